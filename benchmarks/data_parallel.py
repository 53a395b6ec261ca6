"""What data parallelism costs: PP=2 x DP=2 (replicate / shard / shard_grad_op) vs PP=2 alone.

4 gloo ranks with 1 thread each; ``LinearGeluStack(depth=8, width=--width)``, the same
per-rank batch (``--batch`` in 8 micro-batches, DualPipeV) in every variant:

- ``pp only``: two independent PP=2 pipelines (ranks 0-1 and 2-3), no data parallelism;
- ``replicate``, ``shard``, ``shard_grad_op``: the same two pipelines as replicas of one
  model over ``dp_group`` = {0, 2} and {1, 3}.

Each round runs every variant in turn (a load change on a shared machine hits all of them)
and times the second of two back-to-back steps (``zero_grad`` + ``step``); the figure is the
median over ``--steps`` rounds after ``--warmup``, the slowest rank's time per round. It
prints each variant's ratio to ``pp only`` and the bytes each rank moves over ``dp_group``
per step (all-reduce: the grads; shard: the all-gather of the parameters plus the
reduce-scatter of the grads, in each rank's 1/N share), and writes ``--json``.

    python benchmarks/data_parallel.py --json /tmp/data_parallel.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dualpipe_fx  # noqa: E402
from dualpipe_fx import examples as ex  # noqa: E402
from tests.runtime.dist_harness import run_ranks  # noqa: E402

PP, DP, DEPTH, MICROBATCHES = 2, 2, 8, 8
VARIANTS = ("pp only", "replicate", "shard", "shard_grad_op")


def _pipelines(rank: int, world: int, width: int, batch: int) -> tuple[dict, tuple]:
    pp_groups = [dist.new_group(list(range(r * PP, (r + 1) * PP))) for r in range(world // PP)]
    dp_groups = [dist.new_group(list(range(i, world, PP))) for i in range(PP)]
    pp, dp = pp_groups[rank // PP], dp_groups[rank % PP]
    x, y = ex.linear_gelu_batch(width, batch, seed=1 + rank // PP)  # each replica its own data
    mb = batch // MICROBATCHES
    pipes = {}
    for variant in VARIANTS:
        model = ex.LinearGeluStack(DEPTH, width, seed=0)
        kwargs = {} if variant == "pp only" else {"dp_group": dp, "dp_mode": variant}
        pipes[variant] = dualpipe_fx.compile(model, ex.mse_loss, (x[:mb],), y[:mb], schedule="dualpipev",
                                             num_microbatches=MICROBATCHES, group=pp, **kwargs)
    return pipes, (x, y)


def _step(pipe, x, y) -> None:
    pipe.zero_grad()
    pipe.step(x, target=y)


def _dp_bytes(pipe, variant: str) -> int:
    """Bytes this rank sends+receives over dp_group per step (ring collectives: 2 (N-1)/N of the buffer)."""
    params = [p for st in pipe.stages.values() for p in st.params[: st.num_params]]
    full = sum(p.numel() * p.element_size() for p in dict.fromkeys(params))
    ring = (DP - 1) / DP
    # replicate: all-reduce = reduce-scatter + all-gather of the grads; shard: all-gather of
    # the parameters + reduce-scatter of the grads: the same bytes, in another order
    return 0 if variant == "pp only" else int(2 * ring * full)


def measure(rank: int, world: int, width: int, batch: int, warmup: int, steps: int) -> dict:
    pipes, (x, y) = _pipelines(rank, world, width, batch)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_ in range(warmup + steps):
        for variant in VARIANTS:
            _step(pipes[variant], x, y)
            dist.barrier()
            start = time.perf_counter()
            _step(pipes[variant], x, y)
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
            if round_ >= warmup:
                times[variant].append(elapsed.item())
    return {"median_s": {v: statistics.median(t) for v, t in times.items()},
            "dp_bytes_per_step": {v: _dp_bytes(pipes[v], v) for v in VARIANTS}}


def report(out: dict, args) -> dict:
    base = out["median_s"]["pp only"]
    print(f"PP={PP} x DP={DP} on 4 gloo ranks (1 thread each), LinearGeluStack({DEPTH}, {args.width}), "
          f"per-rank batch {args.batch} in {MICROBATCHES} micro-batches, dualpipev; load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'variant':<15}{'step ms':>10}{'vs pp only':>12}{'dp MiB/step/rank':>18}")
    for v in VARIANTS:
        t = out["median_s"][v]
        print(f"{v:<15}{t * 1e3:>10.1f}{t / base:>12.3f}{out['dp_bytes_per_step'][v] / 2**20:>18.2f}")
    return {"config": {"pp": PP, "dp": DP, "depth": DEPTH, "width": args.width, "batch": args.batch,
                       "microbatches": MICROBATCHES, "steps": args.steps, "warmup": args.warmup},
            **out, "ratio_to_pp_only": {v: out["median_s"][v] / base for v in VARIANTS}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256, help="per-rank batch (8 micro-batches)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    results = run_ranks(measure, PP * DP, (args.width, args.batch, args.warmup, args.steps), timeout=900)
    figures = report(results[0], args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
