"""Custom ``torch.autograd.Function`` calls recorded as regions while export traces the model.

Export inlines ``Function.forward`` and forgets the user's ``backward``. ``RegionRecorder``
wraps ``Function.apply`` during the trace and tags each outermost call's nodes
(``dpfx_region``, ``dpfx_region_spec``; entry/exit nodes ``dpfx_region_input``/``_output``),
so that ``split_backward`` can call the Function again (``RegionSpec.call``) and run the
user's own backward; ``collect_regions`` renumbers them in graph order as ``RegionInfo``.
``mark_recompute`` tags a ``checkpoint(..., use_reentrant=False)`` region's nodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.fx

from passes import _compat
from passes._compat import tree_flatten, tree_unflatten
from passes.model_call import Slot
from passes.trace_error import TraceError


@dataclass(frozen=True)
class RegionSpec:
    """How to call a custom autograd Function again: node-free, stored in node meta.

    ``fn.apply(*args, **kwargs)`` where ``(args, kwargs) = tree_unflatten(arg_leaves,
    arg_spec)`` after replacing every :class:`Slot` ``i`` by the region's ``i``-th tensor
    input. The call's result flattens (``out_spec``) to leaves where :class:`Slot` ``j``
    is the region's ``j``-th tensor output and anything else is a constant.
    """

    fn: type
    arg_leaves: tuple
    arg_spec: Any
    out_leaves: tuple
    out_spec: Any
    num_inputs: int
    num_outputs: int

    def call(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Run ``fn.apply`` on ``inputs``; return its tensor outputs in Slot order."""
        leaves = [inputs[x.index] if isinstance(x, Slot) else x for x in self.arg_leaves]
        args, kwargs = tree_unflatten(leaves, self.arg_spec)
        result_leaves, _ = tree_flatten(self.fn.apply(*args, **kwargs))
        outs: list = [None] * self.num_outputs
        for tmpl, val in zip(self.out_leaves, result_leaves):
            if isinstance(tmpl, Slot):
                outs[tmpl.index] = val
        return tuple(outs)


@dataclass(frozen=True)
class RegionInfo:
    """One custom autograd Function call in the captured graph.

    ``inputs[i]`` is the region's entry node for tensor input ``i`` (an ``aten.alias``
    node inside the region whose only argument is the value passed in);
    ``outputs[j]`` the node holding tensor output ``j``; ``nodes`` all region nodes.
    """

    spec: RegionSpec
    inputs: tuple[torch.fx.Node, ...]
    outputs: tuple[torch.fx.Node, ...]
    nodes: tuple[torch.fx.Node, ...]

    @property
    def fn(self) -> type:
        return self.spec.fn

    @property
    def input_values(self) -> tuple[torch.fx.Node, ...]:
        """The nodes (outside the region) whose values are passed to the Function."""
        return tuple(entry.args[0] for entry in self.inputs)


class Holder:
    """A slot that survives the module copies export makes (deepcopy returns itself)."""

    def __init__(self) -> None:
        self.value = None

    def __deepcopy__(self, memo):
        return self


