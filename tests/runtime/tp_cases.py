"""Tensor parallelism beside the pipeline: a small decoder, its TP plan, and the rank functions
(top level, so spawned ranks can import them).

The decoder is llama-shaped (RMSNorm, attention with q/k/v/o, SwiGLU MLP), and its plan is
torchtitan's for llama3 (Megatron TP with sequence parallelism): the embedding rowwise over the
vocabulary with a sequence-sharded output, norms under ``SequenceParallel``, attention and MLP
inputs gathered by ``PrepareModuleInput``, q/k/v and w1/w3 colwise, o and w2 rowwise back to
sequence shards, the head colwise from sequence shards to replicated logits.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dualpipe_fx

VOCAB, DIM, HEADS, HIDDEN, LAYERS, SEQ = 32, 16, 4, 32, 4, 8
C = 4  # micro-batches per step


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head_dim = DIM // HEADS
        self.wq, self.wk, self.wv = (nn.Linear(DIM, DIM, bias=False) for _ in range(3))
        self.wo = nn.Linear(DIM, DIM, bias=True)

    def forward(self, x):
        b, s, _ = x.shape
        # -1 heads: under TP each rank holds HEADS / tp of them (local tensors)
        q, k, v = (w(x).view(b, s, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(DIM, HIDDEN, bias=False), nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(DIM), Attention()
        self.ffn_norm, self.feed_forward = RMSNorm(DIM), FeedForward()

    def forward(self, h):
        h = h + self.attention(self.attention_norm(h))
        return h + self.feed_forward(self.ffn_norm(h))


class Decoder(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tok_embeddings = nn.Embedding(VOCAB, DIM)
            self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
            self.norm = RMSNorm(DIM)
            self.output = nn.Linear(DIM, VOCAB, bias=False)
            for p in self.parameters():  # norms away from ones: their grads must be right too
                if p.dim() == 1:
                    nn.init.normal_(p, 1.0, 0.1)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def loss_fn(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (2 * C, SEQ), generator=gen)
    return x, torch.randint(0, VOCAB, (2 * C, SEQ), generator=gen)


def plan() -> dict:
    """torchtitan's llama3 TP plan (with sequence parallelism), module FQN -> style."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    out = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
           "norm": SequenceParallel(),
           "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}
    for i in range(LAYERS):
        out.update({
            f"layers.{i}.attention_norm": SequenceParallel(),
            f"layers.{i}.attention": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            f"layers.{i}.attention.wq": ColwiseParallel(),
            f"layers.{i}.attention.wk": ColwiseParallel(),
            f"layers.{i}.attention.wv": ColwiseParallel(),
            f"layers.{i}.attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            f"layers.{i}.ffn_norm": SequenceParallel(),
            f"layers.{i}.feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                                           desired_input_layouts=(Replicate(),)),
            f"layers.{i}.feed_forward.w1": ColwiseParallel(),
            f"layers.{i}.feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            f"layers.{i}.feed_forward.w3": ColwiseParallel(),
        })
    return out


def reference(steps: int = 3, lr: float = 0.1):
    """One process, the unsplit model: per step the loss and the grads, SGD between steps."""
    model = Decoder()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = batch()
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        out.append({"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}})
        opt.step()
    return out


def _meshes():
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    return mesh["pp"].get_group(), mesh["tp"]


def pp_x_tp(rank, world, schedules=("dualpipev", "1f1b"), steps: int = 3, lr: float = 0.1):
    """PP=2 x TP=2: ranks 2 * pp + tp; each schedule trains ``steps`` SGD steps. Returns, per
    schedule, each step's loss (None off the loss rank) and gathered grads, the parameters'
    types and placements, and how many F&B pairs ran merged."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    pp_group, tp_mesh = _meshes()
    x, y = batch()
    out = {}
    for schedule in schedules:
        model = parallelize_module(Decoder(), tp_mesh, plan())
        pipe = dualpipe_fx.compile(model, loss_fn, (x[:2],), y[:2], schedule=schedule, num_microbatches=C,
                                   group=pp_group)
        opt = torch.optim.SGD(pipe.parameters(), lr=lr)
        params = dict(pipe.named_parameters())
        kinds = {n: (type(p).__name__, tuple(map(repr, p.placements)) if isinstance(p, DTensor) else None,
                     tuple(p.shape)) for n, p in params.items()}
        trace = []
        for _ in range(steps):
            opt.zero_grad()
            loss = pipe.step(x, target=y)
            grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in params.items()}
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 1e9)
            trace.append({"loss": None if loss is None else loss.item(), "grads": grads,
                          "norm": norm.full_tensor().item() if isinstance(norm, DTensor) else norm.item()})
            opt.step()
        out[schedule] = {"steps": trace, "kinds": kinds}
    return out


def _collectives(gm) -> list[str]:
    """The collective ops a graph calls, in order (``wait_tensor`` left out)."""
    from passes._compat import is_functional_collective
    return [str(n.target).split(".")[1] + "." + str(n.target).split(".")[2] for n in gm.graph.nodes
            if is_functional_collective(n)]


def graph_collectives(rank, world, schedule="dualpipev"):
    """Per stage this rank runs: the collectives in F, I and W, and the route ops in F; and
    the number of F&B pairs that ran as one multiplexed graph in one step."""
    from torch.distributed.tensor.parallel import parallelize_module

    pp_group, tp_mesh = _meshes()
    x, y = batch()
    pipe = dualpipe_fx.compile(parallelize_module(Decoder(), tp_mesh, plan()), loss_fn, (x[:2],), y[:2],
                               schedule=schedule, num_microbatches=C, group=pp_group)
    out = {}
    for s, stage in pipe.stages.items():
        g = stage.flat_graphs
        out[s] = {"F": _collectives(g.forward.gm), "I": _collectives(g.backward_input.gm),
                  "W": _collectives(g.backward_weight.gm)}
    pipe.step(x, target=y)
    runner = pipe._executor.overlap
    out["multiplexed"] = sum(gm is not None for gm in runner._graphs.values()) if runner is not None else 0
    return out
