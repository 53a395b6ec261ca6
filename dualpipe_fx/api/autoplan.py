"""``dualpipe_fx.autoplan``: choose the pipeline degree, schedule, micro-batch count, recompute
policy, data-parallel mode and expert-parallel degree of a pipeline under a memory budget,
from the model alone (no process group, nothing allocated for a meta model).

**Contract**: ``autoplan(model, loss_fn, batch_inputs, batch_target, *, world_size, device,
memory_budget, ...) -> Plans`` (a list of ``Plan``, fastest first, with ``.rejected``: every
candidate left out and why). Each candidate is cut and planned as ``compile()`` would build
it (``granularity="op"``: ``split_for_program`` on one micro-batch of the batch,
``planning.memory``) or from its layers' figures (``"layer"``: ``planning.layers``, one
traced layer of each kind, stages of whole layers), timed by the simulator with roofline
costs of its stage graphs on the device model (``planning.devices``), and kept when every
rank's total fits ``memory_budget``.

**Pseudocode**
    for pp in the divisors of world_size; dp = world_size / pp; for (dp mode, ep) families:
        a family whose kept bytes (params, grads, optimizer state) alone average over the
        budget per rank: rejected for every C, schedule and policy, before any trace
        for C, schedule, recompute from None to "full" until one fits:
            program = generate(schedule, pp, C)       (a schedule that cannot run pp, C: rejected)
            parts = the cut for one micro-batch (batch / (dp C)), one replica's pipeline
            per stage: F, I, W seconds = sum of node_seconds over its graphs (+ per-action
                overhead; + each MoE layer's all_to_alls over ep)
            step = simulate(program, those costs, a hop = network.seconds(boundary bytes))
            with top: step slower than the top found so far -> rejected, memory not planned
            memory = the plan, with dp replicas and the experts' split applied
                                                      (a rank over the budget: rejected, by how much)
            step += the data-parallel reductions the step waits for
    rank the survivors by step (then by peak memory)

The pipeline degree ranges over the divisors of ``world_size`` (up to ``MAX_PP_DEGREE``
unless named); the other ranks are data-parallel replicas of the pipeline (``replicate`` or
``shard``), each fed ``1 / dp`` of the batch, counted by ``planning.data_parallel``: their
bytes per rank and the reductions a step waits for; for an MoE model, the experts are split
over ``ep`` of those ranks (``1 / ep`` of their bytes per rank, their all_to_alls in F and I).
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass
from types import MappingProxyType, SimpleNamespace
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist

from dualpipe_fx.api.options import ActivationBudget, MemoryPolicy, Parallelism
from dualpipe_fx.runtime.data_parallel import ExpertParallel
from dualpipe_fx.api.split import _split_backward, split_for_program
from dualpipe_fx.planning.devices import (DEVICES, NETWORKS, DeviceModel, NetworkModel, device_model, network_model,
                                         node_seconds, probe_device, probe_network)
from dualpipe_fx.planning.data_parallel import DP_MODES, all_to_all_seconds, exposed_seconds, replicated
from dualpipe_fx.planning.layers import LayerProfile, affine, layer_bounds, layer_names, profile_layers
from dualpipe_fx.planning.memory import MemoryPlan, _fmt, _graph_values, _plan_from, optimizer_bytes, split_plan
from dualpipe_fx.planning.simulate import Costs, StageCosts, simulate
from dualpipe_fx.runtime.agree import together, vote_device
from dualpipe_fx.schedules.ir import Program
from dualpipe_fx.schedules.lowering import RECV_LOOKAHEAD
from dualpipe_fx.schedules.registry import SCHEDULES, generate
from passes.capture import capture
from passes.split_stages import split_stages
from passes.cost_model import concrete_size, node_costs, stage_io_bytes

__all__ = ["autoplan", "Plan", "Plans", "Rejected", "DEFAULT_SCHEDULES", "pick_schedule", "fit_recompute",
           "pipeline_grid", "expert_grid", "is_expert_param"]

log = logging.getLogger(__name__)

# every schedule the runtime runs; "zb1p" is ZB-H1 (torch's own name for it is ZB1P)
DEFAULT_SCHEDULES = ("dualpipev", "dualpipe", "zbv", "zb1p", "1f1b", "interleaved_1f1b", "gpipe")
DEFAULT_RECOMPUTE = (None, "selective", "full")
DEFAULT_DP_MODES = ("replicate", "shard")
MAX_PP_DEGREE = 16  # deeper pipelines are searched only when named (pp_degree=, space["pp_degree"])
_SPACE_KEYS = ("schedule", "num_microbatches", "recompute", "pp_degree", "dp_mode", "ep_degree")


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
    ep_degree: int = 1  # the experts split over this many of the dp ranks (1: every rank holds them all)
    expert_params: Any = dataclasses.field(default=None, compare=False, repr=False)  # FQN -> is an expert

    @property
    def compile_kwargs(self) -> dict[str, Any]:
        """``compile(model, loss_fn, (x[:mb],), y[:mb], **plan.compile_kwargs)`` builds it
        (``mb = plan.microbatch_size``) on a group of ``pp_degree`` ranks; with data
        parallelism (``dp_degree > 1``) use :meth:`build_kwargs`, which makes the groups too."""
        return {"schedule": self.schedule, "num_microbatches": self.num_microbatches,
                "memory": MemoryPolicy(recompute=self.recompute)}

    def build_kwargs(self, world_group=None) -> dict[str, Any]:
        """``compile_kwargs`` with ``group=`` (this rank's pipeline) and, for ``dp_degree > 1``,
        ``parallelism=Parallelism(dp_group=, dp_mode=, expert_parallel=)``: the plan's process
        groups. Pipelines are ``pp_degree`` consecutive ranks of ``world_group`` (default: the
        world); a data-parallel group is the ranks at one depth of every pipeline; with
        ``ep_degree > 1`` its members split into EP groups of ``ep_degree`` consecutive ones
        (``ExpertParallel(ep group, plan.expert_params, replica_group)``: the ranks of the
        other EP groups holding the same slice; None when one EP group spans the dp group).
        The model's MoE layers must exchange their tokens over that EP group and hold its
        slice of the experts (e.g. ``examples.moe.MoEDecoder(group=kwargs["parallelism"]
        .expert_parallel.group)``). Each rank feeds its pipeline its own ``1 / dp_degree`` of
        the batch (data-parallel rank ``rank // pp_degree``). Every rank of the default group
        calls it (it creates process groups)."""
        pp_group, dp_group = pipeline_grid(self.pp_degree, self.dp_degree, world_group)
        kwargs = {**self.compile_kwargs, "group": pp_group}
        if self.dp_degree > 1:
            experts = None
            if self.ep_degree > 1:
                ep_group, replicas = expert_grid(self.pp_degree, self.dp_degree, self.ep_degree, world_group)
                experts = ExpertParallel(ep_group, self.expert_params, replicas)
            kwargs["parallelism"] = Parallelism(dp_group=dp_group, dp_mode=self.dp_mode, expert_parallel=experts)
        return kwargs

    @property
    def peak_bytes(self) -> int:
        """The largest rank's planned total (params, grads, optimizer state, the step's peak)."""
        return max(r.total for r in self.memory.ranks)

    def row(self) -> tuple[str, ...]:
        ep = f" ep{self.ep_degree}" if self.ep_degree > 1 else ""
        return (str(self.pp_degree), f"{self.dp_degree} {self.dp_mode}{ep}" if self.dp_degree > 1 else "1",
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
    ep_degree: int = 1

    def label(self) -> str:
        ep = f" ep={self.ep_degree}" if self.ep_degree > 1 else ""
        dp = f"dp={self.dp_degree} {self.dp_mode}{ep}, " if self.dp_degree > 1 else ""
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


def expert_grid(pp_degree: int, dp_degree: int, ep_degree: int, world_group=None):
    """``(ep_group, replica_group)`` of this rank: its data-parallel group (see
    :func:`pipeline_grid`) cut into EP groups of ``ep_degree`` consecutive members, and the
    members at its place in every EP group (None when ``ep_degree == dp_degree``). Every rank
    of the default group calls it.

    Raises:
        ValueError: ``ep_degree`` does not divide ``dp_degree``.
    """
    if ep_degree < 1 or dp_degree % ep_degree:
        raise ValueError(f"expert_grid: ep_degree {ep_degree} does not divide dp_degree {dp_degree}; the EP "
                         "groups split each data-parallel group: pick a divisor of dp_degree")
    size = dist.get_world_size(world_group)
    ranks = [dist.get_global_rank(world_group, r) if world_group is not None else r for r in range(size)]
    columns = [ranks[d::pp_degree] for d in range(pp_degree)]  # one data-parallel group per depth
    eps = [col[i:i + ep_degree] for col in columns for i in range(0, dp_degree, ep_degree)]
    ep_group, _ = dist.new_subgroups_by_enumeration(eps)
    if ep_degree == dp_degree:
        return ep_group, None
    replicas = [col[j::ep_degree] for col in columns for j in range(ep_degree)]
    replica_group, _ = dist.new_subgroups_by_enumeration(replicas)
    return ep_group, replica_group


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
            "recompute": list(space.get("recompute", DEFAULT_RECOMPUTE)), "pp_degree": degrees, "dp_mode": modes,
            "ep_degree": list(space["ep_degree"]) if "ep_degree" in space else None}


def _smallest_dim(node: torch.fx.Node) -> Optional[int]:
    """A GEMM-like node's smallest dimension (its shape class): the output's last two and the
    first input's last (the contracted one)."""
    val = node.meta.get("val")
    first = node.all_input_nodes[0].meta.get("val") if node.all_input_nodes else None
    dims = list(val.shape[-2:]) if isinstance(val, torch.Tensor) else []
    dims += [first.shape[-1]] if isinstance(first, torch.Tensor) and first.dim() else []
    # a data-dependent size (an expert's tokens) by the cost model's guess
    return min(concrete_size(d) for d in dims) if dims else None


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


@dataclass(frozen=True)
class _Experts:
    """The model's MoE layers as the planner counts them: which parameters are experts, how
    many experts a layer has (the EP degree must divide it) and how many each token picks."""

    is_expert: Callable[[str], bool]
    count: int
    top_k: int


def is_expert_param(name: str) -> bool:
    """The default test for an expert parameter: torchtitan's MoE layers keep them under
    ``experts`` (``layers.3.moe.experts.w1``)."""
    return ".experts." in name


def _experts_of(model: torch.nn.Module, is_expert: Optional[Callable[[str], bool]]) -> Optional[_Experts]:
    """``model``'s experts (None: none). The count is an expert parameter's first dim (the
    experts stacked, as ``ExpertParallel`` shards them); top-k the largest int ``top_k`` of a
    module (torchtitan's router, ``examples.moe.MoEFeedForward``), else 1."""
    test = is_expert or is_expert_param
    first = next((p for n, p in model.named_parameters() if test(n)), None)
    if first is None or first.dim() == 0:
        return None
    top = [m.top_k for m in model.modules() if isinstance(getattr(m, "top_k", None), int)]
    return _Experts(test, int(first.shape[0]), max(top, default=1))


def _moe_layers(names: set, experts: Optional[_Experts]) -> int:
    """MoE layers among these parameters: the modules holding expert parameters."""
    if experts is None:
        return 0
    return len({n.rsplit(".", 1)[0] for n in names if experts.is_expert(n)})


@dataclass(frozen=True)
class _Pipeline:
    """One replica's pipeline for a candidate: its program, (F, I, W) seconds per model part,
    the largest activation a stage hands the next, MoE layers per part, each rank's bytes of
    expert parameters, and its memory plan (``memory``: planned on first use, so that a
    candidate the step time rules out is never planned)."""

    program: Program
    seconds: Mapping[int, tuple]
    hop_bytes: int
    moe: Mapping[int, int]
    expert_bytes: Mapping[int, int]
    plan_memory: Callable[[], MemoryPlan]
    kept: Mapping[int, tuple[int, int]] = dataclasses.field(default_factory=dict)  # rank -> (dense, expert)

    @functools.cached_property
    def memory(self) -> MemoryPlan:
        return self.plan_memory()


def _rank_tensors(program: Program, values: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[int, dict]:
    """Per rank, ``{name: traced value}`` of the parameters and buffers of its model parts."""
    place = program.stage_to_rank()
    parts = {r: {program.model_part(s) for s, q in place.items() if q == r} for r in sorted(program)}
    return {r: {n: t for k in ks for n, t in values[k].items()} for r, ks in parts.items()}


def _kept_bytes(program: Program, values: Mapping[int, Mapping[str, torch.Tensor]], trainable: set, optimizer,
                experts: Optional[_Experts]) -> dict[int, tuple[int, int]]:
    """Per rank, the params, grads and optimizer state of its parts (non-expert, expert)."""
    is_e = experts.is_expert if experts is not None else (lambda n: False)
    return {r: tuple(_kept([(t, n in trainable) for n, t in named.items() if is_e(n) == e], optimizer)
                     for e in (False, True))
            for r, named in _rank_tensors(program, values).items()}


def _kept(tensors: list, optimizer) -> int:
    """Bytes of these (tensor, trainable) pairs, of the trainable ones' grads and optimizer state."""
    nbytes = sum(t.numel() * t.element_size() for t, _ in tensors)
    train = [t for t, trainable in tensors if trainable]
    tbytes = sum(t.numel() * t.element_size() for t in train)
    return nbytes + tbytes + optimizer_bytes(optimizer, tbytes, sum(t.numel() for t in train), len(train))


def _kept_over(pipe: _Pipeline, dp: int, mode: Optional[str], ep: int, budget: Optional[int]) -> Optional[str]:
    """A rank whose params, grads and optimizer state alone (non-expert ones over dp when
    sharded, experts over ep) exceed the budget: no need to plan the rest."""
    if budget is None or not pipe.kept:
        return None
    shard = dp if mode in ("shard", "shard_grad_op") and dp > 1 else 1
    rank, kept = max(((r, d / shard + e / ep) for r, (d, e) in pipe.kept.items()), key=lambda x: x[1])
    if kept <= budget:
        return None
    return (f"out of memory on rank {rank} by at least {(kept - budget) / 2 ** 30:,.3f} GiB: its params, grads and "
            "optimizer state alone")


def _expert_bytes(program: Program, values: Mapping[int, Mapping[str, torch.Tensor]],
                  experts: Optional[_Experts]) -> dict[int, int]:
    if experts is None:
        return {}
    return {r: sum(t.numel() * t.element_size() for n, t in named.items() if experts.is_expert(n))
            for r, named in _rank_tensors(program, values).items()}


def stage_costs(pipe: _Pipeline, device: DeviceModel, network: NetworkModel, ep: int = 1,
                experts: Optional[_Experts] = None) -> StageCosts:
    """Seconds of every action of ``pipe.program`` from its parts' roofline seconds; with EP,
    each MoE layer's dispatch and combine all_to_alls (``top_k`` copies of the activation a
    stage hands the next, per micro-batch) in F and again, reversed, in I."""
    a2a = 0.0
    if ep > 1 and experts is not None:
        a2a = 2 * all_to_all_seconds(experts.top_k * pipe.hop_bytes, ep, network)
    per_part = {k: (f + pipe.moe.get(k, 0) * a2a, i + pipe.moe.get(k, 0) * a2a, w)
                for k, (f, i, w) in pipe.seconds.items()}
    extra = device.action_overhead_s
    program = pipe.program
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
    base = Costs(F=mean[0], B=mean[1] + mean[2], W=mean[2], comm=network.seconds(pipe.hop_bytes))
    return StageCosts(base, by_key={}, by_action=by_action)


def _over_budget(memory: MemoryPlan, budget: int) -> Optional[str]:
    over = [(r.rank, r.total - budget) for r in memory.ranks if r.total > budget]
    if not over:
        return None
    rank, by = max(over, key=lambda x: x[1])
    return f"out of memory on rank {rank} by {by / 2 ** 30:,.3f} GiB (its total {(budget + by) / 2 ** 30:,.3f} GiB)"


GRANULARITIES = ("auto", "op", "layer")
LAYERED_PARAMS = 10 ** 9  # "auto": models of at least this many parameters are cut between layers


def _granularity(model: torch.nn.Module, granularity: str) -> Optional[list[str]]:
    """The layer names the search cuts between, or None to cut between ops."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"autoplan: granularity={granularity!r}; expected one of {GRANULARITIES}")
    names = layer_names(model)
    if granularity == "layer" and not names:
        raise ValueError("autoplan: granularity='layer' needs a model whose layers sit in a ModuleList or ModuleDict "
                         "(its largest one is taken); this model has none. Fix: granularity='op'")
    if granularity == "op" or not names:
        return None
    if granularity == "auto" and sum(p.numel() for p in model.parameters()) < LAYERED_PARAMS:
        return None
    return names


def _static_floor(model: torch.nn.Module, optimizer, experts: Optional[_Experts]) -> tuple[int, int]:
    """(non-expert, expert) bytes of params + grads + optimizer state of the whole model."""
    def kept(params) -> int:
        params = list({id(p): p for p in params}.values())
        train = [p for p in params if p.requires_grad]
        nbytes = sum(p.numel() * p.element_size() for p in params)
        tbytes = sum(p.numel() * p.element_size() for p in train)
        return nbytes + tbytes + optimizer_bytes(optimizer, tbytes, sum(p.numel() for p in train), len(train))
    named = list(model.named_parameters())
    is_e = experts.is_expert if experts is not None else (lambda n: False)
    return kept(p for n, p in named if not is_e(n)), kept(p for n, p in named if is_e(n))


def _floor_reason(floor: tuple[int, int], pp: int, dp: int, mode: Optional[str], ep: int,
                  budget: Optional[int]) -> Optional[str]:
    """Why a family cannot fit whatever its cut: a rank holds at least the mean of what the
    pipeline's ranks keep between steps (params, grads, optimizer state: the non-expert part
    over ``dp`` when sharded, the experts over ``ep``)."""
    if budget is None:
        return None
    dense, experts = floor
    mean = (dense / (dp if mode in ("shard", "shard_grad_op") and dp > 1 else 1) + experts / ep) / pp
    if mean <= budget:
        return None
    return (f"out of memory on every cut: params, grads and optimizer state alone average {_fmt(int(mean))} per "
            f"rank (budget {_fmt(budget)})")


def autoplan(model: torch.nn.Module, loss_fn: Callable, batch_inputs, batch_target=None, *, world_size: int,
             device: Union[str, DeviceModel] = "cpu", memory_budget: Optional[int] = None,
             network: Union[str, NetworkModel, None] = None, pp_degree: Optional[int] = None,
             space: Optional[Mapping[str, Sequence]] = None, top: Optional[int] = 5,
             optimizer: Union[str, int, float] = "adamw", trace_device=None, example_kwargs=None,
             experts: Optional[Callable[[str], bool]] = None, granularity: str = "auto") -> Plans:
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
            [4, 8], "recompute": [None], "pp_degree": [4, 8], "dp_mode": ["shard"],
            "ep_degree": [1, 8]}``.
        top: how many plans to return (None: every feasible one).
        optimizer: the optimizer whose state counts (as ``MemoryPolicy.optimizer``).
        trace_device: the device the graphs are traced for (default cpu).
        example_kwargs: the model's keywords for one micro-batch (as ``compile``: e.g. a
            flex-attention model's ``attention_masks``), tensors with the batch dim first
            are split like the inputs.
        experts: ``FQN -> bool``, the expert parameters of the model's MoE layers (default
            ``is_expert_param``: torchtitan's ``.experts.``). With experts, each data-parallel
            degree is also tried split into EP groups (``ep_degree``: divisors of it and of
            the expert count).
        granularity: ``"op"`` cuts each candidate's graph as ``compile()`` does (exact,
            slow on big models), ``"layer"`` cuts between the layers of the model's largest
            ``ModuleList``/``ModuleDict``, from one traced layer of each kind
            (``planning.layers``), ``"auto"`` (default) ``"layer"`` from ``LAYERED_PARAMS``
            parameters up.

    Returns:
        ``Plans``: ``Plan``s (``.compile_kwargs``, ``.build_kwargs()`` with the process
        groups, ``.predicted_step_s``, ``.memory``: per-rank bytes with the data-parallel
        mode and the expert split applied), with ``.rejected`` and ``.table()``.

    Raises:
        ValueError: a ``pp_degree`` that does not divide ``world_size``, a bad ``space`` or
            ``granularity``, or no candidate that fits (every candidate's reason listed).
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
    moe = _experts_of(model, experts)
    layers = _granularity(model, granularity)
    floor = _static_floor(model, optimizer, moe)
    search = _Searcher(model, loss_fn, example_kwargs, dev, net, optimizer, trace_device, moe, layers)
    search.top = top
    plans, rejected = [], []

    def unsplittable(c: int, pp: int, dp: int, families: list, why: str) -> list[Rejected]:
        return [Rejected(s, c, r, why, pp, dp, m, e) for s in grid["schedule"] for r in grid["recompute"]
                for m, e in families]

    for pp in grid["pp_degree"]:
        dp = world_size // pp
        families = _families(grid, dp, moe)
        if batch % dp:  # each replica takes batch / dp samples
            rejected += unsplittable(0, pp, dp, families,
                                     f"the batch of {batch} does not split into {dp} data-parallel replicas")
            continue
        fit = [(m, e) for m, e in families if not _floor_reason(floor, pp, dp, m, e, budget)]
        for c in grid["num_microbatches"] or _counts(batch // dp, pp):
            if batch % (dp * c):
                rejected += unsplittable(c, pp, dp, families, f"the batch of {batch} does not split into "
                                                              f"{dp} replica(s) x {c} micro-batches")
                continue
            for m, e in families:  # pruned before any cut: not even the kept bytes fit
                if (m, e) not in fit:
                    rejected += unsplittable(c, pp, dp, [(m, e)], _floor_reason(floor, pp, dp, m, e, budget))
            if not fit:
                continue
            mb = batch // (dp * c)
            examples = _sliced(inputs, mb)
            target = _sliced(batch_target, mb)
            kwargs = {k: _sliced(v, mb) for k, v in (example_kwargs or {}).items()}
            got = _search(model, loss_fn, examples, target, kwargs or None, schedules=grid["schedule"],
                          num_microbatches=c, recomputes=grid["recompute"], ranks=pp, device=dev, network=net,
                          budget=budget, optimizer=optimizer, trace_device=trace_device, memo=search.memo, dp=dp,
                          families=fit, searcher=search)
            plans += got[0]
            rejected += got[1]
    return _ranked(plans, rejected, top, time.perf_counter() - start, dev, net, world_size)


def _sliced(value, mb: int):
    """The first ``mb`` samples of a batch-first tensor (or of each in a tuple); others as they are."""
    if isinstance(value, tuple):
        return tuple(_sliced(v, mb) for v in value)
    return value[:mb] if isinstance(value, torch.Tensor) and value.dim() > 0 else value


def _families(grid: dict, dp: int, moe: Optional[_Experts]) -> list[tuple[Optional[str], int]]:
    """The (dp mode, EP degree) pairs of ``dp`` replicas: EP degrees divide ``dp`` and the
    expert count (1, no EP, always)."""
    modes = [m for m in grid["dp_mode"] if m is not None] if dp > 1 else [None]
    eps = [1]
    if moe is not None and dp > 1:
        eps = [e for e in _divisors(dp) if moe.count % e == 0]
    if grid["ep_degree"] is not None:
        eps = [e for e in eps if e in grid["ep_degree"]]
    return [(m, e) for m in modes for e in eps]


class _Searcher:
    """What one search shares between candidates: captures and layer profiles by micro-batch
    size, split stages, FLOPs by op; and how it builds one replica's pipeline."""

    def __init__(self, model, loss_fn, example_kwargs, device: DeviceModel, network: NetworkModel, optimizer,
                 trace_device, experts: Optional[_Experts], layers: Optional[list[str]]) -> None:
        self.model, self.loss_fn, self.example_kwargs = model, loss_fn, example_kwargs
        self.device, self.network, self.optimizer = device, network, optimizer
        self.dp_network = network  # the replicas' links (compile(schedule="auto") probes its dp_group's)
        self.experts, self.layers = experts, layers
        self.trace_on = torch.device("cpu" if trace_device is None else trace_device)
        self.gloo = network.name in ("localhost", "probed") and self.trace_on.type == "cpu"
        self.memo, self.backward_cache, self.captures, self.profiles, self.bounds = {}, {}, {}, {}, {}
        self.unit_cuts: dict = {}
        self.trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
        self.top: Optional[int] = None  # a search that returns only the top plans skips what cannot enter them
        self.steps: list[float] = []    # the feasible plans' step times, fastest first (with top)

    def bar(self) -> float:
        """The step time a candidate must beat to enter the top plans (inf: any may)."""
        return self.steps[self.top - 1] if self.top is not None and len(self.steps) >= self.top else float("inf")

    def found(self, step: float) -> None:
        if self.top is not None:
            bisect.insort(self.steps, step)
            del self.steps[self.top:]

    def captured(self, examples, target, kwargs):
        mb = _mb(examples)
        if mb not in self.captures:  # one trace per micro-batch size, whatever the degrees around it
            self.captures[mb] = capture(self.model, self.loss_fn, examples, target, example_kwargs=kwargs,
                                        device=self.trace_on)
        return self.captures[mb]

    def pipeline(self, program: Program, recompute, examples, target, kwargs, captured=None) -> Union[_Pipeline, str]:
        """One replica's pipeline for ``program`` (a reason string when it cannot be cut)."""
        if self.layers is not None:
            return self._layered(program, recompute, examples, target, kwargs)
        memory = MemoryPolicy(recompute=recompute, optimizer=self.optimizer)
        captured = captured or self.captured(examples, target, kwargs)
        parts = split_for_program(program, self.model, self.loss_fn, examples, target, device=self.trace_on,
                                  memory=memory, example_kwargs=kwargs, captured=captured,
                                  backward_cache=self.backward_cache)
        plan = split_plan(parts, program, optimizer=self.optimizer,
                          recv_lookahead=RECV_LOOKAHEAD if self.gloo else 0, recompute=recompute)  # cheap here
        seconds = {k: tuple(_graph_seconds(g.gm, self.device, self.memo)
                            for g in (sg.forward, sg.backward_input, sg.backward_weight))
                   for k, sg in enumerate(parts.stages)}
        values = _graph_values(parts.partition.stages)
        return _Pipeline(program, seconds, _boundary_bytes(parts),
                         {k: _moe_layers(set(v), self.experts) for k, v in values.items()},
                         _expert_bytes(program, values, self.experts), lambda: plan)

    def profile(self, recompute, examples, target, kwargs) -> LayerProfile:
        mb = _mb(examples)
        key = (mb, _recompute_key(recompute))
        if key not in self.profiles and mb > 2:  # traced at 1 and 2 samples, affine beyond (layers.affine)
            one, two = (self.profile(recompute, *(_sliced(v, n) for v in (examples, target)),
                                     {k: _sliced(v, n) for k, v in (kwargs or {}).items()} or None) for n in (1, 2))
            self.profiles[key] = affine(one, two, mb)
        if key not in self.profiles:
            def split_units(points):  # called with the model cut down to one layer of each kind
                if (mb, tuple(points)) not in self.unit_cuts:  # one trace and cut per micro-batch size
                    captured = capture(self.model, self.loss_fn, examples, target, example_kwargs=kwargs,
                                       device=self.trace_on)
                    self.unit_cuts[mb, tuple(points)] = split_stages(captured, len(points) + 1, split_points=points)
                partition = self.unit_cuts[mb, tuple(points)]
                last = len(partition.stages) - 1
                return SimpleNamespace(partition=partition, stages=tuple(
                    _split_backward(gm, s, s == last, recompute, self.backward_cache)
                    for s, gm in enumerate(partition.stages)))
            self.profiles[key] = profile_layers(self.model, self.layers, split_units,
                                                lambda gm: _graph_seconds(gm, self.device, self.memo),
                                                lambda names: _moe_layers(names, self.experts))
        return self.profiles[key]

    def _layered(self, program: Program, recompute, examples, target, kwargs) -> Union[_Pipeline, str]:
        prof = self.profile(recompute, examples, target, kwargs)
        parts = program.num_model_parts
        if parts > len(prof):
            return (f"{parts} stages but {len(prof)} layer units: granularity='layer' cuts between layers "
                    "(granularity='op' cuts between ops)")
        key = (_mb(examples), _recompute_key(recompute), parts)
        if key not in self.bounds:
            self.bounds[key] = layer_bounds([sum(s) for s in prof.seconds], parts)
        mems, values, secs, hop = prof.stages(self.bounds[key])
        moe = {k: sum(prof.experts[u] for u in range(a, b)) for k, (a, b) in enumerate(self.bounds[key])}
        return _Pipeline(program, secs, hop, moe, _expert_bytes(program, values, self.experts),
                         lambda: _plan_from(program, mems, values, self.trainable, self.optimizer,
                                            RECV_LOOKAHEAD if self.gloo else 0, recompute, sorted(program)),
                         _kept_bytes(program, values, self.trainable, self.optimizer, self.experts))


def _mb(examples) -> int:
    return next((t.shape[0] for t in examples if isinstance(t, torch.Tensor) and t.dim() > 0), 1)


def _recompute_key(recompute):
    return recompute if recompute is None or isinstance(recompute, str) else id(recompute)


def _ranked(plans, rejected, top, seconds, dev, net, ranks) -> Plans:
    plans = sorted(plans, key=lambda p: (p.predicted_step_s, p.peak_bytes))
    if not plans:
        reasons = "\n".join(f"  {r.label()}: {r.reason}" for r in rejected)
        raise ValueError(f"autoplan: no configuration fits on {ranks} ranks:\n{reasons}\nFix: raise the "
                         "memory budget, use more ranks, or widen the space")
    return Plans(plans if top is None else plans[:top], rejected, seconds, dev, net)


def candidate(searcher: "_Searcher", examples: tuple, target, kwargs, *, schedule: str, num_microbatches: int,
              recompute, ranks: int, captured=None) -> Union[_Pipeline, Rejected]:
    """One configuration on one example micro-batch: its replica's ``_Pipeline`` (whatever its
    memory), or a ``Rejected`` when the schedule cannot run these ranks and micro-batches."""
    try:
        program = generate(schedule, ranks, num_microbatches)
    except ValueError as err:
        return Rejected(schedule, num_microbatches, recompute, str(err).split(";")[0], ranks)
    got = searcher.pipeline(program, recompute, examples, target, kwargs, captured)
    return Rejected(schedule, num_microbatches, recompute, got, ranks) if isinstance(got, str) else got


def _timed(pipe: _Pipeline, searcher: "_Searcher", ep: int, bar: float = float("inf")):
    """The replica's step simulated with the EP all_to_alls of ``ep``; or, when its busiest
    rank's work alone (a lower bound of the step) exceeds ``bar``, that figure (a float)."""
    costs = stage_costs(pipe, searcher.device, searcher.network, ep, searcher.experts)
    busy = max(sum(costs.by_action[a] for a in actions) for actions in pipe.program.values())
    if busy > bar:
        return busy
    return simulate(pipe.program, costs, early_results=searcher.gloo)


def _plan(pipe: _Pipeline, sim, searcher: "_Searcher", schedule: str, c: int, recompute, mb: int, ep: int) -> Plan:
    step = sim.makespan + vote_seconds(len(pipe.program), searcher.network)
    return Plan(schedule, c, recompute, step, sim.bubble_ratio, pipe.memory, mb, mb * c / step,
                pp_degree=len(pipe.program), ep_degree=ep,
                expert_params=searcher.experts.is_expert if searcher.experts is not None else None)


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
            dp: int = 1, families: Sequence[tuple[Optional[str], int]] = ((None, 1),),
            backward_cache: Optional[dict] = None, captured=None,
            searcher: Optional[_Searcher] = None) -> tuple[list[Plan], list[Rejected]]:
    """Every schedule x (dp mode, EP degree) x recompute policy for one micro-batch count of a
    ``ranks``-deep pipeline (``dp`` replicas of it), on one capture. Policies go from saving
    the most to recomputing the most, and stop at the first that fits the bytes ``budget``
    (and ``fraction``, an ``ActivationBudget``'s, against the schedule's plan without
    recompute): recompute only adds compute, so a later one that fits too is slower (it is
    listed as rejected, why). ``captured``: the micro-batch's capture, when the caller has
    it; ``searcher``: the search's shared caches (a fresh op-level one when None)."""
    if searcher is None:
        searcher = _Searcher(model, loss_fn, example_kwargs, device, network, optimizer, trace_device, None, None)
        searcher.memo = memo
        searcher.backward_cache = {} if backward_cache is None else backward_cache
    if captured is None and searcher.layers is None:
        captured = searcher.captured(examples, target, example_kwargs)
    plans, rejected, pipelines, sims = [], [], {}, {}
    mb = _mb(examples)

    def pipeline(schedule, recompute) -> Union[_Pipeline, Rejected]:  # one replica's, shared by the families
        if (schedule, recompute) not in pipelines:
            pipelines[schedule, recompute] = candidate(
                searcher, examples, target, example_kwargs, schedule=schedule, num_microbatches=num_microbatches,
                recompute=recompute, ranks=ranks, captured=captured)
        return pipelines[schedule, recompute]

    for schedule, (mode, ep) in ((s, f) for s in schedules for f in families):
        fits, cannot, reference = None, None, None
        for recompute in sorted(recomputes, key=_recompute_order):
            if fits is not None or cannot is not None:
                rejected.append(Rejected(schedule, num_microbatches, recompute, cannot or (
                    f"not tried: recompute={fits.recompute!r} fits, and recomputing more only adds compute"),
                    ranks, dp, mode, ep))
                continue
            got = pipeline(schedule, recompute)
            if isinstance(got, Rejected):  # the schedule cannot run these micro-batches: no policy changes that
                rejected.append(dataclasses.replace(got, dp_degree=dp, dp_mode=mode, ep_degree=ep))
                cannot = got.reason
                continue
            if fraction is None and budget is not None:  # what is cheap to check first
                why = _kept_over(got, dp, mode, ep, budget)
                if why is None and "memory" in got.__dict__:  # planned already
                    why = _over_budget(replicated(got.memory, dp, mode, ep, got.expert_bytes if ep > 1 else None),
                                       budget)
                if why:
                    rejected.append(Rejected(schedule, num_microbatches, recompute, why, ranks, dp, mode, ep))
                    continue
            bar = searcher.bar()
            if (schedule, recompute, ep) not in sims:  # the dp modes share the replica's step
                sims[schedule, recompute, ep] = _timed(got, searcher, ep, bar)
            sim = sims[schedule, recompute, ep]
            step = sim if isinstance(sim, float) else sim.makespan  # a float: its busiest rank, not simulated
            if step > bar:  # cannot enter the top plans: recomputing more is slower still
                cannot = (f"slower than the top {searcher.top} found: its pipeline alone takes at least "
                          f"{step * 1e3:,.1f} ms with recompute={recompute!r}, {step / bar - 1:.1%} "
                          "over the last of them (recomputing more only adds compute)")
                rejected.append(Rejected(schedule, num_microbatches, recompute, cannot, ranks, dp, mode, ep))
                continue
            plan = _with_replicas(_plan(got, sim, searcher, schedule, num_microbatches, recompute, mb, ep), got, dp,
                                  mode, ep, searcher.dp_network)
            reference = plan if recompute is None else reference
            why = _unfit(plan, reference, budget, fraction)
            if why:
                rejected.append(Rejected(schedule, num_microbatches, recompute, why, ranks, dp, mode, ep))
            else:
                plans.append(plan)
                searcher.found(plan.predicted_step_s)
                fits = plan
    return plans, rejected


