"""Cost model: FLOPs, bytes and (optionally) measured time of every node of an FX graph.

**Contract**: ``node_costs(gm, *, measured=False, repeats=3) -> Mapping[str, NodeCost]``
(node name -> cost, for every ``call_*`` node; placeholders, ``get_attr`` and the output
cost nothing and are absent), ``edge_bytes(gm) -> Mapping[(producer, consumer), int]``,
``scalar_costs(gm, cost) -> Mapping[str, float]`` with ``cost`` in ``"flops"``,
``"measured"`` or a callable ``cost(node) -> float``. Pure functions: ``gm`` is only read.

**Pseudocode**:
    for node in gm.graph.nodes if node.op starts with "call":
        args = fresh fake tensors shaped like the args' meta["val"]
        flops = FlopCounterMode total of node.target(*args)       # fwd FLOPs only
        bytes = bytes of tensor args + bytes of the result; out_bytes = result bytes
        time  = median of `repeats` timed runs on random real tensors (measured only)
"""
from __future__ import annotations

import operator
import statistics
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import sympy

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from passes._compat import (FakeTensorMode, decomposes_implicitly, quiet_fake_kernel_errors, sym_size_facts,
                            tree_flatten)

CostSpec = Union[str, Callable[[fx.Node], float]]


@dataclass(frozen=True)
class NodeCost:
    """Cost of one node: forward FLOPs, bytes read + written, bytes of its result, seconds."""

    flops: float
    bytes: int
    out_bytes: int
    time: float = 0.0


def _sdpa_cpu_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    # q: [b, h, s_q, d] @ k^T -> [b, h, s_q, s_k]; @ v: [.., s_k, d_v]: two batched matmuls
    *batch, s_q, d_q = q_shape
    s_k, d_v = k_shape[-2], v_shape[-1]
    n = 1
    for b in batch:
        n *= b
    return 2 * n * s_q * s_k * d_q + 2 * n * s_q * s_k * d_v


