"""A small, seeded model zoo for the pass and runtime tests, plus a hypothesis strategy.

Every builder returns a :class:`Case`: ``model``, ``loss_fn``, ``inputs`` (tuple),
``target``; the same ``seed`` always gives the same weights and batch. Sizes are tiny so
that tracing and running stay fast on 2 CPU cores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dualpipe_fx.examples import LlamaConfig, LlamaDecoder, llama_batch, llama_loss


@dataclass
class Case:
    """One model with its loss and one example micro-batch."""

    name: str
    model: nn.Module
    loss_fn: Callable
    inputs: tuple
    target: Optional[torch.Tensor]


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _randint(seed: int, high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


def token_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1))


# --------------------------------------------------------------------------------------
# Custom autograd Functions whose backward is NOT the autograd of their forward


class StraightThroughRound(torch.autograd.Function):
    """forward: round to a 1/scale grid; backward: identity (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.round(x * scale) / scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class ScaledMul(torch.autograd.Function):
    """forward: ``(x * w, x + w)``; backward: the true grads, with d/dx doubled on purpose."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, factor: float):
        ctx.save_for_backward(x, w)
        ctx.factor = factor
        return x * w, x + w

    @staticmethod
    def backward(ctx, g_mul: torch.Tensor, g_add: torch.Tensor):
        x, w = ctx.saved_tensors
        gx = ctx.factor * (g_mul * w + g_add)
        gw = (g_mul * x + g_add).sum(dim=tuple(range(g_mul.dim() - w.dim())))
        return gx, gw, None


# --------------------------------------------------------------------------------------
# Building blocks


class RMSNormLayer(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(kind: str, dim: int) -> nn.Module:
    return {"none": nn.Identity, "layer": nn.LayerNorm, "rms": nn.RMSNorm,
            "rms_manual": RMSNormLayer}[kind](dim)


class MLPBlock(nn.Module):
    """``x (+) fc2(act(fc1(norm(x))))``; ``act`` may be a custom Function."""

    def __init__(self, dim: int, hidden: int, residual: bool, norm: str, custom: str = "none"):
        super().__init__()
        self.norm = _norm(norm, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.residual, self.custom = residual, custom
        if custom == "scaled_mul":
            self.gate = nn.Parameter(torch.randn(hidden) * 0.1 + 1.0)

    def forward(self, x):
        h = F.gelu(self.fc1(self.norm(x)))
        if self.custom == "ste":
            h = StraightThroughRound.apply(h, 8.0)
        elif self.custom == "scaled_mul":
            prod, total = ScaledMul.apply(h, self.gate, 2.0)
            h = prod + 0.1 * total
        out = self.fc2(h)
        return x + out if self.residual else out


class AttentionBlock(nn.Module):
    """Pre-norm causal SDPA self-attention with RoPE, residual."""

    def __init__(self, dim: int, heads: int, norm: str, max_seq: int = 16):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.norm = _norm(norm, dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        pos = torch.arange(max_seq, dtype=torch.float32)[:, None]
        freqs = 1.0 / 10000 ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd)
        self.register_buffer("cos", (pos * freqs).cos(), persistent=False)
        self.register_buffer("sin", (pos * freqs).sin(), persistent=False)

    def _rope(self, x):  # x: [b, heads, s, hd]
        s = x.shape[-2]
        cos, sin = self.cos[:s], self.sin[:s]
        ev, od = x[..., 0::2], x[..., 1::2]
        return torch.stack((ev * cos - od * sin, ev * sin + od * cos), -1).flatten(-2)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self._rope(q), self._rope(k), v, is_causal=True)
        return x + self.proj(out.transpose(1, 2).reshape(b, s, d))


# --------------------------------------------------------------------------------------
# Zoo


class ResidualMLP(nn.Module):
    def __init__(self, dim=16, hidden=32, depth=3, residual=True, norm="none", custom="none"):
        super().__init__()
        self.blocks = nn.ModuleList(MLPBlock(dim, hidden, residual, norm, custom) for _ in range(depth))
        self.head = nn.Linear(dim, dim)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def residual_mlp(seed: int = 0, depth: int = 3, norm: str = "none", custom: str = "none",
                 residual: bool = True) -> Case:
    model = _seeded(seed, lambda: ResidualMLP(depth=depth, norm=norm, custom=custom, residual=residual))
    return Case(f"mlp-{norm}-{custom}", model, mse, (_randn(seed + 1, 4, 16),), _randn(seed + 2, 4, 16))


def norm_blocks(seed: int = 0, norm: str = "layer") -> Case:
    """LayerNorm (``norm='layer'``), nn.RMSNorm (``'rms'``) or hand-written RMSNorm blocks."""
    return residual_mlp(seed, depth=3, norm=norm)


class TinyLM(nn.Module):
    """Token embedding, attention + MLP blocks, final norm, LM head (tied if ``tied``)."""

    def __init__(self, vocab=32, dim=16, depth=2, heads=2, norm="rms", tied=False, custom="none",
                 residual=True, attention=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layers = []
        for _ in range(depth):
            if attention:
                layers.append(AttentionBlock(dim, heads, norm))
            layers.append(MLPBlock(dim, 2 * dim, residual, norm, custom))
        self.layers = nn.ModuleList(layers)
        self.norm = _norm(norm, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


def tiny_lm(seed: int = 0, tied: bool = False, depth: int = 2, norm: str = "rms", custom: str = "none",
            attention: bool = True, residual: bool = True) -> Case:
    model = _seeded(seed, lambda: TinyLM(depth=depth, norm=norm, tied=tied, custom=custom,
                                         attention=attention, residual=residual))
    return Case(f"lm-tied{tied}-{norm}-{custom}", model, token_ce, (_randint(seed + 1, 32, 2, 8),),
                _randint(seed + 2, 32, 2, 8))


def tiny_llama(seed: int = 0, n_layers: int = 2) -> Case:
    """The benchmark llama decoder (``dualpipe_fx.examples``) at a tiny size."""
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=n_layers, n_heads=2, ffn_hidden=48, max_seq_len=16)
    tokens, target = llama_batch(cfg, batch=2, seq=8, seed=seed)
    return Case("llama", LlamaDecoder(cfg, seed=seed), llama_loss, (tokens,), target)


class EncoderModel(nn.Module):
    def __init__(self, dim=16, heads=2, layers=2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        return self.head(self.encoder(x))


def transformer_encoder(seed: int = 0) -> Case:
    """``nn.TransformerEncoder`` in train mode (dropout 0 so that runs are comparable)."""
    model = _seeded(seed, EncoderModel).train()
    return Case("encoder", model, mse, (_randn(seed + 1, 2, 6, 16),), _randn(seed + 2, 2, 6, 4))


class BufferModel(nn.Module):
    """A persistent buffer (per-channel scale) and a non-persistent one (offset)."""

    def __init__(self, dim=8):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim))
        self.register_buffer("offset", torch.full((dim,), 0.25), persistent=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x) * self.scale + self.offset))


def buffers(seed: int = 0) -> Case:
    return Case("buffers", _seeded(seed, BufferModel), mse, (_randn(seed + 1, 3, 8),), _randn(seed + 2, 3, 8))


def custom_function(seed: int = 0, kind: str = "scaled_mul") -> Case:
    """An MLP whose blocks call a custom autograd Function (``ste`` or ``scaled_mul``)."""
    return residual_mlp(seed, depth=2, custom=kind)


class DataDependent(nn.Module):
    """Python control flow on a tensor value: cannot be captured as one static graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:  # DATA-DEPENDENT-LINE
            h = h * 2
        return h


def data_dependent(seed: int = 0) -> Case:
    return Case("data-dependent", _seeded(seed, DataDependent), mse, (_randn(seed + 1, 2, 4),),
                _randn(seed + 2, 2, 4))


class NoGradModel(nn.Module):
    """Part of forward under ``torch.no_grad()`` (export wraps it in a higher-order op)."""

    def __init__(self, dim=8):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        h = self.a(x)
        with torch.no_grad():
            scale = self.b(h).abs().mean() + 1
        return self.c(h / scale) + h.detach()


def no_grad_part(seed: int = 0) -> Case:
    """``b``'s params get no grad from autograd (None); the passes give zeros."""
    return Case("no-grad", _seeded(seed, NoGradModel), mse, (_randn(seed + 1, 4, 8),), _randn(seed + 2, 4, 8))


class BatchNormModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


def batchnorm(seed: int = 0, train: bool = True) -> Case:
    model = _seeded(seed, BatchNormModel).train(train)
    return Case("batchnorm", model, mse, (_randn(seed + 1, 4, 4),), _randn(seed + 2, 4, 4))


def zoo(seed: int = 0) -> list[Case]:
    """Every traceable model of the zoo once."""
    return [
        residual_mlp(seed), norm_blocks(seed, "layer"), norm_blocks(seed, "rms"),
        norm_blocks(seed, "rms_manual"), tiny_lm(seed), tiny_lm(seed, tied=True), tiny_llama(seed),
        transformer_encoder(seed), buffers(seed), custom_function(seed, "ste"),
        custom_function(seed, "scaled_mul"), batchnorm(seed, train=False),
    ]


# --------------------------------------------------------------------------------------
# Hypothesis strategy


def random_cases():
    """A hypothesis strategy of random MLPs and small transformers.

    Varies depth, width, residuals, norms, tied weights and custom Functions.
    """
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        seed = draw(st.integers(0, 2**16))
        norm = draw(st.sampled_from(["none", "layer", "rms", "rms_manual"]))
        custom = draw(st.sampled_from(["none", "none", "ste", "scaled_mul"]))
        residual = draw(st.booleans())
        depth = draw(st.integers(1, 3))
        if draw(st.booleans()):
            dim = draw(st.sampled_from([8, 16]))
            model = _seeded(seed, lambda: _WideMLP(dim, depth, residual, norm, custom))
            return Case(f"rand-mlp-d{depth}-w{dim}-{norm}-{custom}-r{residual}", model, mse,
                        (_randn(seed + 1, 3, dim),), _randn(seed + 2, 3, dim))
        tied = draw(st.booleans())
        attention = draw(st.booleans())
        case = tiny_lm(seed, tied=tied, depth=depth, norm=norm, custom=custom, attention=attention,
                       residual=residual)
        case.name = f"rand-lm-d{depth}-{norm}-{custom}-tied{tied}-attn{attention}-r{residual}"
        return case

    return build()


class _WideMLP(ResidualMLP):
    def __init__(self, dim, depth, residual, norm, custom):
        nn.Module.__init__(self)
        self.blocks = nn.ModuleList(MLPBlock(dim, 2 * dim, residual, norm, custom) for _ in range(depth))
        self.head = nn.Linear(dim, dim)