class RegionRecorder:
    """Wraps ``torch.autograd.Function.apply`` while tracing; tags each call's nodes."""

    def __init__(self, graph: "Holder") -> None:
        self.next_id = 0
        self.depth = 0  # nested Function calls belong to the outermost region
        self.graph = graph  # .value: the model's graph (see _WithLoss); other graphs are not recorded

    def patched(self):
        """While active, each outermost ``Function`` call traced into a graph is recorded."""
        return _compat.on_function_apply(self._apply)

    def _apply(self, run, cls, args, kwargs):
        graph = _compat.current_tracer_graph()
        if graph is not None and cls is _compat.REENTRANT_CHECKPOINT:
            raise TraceError(
                "torch.utils.checkpoint(..., use_reentrant=True) cannot be captured: its backward "
                "re-runs the forward under autograd, which no graph can hold. Fix: pass "
                "use_reentrant=False (dualpipe_fx then recomputes that region in the backward), "
                "or drop the checkpoint and use compile(..., recompute='full' | 'selective').")
        if graph is None or self.depth > 0 or graph is not self.graph.value:
            return run(cls, *args, **kwargs)
        self.depth += 1
        try:
            return self._record(graph, run, cls, args, kwargs)
        finally:
            self.depth -= 1

    def _record(self, graph, orig_fn, cls, args, kwargs):
        rid = self.next_id
        self.next_id += 1
        mark = next(iter(reversed(graph.nodes)))  # the tracer appends new nodes after it
        leaves, arg_spec = tree_flatten((args, kwargs))
        arg_leaves, new_leaves, n_in = [], [], 0
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                # An entry node inside the region marks which value is tensor input n_in.
                leaf = torch.ops.aten.alias.default(leaf)
                _tag(_compat.current_fx_node(leaf), "dpfx_region_input", n_in)
                arg_leaves.append(Slot(n_in))
                n_in += 1
            else:
                arg_leaves.append(leaf)
            new_leaves.append(leaf)
        args2, kwargs2 = tree_unflatten(new_leaves, arg_spec)
        out = orig_fn(cls, *args2, **kwargs2)
        out, out_leaves, out_spec, n_out = self._tag_outputs(out, _nodes_after(graph, mark))
        spec = RegionSpec(cls, tuple(arg_leaves), arg_spec, tuple(out_leaves), out_spec, n_in, n_out)
        for node in _nodes_after(graph, mark):
            node.meta["dpfx_region"] = rid
            node.meta["dpfx_region_spec"] = spec
        return out

    def _tag_outputs(self, out, new_nodes):
        leaves, out_spec = tree_flatten(out)
        tmpl, new_leaves, n_out = [], [], 0
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                node = _compat.current_fx_node(leaf)
                if node is None or node not in new_nodes or "dpfx_region_input" in node.meta:
                    # forward returned (an alias of) its input: give the output its own node
                    leaf = torch.ops.aten.alias.default(leaf)
                    node = _compat.current_fx_node(leaf)
                _tag(node, "dpfx_region_output", n_out)
                tmpl.append(Slot(n_out))
                n_out += 1
            else:
                tmpl.append(leaf)
            new_leaves.append(leaf)
        return tree_unflatten(new_leaves, out_spec), tmpl, out_spec, n_out


def mark_recompute(mark: torch.fx.Node, graph: torch.fx.Graph) -> None:
    """Nodes of a ``checkpoint(..., use_reentrant=False)`` region: recomputed in backward."""
    for node in _nodes_after(graph, mark):
        node.meta["dpfx_recompute"] = True


def _nodes_after(graph: torch.fx.Graph, mark: torch.fx.Node) -> set[torch.fx.Node]:
    found = set()
    for node in reversed(graph.nodes):
        if node is mark:
            return found
        found.add(node)
    raise AssertionError("the tracer removed a node while a custom Function ran")


def _tag(node: Optional[torch.fx.Node], key: str, value: int) -> None:
    assert node is not None, f"no traced node for a custom Function tensor ({key})"
    node.meta[key] = value


def collect_regions(graph: torch.fx.Graph) -> dict[int, RegionInfo]:
    """Renumber regions in graph order and build their RegionInfo."""
    remap: dict[int, int] = {}
    members: dict[int, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if "dpfx_region" in node.meta:
            rid = remap.setdefault(node.meta["dpfx_region"], len(remap))
            node.meta["dpfx_region"] = rid
            members.setdefault(rid, []).append(node)
    regions = {}
    for rid, nodes in members.items():
        spec = nodes[0].meta["dpfx_region_spec"]
        ins = {n.meta["dpfx_region_input"]: n for n in nodes if "dpfx_region_input" in n.meta}
        outs = {n.meta["dpfx_region_output"]: n for n in nodes if "dpfx_region_output" in n.meta}
        if len(ins) != spec.num_inputs or len(outs) != spec.num_outputs:
            raise TraceError(
                f"custom autograd Function {spec.fn.__qualname__}: expected {spec.num_inputs} "
                f"tensor inputs and {spec.num_outputs} outputs in the graph, found {len(ins)} "
                f"and {len(outs)}. Fix: make forward() use every tensor argument it receives."
            )
        regions[rid] = RegionInfo(spec, tuple(ins[i] for i in range(len(ins))),
                                  tuple(outs[j] for j in range(len(outs))), tuple(nodes))
    return regions