def _with_replicas(plan: Plan, pipe: _Pipeline, dp: int, mode: Optional[str], ep: int,
                   network: NetworkModel) -> Plan:
    """A replica's ``plan`` as one of ``dp`` data-parallel replicas in ``mode``, its experts
    split over ``ep`` of them (``planning.data_parallel``): its ranks' bytes, and the step's
    wait for the reductions."""
    if dp == 1:
        return plan
    experts = pipe.expert_bytes if ep > 1 else None
    step = (plan.predicted_step_s + exposed_seconds(plan.memory, dp, mode, network, ep, experts)
            + vote_seconds(dp, network))
    return dataclasses.replace(plan, predicted_step_s=step, memory=replicated(plan.memory, dp, mode, ep, experts),
                               dp_degree=dp, dp_mode=mode,
                               samples_per_s=plan.samples_per_s * plan.predicted_step_s / step * dp)


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
                               bandwidth=bandwidth, kernel_overhead_s=kernel, action_overhead_s=action,
                               p2p_overhead_s=p2p, small_gemms=tuple(zip(bounds, fractions)))


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
    searcher = _Searcher(model, loss_fn, example_kwargs, dev, net, memory.optimizer, device, None, None)
    if dp > 1:
        searcher.dp_network = probe_network(dp_group, device=vote_device(dp_group))
    budget = memory.budget if memory.budget is not None else (dev.memory_bytes or None)
    chosen = memory.recompute is None or isinstance(memory.recompute, ActivationBudget)
    recomputes = list(DEFAULT_RECOMPUTE) if chosen else [memory.recompute]
    start = time.perf_counter()
    with together(group, timeout, "compile(schedule='auto')"):
        plans, rejected = _search(model, loss_fn, examples, target, example_kwargs, schedules=DEFAULT_SCHEDULES,
                                  num_microbatches=num_microbatches, recomputes=recomputes, ranks=world, device=dev,
                                  network=net, budget=budget, optimizer=memory.optimizer, trace_device=device,
                                  memo=searcher.memo, fraction=_fraction(memory), dp=dp,
                                  families=((dp_mode if dp > 1 else None, 1),), searcher=searcher)
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
