"""``dualpipe-fx run``: train a built-in example pipelined on N local gloo ranks.

The README's main job. It spawns ``--ranks`` processes on localhost (or, under
``torchrun``, runs as the rank torchrun started), compiles the example with
``dualpipe_fx.compile`` and takes ``--steps`` SGD steps. Rank 0 also trains the same
model in one process on the same batches and prints, per step, both losses and the
largest parameter difference: the pipelined run must follow the single-process one.

**Pseudocode**
    every rank: model = example(seed); pipe = compile(model, loss, one micro-batch, ...)
    for each step: loss = pipe.step(x, target=y); sgd(pipe.parameters()); gather params
    rank 0: the same steps on an unsplit copy; print both losses and max |param diff|
"""
from __future__ import annotations

import argparse
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

import dualpipe_fx
from dualpipe_fx import examples as ex
from dualpipe_fx.schedules import get_schedule

EXAMPLES = ("llama", "mlp")


def _example(name: str, microbatch: int, seed: int = 0):
    """(model, loss_fn, batch maker) of a built-in example."""
    if name == "llama":
        cfg = ex.LlamaConfig()
        return ex.LlamaDecoder(cfg, seed=seed), ex.llama_loss, lambda b, s: ex.llama_batch(cfg, batch=b, seed=s)
    model = ex.LinearGeluStack(depth=8, width=256, seed=seed)
    return model, ex.mse_loss, lambda b, s: ex.linear_gelu_batch(256, batch=b, seed=s)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--example", choices=EXAMPLES, default="llama", help="built-in model (default llama)")
    p.add_argument("--ranks", type=int, default=2, help="pipeline ranks to spawn (ignored under torchrun)")
    p.add_argument("--schedule", default="dualpipev", help="schedule name (default dualpipev)")
    p.add_argument("--microbatches", type=int, default=4, help="micro-batches per step (default 4)")
    p.add_argument("--microbatch-size", type=int, default=2, help="samples per micro-batch (default 2)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps (default 3)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    p.add_argument("--compile-stages", action="store_true", help="torch.compile the stage graphs")
    p.add_argument("--png", default=None, help="draw the measured timeline of a profiled step to this PNG")
    p.add_argument("--profile-steps", type=int, default=5,
                   help="steps profiled after training for --png; the bubble printed is their median (default 5)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference_params(args, batches) -> list[dict[str, torch.Tensor]]:
    """Single-process SGD on the unsplit model: params after each step, and the losses."""
    model, loss_fn, _ = _example(args.example, args.microbatch_size)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    history = []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        history.append((loss.item(), {n: p.detach().clone() for n, p in model.named_parameters()}))
    return history


def _train(rank: int, world: int, args) -> None:
    model, loss_fn, make_batch = _example(args.example, args.microbatch_size)
    batch = args.microbatch_size * args.microbatches
    batches = [make_batch(batch, step) for step in range(args.steps)]
    x0, y0 = batches[0]
    pipe = dualpipe_fx.compile(model, loss_fn, (x0[: args.microbatch_size],), y0[: args.microbatch_size],
                               schedule=args.schedule, num_microbatches=args.microbatches,
                               compile_stages=args.compile_stages)
    opt = torch.optim.SGD(pipe.parameters(), lr=args.lr)
    reference = _reference_params(args, batches) if rank == 0 else None
    if rank == 0:
        print(f"{args.example}: {world} ranks, schedule {args.schedule}, {args.microbatches} micro-batches "
              f"of {args.microbatch_size}; stages per rank: {sorted(pipe.stages)}")
        print(f"{'step':>4}  {'pipelined loss':>15}  {'single-process':>15}  {'max |param diff|':>16}")
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss = pipe.step(x, target=y)
        opt.step()
        held = torch.tensor([0.0, 0.0] if loss is None else [float(loss), 1.0])
        dist.all_reduce(held)  # the loss from the rank(s) holding the last stage
        local = {n: p.detach().clone() for n, p in pipe.named_parameters()}
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
        if rank == 0:
            merged = {k: v for part in gathered for k, v in part.items()}
            ref_loss, ref_params = reference[step]
            diff = max((merged[n] - p).abs().max().item() for n, p in ref_params.items() if n in merged)
            shown = held[0].item() / held[1].item()
            print(f"{step + 1:>4}  {shown:>15.6f}  {ref_loss:>15.6f}  {diff:>16.2e}")
    if args.png:
        prof = pipe.profile(batches[0][0], target=batches[0][1], steps=args.profile_steps)
        if rank == 0:
            dualpipe_fx.visualize(pipe.program, args.png, sim=prof)
            print(bubble_line(prof, args.png))


def bubble_line(prof, png: str) -> str:
    """What ``--png`` prints: the bubble per rank as the median over the profiled steps."""
    steps = len(prof.step_times)
    ratios = ", ".join(f"rank {r} {b:.3f}" for r, b in sorted(prof.bubble_ratio_per_rank.items()))
    return (f"measured bubble ratio, median of {steps} profiled steps: {ratios}; "
            f"{prof.samples_per_s:.1f} samples/s; wrote the timeline of the last one to {png}")


def _entry(rank: int, world: int, port: int, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        _train(rank, world, args)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    """Handler of ``dualpipe-fx run``; returns the exit status."""
    spec = get_schedule(args.schedule)  # unknown name -> ValueError before any process starts
    if args.png and args.profile_steps < 1:
        raise ValueError(f"--profile-steps {args.profile_steps}: profile at least 1 step")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        dist.init_process_group("gloo", timeout=timedelta(seconds=300))
        world = dist.get_world_size()
        spec.validate(world, args.microbatches)
        _train(dist.get_rank(), world, args)
        dist.destroy_process_group()
        return 0
    if args.ranks < 1:
        raise ValueError(f"--ranks {args.ranks}: need at least 1 rank")
    spec.validate(args.ranks, args.microbatches)
    torch.multiprocessing.spawn(_entry, args=(args.ranks, _free_port(), args), nprocs=args.ranks, join=True)
    return 0