def _sdpa_cpu_backward_flop(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    # five matmuls of the same sizes (dV, dP, dS->dQ, dK, plus recomputed scores)
    return _sdpa_cpu_flop(q_shape, k_shape, v_shape) * 5 // 2


def extra_flop_formulas() -> dict:
    """FLOP formulas torch's counter lacks: the CPU flash-attention kernels SDPA picks on CPU.

    Pass as ``FlopCounterMode(custom_mapping=extra_flop_formulas())`` to count eager code
    the way :func:`node_costs` counts graphs.
    """
    aten = torch.ops.aten
    table = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        table[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        table[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flop
    return table


# Data-dependent (unbacked) sizes, such as the per-expert token counts an MoE's
# `counts.tolist()` puts into the graph, have no value at trace time. They are costed with a
# guess, never an error (see _unbacked_guess):
#   1. a symbol in a run-time assert `u_a + ... + u_k <= N` or `== N` (torch asserts this when
#      the sizes split or slice a dim of N): N / k, i.e. tokens / experts for routed sizes;
#   2. else the upper end of its value range, when finite (the slice `x[:sum(counts)]` of 48 rows);
#   3. else its lower end, at least UNBACKED_FALLBACK.
UNBACKED_FALLBACK = 1


def _split_share(symbol, asserts) -> Optional[int]:
    """N / k when ``symbol`` is one of the k terms of an asserted ``sum <= N`` or ``sum == N``."""
    for rel in asserts:
        if not isinstance(rel, (sympy.Le, sympy.Eq)):
            continue
        total, bound = (rel.lhs, rel.rhs) if rel.rhs.is_Integer else (rel.rhs, rel.lhs)
        if not bound.is_Integer or not isinstance(total, sympy.Add):
            continue
        terms = total.args
        if symbol in terms and all(t.is_Symbol for t in terms):
            return max(1, round(int(bound) / len(terms)))
    return None


def _unbacked_guess(symbol, facts) -> int:
    share = _split_share(symbol, facts.asserts)
    if share is not None:
        return share
    lower, upper = facts.ranges.get(symbol, (None, None))
    if upper is not None:
        return upper
    return max(lower or 0, UNBACKED_FALLBACK)


def _concrete(size) -> int:
    """A plain int for a size that may be a SymInt: its hint under dynamic shapes, or for a
    data-dependent size the guess documented above ``UNBACKED_FALLBACK``."""
    if not isinstance(size, torch.SymInt):
        return int(size)
    if size.node.hint is not None:
        return int(size.node.hint)
    facts = sym_size_facts(size)
    values = {s: facts.hints.get(s) for s in facts.expr.free_symbols}
    values.update({s: _unbacked_guess(s, facts) for s, v in values.items() if v is None})
    return max(0, int(facts.expr.xreplace(values)))


concrete_size = _concrete  # public: memory plans read storage sizes the same way


def stage_io_bytes(gm: fx.GraphModule) -> tuple[int, int]:
    """Activation bytes a stage receives (activation placeholders) and sends (outputs)."""
    acts_in = sum(activation_bytes(n) for n in gm.graph.nodes
                  if n.op == "placeholder" and n.meta.get("dpfx_kind") == "activation")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    acts_out = sum(activation_bytes(a) for a in out.all_input_nodes)
    return acts_in, acts_out


def value_storages(val: Any) -> list[tuple[int, int]]:
    """``(storage id, storage bytes)`` of the tensors in a node's ``meta["val"]`` (a size that
    depends on data: a guess, as ``concrete_size``)."""
    vals = val if isinstance(val, (tuple, list)) else (val,)
    return [(t.untyped_storage()._cdata, _concrete(t.untyped_storage().nbytes()))
            for t in vals if isinstance(t, torch.Tensor)]


def node_storages(nodes: Iterable) -> dict[int, int]:
    """``{storage id: bytes}`` of the values of ``nodes`` (each storage once)."""
    return {k: b for n in nodes if isinstance(n, fx.Node) for k, b in value_storages(n.meta.get("val"))}


def _storage_numel(shape, stride) -> int:
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride))


def _tensor_like(val: torch.Tensor, real: bool) -> torch.Tensor:
    """A tensor with ``val``'s shape, strides, dtype and device: random if ``real``, else empty."""
    shape = [_concrete(s) for s in val.shape]
    stride = [_concrete(s) for s in val.stride()]
    if not real:
        return torch.empty_strided(shape, stride, dtype=val.dtype, device=val.device)
    n = _storage_numel(shape, stride)
    if val.dtype.is_floating_point or val.dtype.is_complex:
        base = torch.randn(n, dtype=val.dtype, device=val.device)
    else:
        # zeros are valid indices (embedding, cross-entropy targets) and valid masks
        base = torch.zeros(n, dtype=val.dtype, device=val.device)
    return base.as_strided(shape, stride)


def _materialize(node: fx.Node, real: bool) -> tuple[tuple, dict]:
    """The node's args with every graph value replaced by a fresh tensor like its meta["val"]."""
    def one(a):
        if isinstance(a, fx.Node):
            val = a.meta.get("val")
            if isinstance(val, torch.Tensor):
                return _tensor_like(val, real)
            if isinstance(val, (list, tuple)):
                return type(val)(_tensor_like(v, real) if isinstance(v, torch.Tensor) else v for v in val)
            if isinstance(val, torch.SymInt):
                return _concrete(val)
            return val
        if isinstance(a, torch.Tensor):
            return _tensor_like(a, real)
        return a
    return map_aggregate(node.args, one), map_aggregate(node.kwargs, one)


def _nbytes(vals: Any) -> int:
    if isinstance(vals, torch.Tensor):
        return _concrete(vals.numel()) * vals.element_size()
    if isinstance(vals, (list, tuple)):
        return sum(_nbytes(v) for v in vals)
    return 0


def value_bytes(val: Any) -> int:
    """Bytes of a traced value (a tensor or a list of them; other values count 0). A
    data-dependent size counts as its documented guess (see ``UNBACKED_FALLBACK``)."""
    return _nbytes(val)


def activation_bytes(node: fx.Node) -> int:
    """Bytes of the value ``node`` produces (per micro-batch), from its ``meta["val"]``."""
    return _nbytes(node.meta.get("val"))


def _signature(node: fx.Node) -> str:
    """What a node's FLOPs depend on: its op, its args' shapes/strides/dtypes, other args."""
    def one(a):
        val = a.meta.get("val") if isinstance(a, fx.Node) else a
        if isinstance(val, torch.Tensor):
            return ("T", tuple(val.shape), tuple(val.stride()), val.dtype)
        return val
    return repr((node.target, map_aggregate(node.args, one), map_aggregate(node.kwargs, one)))


def _node_flops(node: fx.Node, counter: FlopCounterMode, memo: dict) -> float:
    """FLOPs of one node; ``counter`` (entered, inside a fake mode) accumulates across calls."""
    packet = getattr(node.target, "overloadpacket", None)
    if packet not in counter.flop_registry and not decomposes_implicitly(node.target):
        return 0.0  # a leaf kernel without a FLOP formula: the counter would say 0 anyway
    key = _signature(node)  # repeated layers repeat signatures: count each once
    if key not in memo:
        memo[key] = _count_flops(node, counter)
    return memo[key]


def _count_flops(node: fx.Node, counter: FlopCounterMode) -> float:
    before = counter.get_total_flops()
    try:
        args, kwargs = _materialize(node, real=False)
        node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - an op the fake kernels cannot run costs no FLOPs
        return 0.0
    return float(counter.get_total_flops() - before)


def _sync(device: torch.device) -> None:
    # GPU kernels run asynchronously: wait for them so the timer sees the op itself
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _node_time(node: fx.Node, repeats: int) -> float:
    val = node.meta.get("val")
    device = val.device if isinstance(val, torch.Tensor) else torch.device("cpu")
    try:
        args, kwargs = _materialize(node, real=True)
        with torch.no_grad():
            node.target(*args, **kwargs)  # warm-up: first-call allocations and dispatch caches
            times = []
            for _ in range(repeats):
                _sync(device)
                start = time.perf_counter()
                node.target(*args, **kwargs)
                _sync(device)
                times.append(time.perf_counter() - start)
    except Exception:  # noqa: BLE001 - an op that cannot run on random inputs is not timed
        return 0.0
    return statistics.median(times)


def has_flop_formula(node: fx.Node) -> bool:
    """Whether ``node`` is matmul-class work (matmuls, convolutions, attention, their
    backwards): the FLOP counter has a formula for its op (``extra_flop_formulas`` included),
    or it is a higher-order op or Python callable (a getitem is not). Everything else
    (pointwise, reductions, views, norms) counts 0 FLOPs here and is memory-bound."""
    target = node.target
    if target is operator.getitem:
        return False
    packet = getattr(target, "overloadpacket", None)
    if packet is None:
        return True
    return packet in flop_registry or packet in extra_flop_formulas() or "grouped_mm" in packet.__name__


def _is_compute(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and callable(node.target)


def node_costs(gm: fx.GraphModule, *, measured: bool = False, repeats: int = 3,
               flop_memo: Optional[dict] = None) -> Mapping[str, NodeCost]:
    """Per-node FLOPs, bytes read + written, output bytes and (optionally) measured time.

    **Contract**: ``GraphModule`` with ``meta["val"]`` on its nodes -> frozen mapping
    ``node.name -> NodeCost`` for every ``call_function`` / ``call_method`` node.

    **Pseudocode**:
        for each call node: fake args from the args' meta["val"]
            flops <- FlopCounterMode over node.target(*fake args)
            bytes <- sizes of args + result; time <- median of timed real runs if measured

    Args:
        gm: the graph to cost; it is never modified.
        measured: also time each op on random real tensors of the recorded shapes.
        repeats: timed runs per op (after one warm-up); the median is kept.
        flop_memo: FLOPs by node signature, shared between calls (a caller costing many graphs
            of one model, e.g. ``dualpipe_fx.autoplan``'s cuts, counts each op shape once).

    Returns:
        ``MappingProxyType`` of node name -> ``NodeCost``.

    Raises:
        ValueError: ``repeats < 1``.
    """
    if repeats < 1:
        raise ValueError(f"node_costs: repeats={repeats}; expected >= 1")
    nodes = [n for n in gm.graph.nodes if _is_compute(n)]
    # one fake mode and one counter for the whole graph: entering them per node is slow.
    # Tensors made inside the fake mode are fake: no real memory, even for huge shapes.
    with FakeTensorMode(allow_non_fake_inputs=True), quiet_fake_kernel_errors():
        with FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()) as counter:
            memo: dict[str, float] = {} if flop_memo is None else flop_memo
            flops = {n.name: _node_flops(n, counter, memo) for n in nodes}
    table = {}
    for node in nodes:
        out_bytes = activation_bytes(node)
        in_bytes = sum(activation_bytes(a) for a in node.all_input_nodes)
        table[node.name] = NodeCost(
            flops=flops[node.name],
            bytes=in_bytes + out_bytes,
            out_bytes=out_bytes,
            time=_node_time(node, repeats) if measured else 0.0,
        )
    return MappingProxyType(table)


def _probe_saved(node: fx.Node) -> tuple[int, frozenset]:
    """Run ``node`` once on fake tensors (floating ones requiring grad) and see what autograd
    saves: ``(bytes of saved storages that are none of its inputs, indices of the flat args
    it saves)``. Nothing is allocated; an op the fake kernels cannot run saves nothing."""
    try:
        args, kwargs = _materialize(node, real=False)
        flat = tree_flatten((args, kwargs))[0]
        for t in flat:
            if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
                t.requires_grad_(True)
        packed: list[torch.Tensor] = []
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t,
                                                                           lambda t: t):
            node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the estimate is best effort: the plan has exact bytes
        return 0, frozenset()
    inputs = {t.untyped_storage()._cdata: i for i, t in enumerate(flat) if isinstance(t, torch.Tensor)}
    own, from_inputs, seen = 0, set(), set()
    for t in packed:
        key = t.untyped_storage()._cdata
        if key in seen:
            continue
        seen.add(key)
        if key in inputs:
            from_inputs.add(inputs[key])
        else:
            own += _concrete(t.untyped_storage().nbytes())
    return own, frozenset(from_inputs)


