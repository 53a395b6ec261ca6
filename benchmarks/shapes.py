"""What a batch of new shapes costs: its first step (trace, cut and build) against a cached step.

2 gloo ranks, ``LlamaDecoder`` (dim 64, 8 layers, vocab 256), 4 micro-batches of 1 sequence,
compiled at sequence length ``--seq``. Per mode (schedule x training / forward-only steps):
two steps at the traced length (the first warms the runtime), then the first step at
``--new-seq`` (a miss: ``Pipeline.step`` traces, cuts at the first build's cut and builds its
program on both ranks) and the median of ``--steps`` steps at it (cached). Prints the ratio
first step / cached step and the build's share of the first step, and writes JSON::

    python benchmarks/shapes.py --json /tmp/shapes.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualpipe_fx import examples as ex  # noqa: E402
from tests.runtime.dist_harness import run_ranks  # noqa: E402

C = 4
MODES = (("dualpipev", "train"), ("dualpipev", "forward"), ("1f1b", "train"), ("zbv", "train"))


def _timed_step(pipe, x, y, forward: bool) -> float:
    start = time.perf_counter()
    with torch.no_grad() if forward else torch.enable_grad():
        pipe.step(x, target=y)
    return time.perf_counter() - start


def measure(rank: int, world: int, seq: int, new_seq: int, steps: int) -> dict:
    import dualpipe_fx

    cfg = ex.LlamaConfig(max_seq_len=max(seq, new_seq))
    out = {}
    for schedule, kind in MODES:
        forward = kind == "forward"
        x, y = ex.llama_batch(cfg, batch=C, seq=seq, seed=1)
        start = time.perf_counter()
        pipe = dualpipe_fx.compile(ex.LlamaDecoder(cfg, seed=0), ex.llama_loss, (x[:1],), y[:1], schedule=schedule,
                                   num_microbatches=C)
        compile_s = time.perf_counter() - start
        traced = [_timed_step(pipe, x, y, forward) for _ in range(2)]
        x2, y2 = ex.llama_batch(cfg, batch=C, seq=new_seq, seed=2)
        first = _timed_step(pipe, x2, y2, forward)
        assert pipe._shapes.builds == 1, pipe._shapes.builds
        cached = statistics.median(_timed_step(pipe, x2, y2, forward) for _ in range(steps))
        out[f"{schedule} {kind}"] = {"compile_s": compile_s, "traced_step_s": traced[1], "first_step_s": first,
                                     "cached_step_s": cached}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-seq", type=int, default=192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = run_ranks(measure, 2, (args.seq, args.new_seq, args.steps), timeout=1800)
    print(f"2 ranks, llama dim 64 x 8 layers, {C} micro-batches; traced at seq {args.seq}, new seq {args.new_seq}")
    print(f"{'mode':<20} {'compile()':>10} {'first step':>11} {'cached step':>12} {'first/cached':>13}")
    for mode in results[0]:
        r = {k: max(res[mode][k] for res in results) for k in results[0][mode]}  # the slower rank
        print(f"{mode:<20} {r['compile_s']:>9.2f}s {r['first_step_s']:>10.2f}s {r['cached_step_s'] * 1e3:>10.1f}ms "
              f"{r['first_step_s'] / r['cached_step_s']:>12.0f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "ranks": results},
                                        indent=2))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
