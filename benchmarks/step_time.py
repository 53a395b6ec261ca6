"""Step time of dualpipe_fx vs torch's own schedules, on the issue's configuration.

2 gloo ranks with 1 thread each, ``LinearGeluStack(depth=8, width=1024)``, batch 512 in 8
micro-batches. In ONE run it times (median of ``--steps`` rounds after ``--warmup``; each round runs every
variant in turn, so a load change on a shared machine hits all of them, and times the
second of two back-to-back steps: training repeats one step, so its buffers are already
in the allocator, while a step right after another variant's pays for page faults):

- single process, whole batch; single process, the same 8 micro-batches with grad accumulation
  (on rank 0 while rank 1 waits);
- dualpipe_fx (dualpipev) with eager graphs and with ``compile_stages=True``;
- torch's ``ScheduleDualPipeV``, ``ScheduleZBVZeroBubble`` (4 stages, V placement) and
  ``Schedule1F1B`` (2 stages) on equal manual stages (``nn.Sequential`` slices in ``PipelineStage``).

It prints the ratios to torch's DualPipeV, the efficiency ``(single process, same
micro-batches) / (ranks x step)``, each rank's measured bubble beside the simulator's
prediction from the measured F/I/W costs, and the overhead (step time that is neither
compute nor predicted bubble). It checks the load average first and writes ``--json``.

    python benchmarks/step_time.py --json /tmp/step_time.json
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

from dualpipe_fx import examples as ex  # noqa: E402
from tests.runtime.dist_harness import run_ranks  # noqa: E402

RANKS, DEPTH, WIDTH, BATCH, MICROBATCHES = 2, 8, 1024, 512, 8


def _single_process_steps() -> dict:
    """Whole batch at once, and the same micro-batches with grad accumulation (1 thread)."""
    model = ex.LinearGeluStack(DEPTH, WIDTH)
    x, y = ex.linear_gelu_batch(WIDTH, BATCH)

    def whole():
        model.zero_grad(set_to_none=True)
        ex.mse_loss(model(x), y).backward()

    def accumulate():
        model.zero_grad(set_to_none=True)
        for xm, ym in zip(x.chunk(MICROBATCHES), y.chunk(MICROBATCHES)):
            (ex.mse_loss(model(xm), ym) / MICROBATCHES).backward()

    return {"whole_batch": whole, "grad_accumulation": accumulate}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def torch_schedule(name: str, parts: list, rank: int, ranks: int, microbatches: int, loss_fn, x, y,
                   device=torch.device("cpu"), zero_grad=None):
    """A step function of torch's own ``name`` schedule ("torch DualPipeV", "torch ZBV": 2 stages
    per rank in V placement; "torch 1F1B": 1) on ``parts``, the manual stages' modules in
    order (``len(parts)`` stages; this rank builds only its own)."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import (Schedule1F1B, ScheduleDualPipeV,
                                                        ScheduleZBVZeroBubble)
    n = len(parts)
    if name == "torch 1F1B":
        stages = [PipelineStage(parts[rank], rank, n, device)]
        sched = Schedule1F1B(stages[0], microbatches, loss_fn=loss_fn)
    else:
        stages = [PipelineStage(parts[s], s, n, device) for s in (rank, n - 1 - rank)]
        cls = ScheduleDualPipeV if name == "torch DualPipeV" else ScheduleZBVZeroBubble
        sched = cls(stages, microbatches, loss_fn=loss_fn)
    first = any(s.is_first for s in stages)
    last = any(s.is_last for s in stages)

    def step():
        if zero_grad is not None:
            zero_grad()
        sched.step(*((x,) if first else ()), target=y if last else None)
    return step


def _torch_schedule(name: str, model, x, y, rank: int):
    layers = list(model.layers)
    n = RANKS if name == "torch 1F1B" else 2 * RANKS
    per = DEPTH // n
    parts = [torch.nn.Sequential(*layers[s * per:(s + 1) * per]) for s in range(n)]
    return torch_schedule(name, parts, rank, RANKS, MICROBATCHES, ex.mse_loss, x, y,
                          zero_grad=lambda: model.zero_grad(set_to_none=True))


def _profile_figures(pipe, x, y) -> dict | None:
    prof = pipe.profile(x, target=y, steps=3)
    if prof is None:
        return None
    step = statistics.median(prof.step_times)
    sim_idle = prof.simulated.idle
    return {
        "table": prof.table(),
        "measured_bubble": prof.bubble_ratio_per_rank,
        "simulated_bubble": prof.simulated_bubble_ratio_per_rank,
        "busy_s": prof.busy,
        "overhead_s": {r: step - prof.busy[r] - sim_idle.get(r, 0.0) for r in prof.busy},
        "overhead_between_actions_s": prof.overhead,
        "outside_actions_s": step - prof.makespan,  # step setup, last sends, loss: before/after the actions
        "costs_ms": {k: getattr(prof.costs, k) * 1e3 for k in ("F", "B", "W")} | {"FB": prof.costs.overlapped * 1e3},
        "profiled_step_s": step,
    }