def _base(node: fx.Node) -> fx.Node:
    """The value a chain of view ops reads (a view saves its base's storage)."""
    while isinstance(getattr(node, "target", None), torch._ops.OpOverload) and node.target.is_view \
            and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


_MATMULS = ("linear", "matmul", "mm", "addmm", "bmm", "baddbmm", "convolution", "conv1d", "conv2d", "conv3d",
            "_grouped_mm", "einsum")


def _packet_name(node: fx.Node) -> str:
    packet = getattr(node.target, "overloadpacket", None)
    return getattr(packet, "__name__", getattr(node.target, "__name__", ""))


def _selective_estimate(gm: fx.GraphModule, nodes: list) -> dict[str, int]:
    """What ``recompute="selective"`` keeps: matmul and attention outputs, attention's inputs."""
    own = {n.name: 0 for n in nodes}
    kept: set[fx.Node] = set()
    for n in nodes:
        name = _packet_name(n)
        if name in _MATMULS or "attention" in name:
            kept.add(n)
        if "attention" in name:
            kept |= {_base(a) for a in n.all_input_nodes if a.op != "placeholder" or
                     a.meta.get("dpfx_kind") not in ("param", "buffer")}
    for n in kept:
        if n.name in own:
            own[n.name] += activation_bytes(n)
    return own


