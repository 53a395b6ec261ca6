"""What the ranks' agreements cost, on benchmarks/step_time.py's configuration.

2 gloo ranks, ``LinearGeluStack(depth=8, width=1024)`` (34 MB of parameters), batch 512 in
8 micro-batches, dualpipev. It prints:

- compile(): seconds with ``verify_weights`` True and False (median of ``--compiles``
  each), and the checksum of every parameter alone, as a share of compile time;
- step(): the median step, and the median of the per-step agreement alone (the two
  ``agree.vote`` all-reduces every step runs: inputs checked, step outcome), timed over
  ``--votes`` back-to-back rounds, as a share of the step.

    python benchmarks/agreement.py --json /tmp/agreement.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualpipe_fx import examples as ex  # noqa: E402
from tests.runtime.dist_harness import run_ranks  # noqa: E402

DEPTH, WIDTH, BATCH, MICROBATCHES = 8, 1024, 512, 8


def _compile(verify: bool):
    import dualpipe_fx
    x, y = ex.linear_gelu_batch(WIDTH, BATCH)
    mb = BATCH // MICROBATCHES
    model = ex.LinearGeluStack(DEPTH, WIDTH)
    start = time.perf_counter()
    pipe = dualpipe_fx.compile(model, ex.mse_loss, (x[:mb],), y[:mb], schedule="dualpipev",
                               num_microbatches=MICROBATCHES, verify_weights=verify)
    return pipe, model, x, y, time.perf_counter() - start


def measure(rank: int, world: int, compiles: int, steps: int, votes: int) -> dict:
    from dualpipe_fx.runtime import agree
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(compiles):
        for verify in (False, True):
            pipe, model, x, y, took = _compile(verify)
            seconds[verify].append(took)
    state = model.state_dict()
    start = time.perf_counter()
    for t in state.values():
        agree.checksum(t)
    checksum_s = time.perf_counter() - start
    step_times = []
    for _ in range(steps):
        pipe.zero_grad()
        start = time.perf_counter()
        pipe.step(x, target=y)
        step_times.append(time.perf_counter() - start)
    vote_times = []
    timeout = timedelta(seconds=60)
    for _ in range(votes):
        dist.barrier()
        start = time.perf_counter()
        agree.vote(None, None, timeout, "inputs")
        agree.vote(None, None, timeout, "outcome")
        vote_times.append(time.perf_counter() - start)
    return {"compile_s": {str(k): statistics.median(v) for k, v in seconds.items()},
            "checksum_s": checksum_s, "param_bytes": sum(t.numel() * t.element_size() for t in state.values()),
            "step_s": statistics.median(step_times[1:]), "votes_s": statistics.median(vote_times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compiles", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--votes", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = run_ranks(measure, 2, (args.compiles, args.steps, args.votes), timeout=1200)
    for rank, r in enumerate(results):
        compile_s = r["compile_s"]["True"]
        print(f"rank {rank}: compile {r['compile_s']['False']:.3f} s (verify_weights=False), "
              f"{compile_s:.3f} s (True); checksum of {r['param_bytes'] / 2**20:.0f} MiB "
              f"{r['checksum_s'] * 1e3:.2f} ms = {100 * r['checksum_s'] / compile_s:.2f}% of compile")
        print(f"rank {rank}: step {r['step_s'] * 1e3:.1f} ms; the step's two votes {r['votes_s'] * 1e6:.0f} us "
              f"= {100 * r['votes_s'] / r['step_s']:.3f}% of the step")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
