"""``dualpipe_fx.autoplan``: choose the schedule, micro-batch count and recompute policy of a
pipeline under a memory budget, from the model alone (no process group, nothing allocated
for a meta model).

**Contract**: ``autoplan(model, loss_fn, batch_inputs, batch_target, *, world_size, device,
memory_budget, ...) -> Plans`` (a list of ``Plan``, fastest first, with ``.rejected``: every
candidate left out and why). Each candidate is cut and planned exactly as ``compile()`` would
build it (``split_for_program`` on one micro-batch of the batch, ``planning.memory``), timed
by the simulator with roofline costs of its stage graphs on the device model
(``planning.devices``), and kept when every rank's total fits ``memory_budget``.

**Pseudocode**
    for C, schedule in the space, recompute from None to "full" until one fits (recomputing
    more only adds compute: the rest are listed as not tried):
        program = generate(schedule, P, C)          (a schedule that cannot run P, C: rejected)
        parts = the cut compile() makes for one micro-batch (batch / C)
        memory = split_plan(parts, program)          (a rank over the budget: rejected, by how much)
        per stage: F, I, W seconds = sum of node_seconds over its graphs (+ per-action overhead,
                   + per-transfer overhead for each P2P transfer an action posts across ranks)
        step = simulate(program, those costs, a hop = network.seconds(boundary bytes)).makespan
               + the step's votes (STEP_VOTES all_reduces of a flag over the pipeline)
    rank the survivors by step (then by peak memory)

The pipeline degree ranges over the divisors of ``world_size`` (up to ``MAX_PP_DEGREE``
unless named); the other ranks are data-parallel replicas of the pipeline (``replicate`` or
``shard``), each fed ``1 / dp`` of the batch, counted by ``planning.data_parallel``: their
bytes per rank and the reductions a step waits for. Expert parallelism is not planned yet.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist

from dualpipe_fx.api.options import ActivationBudget, MemoryPolicy, Parallelism
from dualpipe_fx.api.split import split_for_program, stage_io_bytes
from dualpipe_fx.planning.devices import (DEVICES, NETWORKS, DeviceModel, NetworkModel, device_model, network_model,
                                         node_seconds, probe_device, probe_network)
from dualpipe_fx.planning.data_parallel import DP_MODES, exposed_seconds, replicated
from dualpipe_fx.planning.memory import MemoryPlan, split_plan
from dualpipe_fx.planning.simulate import Costs, StageCosts, simulate
from dualpipe_fx.runtime.agree import together, vote_device
from dualpipe_fx.schedules.ir import Program
from dualpipe_fx.schedules.lowering import RECV_LOOKAHEAD
from dualpipe_fx.schedules.registry import SCHEDULES, generate
from passes.capture import capture
from passes.cost_model import node_costs

__all__ = ["autoplan", "Plan", "Plans", "Rejected", "DEFAULT_SCHEDULES", "pick_schedule", "fit_recompute"]

log = logging.getLogger(__name__)

# every schedule the runtime runs; "zb1p" is ZB-H1 (torch's own name for it is ZB1P)
DEFAULT_SCHEDULES = ("dualpipev", "dualpipe", "zbv", "zb1p", "1f1b", "interleaved_1f1b", "gpipe")
DEFAULT_RECOMPUTE = (None, "selective", "full")
DEFAULT_DP_MODES = ("replicate", "shard")
MAX_PP_DEGREE = 16  # deeper pipelines are searched only when named (pp_degree=, space["pp_degree"])
_SPACE_KEYS = ("schedule", "num_microbatches", "recompute", "pp_degree", "dp_mode")


@dataclass(frozen=True)
class Plan:
    """One feasible configuration: what ``compile()`` takes to build it, and what it predicts."""

    schedule: str
    num_microbatches: int
    recompute: Any
    predicted_step_s: float
    bubble_ratio: float
    memory: MemoryPlan
    microbatch_size: int
    samples_per_s: float  # over the dp replicas
    pp_degree: int = 1
    dp_degree: int = 1
    dp_mode: Optional[str] = None

    @property
    def compile_kwargs(self) -> dict[str, Any]:
        """``compile(model, loss_fn, (x[:mb],), y[:mb], **plan.compile_kwargs)`` builds it
        (``mb = plan.microbatch_size``) on a group of ``pp_degree`` ranks; with data
        parallelism (``dp_degree > 1``) use :meth:`build_kwargs`, which makes the groups too."""
        return {"schedule": self.schedule, "num_microbatches": self.num_microbatches,
                "memory": MemoryPolicy(recompute=self.recompute)}

    def build_kwargs(self, world_group=None) -> dict[str, Any]:
        """``compile_kwargs`` with ``group=`` (this rank's pipeline) and, for ``dp_degree > 1``,
        ``parallelism=Parallelism(dp_group=, dp_mode=)``: the plan's process groups. Pipelines
        are ``pp_degree`` consecutive ranks of ``world_group`` (default: the world); a
        data-parallel group is the ranks at one depth of every pipeline. Each rank feeds its
        pipeline its own ``1 / dp_degree`` of the batch. Every rank of the default group calls
        it (it creates process groups)."""
        pp_group, dp_group = pipeline_grid(self.pp_degree, self.dp_degree, world_group)
        kwargs = {**self.compile_kwargs, "group": pp_group}
        if self.dp_degree > 1:
            kwargs["parallelism"] = Parallelism(dp_group=dp_group, dp_mode=self.dp_mode)
        return kwargs

    @property
    def peak_bytes(self) -> int:
        """The largest rank's planned total (params, grads, optimizer state, the step's peak)."""
        return max(r.total for r in self.memory.ranks)

    def row(self) -> tuple[str, ...]:
        return (str(self.pp_degree), f"{self.dp_degree} {self.dp_mode}" if self.dp_degree > 1 else "1",
                self.schedule, str(self.num_microbatches), str(self.recompute),
                f"{self.predicted_step_s * 1e3:,.2f}", f"{self.bubble_ratio:.3f}",
                f"{self.peak_bytes / 2 ** 30:,.3f}", f"{self.samples_per_s:,.1f}")


@dataclass(frozen=True)
class Rejected:
    """A candidate left out, and why (cannot run, or over the budget on a rank by how much)."""

    schedule: str
    num_microbatches: int
    recompute: Any
    reason: str
    pp_degree: int = 1
    dp_degree: int = 1
    dp_mode: Optional[str] = None

    def label(self) -> str:
        dp = f"dp={self.dp_degree} {self.dp_mode}, " if self.dp_degree > 1 else ""
        return f"pp={self.pp_degree}, {dp}{self.schedule}, C={self.num_microbatches}, recompute={self.recompute}"


def pipeline_grid(pp_degree: int, dp_degree: int, world_group=None):
    """``(pp_group, dp_group)`` of this rank: ``dp_degree`` pipelines of ``pp_degree``
    consecutive ranks of ``world_group`` (default: the world), and the ranks at one depth of
    every pipeline (None when ``dp_degree`` is 1). Every rank of the default group calls it.

    Raises:
        ValueError: ``pp_degree * dp_degree`` is not the size of ``world_group``.
    """
    size = dist.get_world_size(world_group)
    if pp_degree * dp_degree != size:
        raise ValueError(f"pipeline_grid: pp_degree {pp_degree} x dp_degree {dp_degree} != {size} ranks in the "
                         "group; pick degrees whose product is the group's size")
    ranks = [dist.get_global_rank(world_group, r) if world_group is not None else r for r in range(size)]
    rows = [ranks[d * pp_degree:(d + 1) * pp_degree] for d in range(dp_degree)]
    pp_group, _ = dist.new_subgroups_by_enumeration(rows)
    if dp_degree == 1:
        return pp_group, None
    dp_group, _ = dist.new_subgroups_by_enumeration([list(c) for c in zip(*rows)])
    return pp_group, dp_group


class Plans(list):
    """``Plan``s, fastest first; ``rejected``: every candidate left out, with its reason;
    ``search_s``: how long the search took."""

    def __init__(self, plans: Sequence[Plan], rejected: Sequence[Rejected], search_s: float,
                 device: DeviceModel, network: NetworkModel) -> None:
        super().__init__(plans)
        self.rejected = list(rejected)
        self.search_s = search_s
        self.device, self.network = device, network

    def table(self) -> str:
        """The ranking as text: one row per plan, then the rejected candidates."""
        head = ("pp", "dp", "schedule", "C", "recompute", "step ms", "bubble", "peak GiB", "samples/s")
        rows = [head] + [p.row() for p in self]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"device {self.device.name}, network {self.network.name}; searched in {self.search_s:.1f} s"]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        lines += [f"rejected: {r.label()}: {r.reason}" for r in self.rejected]
        return "\n".join(lines)


def _batch_size(batch_inputs: tuple) -> int:
    sizes = {t.shape[0] for t in batch_inputs if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"autoplan: batch_inputs have first dims {sorted(sizes)}; expected one batch size "
                         "shared by every input tensor (the whole batch of one step)")
    return sizes.pop()


def _divisors(n: int) -> list[int]:
    return [c for c in range(1, n + 1) if n % c == 0]


def _counts(batch: int, ranks: int) -> list[int]:
    """Every micro-batch count that divides ``batch``, from the pipeline degree up to 8 per rank
    (fewer leaves a bubble no schedule hides; more only adds per-action overhead)."""
    return [c for c in _divisors(batch) if ranks <= c <= 8 * ranks] or [batch]


def _space(space: Optional[Mapping[str, Sequence]], batch: int, world: int, pp_degree: Optional[int]) -> dict:
    space = dict(space or {})
    unknown = sorted(set(space) - set(_SPACE_KEYS))
    if unknown:
        raise ValueError(f"autoplan: space has keys {unknown}; expected some of {list(_SPACE_KEYS)}")
    schedules = list(space.get("schedule", DEFAULT_SCHEDULES))
    bad = [s for s in schedules if s not in SCHEDULES]
    if bad:
        raise ValueError(f"autoplan: unknown schedules {bad} in space; known: {', '.join(SCHEDULES)}")
    # pipeline degrees: the given one, else the divisors of the world up to MAX_PP_DEGREE
    degrees = [pp_degree] if pp_degree is not None else list(space.get(
        "pp_degree", [d for d in _divisors(world) if d <= MAX_PP_DEGREE]))
    wrong = [d for d in degrees if not (isinstance(d, int) and d >= 1 and world % d == 0)]
    if wrong:
        raise ValueError(f"autoplan: pipeline degrees {wrong} do not divide world_size={world}; the ranks beside "
                         "the pipeline are data-parallel replicas of it, so pick divisors of world_size")
    modes = list(space.get("dp_mode", DEFAULT_DP_MODES))
    if any(m not in DP_MODES for m in modes):
        raise ValueError(f"autoplan: space's dp_mode {modes}; expected some of {list(DP_MODES)}")
    return {"schedule": schedules, "num_microbatches": list(space.get("num_microbatches", [])),
            "recompute": list(space.get("recompute", DEFAULT_RECOMPUTE)), "pp_degree": degrees, "dp_mode": modes}


def _smallest_dim(node: torch.fx.Node) -> Optional[int]:
    """A GEMM-like node's smallest dimension (its shape class): the output's last two and the
    first input's last (the contracted one)."""
    val = node.meta.get("val")
    first = node.all_input_nodes[0].meta.get("val") if node.all_input_nodes else None
    dims = list(val.shape[-2:]) if isinstance(val, torch.Tensor) else []
    dims += [first.shape[-1]] if isinstance(first, torch.Tensor) and first.dim() else []
    return int(min(dims)) if dims else None