def saved_bytes_estimate(gm: fx.GraphModule, *, selective: bool = False) -> Mapping[str, int]:
    """Per call node: bytes autograd keeps for the backward because of it, per micro-batch, from
    a fake run of each distinct op (memoised like FLOPs): what the op saves that is not an
    input (a softmax's output, attention's log-sum-exp), plus its own value when some op that
    reads it saves it. Values that depend on parameters and buffers alone (a transposed
    weight) count nothing: they live anyway. An estimate: ``passes.split_backward`` has the
    exact saved values of a split stage. ``selective``: what ``recompute="selective"`` keeps.
    """
    nodes = [n for n in gm.graph.nodes if _is_compute(n)]
    if selective:
        return MappingProxyType(_selective_estimate(gm, nodes))
    kinds = {n: n.meta.get("dpfx_kind") for n in gm.graph.nodes if n.op == "placeholder"}
    static: set[fx.Node] = {n for n, k in kinds.items() if k in ("param", "buffer")}
    static |= {n for n in gm.graph.nodes if n.op == "get_attr"}
    for n in nodes:
        if n.all_input_nodes and all(a in static for a in n.all_input_nodes):
            static.add(n)
    memo: dict[str, tuple[int, frozenset]] = {}
    own: dict[str, int] = {n.name: 0 for n in nodes}
    kept: set[fx.Node] = set()
    with FakeTensorMode(allow_non_fake_inputs=True), quiet_fake_kernel_errors():
        for n in nodes:
            key = _signature(n)
            if key not in memo:
                memo[key] = _probe_saved(n)
            nbytes, from_inputs = memo[key]
            own[n.name] = nbytes
            flat = tree_flatten((n.args, n.kwargs))[0]
            for i in from_inputs:
                if i < len(flat) and isinstance(flat[i], fx.Node):
                    kept.add(_base(flat[i]))
    for n in kept:
        if n.name in own and n not in static:
            own[n.name] += activation_bytes(n)
    return MappingProxyType(own)


