"""``dualpipe_fx.autoplan`` against measured step times, on CPU gloo ranks.

2 ranks (1 thread each), ``LinearGeluStack(depth=8, width=WIDTH)`` and the llama example, the
whole batch ``BATCH``. For every configuration of the grid (schedule x micro-batch count x
recompute; at least 12) it measures the step (median of ``--steps`` timed steps after a
warm-up, all configurations compiled first and timed round-robin so that a load change hits
every one alike) and compares it with autoplan's prediction for that configuration, made with
this machine's probed device (``planning.devices.probe_device``) and the group's probed links
(``probe_network``):

- Spearman rank correlation of predicted against measured (target >= 0.9);
- median absolute relative error (target <= 15%);
- the measured time of autoplan's pick over the best measured time (target <= 1.05).

It prints the table and the ratios and writes ``--json``.

    python benchmarks/autoplan.py --json /tmp/autoplan.json
"""
from __future__ import annotations

import argparse
import dataclasses
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
from dualpipe_fx.api.autoplan import autoplan  # noqa: E402
from dualpipe_fx.planning.devices import probe_device, probe_network  # noqa: E402
from tests.runtime.dist_harness import run_ranks  # noqa: E402

RANKS = 2
GRID = {"schedule": ["dualpipev", "1f1b", "zbv", "gpipe"], "num_microbatches": [4, 8, 16],
        "recompute": [None]}


def _case(kind: str, width: int, batch: int):
    if kind == "mlp":
        model, loss_fn = ex.LinearGeluStack(depth=8, width=width), ex.mse_loss
        x, y = ex.linear_gelu_batch(width, batch=batch)
    else:
        cfg = ex.LlamaConfig(vocab_size=512, dim=width // 4, n_layers=8, n_heads=4, ffn_hidden=width // 2,
                             max_seq_len=64)
        model, loss_fn = ex.LlamaDecoder(cfg), ex.llama_loss
        x, y = ex.llama_batch(cfg, batch=batch, seq=64)
    return model, loss_fn, x, y


def _measure(rank, world, kind, width, batch, grid, steps):
    """Every configuration's step time on this rank (and, on rank 0, the predictions)."""
    torch.manual_seed(0)
    model, loss_fn, x, y = _case(kind, width, batch)
    network = probe_network()  # every rank takes part; rank 0 predicts
    device = probe_device("cpu")
    pipes = {}
    for schedule in grid["schedule"]:
        for c in grid["num_microbatches"]:
            for recompute in grid["recompute"]:
                try:
                    dualpipe_fx.get_schedule(schedule).validate(world, c)
                except ValueError:
                    continue
                mb = batch // c
                pipes[(schedule, c, str(recompute))] = dualpipe_fx.compile(
                    model, loss_fn, (x[:mb],), y[:mb], schedule=schedule, num_microbatches=c,
                    memory=dualpipe_fx.MemoryPolicy(recompute=recompute))
    times = {k: [] for k in pipes}
    for round_ in range(steps + 1):
        for key, pipe in pipes.items():
            dist.barrier()
            start = time.perf_counter()
            pipe.zero_grad()
            pipe.step(x, target=y)
            dist.barrier()
            if round_:  # the first round warms up
                times[key].append(time.perf_counter() - start)
    measured = {str(k): statistics.median(v) for k, v in times.items()}
    predicted = {}
    if rank == 0:
        plans = autoplan(model, loss_fn, (x,), y, world_size=world, pp_degree=world, device=device, network=network,
                         space=grid, top=None)
        predicted = {str((p.schedule, p.num_microbatches, str(p.recompute))): p.predicted_step_s for p in plans}
        predicted["_pick"] = str((plans[0].schedule, plans[0].num_microbatches, str(plans[0].recompute)))
        predicted["_search_s"] = plans.search_s
        predicted["_network"] = (network.bandwidth, network.latency_s)
        predicted["_device"] = {f.name: (dict(v) if f.name == "peak_flops" else v)
                                for f in dataclasses.fields(device) for v in [getattr(device, f.name)]}
    return {"measured": measured, "predicted": predicted}


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = pos
        return r
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=["mlp", "llama"], default="mlp")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    results = run_ranks(_measure, RANKS, (args.kind, args.width, args.batch, GRID, args.steps), timeout=3000)
    measured = {k: max(r["measured"][k] for r in results) for k in results[0]["measured"]}
    predicted = results[0]["predicted"]
    keys = sorted(measured, key=measured.get)
    rows = [(k, measured[k], predicted[k], predicted[k] / measured[k] - 1) for k in keys]
    print(f"{'configuration':40s} {'measured ms':>12s} {'predicted ms':>13s} {'error':>8s}")
    for k, m, p, e in rows:
        print(f"{k:40s} {m * 1e3:12.1f} {p * 1e3:13.1f} {e:+8.1%}")
    rho = _spearman([r[1] for r in rows], [r[2] for r in rows])
    median_error = statistics.median(abs(r[3]) for r in rows)
    pick = predicted["_pick"]
    pick_ratio = measured[pick] / measured[keys[0]]
    print(f"Spearman {rho:.3f} (target >= 0.9); median |error| {median_error:.1%} (target <= 15%); "
          f"pick {pick} measured at {pick_ratio:.3f}x the best measured {keys[0]} (target <= 1.05); "
          f"search {predicted['_search_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "rows": [{"config": k, "measured_s": m, "predicted_s": p} for k, m, p, _ in rows],
            "spearman": rho, "median_abs_error": median_error, "pick": pick, "pick_over_best": pick_ratio,
            "best": keys[0], "search_s": predicted["_search_s"], "network": predicted["_network"],
            "device": predicted["_device"], "args": vars(args) | {"json": str(args.json)},
            "load_average": os.getloadavg()[0]}, indent=1))


if __name__ == "__main__":
    main()
