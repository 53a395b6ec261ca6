"""The memory plan against the published per-device figures of DualPipe's README.

DeepSeek's DualPipe README (and the DeepSeek-V3 report's Table 2) compare schedules "based on
the same number of PP stages": parameters per device in units of one stage's parameters, and
activations per device in units of one micro-batch's activations of one stage:

| schedule | parameters | activations | devices |
|---|---|---|---|
| 1F1B | 1x | PP | PP |
| ZB1P | 1x | PP | PP |
| DualPipe | 2x | PP + 1 | PP |
| DualPipeV | 2x | PP + 1 | PP / 2 |

This script plans (``dualpipe_fx.plan``: the graphs, nothing runs) a uniform stack of
``Linear -> GELU`` layers, one per stage (``split_points``), with PP stages and 20 micro-batches, and prints the
same two columns from the plan: the largest rank's parameters over one stage's, and its peak
of activations held for the backward (``RankMemory.peak_activations``: what F saves for I and
what I keeps for W) over one stage's saved bytes per micro-batch (a middle stage's, under
1F1B). ``--json FILE`` writes them. Never asserts.

    PYTHONPATH=$PWD python benchmarks/published_memory.py --pp 8 --json /tmp/published_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dualpipe_fx  # noqa: E402
from dualpipe_fx.examples import LinearGeluStack, linear_gelu_batch, mse_loss  # noqa: E402

# (schedule, devices for PP stages, published parameters, published activations as f(PP))
PUBLISHED = (("1f1b", lambda pp: pp, 1, lambda pp: pp), ("zb1p", lambda pp: pp, 1, lambda pp: pp),
             ("dualpipe", lambda pp: pp, 2, lambda pp: pp + 1), ("dualpipev", lambda pp: pp // 2, 2, lambda pp: pp + 1))


def measure(pp: int = 8, microbatches: int = 20, width: int = 256) -> list[dict]:
    model = LinearGeluStack(depth=pp, width=width)
    x, y = linear_gelu_batch(width, batch=1)
    rows, stage_params = [], None
    for schedule, devices, params, acts in PUBLISHED:
        plan = dualpipe_fx.plan(model, mse_loss, x, y, ranks=devices(pp), num_microbatches=microbatches,
                                schedule=schedule, split_points=[f"layers.{i}" for i in range(1, pp)])
        stage_params = stage_params or plan.ranks[len(plan.ranks) // 2].params  # 1F1B: one stage a rank
        saved = {s.index: s.saved for s in plan.stages}  # by model part (DualPipe's mirrors share one)
        part = dualpipe_fx.generate(schedule, devices(pp), microbatches).model_part

        def in_stage_units(rank) -> float:  # the rank's activations over its stages' mean per micro-batch
            return rank.peak_activations / (sum(saved[part(s)] for s in rank.stages) / len(rank.stages))

        worst = max(plan.ranks, key=in_stage_units)
        rows.append({"schedule": schedule, "devices": devices(pp), "published_params": params,
                     "planned_params": max(r.params for r in plan.ranks) / stage_params,
                     "published_activations": acts(pp), "planned_activations": in_stage_units(worst),
                     "planned_rank": worst.rank})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pp", type=int, default=8, help="pipeline stages (even; default 8)")
    p.add_argument("--microbatches", type=int, default=20)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    rows = measure(args.pp, args.microbatches)
    print(f"PP = {args.pp} stages, {args.microbatches} micro-batches; units: one stage's parameters, one "
          "micro-batch's activations of one stage")
    print(f"{'schedule':>10} {'devices':>7} {'params pub.':>11} {'planned':>8} {'acts pub.':>9} {'planned':>8} "
          f"{'ratio':>6}")
    for r in rows:
        print(f"{r['schedule']:>10} {r['devices']:>7} {r['published_params']:>10}x {r['planned_params']:>7.2f}x "
              f"{r['published_activations']:>9} {r['planned_activations']:>8.2f} "
              f"{r['planned_activations'] / r['published_activations']:>6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pp": args.pp, "microbatches": args.microbatches, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
