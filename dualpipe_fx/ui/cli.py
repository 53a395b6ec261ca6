"""The ``dualpipe-fx`` command line.

``dualpipe-fx schedule --schedule dualpipev --ranks 4 --microbatches 10
[--costs F=1,B=2,W=1,FB=2.5,comm=0] [--png out.png] [--trace out.json]`` prints the
program one rank per row, then one table comparing every registered schedule at the
same ranks, micro-batches and costs (bubble, bubble ratio, peak activations, makespan,
and the DualPipe README's bubble formula where it has one).

``dualpipe-fx plan --example llama --ranks 8 --microbatches 16 --dtype bfloat16
[--optimizer adamw] [--recompute none|selective|full] [--layers --dim --seq ...] [--json out.json]``
builds the example on meta and prints ``dualpipe_fx.plan``'s per-rank bytes.

Bad input prints one line ``dualpipe-fx: error: ...`` naming the value and the rule,
and exits with status 2.

A subcommand is a ``(name, help, add_arguments, handler)`` entry of ``_subcommands()``;
``handler(args) -> int`` is the exit status. Another module adds one by appending a line.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional, Sequence

import torch

from dualpipe_fx import examples as ex
from dualpipe_fx.api.options import MemoryPolicy
from dualpipe_fx.api.autoplan import autoplan
from dualpipe_fx.api.plan import plan
from dualpipe_fx.planning.simulate import Costs, SimResult, readme_bubble, simulate
from dualpipe_fx.schedules.ir import Program
from dualpipe_fx.schedules.registry import SCHEDULES, generate, get_schedule
from dualpipe_fx.ui import demo
from dualpipe_fx.ui.visualize import visualize

_PROG = "dualpipe-fx"
_COST_KEYS = ("F", "B", "W", "FB", "comm")
_DEFAULT_COSTS = "F=1,B=2,W=1"
_TABLE_BLOCK = 16  # actions per printed block of the per-rank table


class UsageError(ValueError):
    """Input the user can fix; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def parse_costs(text: str) -> Costs:
    """``"F=1,B=2,W=1,FB=2.5,comm=0"`` -> ``Costs``; keys left out keep ``F=1,B=2,W=1`` (FB = F+B, comm = 0).

    Raises:
        UsageError: a malformed pair, an unknown or repeated key, or a value that is not a number.
        ValueError: a cost that breaks a ``Costs`` rule (negative, ``W > B``, ...).
    """
    values: dict[str, float] = {"F": 1.0, "B": 2.0, "W": 1.0}
    seen: set[str] = set()
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = (s.strip() for s in pair.partition("="))
        if not eq or key not in _COST_KEYS or key in seen:
            why = "is not KEY=VALUE" if not eq else ("repeats a key" if key in seen else f"has unknown key {key!r}")
            raise UsageError(f"--costs {text!r}: {pair!r} {why}; expected comma-separated KEY=VALUE with "
                             f"keys {', '.join(_COST_KEYS)}, e.g. {_DEFAULT_COSTS},FB=2.5,comm=0")
        try:
            values[key] = float(value)
        except ValueError:
            raise UsageError(f"--costs {text!r}: {key}={value!r} is not a number; use e.g. {key}=1.5") from None
        seen.add(key)
    return Costs(**values)


def _format_costs(costs: Costs) -> str:
    return f"F={costs.F:g} B={costs.B:g} W={costs.W:g} FB={costs.overlapped:g} comm={costs.comm:g}"


def format_program(program: Program, block: int = _TABLE_BLOCK) -> str:
    """The per-rank action table: one row per rank, columns aligned, ``block`` actions per band."""
    cells = {r: [str(a) for a in acts] for r, acts in sorted(program.items())}
    width = max((len(c) for row in cells.values() for c in row), default=4)
    longest = max((len(row) for row in cells.values()), default=0)
    bands = []
    for lo in range(0, longest, block):
        head = "step    " + " ".join(f"{i:<{width}}" for i in range(lo, min(lo + block, longest)))
        rows = [f"rank {r:<3}" + " ".join(f"{c:<{width}}" for c in row[lo:lo + block]) for r, row in cells.items()]
        bands.append("\n".join([head.rstrip()] + [row.rstrip() for row in rows]))
    return "\n\n".join(bands)


def _row(name: str, num_ranks: int, num_microbatches: int, costs: Costs) -> list[str]:
    """One comparison-table row: the simulated figures, or ``n/a: <why>``."""

    try:
        program = generate(name, num_ranks, num_microbatches)
    except (ValueError, TypeError) as err:
        return [name, f"n/a: {err}"]
    sim = simulate(program, costs)
    pp = len(program.chains[0])
    ref = readme_bubble(name, pp, costs)
    return [name, str(program.num_stages), f"{sim.bubble:g}", f"{sim.bubble_ratio:.3f}",
            str(sim.max_peak_activations), f"{sim.makespan:g}", "-" if ref is None else f"{ref:g} (PP={pp})"]