def _graph_seconds(gm: torch.fx.GraphModule, device: DeviceModel, memo: Optional[dict] = None) -> float:
    """Roofline seconds of every compute node of ``gm`` on ``device`` (``memo``: FLOPs by op
    signature, shared by a search's graphs)."""
    total = 0.0
    by_name = {n.name: n for n in gm.graph.nodes}
    for name, cost in node_costs(gm, flop_memo=memo).items():
        node = by_name[name]
        val = node.meta.get("val")
        dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
        total += node_seconds(cost.flops, cost.bytes, dtype, device, _smallest_dim(node) if cost.flops else None)
    return total


def _boundary_bytes(parts) -> int:
    """The largest activation one stage hands the next (per micro-batch)."""
    return max((stage_io_bytes(gm)[1] for gm in parts.partition.stages[:-1]), default=0)


def stage_costs(parts, program: Program, device: DeviceModel, network: NetworkModel,
                memo: Optional[dict] = None) -> StageCosts:
    """Seconds of every action of ``program`` from its stage graphs' roofline costs."""
    per_part = {}
    for k, sg in enumerate(parts.stages):
        f = _graph_seconds(sg.forward.gm, device, memo)
        i = _graph_seconds(sg.backward_input.gm, device, memo)
        w = _graph_seconds(sg.backward_weight.gm, device, memo)
        per_part[k] = (f, i, w)
    extra = device.action_overhead_s
    rank_of = program.stage_to_rank()

    def transfers(action) -> int:
        """The P2P transfers ``action`` posts or waits on: F receives its input and sends its
        output, B or I receives its output's grad and sends its input's; only across ranks."""
        if action.kind == "W":
            return 0
        peers = (program.previous_stage(action.stage), program.next_stage(action.stage))
        return sum(peer is not None and rank_of[peer] != rank_of[action.stage] for peer in peers)

    def seconds(action) -> float:
        if action.kind == "FB":  # one action of the runtime, with both parts' transfers
            return seconds(action.forward) + seconds(action.backward) - extra
        f, i, w = per_part[program.model_part(action.stage)]
        return ({"F": f, "B": i + w, "I": i, "W": w}[action.kind] + extra
                + device.p2p_overhead_s * transfers(action))

    by_action = {a: seconds(a) for actions in program.values() for a in actions}
    mean = [sum(v[j] for v in per_part.values()) / len(per_part) for j in range(3)]
    base = Costs(F=mean[0], B=mean[1] + mean[2], W=mean[2], comm=network.seconds(_boundary_bytes(parts)))
    return StageCosts(base, by_key={}, by_action=by_action)