def _pipelines(x, y, rank: int) -> dict:
    """Every distributed variant's step function, built once."""
    import dualpipe_fx
    mb = BATCH // MICROBATCHES
    steps, pipes = {}, {}
    for label, compiled in (("dualpipe_fx eager", False), ("dualpipe_fx compiled", True)):
        pipe = dualpipe_fx.compile(ex.LinearGeluStack(DEPTH, WIDTH), ex.mse_loss, (x[:mb],), y[:mb],
                                   schedule="dualpipev", num_microbatches=MICROBATCHES,
                                   compile_stages=compiled)
        pipes[label] = pipe

        def step(pipe=pipe):
            pipe.zero_grad()
            pipe.step(x, target=y)
        steps[label] = step
    for label in ("torch DualPipeV", "torch ZBV", "torch 1F1B"):
        steps[label] = _torch_schedule(label, ex.LinearGeluStack(DEPTH, WIDTH), x, y, rank)
    return steps, pipes


def distributed(rank: int, world: int, warmup: int, steps: int) -> dict:
    """Round-robin timing: each round runs one step of every variant (and, on rank 0 while
    rank 1 waits, the single-process references), so all of them see the same load."""
    x, y = ex.linear_gelu_batch(WIDTH, BATCH)
    variants, pipes = _pipelines(x, y, rank)
    single = _single_process_steps()
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in [*variants, *single]}
    for _ in range(steps):
        for label, fn in variants.items():
            fn()  # back to back, as in training: the allocator already holds this step's buffers
            dist.barrier()
            times[label].append(_timed(fn))
        if rank == 0:
            for label, fn in single.items():
                fn()
                times[label].append(_timed(fn))
        dist.barrier()
    gathered = [None] * world
    dist.all_gather_object(gathered, times)
    out = {"times": {label: statistics.median(max(g[label][i] for g in gathered) for i in range(steps))
                     for label in variants},
           "single": {label: statistics.median(times[label]) for label in single} if rank == 0 else None,
           "profiles": {label: _profile_figures(pipe, x, y) for label, pipe in pipes.items()}}
    return out


def _check_load() -> float:
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    if load > 0.5:
        print(f"!!! WARNING: load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores "
              f"({load:.2f} per core > 0.5): other processes share the CPUs, the figures are noisy !!!")
    return load


def report(single: dict, dist_out: dict, load: float) -> dict:
    times = dist_out["times"]
    ref = times["torch DualPipeV"]
    acc = single["grad_accumulation"]
    print(f"load per core at start: {load:.2f}")
    print(f"single process: whole batch {single['whole_batch'] * 1e3:.1f} ms, "
          f"grad accumulation over {MICROBATCHES} micro-batches {acc * 1e3:.1f} ms")
    print(f"{'run':<22}{'step ms':>9}{'vs torch DualPipeV':>20}{'efficiency':>12}")
    rows = {}
    for label, t in times.items():
        rows[label] = {"step_s": t, "ratio_to_torch_dualpipev": t / ref, "efficiency": acc / (RANKS * t)}
        print(f"{label:<22}{t * 1e3:9.1f}{t / ref:20.3f}{acc / (RANKS * t):12.3f}")
    for label, prof in dist_out["profiles"].items():
        if prof:
            print(f"\n{label}: measured vs simulated (simulator fed the measured F/I/W costs)")
            print(prof["table"])
            print("overhead (step - busy - simulated idle), ms: "
                  + ", ".join(f"rank {r}: {v * 1e3:.1f}" for r, v in sorted(prof["overhead_s"].items()))
                  + f"; of it between actions: "
                  + ", ".join(f"rank {r}: {v * 1e3:.1f}" for r, v in sorted(prof["overhead_between_actions_s"].items()))
                  + f"; before/after the actions: {prof['outside_actions_s'] * 1e3:.1f}")
    return {"config": {"ranks": RANKS, "depth": DEPTH, "width": WIDTH, "batch": BATCH,
                       "microbatches": MICROBATCHES, "threads_per_rank": 1},
            "load_per_core": load, "single_process_s": single, "runs": rows,
            "profiles": {k: {kk: vv for kk, vv in v.items() if kk != "table"} if v else None
                         for k, v in dist_out["profiles"].items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args(argv)
    if args.steps < 5:
        parser.error(f"--steps {args.steps}: take the median of at least 5 steps")
    load = _check_load()
    results = run_ranks(distributed, RANKS, (args.warmup, args.steps), timeout=1800)
    dist_out = results[0]
    figures = report(dist_out["single"], dist_out, load)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
