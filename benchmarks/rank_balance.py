"""The per-rank cut: parameter bytes, memory and time per rank, per ``balance`` mode.

torchtitan's llama3 8B and 70B, built on meta in bf16 (nothing allocated), seq 128, one
sequence per micro-batch, traced for CPU, on 8 ranks under DualPipeV (16 stages, rank r
holds stages r and 15-r) and 1F1B (8 stages). For each way to cut:

- ``per stage``: every stage's FLOPs as even as they can be (the cut before ``balance``);
- ``time``, ``memory``, ``both``: ``split(..., balance=...)`` (``both`` is ``compile()``'s default),
  with AdamW state and the schedule's activations in flight (``simulate.in_flight_by_part``);

it prints, as largest rank over the mean: parameter bytes (exact, from the stage graphs),
the memory estimate the cut balances, and forward FLOPs; the largest stage's FLOPs over the
mean; and the simulated makespan of the schedule with every action's cost from its stage's
FLOPs (F = f, B = 2f, I = W = f, F&B = F + B), relative to the per-stage cut. Plus the
seconds the cut took. ``--json FILE`` writes the figures. Never asserts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dualpipe_fx.schedules import generate  # noqa: E402
from dualpipe_fx.planning.simulate import Costs, StageCosts, in_flight_by_part, simulate  # noqa: E402
from dualpipe_fx.api.split import memory_spec  # noqa: E402
from passes.capture import capture  # noqa: E402
from passes.split_stages import split_stages  # noqa: E402

MODES = (None, "time", "memory", "both")


def _model(name: str, seq: int):
    from torchtitan.models.llama3 import Transformer, llama3_args

    args = dataclasses.replace(llama3_args[name], max_seq_len=seq)
    with torch.device("meta"):
        model = Transformer(args).to(torch.bfloat16)
    return model


def _loss(out, target):
    return F.cross_entropy(out.flatten(0, 1).float(), target.flatten())


def _rank_param_bytes(part, model, placement) -> dict[int, int]:
    named = dict(model.named_parameters())
    out: dict[int, int] = {}
    for s, gm in enumerate(part.stages):
        names = {n.meta["dpfx_name"] for n in gm.graph.nodes
                 if n.op == "placeholder" and n.meta.get("dpfx_kind") == "param"}
        out[placement[s]] = out.get(placement[s], 0) + sum(named[n].numel() * named[n].element_size() for n in names)
    return out


def _makespan(program, stage_costs) -> float:
    by_action = {}
    for actions in program.values():
        for action in actions:
            f = {p.stage: stage_costs[program.model_part(p.stage)] for p in action.parts()}
            cost = {"F": 1, "B": 2, "I": 1, "W": 1}
            by_action[action] = sum(cost[p.kind] * f[p.stage] for p in action.parts())
    return simulate(program, StageCosts(base=Costs(F=1, B=2, W=1), by_key={}, by_action=by_action)).makespan


def _ratio(values) -> float:
    values = list(values)
    return max(values) / (sum(values) / len(values))


def measure(models=("8B", "70B"), ranks: int = 8, microbatches: int = 16, seq: int = 128) -> dict:
    results = {}
    for name in models:
        model = _model(name, seq)
        tokens = torch.zeros(1, seq, dtype=torch.long, device="meta")
        captured = capture(model, _loss, (tokens,), tokens, device="cpu")
        for schedule in ("dualpipev", "1f1b"):
            program = generate(schedule, ranks, microbatches)
            placement = {s: r for s, r in sorted(program.stage_to_rank().items())}
            spec = memory_spec("adamw", in_flight_by_part(program))
            rows, base = {}, None
            for mode in MODES:
                start = time.perf_counter()
                part = split_stages(captured, program.num_model_parts, placement=placement, balance=mode, memory=spec)
                seconds = time.perf_counter() - start
                makespan = _makespan(program, part.costs)
                base = base or makespan
                rows[mode or "per stage"] = {
                    "param_bytes": _ratio(_rank_param_bytes(part, model, placement).values()),
                    "largest_rank_param_GiB": max(_rank_param_bytes(part, model, placement).values()) / 2**30,
                    "memory_estimate": _ratio(m for _, m, _ in part.rank_loads.values()),
                    "rank_flops": _ratio(t for t, _, _ in part.rank_loads.values()),
                    "stage_flops": part.balance,
                    "makespan_vs_per_stage": makespan / base,
                    "cut_seconds": seconds,
                }
            results[f"llama3 {name} {schedule}"] = rows
    return results


def _print(results: dict) -> None:
    cols = ("param_bytes", "largest_rank_param_GiB", "memory_estimate", "rank_flops", "stage_flops",
            "makespan_vs_per_stage", "cut_seconds")
    heads = ("params max/mean", "largest (GiB)", "memory max/mean", "rank FLOPs max/mean",
             "stage FLOPs max/mean", "makespan", "cut (s)")
    for case, rows in results.items():
        print(f"\n{case} (8 ranks, 16 micro-batches, bf16, seq 128, AdamW)")
        print("| cut | " + " | ".join(heads) + " |")
        print("|---" * (len(heads) + 1) + "|")
        for mode, row in rows.items():
            print(f"| {mode} | " + " | ".join(f"{row[c]:.3f}" if c != "cut_seconds" else f"{row[c]:.2f}"
                                            for c in cols) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--models", nargs="+", default=["8B", "70B"])
    args = parser.parse_args(argv)
    results = measure(tuple(args.models))
    _print(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
