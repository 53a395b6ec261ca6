"""Built-in example models for benchmarks, the README and tests.

- ``LlamaDecoder``: a llama-style decoder (token embedding, RMSNorm, RoPE + causal SDPA
  attention, SwiGLU MLP, untied LM head), with ``llama_loss`` (cross-entropy) and
  ``llama_batch``.
- ``LinearGeluStack``: ``depth`` x (Linear + GELU), with ``mse_loss`` and
  ``linear_gelu_batch``; the step-time benchmark's model.

All constructors take a ``seed`` so two builds with the same arguments hold the same
weights; all batches are drawn from a seeded generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    """Sizes of ``LlamaDecoder``; the defaults are small so that CPU runs take seconds."""

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 8
    n_heads: int = 4
    ffn_hidden: int = 172
    max_seq_len: int = 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"LlamaConfig: dim={self.dim} must split into n_heads={self.n_heads} heads "
                f"of an even size; pick dim a multiple of 2*n_heads"
            )


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned per-channel scale."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * rms * self.weight


def _rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    # cos, sin: [max_seq_len, head_dim // 2]
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (even, odd) of ``x: [b, heads, seq, head_dim]`` by position."""
    seq = x.shape[-2]
    cos, sin = cos[:seq], sin[:seq]
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    rot_even = x_even * cos - x_odd * sin
    rot_odd = x_even * sin + x_odd * cos
    # in the tables' dtype (fp32), back to x's: bf16 q and k, as v (SDPA wants one dtype)
    return torch.stack((rot_even, rot_odd), dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE, through ``scaled_dot_product_attention``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape  # [b, s, dim] -> [b, heads, s, head_dim]
        return x.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q = apply_rope(self._heads(self.wq(x)), cos, sin)
        k = apply_rope(self._heads(self.wk(x)), cos, sin)
        v = self._heads(self.wv(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, d))


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: attention then SwiGLU MLP."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class LlamaDecoder(nn.Module):
    """A llama-style decoder: ``tok_embeddings``, ``layers.{i}``, ``norm``, untied ``output``.

    ``forward(tokens: [b, s] int64) -> logits: [b, s, vocab]``. The RoPE tables are
    non-persistent buffers (``rope_cos``, ``rope_sin``).
    """

    def __init__(self, cfg: LlamaConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg = cfg or LlamaConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = _rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_parameters(self) -> None:
        """The root's own tensors: the RoPE tables (non-persistent: in no checkpoint), recomputed
        in place. With each submodule's own ``reset_parameters``, a model built under
        ``torch.device("meta")`` needs no ``param_init_fn`` in ``dualpipe_fx.compile``."""
        cos, sin = _rope_tables(self.cfg.dim // self.cfg.n_heads, self.cfg.max_seq_len, self.cfg.rope_theta)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.rope_cos, self.rope_sin)
        return self.output(self.norm(h))


def llama_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: ``logits: [b, s, vocab]``, ``target: [b, s]``."""
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1))


def llama_batch(
    cfg: LlamaConfig | None = None, batch: int = 2, seq: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded ``(tokens, target)`` pair, both ``[batch, seq]`` int64 in ``[0, vocab)``."""
    cfg = cfg or LlamaConfig()
    if seq > cfg.max_seq_len:
        raise ValueError(f"llama_batch: seq={seq} exceeds max_seq_len={cfg.max_seq_len}; "
                         f"lower seq or raise LlamaConfig.max_seq_len")
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class LinearGeluStack(nn.Module):
    """``depth`` x (Linear(width, width) + GELU), modules ``layers.{i}.linear``."""

    def __init__(self, depth: int = 8, width: int = 1024, seed: int = 0) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"LinearGeluStack: depth={depth}, width={width}; both must be >= 1")
        self.width = width
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.layers = nn.ModuleList(_LinearGelu(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class _LinearGelu(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.linear(x))


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, the ``LinearGeluStack`` loss."""
    return F.mse_loss(output, target)


def linear_gelu_batch(
    width: int = 1024, batch: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded ``(x, target)`` pair, both ``[batch, width]`` float32."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, width, generator=gen), torch.randn(batch, width, generator=gen)


def example_batch(model: nn.Module, batch: int = 2, seq: int = 16, seed: int = 0):
    """A seeded ``(input, target)`` pair that fits a built-in example ``model``."""
    if isinstance(model, LlamaDecoder):
        return llama_batch(model.cfg, batch=batch, seq=seq, seed=seed)
    if isinstance(model, LinearGeluStack):
        return linear_gelu_batch(model.width, batch=batch, seed=seed)
    raise TypeError(f"example_batch: got {type(model).__name__}; expected LlamaDecoder or "
                    f"LinearGeluStack (build batches for other models yourself)")