def format_comparison(num_ranks: int, num_microbatches: int, costs: Costs) -> str:
    """One table: every registered schedule at the same ranks, micro-batches and costs."""

    head = ["schedule", "stages", "bubble", "ratio", "peak act", "makespan", "README bubble"]
    rows = [_row(name, num_ranks, num_microbatches, costs) for name in SCHEDULES]
    widths = [max(len(r[i]) for r in [head] + rows if len(r) == len(head)) for i in range(len(head))]
    lines = ["  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(head, widths)))]
    for row in rows:
        if len(row) == len(head):
            lines.append("  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))))
        else:
            lines.append(f"{row[0]:<{widths[0]}}  {row[1]}")
    return "\n".join(line.rstrip() for line in lines)


def _add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", default="dualpipev", help="a registered schedule (default dualpipev)")
    parser.add_argument("--ranks", type=int, required=True, help="N, the number of pipeline ranks")
    parser.add_argument("--microbatches", type=int, required=True, help="C, micro-batches per step")
    parser.add_argument("--costs", default=_DEFAULT_COSTS,
                        help=f"KEY=VALUE,... with keys {', '.join(_COST_KEYS)} (default {_DEFAULT_COSTS}, "
                             "FB=F+B, comm=0)")
    parser.add_argument("--png", help="write the simulated timeline picture here (.png)")
    parser.add_argument("--trace", help="write a Perfetto/Chrome trace here (.json)")


def _run_schedule(args: argparse.Namespace) -> int:

    for flag, path, suffix in (("--png", args.png, ".png"), ("--trace", args.trace, ".json")):
        if path is not None and not path.lower().endswith(suffix):
            raise UsageError(f"{flag} {path!r} must end in {suffix}")
    costs = parse_costs(args.costs)
    spec = get_schedule(args.schedule)
    program = generate(spec.name, args.ranks, args.microbatches)
    sim: SimResult = simulate(program, costs)
    print(f"{spec.name}: {program.num_ranks} ranks, {program.num_stages} stages, "
          f"{args.microbatches} micro-batches; costs {_format_costs(costs)}")
    print(format_program(program))
    print()
    print(f"every schedule on {args.ranks} ranks, {args.microbatches} micro-batches, the same costs per chunk "
          f"(chunk = one stage of one micro-batch; stage counts differ, so compare ratios):")
    print(format_comparison(args.ranks, args.microbatches, costs))
    for path in (args.png, args.trace):
        if path is not None:

            print(f"wrote {visualize(program, path, sim=sim)}")
    return 0


def _subcommands() -> list[tuple[str, str, Callable, Callable[[argparse.Namespace], int]]]:
    return [
        ("schedule", "print a schedule's program and compare all schedules in simulation",
         _add_schedule_arguments, _run_schedule),
        ("run", "train a built-in example pipelined on local gloo ranks, beside single-process training",
         _add_run_arguments, _run_demo),
        ("plan", "per-rank memory in bytes of a built-in example, built on meta (nothing allocated)",
         _add_plan_arguments, _run_plan),
    ]


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    demo.add_arguments(p)


def _run_demo(args: argparse.Namespace) -> int:
    return demo.run(args)


_DTYPES = ("float32", "bfloat16", "float16")


def _add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--example", choices=("llama", "mlp"), default="llama", help="built-in model (default llama)")
    p.add_argument("--ranks", type=int, help="N, the number of pipeline ranks (required without --world)")
    p.add_argument("--world", type=int, help="--auto: ranks in all; the pipeline degree is searched among its "
                                             "divisors (fixed by --ranks if given), the rest data parallel")
    p.add_argument("--microbatches", type=int, help="C, micro-batches per step (required without --auto)")
    p.add_argument("--schedule", default="dualpipev", help="a registered schedule (default dualpipev)")
    p.add_argument("--auto", action="store_true",
                   help="search the schedule, micro-batch count and recompute (dualpipe_fx.autoplan) and print "
                        "the ranking; --device names the device model (h100, h200, a100, mi300x, or cpu: probed)")
    p.add_argument("--batch", type=int, help="--auto: samples per step (default 8 x ranks)")
    p.add_argument("--network", help="--auto: nvlink, ib-400g, ib-200g, ethernet-100g or localhost "
                                     "(default: nvlink for a GPU, localhost for cpu)")
    p.add_argument("--budget-gib", type=float, help="--auto: memory per rank in GiB (default: the device's)")
    p.add_argument("--dtype", default="float32", help=f"parameter dtype: {', '.join(_DTYPES)} (default float32)")
    p.add_argument("--optimizer", default="adamw",
                   help="adamw, adam, sgd, sgd_momentum, or state bytes per parameter element (default adamw)")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    p.add_argument("--microbatch-size", type=int, default=1, help="samples per micro-batch (default 1)")
    p.add_argument("--layers", type=int, help="llama: n_layers (default 8); mlp: depth (default 8)")
    p.add_argument("--dim", type=int, help="llama: model width (default 64); mlp: width (default 1024)")
    p.add_argument("--heads", type=int, help="llama: attention heads (default max(4, dim // 128))")
    p.add_argument("--seq", type=int, help="llama: sequence length (default 16)")
    p.add_argument("--vocab", type=int, help="llama: vocabulary size (default 256)")
    p.add_argument("--device", default="cpu", help="where the stages would run: its kernels are traced (default cpu)")
    p.add_argument("--json", help="also write the plan here (.json)")


def _plan_example(args: argparse.Namespace, batch: Optional[int] = None):
    """(model on meta in ``--dtype``, loss_fn, one micro-batch's input, target); ``batch``
    samples instead of ``--microbatch-size``."""


    if args.dtype not in _DTYPES:
        raise UsageError(f"--dtype {args.dtype!r}: expected one of {', '.join(_DTYPES)}")
    dtype = getattr(torch, args.dtype)
    if args.example == "mlp":
        with torch.device("meta"):
            model = ex.LinearGeluStack(depth=args.layers or 8, width=args.dim or 1024).to(dtype)
        x, y = ex.linear_gelu_batch(model.width, batch=batch or args.microbatch_size)
        return model, ex.mse_loss, x.to(dtype), y.to(dtype)
    base = ex.LlamaConfig()
    dim = args.dim or base.dim
    seq = args.seq or base.max_seq_len // 4
    cfg = ex.LlamaConfig(vocab_size=args.vocab or base.vocab_size, dim=dim, n_layers=args.layers or base.n_layers,
                         n_heads=args.heads or max(4, dim // 128),
                         ffn_hidden=base.ffn_hidden if args.dim is None else (8 * dim // 3 + 63) // 64 * 64,
                         max_seq_len=seq)
    with torch.device("meta"):
        model = ex.LlamaDecoder(cfg).to(dtype)
    tokens, target = ex.llama_batch(cfg, batch=batch or args.microbatch_size, seq=seq)
    return model, ex.llama_loss, tokens, target


def _optimizer(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _run_plan(args: argparse.Namespace) -> int:


    if args.json is not None and not args.json.lower().endswith(".json"):
        raise UsageError(f"--json {args.json!r} must end in .json")
    if args.world is not None and not args.auto:
        raise UsageError("plan: --world is an --auto option (the search's ranks in all); pass --ranks alone")
    if args.ranks is None and not (args.auto and args.world):
        raise UsageError("plan: --ranks is required (or pass --auto --world W to search the pipeline degree)")
    if args.auto:
        return _run_autoplan(args)
    if args.microbatches is None:
        raise UsageError("plan: --microbatches is required (or pass --auto to search it)")
    model, loss_fn, x, y = _plan_example(args)
    result = plan(model, loss_fn, x, y, ranks=args.ranks, num_microbatches=args.microbatches,
                  schedule=args.schedule, device=args.device,
                  memory=MemoryPolicy(optimizer=_optimizer(args.optimizer),
                                      recompute=None if args.recompute == "none" else args.recompute))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.example}: {n_params:,} parameters ({args.dtype}), {args.ranks} ranks, {args.schedule}, "
          f"{args.microbatches} micro-batches of {tuple(x.shape)}; bytes per rank, at the step's peak:")
    print(result.table())
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _run_autoplan(args: argparse.Namespace) -> int:
    """``plan --auto``: autoplan's ranking of the example on ``--ranks`` ranks of ``--device``."""
    world = args.world or args.ranks
    batch = args.batch or 8 * world
    model, loss_fn, x, y = _plan_example(args, batch)
    space = {"num_microbatches": [args.microbatches]} if args.microbatches else None
    budget = None if args.budget_gib is None else int(args.budget_gib * (1 << 30))
    plans = autoplan(model, loss_fn, (x,), y, world_size=world, pp_degree=args.ranks, device=args.device,
                     network=args.network, memory_budget=budget, space=space, top=None,
                     optimizer=_optimizer(args.optimizer))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.example}: {n_params:,} parameters ({args.dtype}), {world} ranks, a batch of {batch}; "
          "fastest first:")
    print(plans.table())
    best = plans[0]
    dp = f"dp={best.dp_degree} {best.dp_mode}, " if best.dp_degree > 1 else ""
    print(f"pick: pp={best.pp_degree}, {dp}schedule={best.schedule!r}, num_microbatches={best.num_microbatches}, "
          f"recompute={best.recompute!r} ({best.predicted_step_s * 1e3:,.2f} ms predicted)")
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump({"plans": [dict(zip(("pp_degree", "dp", "schedule", "num_microbatches", "recompute", "step_ms",
                                           "bubble", "peak_gib", "samples_per_s"), p.row())) for p in plans],
                       "rejected": [vars(r) | {"recompute": str(r.recompute)} for r in plans.rejected],
                       "search_s": plans.search_s}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=_PROG, description="Automatic DualPipe/DualPipeV pipeline parallelism.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text, add_arguments, handler in _subcommands():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input)."""
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except ValueError as err:  # UsageError, or a rule of the sizes or the costs
        message = " ".join(str(err).split())  # one line
        print(f"{_PROG}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
