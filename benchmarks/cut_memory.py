"""The memory-aware cut against the plan: each rank's total memory as ``dualpipe_fx.plan`` counts it.

For each model, 8 ranks under DualPipeV (16 stages), 16 micro-batches, AdamW, one sequence of
``--seq`` tokens (default 2048) per micro-batch, built on meta (nothing allocated) and traced for CPU: the cut
``compile()`` makes with ``MemoryPolicy(balance=...)`` for ``"time"``, ``"memory"`` and
``"both"`` (the default), then ``planning.memory.split_plan`` on the same split (what
``dualpipe_fx.plan`` returns): params + grads + optimizer state + the step's peak (activations
saved for I and kept for W, receive buffers, sent tensors until their release point, one
action's temporaries). Printed per mode: the largest rank's total over the mean, the largest
total (GiB), the cut's own figure for the largest rank over plan()'s, and the simulated makespan
(``planning.simulate``; every action's cost from its stage's FLOPs: F = f, B = 2f, I = W = f)
over ``"time"``'s. Models: torchtitan's llama3 8B and 70B (bf16) and a 7B GPT-style decoder
(fp32: learned positions, LayerNorm, GELU MLP; dim 4096, 32 layers, vocab 50304).
``--recompute selective|full``: the cut and the plan under that policy. ``--json FILE`` writes the
figures. Never asserts.

    PYTHONPATH=$PWD python benchmarks/cut_memory.py --models gpt7b 8B 70B --json /tmp/cut_memory.json

(gpt7b and 8B: about 10 minutes on 2 CPU cores; 70B: longer.)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dualpipe_fx  # noqa: E402
from dualpipe_fx.api.compile import split_for_program  # noqa: E402
from dualpipe_fx.planning.memory import split_plan  # noqa: E402
from dualpipe_fx.planning.simulate import Costs, StageCosts, simulate  # noqa: E402
from dualpipe_fx.schedules import generate  # noqa: E402
from dualpipe_fx.schedules.lowering import RECV_LOOKAHEAD  # noqa: E402

MODES = ("time", "memory", "both")


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A GPT-2-style decoder: token and learned position embeddings, pre-LayerNorm blocks, GELU MLP."""

    def __init__(self, vocab: int = 50304, dim: int = 4096, layers: int = 32, heads: int = 32, seq: int = 128):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.layers = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def _model(name: str, seq: int) -> nn.Module:
    if name == "gpt7b":
        with torch.device("meta"):
            return GPT(seq=seq)
    from torchtitan.models.llama3 import Transformer, llama3_args

    args = dataclasses.replace(llama3_args[name], max_seq_len=seq)
    with torch.device("meta"):
        return Transformer(args).to(torch.bfloat16)


def _loss(out, target):
    return F.cross_entropy(out.flatten(0, 1).float(), target.flatten())


def _makespan(program, stage_costs) -> float:
    by_action = {}
    cost = {"F": 1, "B": 2, "I": 1, "W": 1}
    for actions in program.values():
        for action in actions:
            by_action[action] = sum(cost[p.kind] * stage_costs[program.model_part(p.stage)] for p in action.parts())
    return simulate(program, StageCosts(base=Costs(F=1, B=2, W=1), by_key={}, by_action=by_action)).makespan


def measure(models=("gpt7b", "8B"), ranks: int = 8, microbatches: int = 16, seq: int = 2048, recompute=None) -> dict:
    results = {}
    program = generate("dualpipev", ranks, microbatches)
    for name in models:
        model = _model(name, seq)
        tokens = torch.zeros(1, seq, dtype=torch.long, device="meta")
        rows = {}
        for mode in MODES:
            start = time.perf_counter()
            sp = split_for_program(program, model, _loss, (tokens,), tokens, device="cpu",
                                   memory=dualpipe_fx.MemoryPolicy(balance=mode, recompute=recompute))
            cut_s = time.perf_counter() - start
            mp = split_plan(sp, program, optimizer="adamw", recv_lookahead=RECV_LOOKAHEAD, recompute=recompute)
            totals = {r.rank: r.total for r in mp.ranks}
            top = max(totals, key=totals.get)
            cut = {r: m for r, (_, m, _) in sp.partition.rank_loads.items()}
            rows[mode] = {
                "total_max_over_mean": max(totals.values()) / (sum(totals.values()) / len(totals)),
                "largest_total_GiB": totals[top] / 2**30,
                "largest_rank": top,
                "cut_figure_over_plan": cut[top] / totals[top],
                "makespan": _makespan(program, sp.partition.costs),
                "cut_seconds": cut_s,
                "totals_GiB": [totals[r] / 2**30 for r in sorted(totals)],
            }
            print(name, mode, {k: v for k, v in rows[mode].items() if k != "totals_GiB"}, flush=True)
        for row in rows.values():
            row["makespan_vs_time"] = row["makespan"] / rows["time"]["makespan"]
        results[name] = rows
    return results


def _print(results: dict, seq: int, recompute=None) -> None:
    for name, rows in results.items():
        print(f"\n{name} (DualPipeV, 8 ranks, 16 micro-batches, seq {seq}, AdamW, recompute {recompute})")
        print("| balance | total max/mean (plan) | largest total (GiB) | cut figure / plan | makespan vs time |")
        print("|---|---|---|---|---|")
        for mode, r in rows.items():
            print(f"| {mode} | {r['total_max_over_mean']:.3f} | {r['largest_total_GiB']:.2f} | "
                  f"{r['cut_figure_over_plan']:.3f} | {r['makespan_vs_time']:.3f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--models", nargs="+", default=["gpt7b", "8B", "70B"])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--recompute", choices=["selective", "full"], default=None)
    args = parser.parse_args(argv)
    results = measure(tuple(args.models), seq=args.seq, recompute=args.recompute)
    _print(results, args.seq, args.recompute)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
