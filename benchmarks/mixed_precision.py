"""Mixed precision's memory, measured: fp32 against ``MixedPrecisionPolicy(bf16, fp32)`` on
the same pipeline, each rank's step counted by the CPU allocator.

``.venv/bin/python benchmarks/mixed_precision.py [--json FILE]``: 2 gloo ranks x 1 thread,
DualPipeV, the built-in ``LlamaDecoder`` (dim 256, 4 layers, seq 256, 8 micro-batches of 1),
``recompute=None``. Per rank and variant:

- **measured peak**: the most bytes one step holds at once above its start, from the
  profiler's allocator events (``profile_memory=True``; ``planning.memory.peak_live_bytes``),
  after a first step and ``zero_grad(set_to_none=False)``, so the step allocates no grads: what
  it holds is activations, boundary tensors, temporaries and, under bf16, the parameters' bf16
  copies cast once per stage and step (freed after its last action);
- **plan**: ``pipe.memory_plan()``'s step peak and its activations (the library's own estimate);
- **step**: the median over rounds of one step, the variants in turn;
- the loss of each (bf16 follows fp32 within bf16's rounding).

Prints a table of bf16 / fp32 ratios and writes JSON. No test asserts its figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dualpipe_fx  # noqa: E402
from dualpipe_fx import examples as ex  # noqa: E402
from dualpipe_fx.planning.memory import allocator_events, peak_live_bytes  # noqa: E402
from tests.runtime.dist_harness import run_ranks  # noqa: E402

C, SEQ = 8, 256
CFG = dict(vocab_size=512, dim=256, n_layers=4, n_heads=4, ffn_hidden=688, max_seq_len=SEQ)
VARIANTS = ("fp32", "bf16")


def _policy(variant: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return None if variant == "fp32" else MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                               reduce_dtype=torch.float32)


def _peak(pipe, x, y) -> int:
    from torch.profiler import ProfilerActivity, profile
    pipe.zero_grad(set_to_none=False)  # the grads stay: the step allocates none
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        pipe.step(x, target=y)
    dist.barrier()
    return peak_live_bytes(allocator_events(prof))["peak"]


def _rank(rank: int, world: int, rounds: int) -> dict:
    cfg = ex.LlamaConfig(**CFG)
    x, y = ex.llama_batch(cfg, batch=C, seq=SEQ, seed=1)
    pipes = {v: dualpipe_fx.compile(ex.LlamaDecoder(cfg, seed=0), ex.llama_loss, (x[:1],), y[:1],
                                    num_microbatches=C, mixed_precision=_policy(v)) for v in VARIANTS}
    out = {v: {"loss": None} for v in VARIANTS}
    for v, pipe in pipes.items():
        loss = pipe.step(x, target=y)  # the first step: grads allocated
        out[v]["loss"] = None if loss is None else loss.item()
        out[v]["peak"] = _peak(pipe, x, y)
        row = pipe.memory_plan().ranks[0]
        out[v].update(plan_peak=row.step_peak, plan_activations=row.activations, params=row.params)
    times = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for v, pipe in pipes.items():
            dist.barrier()
            start = time.perf_counter()
            pipe.step(x, target=y)
            dist.barrier()
            times[v].append(time.perf_counter() - start)
    for v in VARIANTS:
        out[v]["step_s"] = statistics.median(times[v])
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def report(results: list[dict]) -> dict:
    fig = {"config": {**CFG, "microbatches": C, "ranks": len(results), "schedule": "dualpipev"}, "ranks": []}
    print(f"llama dim {CFG['dim']}, {CFG['n_layers']} layers, seq {SEQ}, {C} micro-batches of 1, 2 ranks, "
          "DualPipeV; bytes one step holds at once (MiB)")
    print(f"{'rank':>4} {'variant':>7} {'measured peak':>14} {'plan peak':>10} {'plan acts':>10} "
          f"{'step ms':>8} {'loss':>10}")
    for rank, r in enumerate(results):
        for v in VARIANTS:
            loss = "" if r[v]["loss"] is None else f"{r[v]['loss']:.6f}"
            print(f"{rank:>4} {v:>7} {_mib(r[v]['peak']):>14} {_mib(r[v]['plan_peak']):>10} "
                  f"{_mib(r[v]['plan_activations']):>10} {1e3 * r[v]['step_s']:>8.1f} {loss:>10}")
        ratio = {k: r["bf16"][k] / r["fp32"][k] for k in ("peak", "plan_peak", "plan_activations", "step_s")}
        print(f"{rank:>4} {'bf16/fp32':>7} {ratio['peak']:>14.3f} {ratio['plan_peak']:>10.3f} "
              f"{ratio['plan_activations']:>10.3f} {ratio['step_s']:>8.3f}")
        fig["ranks"].append({**r, "bf16_over_fp32": ratio})
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = run_ranks(_rank, 2, args=(args.rounds,), timeout=900)
    fig = report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=1)


if __name__ == "__main__":
    main()