def _over_budget(memory: MemoryPlan, budget: int) -> Optional[str]:
    over = [(r.rank, r.total - budget) for r in memory.ranks if r.total > budget]
    if not over:
        return None
    rank, by = max(over, key=lambda x: x[1])
    return f"out of memory on rank {rank} by {by / 2 ** 30:,.3f} GiB (its total {(budget + by) / 2 ** 30:,.3f} GiB)"


def autoplan(model: torch.nn.Module, loss_fn: Callable, batch_inputs, batch_target=None, *, world_size: int,
             device: Union[str, DeviceModel] = "cpu", memory_budget: Optional[int] = None,
             network: Union[str, NetworkModel, None] = None, pp_degree: Optional[int] = None,
             space: Optional[Mapping[str, Sequence]] = None, top: Optional[int] = 5,
             optimizer: Union[str, int, float] = "adamw", trace_device=None) -> Plans:
    """The best pipeline configurations of ``model`` on ``world_size`` ranks, fastest first.

    Args:
        model, loss_fn: as ``compile`` (a model on meta is traced on fake tensors).
        batch_inputs, batch_target: the WHOLE batch of one step (a tensor or a tuple of
            tensors, batch dim first); the planner chooses how to split it.
        world_size: ranks in all. pp_degree: the pipeline degree (a divisor of
            ``world_size``; the rest are data-parallel replicas), or None to search the
            divisors up to ``MAX_PP_DEGREE``.
        device: a ``planning.devices`` table name (``"h100"``, ``"h200"``, ``"a100"``,
            ``"mi300x"``), ``"cpu"`` (probed here) or a ``DeviceModel``.
        memory_budget: bytes per rank (default: the device's memory; a probed CPU has none,
            so nothing is pruned).
        network: a ``NETWORKS`` name or a ``NetworkModel`` (default: NVLink for a GPU, the
            ``localhost`` row for a CPU); ``planning.devices.probe_network`` measures one.
        space: restricts the search, e.g. ``{"schedule": ["dualpipev"], "num_microbatches":
            [4, 8], "recompute": [None], "pp_degree": [4, 8], "dp_mode": ["shard"]}``.
        top: how many plans to return (None: every feasible one).
        optimizer: the optimizer whose state counts (as ``MemoryPolicy.optimizer``).
        trace_device: the device the graphs are traced for (default cpu).

    Returns:
        ``Plans``: ``Plan``s (``.compile_kwargs``, ``.build_kwargs()`` with the process
        groups, ``.predicted_step_s``, ``.memory``: per-rank bytes with the data-parallel
        mode applied), with ``.rejected`` and ``.table()``.

    Raises:
        ValueError: a ``pp_degree`` that does not divide ``world_size``, a bad ``space``, or
            no candidate that fits (every candidate's reason listed).
    """
    if world_size < 1:
        raise ValueError(f"autoplan: world_size={world_size}; expected >= 1")
    start = time.perf_counter()
    dev = device_model(device)
    net = network_model(network, dev)
    budget = memory_budget if memory_budget is not None else (dev.memory_bytes or None)
    inputs = (batch_inputs,) if isinstance(batch_inputs, torch.Tensor) else tuple(batch_inputs)
    batch = _batch_size(inputs)
    grid = _space(space, batch, world_size, pp_degree)
    plans, rejected, memo, backward_cache, captures = [], [], {}, {}, {}

    def unsplittable(c: int, pp: int, dp: int, modes: list, why: str) -> list[Rejected]:
        return [Rejected(s, c, r, f"the batch of {batch} does not split into {why}", pp, dp, m)
                for s in grid["schedule"] for r in grid["recompute"] for m in modes]

    for pp in grid["pp_degree"]:
        dp = world_size // pp
        modes = [m for m in grid["dp_mode"] if m is not None] if dp > 1 else [None]
        if batch % dp:  # each replica takes batch / dp samples
            rejected += unsplittable(0, pp, dp, modes, f"{dp} data-parallel replicas")
            continue
        for c in grid["num_microbatches"] or _counts(batch // dp, pp):
            if batch % (dp * c):
                rejected += unsplittable(c, pp, dp, modes, f"{dp} replica(s) x {c} micro-batches")
                continue
            mb = batch // (dp * c)
            examples = tuple(t[:mb] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in inputs)
            target = batch_target[:mb] if isinstance(batch_target, torch.Tensor) and batch_target.dim() > 0 \
                else batch_target
            if mb not in captures:  # one trace per micro-batch size, whatever the degrees around it
                captures[mb] = capture(model, loss_fn, examples, target,
                                       device=torch.device("cpu" if trace_device is None else trace_device))
            got = _search(model, loss_fn, examples, target, None, schedules=grid["schedule"], num_microbatches=c,
                          recomputes=grid["recompute"], ranks=pp, device=dev, network=net, budget=budget,
                          optimizer=optimizer, trace_device=trace_device, memo=memo, dp=dp, dp_modes=modes,
                          backward_cache=backward_cache, captured=captures[mb])
            plans += got[0]
            rejected += got[1]
    return _ranked(plans, rejected, top, time.perf_counter() - start, dev, net, world_size)


def _ranked(plans, rejected, top, seconds, dev, net, ranks) -> Plans:
    plans = sorted(plans, key=lambda p: (p.predicted_step_s, p.peak_bytes))
    if not plans:
        reasons = "\n".join(f"  {r.label()}: {r.reason}" for r in rejected)
        raise ValueError(f"autoplan: no configuration fits on {ranks} ranks:\n{reasons}\nFix: raise the "
                         "memory budget, use more ranks, or widen the space")
    return Plans(plans if top is None else plans[:top], rejected, seconds, dev, net)


def candidate(model, loss_fn, examples: tuple, target, *, schedule: str, num_microbatches: int, recompute,
              ranks: int, device: DeviceModel, network: NetworkModel, optimizer="adamw", trace_device=None,
              example_kwargs=None, captured=None, memo: Optional[dict] = None,
              backward_cache: Optional[dict] = None) -> Union[Plan, Rejected]:
    """One configuration on one example micro-batch: a ``Plan`` (whatever its memory), or a
    ``Rejected`` when the schedule cannot run these ranks and micro-batches.
    ``captured``: the micro-batch's capture, shared by the candidates (one trace, many cuts);
    ``memo``, ``backward_cache``: FLOPs by op and split stages, shared by them too."""
    try:
        program = generate(schedule, ranks, num_microbatches)
    except ValueError as err:
        return Rejected(schedule, num_microbatches, recompute, str(err).split(";")[0], ranks)
    trace_on = torch.device("cpu" if trace_device is None else trace_device)
    gloo = network.name in ("localhost", "probed") and trace_on.type == "cpu"
    parts, plan = _planned(model, loss_fn, examples, target, example_kwargs, program, recompute, optimizer,
                           trace_on, captured, backward_cache, gloo)
    sim = simulate(program, stage_costs(parts, program, device, network, memo), early_results=gloo)
    mb = next((t.shape[0] for t in examples if isinstance(t, torch.Tensor) and t.dim() > 0), 1)
    step = sim.makespan + vote_seconds(ranks, network)
    return Plan(schedule, num_microbatches, recompute, step, sim.bubble_ratio, plan, mb,
                mb * num_microbatches / step, pp_degree=ranks)


# Pipeline.step's agreement: its "inputs" and "outcome" votes (runtime/agree.py), one small
# all_reduce each over the pipeline's group, and over dp_group too when there are replicas.
STEP_VOTES = 2


def vote_seconds(ranks: int, network: NetworkModel) -> float:
    """The time a step spends in its votes over ``ranks`` ranks (an 8-byte flag each)."""
    return STEP_VOTES * network.ring_seconds(8, ranks) if ranks > 1 else 0.0


def _planned(model, loss_fn, examples, target, example_kwargs, program: Program, recompute, optimizer,
             trace_on: torch.device, captured, backward_cache: Optional[dict], gloo: bool):
    """The cut ``compile()`` makes for ``program`` under ``recompute``, and its memory plan."""
    memory = MemoryPolicy(recompute=recompute, optimizer=optimizer)
    if captured is None:
        captured = capture(model, loss_fn, examples, target, example_kwargs=example_kwargs, device=trace_on)
    parts = split_for_program(program, model, loss_fn, examples, target, device=trace_on, memory=memory,
                              example_kwargs=example_kwargs, captured=captured, backward_cache=backward_cache)
    return parts, split_plan(parts, program, optimizer=optimizer, recv_lookahead=RECV_LOOKAHEAD if gloo else 0,
                             recompute=recompute)


def _over_fraction(memory: MemoryPlan, reference: MemoryPlan, fraction: float) -> Optional[str]:
    """``ActivationBudget``: a rank whose saved activations exceed ``fraction`` x the reference's
    (the same schedule without recompute)."""
    for mine, none in zip(memory.ranks, reference.ranks):
        if mine.peak_activations > fraction * none.peak_activations:
            return (f"activations saved on rank {mine.rank} {mine.peak_activations / 2 ** 20:,.2f} MiB > "
                    f"{fraction} x {none.peak_activations / 2 ** 20:,.2f} MiB without recompute (ActivationBudget)")
    return None


def _unfit(plan: Plan, reference: Optional[Plan], budget: Optional[int], fraction: Optional[float]) -> Optional[str]:
    """Why ``plan`` does not fit: over the bytes budget on a rank, or (short of ``"full"``, which
    is taken where nothing less does) over the activation budget."""
    if budget is not None and (why := _over_budget(plan.memory, budget)):
        return why
    if fraction is not None and plan.recompute != "full" and reference is not None:
        return _over_fraction(plan.memory, reference.memory, fraction)
    return None


def _recompute_order(policy) -> int:
    return {None: 0, "selective": 1, "full": 2}.get(policy, 3)


def _search(model, loss_fn, examples: tuple, target, example_kwargs, *, schedules: Sequence[str],
            num_microbatches: int, recomputes: Sequence, ranks: int, device: DeviceModel, network: NetworkModel,
            budget: Optional[int], optimizer, trace_device, memo: dict, fraction: Optional[float] = None,
            dp: int = 1, dp_modes: Sequence[Optional[str]] = (None,),
            backward_cache: Optional[dict] = None, captured=None,
            dp_network: Optional[NetworkModel] = None) -> tuple[list[Plan], list[Rejected]]:
    """Every schedule x dp mode x recompute policy for one micro-batch count of a ``ranks``-deep
    pipeline (``dp`` replicas of it), on one capture. Policies go from saving the most to
    recomputing the most, and stop at the first that fits the bytes ``budget`` (and
    ``fraction``, an ``ActivationBudget``'s, against the schedule's plan without recompute):
    recompute only adds compute, so a later one that fits too is slower (it is listed as
    rejected, why). ``captured``: the micro-batch's capture, when the caller has it;
    ``dp_network``: the replicas' links (default ``network``)."""
    trace_on = torch.device("cpu" if trace_device is None else trace_device)
    if captured is None:
        captured = capture(model, loss_fn, examples, target, example_kwargs=example_kwargs, device=trace_on)
    plans, rejected, pipelines = [], [], {}
    backward_cache = {} if backward_cache is None else backward_cache

    def pipeline(schedule, recompute) -> Union[Plan, Rejected]:  # one replica's, shared by the dp modes
        if (schedule, recompute) not in pipelines:
            pipelines[schedule, recompute] = candidate(
                model, loss_fn, examples, target, schedule=schedule, num_microbatches=num_microbatches,
                recompute=recompute, ranks=ranks, device=device, network=network, optimizer=optimizer,
                trace_device=trace_on, example_kwargs=example_kwargs, captured=captured, memo=memo,
                backward_cache=backward_cache)
        return pipelines[schedule, recompute]

    for schedule, mode in ((s, m) for s in schedules for m in dp_modes):
        fits, cannot, reference = None, None, None
        for recompute in sorted(recomputes, key=_recompute_order):
            if fits is not None or cannot is not None:
                rejected.append(Rejected(schedule, num_microbatches, recompute, cannot or (
                    f"not tried: recompute={fits.recompute!r} fits, and recomputing more only adds compute"),
                    ranks, dp, mode))
                continue
            got = pipeline(schedule, recompute)
            if isinstance(got, Rejected):  # the schedule cannot run these micro-batches: no policy changes that
                rejected.append(dataclasses.replace(got, dp_degree=dp, dp_mode=mode))
                cannot = got.reason
                continue
            got = _with_replicas(got, dp, mode, dp_network or network)
            reference = got if recompute is None else reference
            why = _unfit(got, reference, budget, fraction)
            if why:
                rejected.append(Rejected(schedule, num_microbatches, recompute, why, ranks, dp, mode))
            else:
                plans.append(got)
                fits = got
    return plans, rejected


def _with_replicas(plan: Plan, dp: int, mode: Optional[str], network: NetworkModel) -> Plan:
    """A replica's ``plan`` as one of ``dp`` data-parallel replicas in ``mode``
    (``planning.data_parallel``): its ranks' bytes, and the step's wait for the reductions."""
    if dp == 1:
        return plan
    step = plan.predicted_step_s + exposed_seconds(plan.memory, dp, mode, network) + vote_seconds(dp, network)
    return dataclasses.replace(plan, predicted_step_s=step, memory=replicated(plan.memory, dp, mode), dp_degree=dp,
                               dp_mode=mode, samples_per_s=plan.samples_per_s * plan.predicted_step_s / step * dp)


AUTO = "auto"


def _agreed_device(device: torch.device, group) -> DeviceModel:
    """The table's model of this GPU kind, else rank 0's probe broadcast to every rank (the
    ranks must choose alike, and probes differ a little: every figure the prediction reads,
    the shape classes included, comes from rank 0)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        known = next((k for k in DEVICES if k in name.replace(" ", "")), None)
        if known:
            return DEVICES[known]
    probed = probe_device(device)
    bounds = [bound for bound, _ in probed.small_gemms]
    figures = torch.tensor([probed.peak_flops["float32"], probed.peak_flops["bfloat16"], probed.bandwidth,
                            probed.kernel_overhead_s, probed.action_overhead_s, probed.p2p_overhead_s,
                            *(fraction for _, fraction in probed.small_gemms)], dtype=torch.float64)
    if dist.get_world_size(group) > 1:
        figures = figures.to(vote_device(group))
        dist.broadcast(figures, group_src=0, group=group)
    f32, bf16, bandwidth, kernel, action, p2p, *fractions = figures.cpu().tolist()
    return dataclasses.replace(probed, peak_flops=MappingProxyType({"float32": f32, "bfloat16": bf16}),
                               bandwidth=bandwidth, kernel_overhead_s=kernel, action_overhead_s=action, p2p_overhead_s=p2p,
                               small_gemms=tuple(zip(bounds, fractions)))


def pick_schedule(model, loss_fn, examples: tuple, target, example_kwargs, *, group, world: int,
                  num_microbatches: int, device: torch.device, memory: MemoryPolicy, timeout,
                  dp_group=None, dp_mode: str = "replicate") -> tuple[str, MemoryPolicy]:
    """``compile(schedule="auto")``: the fastest schedule (and, unless ``memory.recompute`` is
    a policy, the recompute policy: within its ``ActivationBudget`` if it is one) for these
    micro-batches that keeps every rank within ``memory.budget`` (or the device's memory).
    With a ``dp_group`` the pipeline is one of its replicas in ``dp_mode``: each rank's bytes
    and the step's wait for the reductions count as ``autoplan`` counts them (the reductions
    priced on the links probed over ``dp_group``). Every rank measures alike (rank 0's probes,
    broadcast) and so picks alike; rank 0 logs the ranking."""
    dev = _agreed_device(device, group)
    net = probe_network(group, device=vote_device(group)) if world > 1 else NETWORKS["localhost"]
    dp = 1 if dp_group is None else dist.get_world_size(dp_group)
    dp_net = probe_network(dp_group, device=vote_device(dp_group)) if dp > 1 else net
    budget = memory.budget if memory.budget is not None else (dev.memory_bytes or None)
    chosen = memory.recompute is None or isinstance(memory.recompute, ActivationBudget)
    recomputes = list(DEFAULT_RECOMPUTE) if chosen else [memory.recompute]
    start = time.perf_counter()
    with together(group, timeout, "compile(schedule='auto')"):
        plans, rejected = _search(model, loss_fn, examples, target, example_kwargs, schedules=DEFAULT_SCHEDULES,
                                  num_microbatches=num_microbatches, recomputes=recomputes, ranks=world, device=dev,
                                  network=net, budget=budget, optimizer=memory.optimizer, trace_device=device,
                                  memo={}, fraction=_fraction(memory), dp=dp,
                                  dp_modes=(dp_mode if dp > 1 else None,), dp_network=dp_net)
        ranked = _ranked(plans, rejected, None, time.perf_counter() - start, dev, net, world)
    best = ranked[0]
    schedule, recompute = best.schedule, best.recompute
    if dp > 1:  # each replica probed its own links: every replica takes the first replica's pick
        choice = torch.tensor([DEFAULT_SCHEDULES.index(schedule), recomputes.index(recompute)],
                              device=vote_device(dp_group))
        dist.broadcast(choice, group_src=0, group=dp_group)
        schedule, recompute = DEFAULT_SCHEDULES[int(choice[0])], recomputes[int(choice[1])]
    if dist.get_rank(group) == 0:
        log.info("compile(schedule='auto') picked %s, recompute=%s:\n%s", schedule, recompute, ranked.table())
    return schedule, dataclasses.replace(memory, recompute=recompute)


def _fraction(memory: MemoryPolicy) -> Optional[float]:
    return memory.recompute.fraction if isinstance(memory.recompute, ActivationBudget) else None


def fit_recompute(model, loss_fn, examples: tuple, target, example_kwargs, *, schedule: str, world: int,
                  num_microbatches: int, device: torch.device, memory: MemoryPolicy) -> MemoryPolicy:
    """``compile(schedule=S, memory=MemoryPolicy(recompute=ActivationBudget(f)))``: ``memory``
    with the least recompute whose saved activations stay within ``f`` x those of no recompute
    on every rank (``"full"`` where none does). From the memory plan of the graphs alone, so
    every rank, tracing the same model and micro-batch, picks alike; nothing is timed."""
    program = generate(schedule, world, num_microbatches)
    trace_on = torch.device(device)
    captured = capture(model, loss_fn, examples, target, example_kwargs=example_kwargs, device=trace_on)
    fraction, reference, backward_cache, chosen = _fraction(memory), None, {}, "full"
    for recompute in DEFAULT_RECOMPUTE[:-1]:  # "full" is taken where nothing less fits
        _, plan = _planned(model, loss_fn, examples, target, example_kwargs, program, recompute, memory.optimizer,
                           trace_on, captured, backward_cache, trace_on.type == "cpu")
        reference = reference or plan
        if not _over_fraction(plan, reference, fraction):
            chosen = recompute
            break
    log.info("ActivationBudget(%s) picked recompute=%r", fraction, chosen)
    return dataclasses.replace(memory, recompute=chosen)
