"""Split a captured graph into contiguous pipeline stages, balanced by cost.

The compute nodes of the captured graph, in topological order, are cut into
``num_stages`` contiguous runs. The cuts minimise the largest stage cost; among equally
good cuts, the one with the fewest activation bytes crossing the cuts wins. A value
needed several stages after the one producing it is forwarded through the stages in
between. Cuts never fall inside a custom ``autograd.Function`` region, never separate
a multi-output op from its ``getitem``s, and never put a use of the target before the
last stage.
"""
from __future__ import annotations

import bisect
import difflib
from collections import deque
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.fx as fx

from passes.balance import BALANCE_MODES, MemorySpec, RankLoads, best_cuts
from passes.cost_model import CostSpec, activation_bytes, saved_bytes_estimate, scalar_costs, weight_inputs_estimate
from passes.grad_flow import grad_carrying
from passes.split_backward import kept_for_weight

__all__ = ["KeptCut", "StagePartition", "default_placement", "split_stages"]

# Stage costs within this relative distance of the optimum count as ties (float noise).
_TIE_RTOL = 1e-9


@dataclass(frozen=True)
class KeptCut:
    """Where a cut fell, to cut another trace of the same model (other input shapes) at the
    same places: ``ops[i]`` names compute node ``i`` (its op and innermost module), stage
    ``s + 1`` starts at node ``cuts[s]``, and ``params`` holds each parameter's stages."""

    ops: tuple[str, ...]
    cuts: tuple[int, ...]
    params: tuple[tuple[str, tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class StagePartition:
    """The stages of one captured graph; see :func:`split_stages` for the graphs' layout.

    ``costs[s]`` is stage ``s``'s cost (the unit of the ``cost`` argument), ``balance``
    ``max(costs) / mean(costs)``, ``cut_bytes[s]`` the activation bytes that stage ``s``
    sends to stage ``s + 1`` per micro-batch, ``param_stages[fqn]`` the stages using the
    parameter (more than one for a shared parameter; the runtime sums its grads over them,
    and over ranks when they sit on several).
    """

    stages: tuple[fx.GraphModule, ...]
    costs: tuple[float, ...]
    balance: float
    cut_bytes: tuple[int, ...]
    param_stages: Mapping[str, tuple[int, ...]]
    captured: Any
    # per rank of the placement: (time in cost units, memory estimate, parameter state; bytes; see
    # passes.balance)
    rank_loads: Mapping[int, tuple[float, float, float]] = field(default_factory=dict)
    kept: Optional[KeptCut] = None  # the cut, as split_stages(keep=...) takes it


@dataclass(frozen=True)
class _Layout:
    """The captured graph flattened for cutting: positions are indices into ``nodes``.

    A cut ``k`` (1 <= k < N) puts ``nodes[:k]`` before it and ``nodes[k:]`` after it.
    ``crossing[k]``: values produced before cut ``k`` and used at or after it, in
    producer order; the model inputs (produced "at -1") come first.
    """

    graph: fx.Graph
    nodes: tuple[fx.Node, ...]
    pos: Mapping[fx.Node, int]
    prefix: tuple[float, ...]  # prefix[k] = cost of nodes[:k]
    crossing: tuple[tuple[fx.Node, ...], ...]
    cut_bytes: tuple[int, ...]
    allowed: tuple[int, ...]  # cuts that split no region, getitem or loss
    why_not: Mapping[int, str]  # cut -> why it is not allowed


# --------------------------------------------------------------------------------------
# Layout: positions, costs and crossing values


def default_placement(num_stages: int) -> dict[int, int]:
    """DualPipeV placement (rank r holds stages r and S-1-r) for even S; else stage s on rank s."""
    if num_stages % 2 == 0:
        return {s: min(s, num_stages - 1 - s) for s in range(num_stages)}
    return {s: s for s in range(num_stages)}


def _is_compute(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method", "call_module")


def _kind(node: fx.Node) -> Optional[str]:
    return node.meta.get("dpfx_kind") if node.op == "placeholder" else None


def _last_uses(graph: fx.Graph, nodes: Sequence[fx.Node], pos: Mapping[fx.Node, int]) -> dict[fx.Node, int]:
    """Last position that reads each activation (the output node reads at N)."""
    last: dict[fx.Node, int] = {}
    n = len(nodes)
    for value in list(pos) + [v for v in graph.nodes if _kind(v) == "input"]:
        uses = [pos.get(u, n) for u in value.users if u.op != "get_attr"]
        last[value] = max(uses, default=-1)
    return last


def _crossings(graph: fx.Graph, nodes, pos) -> tuple[tuple, tuple]:
    """Crossing values and bytes at every cut, via a sweep over producer/last-use intervals."""
    n = len(nodes)
    inputs = [v for v in graph.nodes if _kind(v) == "input"]
    last = _last_uses(graph, nodes, pos)
    starts: list[list[fx.Node]] = [[] for _ in range(n + 1)]
    for value in inputs + list(nodes):
        produced = -1 if _kind(value) == "input" else pos[value]
        if last[value] > produced and last[value] >= 1:  # crosses cuts produced+1 .. last
            starts[max(produced + 1, 1)].append(value)
    crossing: list[tuple[fx.Node, ...]] = [()]
    live: dict[fx.Node, None] = {}  # insertion order = producer order
    for k in range(1, n):
        for value in starts[k]:
            live[value] = None
        for value in [v for v in live if last[v] < k]:
            del live[value]
        crossing.append(tuple(live))
    cut_bytes = tuple(sum(activation_bytes(v) for v in c) for c in crossing)
    return tuple(crossing), cut_bytes


def _data_dependent(val: Any) -> bool:
    """A tensor with a size known only at run time (an unbacked SymInt, e.g. MoE routing)."""
    return isinstance(val, torch.Tensor) and any(
        isinstance(d, torch.SymInt) and d.node.hint is None for d in val.shape)


def _forbidden_cuts(graph: fx.Graph, nodes, pos, crossing) -> dict[int, str]:
    """Cuts that would split a region, carry a non-tensor value or run the loss early."""
    n = len(nodes)
    why: dict[int, str] = {}
    regions: dict[Any, list[int]] = {}
    for node in nodes:
        if "dpfx_region" in node.meta:
            regions.setdefault(node.meta["dpfx_region"], []).append(pos[node])
    for rid, ps in regions.items():
        for k in range(min(ps) + 1, max(ps) + 1):
            why.setdefault(k, f"it is inside custom autograd.Function region {rid}")
    for k in range(1, n):
        bad = [v.name for v in crossing[k] if not isinstance(v.meta.get("val"), torch.Tensor)]
        if bad:
            why.setdefault(k, f"non-tensor value(s) {bad} would cross it")
        sized = [v.name for v in crossing[k] if _data_dependent(v.meta.get("val"))]
        if sized:  # the receiving rank could not size its receive buffer
            why.setdefault(k, f"value(s) {sized} of data-dependent shape would cross it")
    target_uses = [pos[u] for v in graph.nodes if _kind(v) == "target"
                   for u in v.users if u in pos]
    for k in range(min(target_uses, default=n) + 1, n):
        why.setdefault(k, "the target (loss) is used before it; the target lives in the last stage")
    return why


def _prefix(values: Sequence[float]) -> tuple[float, ...]:
    """``out[k]`` = the sum of ``values[:k]``."""
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return tuple(out)


def _layout(gm: fx.GraphModule, cost: CostSpec) -> _Layout:
    nodes = tuple(n for n in gm.graph.nodes if _is_compute(n))
    pos = {node: i for i, node in enumerate(nodes)}
    table = scalar_costs(gm, cost)
    costs = [table.get(node.name, 0.0) for node in nodes]
    if sum(costs) <= 0.0:
        costs = [1.0] * len(nodes)  # nothing costs anything: balance the node counts
    crossing, cut_bytes = _crossings(gm.graph, nodes, pos)
    why = _forbidden_cuts(gm.graph, nodes, pos, crossing)
    allowed = tuple(k for k in range(1, len(nodes)) if k not in why)
    return _Layout(gm.graph, nodes, MappingProxyType(pos), _prefix(costs), crossing, cut_bytes, allowed,
                   MappingProxyType(why))


# --------------------------------------------------------------------------------------
# Choosing the cuts: min-max cost by bisection, then fewest bytes by a windowed DP


def _greedy_stages(lay: _Layout, cuts: Sequence[int], forced: Sequence[int], limit: float) -> Optional[int]:
    """Fewest stages with cost <= ``limit`` using only ``cuts`` (and all ``forced``); None if none.

    Each stage runs as far as it can: optimal, since prefix costs never decrease.
    """
    n, p = len(lay.nodes), lay.prefix
    cut_costs = [p[k] for k in cuts]
    start, count = 0, 0
    while True:
        i = bisect.bisect_right(forced, start)
        stop = forced[i] if i < len(forced) else n  # a stage may not run past a forced cut
        count += 1
        if stop == n and p[n] - p[start] <= limit:
            return count
        j = min(bisect.bisect_right(cut_costs, p[start] + limit), bisect.bisect_right(cuts, stop)) - 1
        if j < 0 or cuts[j] <= start:
            return None
        start = cuts[j]


def _fits(lay: _Layout, cuts, forced, num_stages: int, limit: float) -> bool:
    got = _greedy_stages(lay, cuts, forced, limit)
    return got is not None and got <= num_stages


def _min_max_cost(lay: _Layout, cuts, forced, num_stages: int) -> float:
    """Smallest achievable largest-stage cost, by bisection over the greedy feasibility test."""
    lo, hi = lay.prefix[-1] / num_stages, lay.prefix[-1]
    if _fits(lay, cuts, forced, num_stages, lo):
        return lo
    for _ in range(100):
        if hi - lo <= 1e-12 * hi:
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _fits(lay, cuts, forced, num_stages, mid) else (mid, hi)
    return hi


def _fewest_bytes(lay: _Layout, cuts, forced, num_stages: int, limit: float) -> tuple[int, ...]:
    """The cuts (exactly ``num_stages - 1``) with stage costs <= ``limit`` and fewest crossing bytes."""
    n, p = len(lay.nodes), lay.prefix
    layer: list[tuple[int, int, Any]] = [(0, 0, None)]  # (position, bytes so far, back-pointer)
    for j in range(1, num_stages + 1):
        positions = cuts if j < num_stages else [n]
        window: deque = deque()
        nxt, ptr = [], 0
        for k in positions:
            while ptr < len(layer) and layer[ptr][0] < k:
                while window and window[-1][1] >= layer[ptr][1]:
                    window.pop()
                window.append(layer[ptr])
                ptr += 1
            # a stage may not span a forced cut, nor cost more than the limit
            floor = forced[bisect.bisect_left(forced, k) - 1] if bisect.bisect_left(forced, k) else 0
            while window and (p[k] - p[window[0][0]] > limit or window[0][0] < floor):
                window.popleft()
            if window:
                extra = lay.cut_bytes[k] if j < num_stages else 0
                nxt.append((k, window[0][1] + extra, window[0]))
        layer = nxt
    assert layer and layer[0][0] == n, "the bisection promised a feasible partition"
    chosen, entry = [], layer[0][2]
    while entry is not None and entry[0] != 0:
        chosen.append(entry[0])
        entry = entry[2]
    return tuple(reversed(chosen))


def _choose_cuts(lay: _Layout, num_stages: int, forced: Sequence[int]) -> tuple[int, ...]:
    cuts = list(lay.allowed)
    assert _fits(lay, cuts, forced, num_stages, lay.prefix[-1]), "checked: enough allowed cuts"
    best = _min_max_cost(lay, cuts, forced, num_stages)
    return _fewest_bytes(lay, cuts, forced, num_stages, best * (1 + _TIE_RTOL) + 1e-300)


# --------------------------------------------------------------------------------------
# Per rank: the cut moved until every rank's time and memory are even (passes.balance)


def _rank_loads(lay: _Layout, placement: Mapping[int, int], memory: MemorySpec, mode: str,
                stages: Optional[Callable[[], Sequence[fx.GraphModule]]] = None) -> RankLoads:
    """``stages``: the stage graphs of a reference cut, read under a recompute policy for what
    I keeps for W (the split's own minimum cut, ``split_backward.kept_for_weight``)."""
    param_at = [0.0] * len(lay.nodes)
    first_use: dict[str, int] = {}
    for ph in lay.graph.nodes:
        uses = [lay.pos[u] for u in ph.users if u in lay.pos]
        if _kind(ph) == "param" and uses and isinstance(ph.meta.get("val"), torch.Tensor):
            param_at[min(uses)] += memory.param_bytes(ph.meta["val"])
            first_use[ph.meta["dpfx_name"]] = min(uses)
    received = list(lay.cut_bytes) + [0]
    saved = {} if memory.inputs_only else saved_bytes_estimate(lay.graph.owning_module, selective=memory.selective)
    extra = {}
    if memory.peaks is not None and memory.recompute is not None and stages is not None:
        f_at, i_at = [0] * len(lay.nodes), [0] * len(lay.nodes)
        for name, (f, i) in kept_for_weight(stages(), memory.recompute).items():
            f_at[first_use[name]] += f
            i_at[first_use[name]] += i
        extra = dict(for_weight=_prefix(f_at), grad_for_weight=_prefix(i_at))
    elif memory.peaks is not None and not memory.inputs_only:
        from_f, from_i = weight_inputs_estimate(lay.graph.owning_module)
        extra = dict(for_weight=_prefix([from_f.get(n.name, 0) for n in lay.nodes]),
                     grad_for_weight=_prefix([from_i.get(n.name, 0) for n in lay.nodes]))
    if memory.peaks is not None and (extra or not memory.inputs_only):
        extra.update(largest=_sparse_max([activation_bytes(n) for n in lay.nodes]),
                     model_outputs=_model_output_bytes(lay.graph))
    return RankLoads(time=lay.prefix, params=_prefix(param_at), acts=_prefix([saved.get(n.name, 0) for n in lay.nodes]),
                     received=received, placement=placement, memory=memory, mode=mode, **extra)


def _sparse_max(values: Sequence[float]) -> tuple[tuple[float, ...], ...]:
    """``table[j][k]``: the largest of ``values[k:k + 2**j]`` (range maxima in O(1))."""
    table = [tuple(values)]
    while (2 << (len(table) - 1)) <= len(values):
        prev, half = table[-1], 1 << (len(table) - 1)
        table.append(tuple(max(prev[k], prev[k + half]) for k in range(len(prev) - half)))
    return tuple(table)


def _model_output_bytes(graph: fx.Graph) -> int:
    """Bytes of the model outputs beside the loss (the logits): the last stage's F holds them."""
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return sum(activation_bytes(n) for n in outs[1:] if isinstance(n, fx.Node))


def _per_rank_cuts(lay: _Layout, num_stages: int, forced, loads: RankLoads) -> tuple[int, ...]:
    """The least largest rank load: the exact search over candidate cuts (chain and V
    placements), and local moves from the per-stage time and memory optima; each polished
    by local moves over every allowed cut; the lowest wins (ties: fewer bytes crossing)."""
    starts = {_choose_cuts(lay, num_stages, forced)}
    if loads.mode != "time":
        weights = [loads.params[k + 1] - loads.params[k] + loads.acts[k + 1] - loads.acts[k]
                   for k in range(len(lay.nodes))]
        if sum(weights) > 0:
            starts.add(_choose_cuts(replace(lay, prefix=_prefix(weights)), num_stages, forced))
    return best_cuts(loads, sorted(starts), lay.allowed, forced, lay.cut_bytes, num_stages)


def _check_budget(loads: RankLoads, cuts, placement: Mapping[int, int]) -> None:
    budget = loads.memory.budget
    if budget is None:
        return
    for rank, (_, mem, params) in sorted(loads.ranks(cuts).items()):
        if mem > budget:
            stages = sorted(s for s, r in placement.items() if r == rank)
            acts = mem - params
            raise ValueError(
                f"budget={budget:,} bytes per rank (MemoryPolicy): no cut fits; the best cut still gives rank {rank} "
                f"(stages {stages}) {mem:,.0f} bytes = parameters, grads and optimizer state {params:,.0f} + "
                f"activations {acts:,.0f} (estimate, at its schedule's peak). Fix: raise the budget, use "
                f"more ranks, fewer micro-batches in flight, recompute='selective' or 'full', or a lighter "
                f"optimizer")


# --------------------------------------------------------------------------------------
# split_points, and which stages read each parameter


def _module_names(nodes: Sequence[fx.Node]) -> list[str]:
    names: dict[str, None] = {}
    for node in nodes:
        parts = node.meta.get("dpfx_module", "").split(".")
        for i in range(1, len(parts) + 1):
            if parts[0]:
                names[".".join(parts[:i])] = None
    return list(names)


def _forced_cuts(lay: _Layout, split_points, num_stages: int) -> tuple[int, ...]:
    """Positions of the first node of each ``split_points`` module; validated."""
    if split_points is None:
        return ()
    if isinstance(split_points, str):
        raise TypeError(f"split_points={split_points!r}; expected a list of module names, "
                        f"e.g. [{split_points!r}]")
    forced = set()
    modules = _module_names(lay.nodes)
    for name in split_points:
        first = next((lay.pos[nd] for nd in lay.nodes
                      if (nd.meta.get("dpfx_module", "") + ".").startswith(name + ".")), None)
        if first is None:
            close = difflib.get_close_matches(name, modules, n=5, cutoff=0.5)
            raise ValueError(f"split_points: no module named {name!r} in the graph; "
                             f"close matches: {close or modules[:8]}")
        if first == 0:
            raise ValueError(f"split_points: module {name!r} starts the graph, so a cut there "
                             f"leaves stage 0 empty; drop it from split_points")
        if first in lay.why_not:
            raise ValueError(f"split_points: cannot cut at module {name!r} "
                             f"(node {lay.nodes[first].name}): {lay.why_not[first]}")
        forced.add(first)
    if len(forced) > num_stages - 1:
        raise ValueError(f"split_points gives {len(forced)} cuts but num_stages={num_stages} "
                         f"allows at most {num_stages - 1}; raise num_stages to {len(forced) + 1} "
                         f"or drop split points")
    return tuple(sorted(forced))


def _stage_of(cuts: Sequence[int], position: int) -> int:
    return bisect.bisect_right(cuts, position)


def _param_stages(lay: _Layout, cuts) -> dict[fx.Node, tuple[int, ...]]:
    """For each param placeholder, the stages whose nodes (or the output) read it."""
    n = len(lay.nodes)
    result = {}
    for ph in lay.graph.nodes:
        if _kind(ph) == "param":
            stages = {_stage_of(cuts, lay.pos.get(u, n)) for u in ph.users}
            result[ph] = tuple(sorted(stages))
    return result


# --------------------------------------------------------------------------------------
# Building the stage graphs


def _value_name(value: fx.Node) -> str:
    return value.meta["dpfx_name"] if _kind(value) == "input" else value.name


def _placeholder(graph: fx.Graph, like: fx.Node, kind: str, name: str, carries: bool = True) -> fx.Node:
    ph = graph.placeholder(like.name)
    ph.meta = {k: v for k, v in like.meta.items() if k in ("val", "tensor_meta")}
    ph.meta["dpfx_kind"] = kind
    ph.meta["dpfx_name"] = name
    if kind == "activation":  # False: no gradient reaches it (passes.grad_flow)
        ph.meta["dpfx_requires_grad"] = carries
    return ph


def _build_stage(gm: fx.GraphModule, lay: _Layout, bounds: tuple[int, int], index: int,
                 num_stages: int, carrying: frozenset) -> fx.GraphModule:
    start, stop = bounds
    n = len(lay.nodes)
    body = lay.nodes[start:stop]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    reads = {a for nd in body for a in nd.all_input_nodes}
    out_node = next(nd for nd in gm.graph.nodes if nd.op == "output")
    if index == num_stages - 1:
        reads |= set(out_node.all_input_nodes)
    placeholders = [nd for nd in gm.graph.nodes if nd.op == "placeholder"]
    for kind in ("param", "buffer"):
        for ph in placeholders:
            if _kind(ph) == kind and ph in reads:
                env[ph] = _placeholder(graph, ph, kind, ph.meta["dpfx_name"])
    for value in (lay.crossing[start] if start > 0 else ()):
        env[value] = _placeholder(graph, value, "activation", _value_name(value), value.name in carrying)
    externals = ("input",) if index == 0 else ()
    externals += ("target",) if index == num_stages - 1 else ()
    for ph in placeholders:
        if _kind(ph) in externals:
            env[ph] = _placeholder(graph, ph, _kind(ph), ph.meta["dpfx_name"])

    def lookup(arg: fx.Node) -> fx.Node:
        if arg not in env:
            assert arg.op == "get_attr", f"{arg.name} reaches stage {index} unannounced"
            env[arg] = graph.node_copy(arg)
        return env[arg]

    for node in body:
        env[node] = graph.node_copy(node, lookup)
    if index == num_stages - 1:
        out = graph.output(fx.map_arg(out_node.args[0], lookup))
        names = tuple(a.name if isinstance(a, fx.Node) else repr(a) for a in out_node.args[0])
    else:
        sent = lay.crossing[stop]
        out = graph.output(tuple(lookup(v) for v in sent))
        names = tuple(_value_name(v) for v in sent)
    out.meta["dpfx_output_names"] = names
    graph.lint()
    stage = fx.GraphModule(gm, graph, class_name=f"Stage{index}")
    stage.meta["dpfx_stage"] = index
    stage.meta["dpfx_is_last"] = index == num_stages - 1
    stage.recompile()
    return stage


def _op_key(node: fx.Node) -> str:
    return f"{node.target}@{node.meta.get('dpfx_module', '')}"


def _kept_cuts(lay: _Layout, keep: KeptCut, num_stages: int) -> tuple[int, ...]:
    """``keep``'s cuts in this layout: the same node positions when the ops are the same (a
    trace at other shapes usually is), else each cut's node found through the ops the two
    traces share (difflib's matching blocks); a cut whose node has no match is refused."""
    if len(keep.cuts) != num_stages - 1:
        raise ValueError(f"split_stages(keep=...): the kept cut has {len(keep.cuts) + 1} stages; expected "
                         f"num_stages={num_stages}")
    ops = tuple(_op_key(n) for n in lay.nodes)
    if ops == keep.ops:
        cuts = keep.cuts
    else:
        blocks = difflib.SequenceMatcher(None, keep.ops, ops, autojunk=False).get_matching_blocks()
        where = {i + d: j + d for i, j, size in blocks for d in range(size)}
        missing = [k for k in keep.cuts if k not in where]
        if missing:
            raise ValueError(f"split_stages(keep=...): the graph at these shapes has no op matching "
                             f"{keep.ops[missing[0]]!r} (node {missing[0]} of the first trace), where a stage "
                             "started: the model computes differently at these shapes, so its stages cannot "
                             "keep their parameters. Fix: pad the inputs to a traced shape, or compile() again")
        cuts = tuple(where[k] for k in keep.cuts)
    if list(cuts) != sorted(set(cuts)) or not all(0 < k < len(lay.nodes) for k in cuts):
        raise ValueError(f"split_stages(keep=...): the kept cut maps to nodes {list(cuts)} of {len(lay.nodes)} at "
                         "these shapes, which leaves a stage empty. Fix: pad the inputs to a traced shape, or "
                         "compile() again")
    bad = [k for k in cuts if k in lay.why_not]
    if bad:
        raise ValueError(f"split_stages(keep=...): the kept cut at node {lay.nodes[bad[0]].name} is not allowed at "
                         f"these shapes: {lay.why_not[bad[0]]}. Fix: pad the inputs to a traced shape, or "
                         "compile() again")
    return cuts


def _check_kept_params(keep: KeptCut, params: Sequence[tuple[str, tuple[int, ...]]]) -> None:
    """Every parameter is read by the stages that read it in the kept cut (no parameter moves)."""
    was, now = dict(keep.params), dict(params)
    if keep.params and now != was:
        name = next(n for n in (*now, *was) if now.get(n) != was.get(n))
        raise ValueError(f"split_stages(keep=...): at these shapes parameter {name!r} is read by stages "
                         f"{list(now.get(name, ()))}, in the kept cut by {list(was.get(name, ()))}: the model "
                         "computes differently here, so its stages cannot keep their parameters. Fix: pad the "
                         "inputs to a traced shape, or compile() again")


def _check_args(captured, num_stages, placement, balance=None) -> None:
    if not isinstance(num_stages, int) or isinstance(num_stages, bool):
        raise TypeError(f"num_stages={num_stages!r}; expected an int >= 1")
    if num_stages < 1:
        raise ValueError(f"num_stages={num_stages}; expected >= 1")
    if not isinstance(getattr(captured, "gm", None), fx.GraphModule):
        raise TypeError(f"split_stages: got {type(captured).__name__}; expected the Captured "
                        f"result of passes.capture.capture(model, loss_fn, example_inputs)")
    if balance is not None and balance not in BALANCE_MODES:
        raise ValueError(f"balance={balance!r}; expected one of {', '.join(map(repr, BALANCE_MODES))} or None "
                         "(per stage)")
    if placement is not None and sorted(placement) != list(range(num_stages)):
        raise ValueError(f"placement covers stages {sorted(placement)}; expected every stage "
                         f"0..{num_stages - 1} mapped to a rank")


def split_stages(captured, num_stages: int, *, cost: CostSpec = "flops", split_points=None,
                 placement: Optional[Mapping[int, int]] = None, balance: Optional[str] = None,
                 memory: Optional[MemorySpec] = None, keep: Optional[KeptCut] = None) -> StagePartition:
    """Cut a captured graph into ``num_stages`` contiguous stages balanced by ``cost``.

    **Contract**: ``Captured`` (graph ``(params, buffers, inputs, target) -> (loss,
    *model_outputs)``) -> ``StagePartition`` whose stage ``s`` graph is
    ``(its params, its buffers, activations from s-1, external inputs) -> activations for
    s+1`` (the last stage: ``-> (loss, *model_outputs)``). Model inputs enter stage 0 only,
    the target the last stage only; a value needed later is forwarded stage by stage.
    Placeholders carry ``meta["dpfx_kind"]`` (param/buffer/activation/input/target) and
    ``meta["dpfx_name"]`` (FQN, ``input:i``, ``target``, or the producing node's name for
    an activation, equal to the name in the sender's ``output.meta["dpfx_output_names"]``).

    **Pseudocode**:
        order compute nodes; cost each; crossing set of cut k = values made before k, used after
        T* = least max-stage cost (bisection on a greedy feasibility test over allowed cuts)
        cuts = windowed DP: every stage <= T*, fewest crossing bytes in total
        build each stage graph: copy its nodes, placeholders for its reads, outputs = next crossing

    Args:
        captured: result of ``passes.capture.capture``; never modified.
        num_stages: number of stages ``S``.
        cost: ``"flops"`` (forward FLOPs), ``"measured"`` (timed ops) or ``cost(node) -> float``.
        split_points: module FQNs (e.g. ``["layers.4"]``) where a stage must start.
        placement: ``{stage: rank}``; default DualPipeV (rank r holds r and S-1-r) for even
            S, else one rank per stage. Used by ``balance`` only (a parameter shared by
            stages on several ranks is allowed anywhere).
        balance: None: each stage's cost as even as it can be (the placement is not read).
            ``"time"``, ``"memory"`` or ``"both"``: per rank of ``placement``, the largest
            rank's time, memory estimate, or the larger of the two relative to the mean (with
            ``memory.budget``: the largest time among cuts within the budget), see
            ``passes.balance``.
        memory: what a rank's memory holds (``passes.balance.MemorySpec``); default: AdamW
            states, one micro-batch of activations per stage, no budget.
        keep: another partition's ``kept`` cut (a trace of the same model at other input
            shapes): cut at the same ops instead of choosing (``split_points``, ``cost`` and
            ``balance`` are then not read), so every parameter stays in its stage.

    Returns:
        ``StagePartition``.

    Raises:
        ValueError: ``num_stages`` < 1 or more than the graph has places to cut; an unknown
            or uncuttable split point; more split points than cuts; a placement missing
            stages; an unknown ``balance``; no cut within ``memory.budget`` (names the rank).
        TypeError: a wrong argument type.
    """
    _check_args(captured, num_stages, placement, balance)
    gm = captured.gm
    lay = _layout(gm, cost)
    if not lay.nodes:
        raise ValueError("split_stages: the captured graph has no ops to split; the model and "
                         "loss must compute something from their inputs")
    if len(lay.allowed) < num_stages - 1:
        raise ValueError(f"num_stages={num_stages} needs {num_stages - 1} cuts but the graph "
                         f"({len(lay.nodes)} ops) has {len(lay.allowed)} places to cut; use "
                         f"num_stages <= {len(lay.allowed) + 1}")
    forced = _forced_cuts(lay, split_points, num_stages) if keep is None else ()
    placement = default_placement(num_stages) if placement is None else placement
    carrying = grad_carrying(gm)

    def time_cut_stages() -> list[fx.GraphModule]:  # the reference cut for what I keeps for W
        bounds = list(zip((0, *(c := _choose_cuts(lay, num_stages, forced))), (*c, len(lay.nodes))))
        return [_build_stage(gm, lay, b, i, num_stages, carrying) for i, b in enumerate(bounds)]

    loads = _rank_loads(lay, placement, memory or MemorySpec(), balance or "time",
                        time_cut_stages if balance is not None and keep is None else None)
    if keep is not None:
        cuts = _kept_cuts(lay, keep, num_stages)
    elif balance is None:
        cuts = _choose_cuts(lay, num_stages, forced)
    else:
        cuts = _per_rank_cuts(lay, num_stages, forced, loads)
    if keep is None:  # the budget is the traced shapes' (a kept cut at other shapes is not moved)
        _check_budget(loads, cuts, placement)
    params = tuple((ph.meta["dpfx_name"], st) for ph, st in _param_stages(lay, cuts).items())
    if keep is not None:
        _check_kept_params(keep, params)
    bounds = list(zip((0, *cuts), (*cuts, len(lay.nodes))))
    stages = tuple(_build_stage(gm, lay, b, i, num_stages, carrying) for i, b in enumerate(bounds))
    costs = tuple(lay.prefix[b] - lay.prefix[a] for a, b in bounds)
    mean = sum(costs) / num_stages
    return StagePartition(
        stages=stages,
        costs=costs,
        balance=max(costs) / mean if mean > 0 else 1.0,
        cut_bytes=tuple(lay.cut_bytes[k] for k in cuts),
        param_stages=MappingProxyType(dict(params)),
        captured=captured,
        rank_loads=MappingProxyType(loads.ranks(cuts)),
        kept=KeptCut(tuple(_op_key(n) for n in lay.nodes), tuple(cuts), params),
    )
