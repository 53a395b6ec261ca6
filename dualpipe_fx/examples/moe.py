"""A small mixture-of-experts decoder whose experts are sharded over an expert-parallel group.

``MoEDecoder`` is transformer-ish: token embedding, then ``n_layers`` blocks of
(RMSNorm, causal self-attention, residual; RMSNorm, top-k routed MoE feed-forward,
residual), a final norm and an LM head; ``moe_loss`` is cross-entropy.

Expert parallelism (EP): the ``n_experts`` experts are split into ``ep_size`` equal
shards; rank ``r`` of the EP group holds experts ``r*E_local .. (r+1)*E_local-1``. Each
EP rank routes its own tokens and exchanges them with ``all_to_all`` through the
*functional* collectives (``_c10d_functional.all_to_all_single`` then ``wait_tensor``),
which trace into an FX graph and have autograd (the backward is the reverse
all_to_all). With no group, or a group of size 1, no collective runs and the model is
the dense single-process model, bit for bit.

Routing is static-shaped so that the model traces: every expert has a buffer of
``capacity = tokens`` slots (a token picks an expert at most once, so nothing is ever
dropped and a token's output does not depend on how the batch is sharded):

```
x: [T, D]  --router, top-k-->  expert ids [T, k], weights [T, k]
slot(t, j) = e(t, j) * T + (rank of t among the tokens routed to e(t, j))
buf: [E, T, D]   buf[slot(t, j)] = x[t]           (gather; empty slots read a zero row)
  --all_to_all-->  [ep, E_local, T, D]  -> per local expert: [E_local, ep*T, D] -> MLP
  --all_to_all-->  [E, T, D]
y[t] = sum_j weight(t, j) * out[slot(t, j)]
```

Gradients under EP: every rank differentiates the mean loss of its own tokens. The
experts' grads arrive summed over the EP group (through the reverse all_to_all); the
replicated (non-expert) parameters need an all-reduce. ``ep_average_grads`` turns both
into the gradient of the mean of the EP ranks' losses, which equals the single-process
model's gradient on the concatenated batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dualpipe_fx import _compat


@dataclass(frozen=True)
class MoEConfig:
    """Sizes of ``MoEDecoder``; the defaults are small so that CPU runs take milliseconds."""

    vocab_size: int = 64
    dim: int = 32
    n_layers: int = 4
    n_heads: int = 2
    n_experts: int = 4
    top_k: int = 2
    expert_hidden: int = 64
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"MoEConfig: dim={self.dim} is not a multiple of n_heads={self.n_heads}; "
                             f"pick dim divisible by n_heads")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"MoEConfig: top_k={self.top_k} must be in 1..n_experts={self.n_experts}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class CausalAttention(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        # q, k, v: [b, heads, s, head_dim]
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


def _ep_rank_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class MoEFeedForward(nn.Module):
    """Top-k routed experts (SiLU MLPs); this rank holds ``n_experts / ep_size`` of them."""

    def __init__(self, cfg: MoEConfig, group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        self.ep_rank, self.ep_size = _ep_rank_size(group)
        if cfg.n_experts % self.ep_size:
            raise ValueError(f"MoEFeedForward: n_experts={cfg.n_experts} does not split over an EP "
                             f"group of {self.ep_size} ranks; pick n_experts a multiple of it")
        # The group's name is what the functional collectives take (a str traces into the graph).
        self.group_name = group.group_name if group is not None and self.ep_size > 1 else None
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.n_local = cfg.n_experts // self.ep_size
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        # Stacked local expert weights: w1 [E_local, dim, hidden], w2 [E_local, hidden, dim].
        self.w1 = nn.Parameter(torch.empty(self.n_local, cfg.dim, cfg.expert_hidden))
        self.w2 = nn.Parameter(torch.empty(self.n_local, cfg.expert_hidden, cfg.dim))

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, D] -> slot index [T, k] into the flat [E*T] buffer, combine weights [T, k]."""
        t = x.shape[0]
        top_logits, expert = self.router(x).topk(self.top_k, dim=-1)
        weight = top_logits.softmax(dim=-1)
        # Position of each (token, choice) among the tokens routed to the same expert,
        # counted in token order: cumsum over the flattened one-hot [T*k, E].
        onehot = F.one_hot(expert.reshape(-1), self.n_experts)
        position = ((onehot.cumsum(0) - 1) * onehot).sum(-1).view(t, self.top_k)
        return expert * t + position, weight

    def _experts(self, buf: torch.Tensor) -> torch.Tensor:
        """buf: [ep, E_local, C, D] (C slots from each EP rank) -> same shape, after the MLPs."""
        ep, n_local, c, d = buf.shape
        h = buf.permute(1, 0, 2, 3).reshape(n_local, ep * c, d)
        h = torch.bmm(F.silu(torch.bmm(h, self.w1)), self.w2)
        return h.view(n_local, ep, c, d).permute(1, 0, 2, 3)

    def _exchange(self, buf: torch.Tensor) -> torch.Tensor:
        """The EP all_to_all of a [E, C, D] buffer along its expert dim (equal splits)."""
        if self.group_name is None:
            return buf
        flat = buf.reshape(buf.shape[0] * buf.shape[1], buf.shape[2])
        sizes = [flat.shape[0] // self.ep_size] * self.ep_size
        out = _compat.functional_all_to_all_single(flat, sizes, sizes, self.group_name)
        return _compat.functional_wait_tensor(out).view(buf.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        t, d = x.shape
        slot, weight = self._route(x)
        # token_of_slot: [E*T] token index, or T (a zero row) for an empty slot.
        token_of_slot = torch.full((self.n_experts * t,), t, dtype=torch.long, device=x.device)
        token_ids = torch.arange(t, device=x.device).repeat_interleave(self.top_k)
        token_of_slot = token_of_slot.scatter(0, slot.reshape(-1), token_ids)
        padded = torch.cat([x, x.new_zeros(1, d)])
        buf = padded[token_of_slot].view(self.n_experts, t, d)
        buf = self._exchange(buf).view(self.ep_size, self.n_local, t, d)
        out = self._exchange(self._experts(buf).reshape(self.n_experts, t, d))
        y = (out.reshape(-1, d)[slot] * weight.unsqueeze(-1)).sum(1)
        return y.view(shape)


class MoEBlock(nn.Module):
    def __init__(self, cfg: MoEConfig, group: Optional[dist.ProcessGroup]) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = CausalAttention(cfg)
        self.moe_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.moe = MoEFeedForward(cfg, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.moe(self.moe_norm(x))


class MoEDecoder(nn.Module):
    """Token ids ``[b, s]`` -> logits ``[b, s, vocab]``; experts sharded over ``group``.

    Args:
        cfg: sizes.
        seed: every rank builds the full model from this seed, then keeps its expert shard,
            so the shards of an EP group together are exactly the dense model's experts.
        group: the expert-parallel process group (None: all experts local, no collective).
    """

    def __init__(self, cfg: MoEConfig = MoEConfig(), seed: int = 0,
                 group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(MoEBlock(cfg, group) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._init_weights(seed)

    def _init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(("w1", "w2")):
                    moe = self.get_submodule(name.rsplit(".", 1)[0])
                    full = torch.randn((moe.n_experts, *p.shape[1:]), generator=gen) / p.shape[1] ** 0.5
                    p.copy_(full[moe.ep_rank * moe.n_local:(moe.ep_rank + 1) * moe.n_local])
                elif name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def moe_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; logits: [b, s, vocab], target: [b, s]."""
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def moe_batch(cfg: MoEConfig, batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random (tokens, target) pair, both ``[batch, seq]`` int64."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    return tokens, torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)


def is_expert_param(name: str) -> bool:
    """Whether the parameter FQN is an expert weight (sharded over EP, not replicated)."""
    return name.endswith((".moe.w1", ".moe.w2"))


def expert_shard(name: str, full: torch.Tensor, ep_rank: int, ep_size: int) -> torch.Tensor:
    """The slice of a dense model's tensor ``full`` that EP rank ``ep_rank`` holds."""
    if not is_expert_param(name):
        return full
    n = full.shape[0] // ep_size
    return full[ep_rank * n:(ep_rank + 1) * n]


def ep_average_grads(named_params, group: Optional[dist.ProcessGroup]) -> None:
    """Turn per-rank grads (each rank's own mean loss) into grads of the EP-mean loss.

    Expert grads already hold the sum over the group's losses: divide by the group size.
    Replicated grads hold this rank's loss only: all-reduce (sum), then divide.
    """
    _, size = _ep_rank_size(group)
    if size == 1:
        return
    for name, p in named_params:
        if p.grad is None:
            continue
        if not is_expert_param(name):
            dist.all_reduce(p.grad, group=group)
        p.grad.div_(size)