def weight_inputs_estimate(gm: fx.GraphModule) -> tuple[Mapping[str, int], Mapping[str, int]]:
    """Per call node: ``(F's bytes the weight grad reads, I's bytes the weight grad reads)``:
    for a matmul with a parameter operand (its weight), the other operands (what I hands W
    of F's values) and its output's bytes (its output grad, what I keeps for W). An estimate
    of ``passes.split_backward``'s ``saved_for_weight``, per micro-batch."""
    kinds = {n: n.meta.get("dpfx_kind") for n in gm.graph.nodes if n.op == "placeholder"}
    static: set[fx.Node] = {n for n, k in kinds.items() if k in ("param", "buffer")}
    nodes = [n for n in gm.graph.nodes if _is_compute(n)]
    for n in nodes:
        if n.all_input_nodes and all(a in static for a in n.all_input_nodes):
            static.add(n)
    from_f, from_i = {}, {}
    for n in nodes:
        if _packet_name(n) not in _MATMULS:
            continue
        ins = n.all_input_nodes
        if not any(a in static for a in ins):
            continue
        from_f[n.name] = sum(activation_bytes(_base(a)) for a in ins if a not in static)
        from_i[n.name] = activation_bytes(n)
    return MappingProxyType(from_f), MappingProxyType(from_i)


def edge_bytes(gm: fx.GraphModule) -> Mapping[tuple[str, str], int]:
    """Activation bytes on every data edge ``(producer name, consumer name)`` of ``gm``."""
    table = {}
    for node in gm.graph.nodes:
        for src in node.all_input_nodes:
            table[(src.name, node.name)] = activation_bytes(src)
    return MappingProxyType(table)


def scalar_costs(gm: fx.GraphModule, cost: CostSpec = "flops") -> Mapping[str, float]:
    """One number per call node: its FLOPs, its measured seconds or ``cost(node)``.

    **Contract**: ``(GraphModule, "flops" | "measured" | callable) -> Mapping[str, float]``.

    **Pseudocode**:
        callable -> {n.name: float(cost(n))}; else node_costs(gm, measured=...) field

    Raises:
        ValueError: an unknown cost name, or a callable returning a negative or NaN cost.
        TypeError: ``cost`` neither a string nor a callable.
    """
    if callable(cost):
        table = {}
        for node in gm.graph.nodes:
            if _is_compute(node):
                value = float(cost(node))
                if not value >= 0.0:
                    raise ValueError(f"cost({node.name}) returned {value}; expected a finite number >= 0")
                table[node.name] = value
        return MappingProxyType(table)
    if not isinstance(cost, str):
        raise TypeError(f"cost={cost!r}; expected 'flops', 'measured' or a callable cost(node) -> float")
    if cost not in ("flops", "measured"):
        raise ValueError(f"cost={cost!r}; expected 'flops', 'measured' or a callable cost(node) -> float")
    costs = node_costs(gm, measured=cost == "measured")
    field = "flops" if cost == "flops" else "time"
    return MappingProxyType({name: float(getattr(c, field)) for name, c in costs.items()})
