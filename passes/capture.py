"""Capture: a model and its loss become one flat ATen-level FX graph with lifted params.

The graph is what ``torch.export.export(..., strict=False)`` produces for
``(loss, *model_outputs) = loss_fn(model(*inputs), target)``, post-processed so that the
later passes can rely on a few annotations (see :func:`capture`).

Custom ``torch.autograd.Function`` calls are recorded as atomic *regions*: export inlines
``Function.forward`` and forgets the user's ``backward``; we tag the inlined nodes so that
``split_backward`` can call the Function again and make the user's own backward run.

Buffers mutated in forward (BatchNorm running statistics in train mode) are NOT
supported: :func:`capture` raises :class:`TraceError` naming the buffer. Put such modules
in ``eval()`` or use ``track_running_stats=False``.
"""
from __future__ import annotations

import contextlib
import linecache
import os
import traceback
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.fx
from torch import nn

from passes import _compat
from passes._compat import tree_flatten, tree_unflatten

__all__ = ["Captured", "RegionInfo", "RegionSpec", "Slot", "TraceError", "capture"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_PASSES_DIR = os.path.dirname(os.path.abspath(__file__))


class TraceError(ValueError):
    """The model (with its loss) cannot be captured as one static FX graph."""


@dataclass(frozen=True)
class Slot:
    """Placeholder for the ``index``-th tensor in a region's argument or result template."""

    index: int


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


@dataclass(frozen=True)
class Captured:
    """The result of :func:`capture`; see its docstring for the graph's annotations."""

    gm: torch.fx.GraphModule
    param_names: tuple[str, ...]
    buffer_names: tuple[str, ...]
    num_inputs: int
    has_target: bool
    regions: Mapping[int, RegionInfo]
    param_aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    output_spec: Any = None
    num_model_outputs: int = 0


# --------------------------------------------------------------------------------------
# Tracing: wrapper module and region recording


class _WithLoss(nn.Module):
    """``forward(*inputs[, target]) -> (loss, *leaves(model(*inputs)))``."""

    def __init__(self, model: nn.Module, loss_fn: Callable, num_inputs: int, has_target: bool):
        super().__init__()
        self.model = model
        # Not a submodule: a loss module's tensors must not become "model" params/buffers.
        object.__setattr__(self, "_loss_fn", loss_fn)
        object.__setattr__(self, "_num_inputs", num_inputs)
        object.__setattr__(self, "_has_target", has_target)
        object.__setattr__(self, "out_spec", _Holder())

    def forward(self, *args):
        inputs = args[: self._num_inputs]
        out = self.model(*inputs)
        loss = self._loss_fn(out, args[-1]) if self._has_target else self._loss_fn(out)
        leaves, spec = tree_flatten(out)
        self.out_spec.value = spec
        return (loss, *leaves)


class _Holder:
    """A slot that survives the module copies export makes (deepcopy returns itself)."""

    def __init__(self) -> None:
        self.value = None

    def __deepcopy__(self, memo):
        return self


class _RegionRecorder:
    """Wraps ``torch.autograd.Function.apply`` while tracing; tags each call's nodes."""

    def __init__(self) -> None:
        self.next_id = 0
        self.depth = 0  # nested Function calls belong to the outermost region

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        original = torch.autograd.Function.__dict__["apply"]
        orig_fn = original.__func__
        recorder = self

        def apply(cls, *args, **kwargs):
            graph = _compat.current_tracer_graph()
            if graph is None or recorder.depth > 0:
                return orig_fn(cls, *args, **kwargs)
            recorder.depth += 1
            try:
                return recorder._record(graph, orig_fn, cls, args, kwargs)
            finally:
                recorder.depth -= 1

        torch.autograd.Function.apply = classmethod(apply)
        try:
            yield
        finally:
            torch.autograd.Function.apply = original

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


# --------------------------------------------------------------------------------------
# Errors: point at the user's source line


def _user_frame(exc: BaseException) -> Optional[traceback.FrameSummary]:
    """The innermost traceback frame in user code (not torch, not passes), over the chain."""
    seen, best = set(), None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for fs in traceback.extract_tb(exc.__traceback__):
            path = os.path.abspath(fs.filename)
            if path.startswith(_TORCH_DIR) or path.startswith(_PASSES_DIR):
                continue
            if "/lib/python3" in path and "site-packages" not in path:
                continue  # standard library (contextlib, functools)
            best = fs
        if best is not None:
            return best
        exc = exc.__cause__ or exc.__context__
    return None


def _is_data_dependent(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _compat.DATA_DEPENDENT_ERRORS) or "data-dependent" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _trace_error(model: nn.Module, exc: BaseException) -> TraceError:
    fs = _user_frame(exc)
    where = "an unknown location"
    if fs is not None:
        line = (fs.line or linecache.getline(fs.filename, fs.lineno)).strip()
        where = f"{fs.filename}:{fs.lineno} (`{line}`)"
    name = type(model).__name__
    if _is_data_dependent(exc):
        return TraceError(
            f"cannot capture {name}: Python control flow at {where} depends on tensor "
            "values, which a static graph cannot express. Fix: replace the branch by "
            "`torch.where(cond, a, b)` or `torch.cond(...)`, or move it out of forward()."
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TraceError(
        f"cannot capture {name}: torch.export failed at {where}: {type(exc).__name__}: "
        f"{first}. Fix: make forward() traceable by torch.export(strict=False)."
    )


# --------------------------------------------------------------------------------------
# Post-processing of the exported graph


def _export(model, loss_fn, inputs, target):
    wrapper = _WithLoss(model, loss_fn, len(inputs), target is not None)
    args = (*inputs, target) if target is not None else tuple(inputs)
    recorder = _RegionRecorder()
    try:
        with recorder.patched():
            ep = torch.export.export(wrapper, args, strict=False)
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised as TraceError naming the user's line
        raise _trace_error(model, exc) from exc
    return ep, wrapper.out_spec.value


def _strip(fqn: str) -> str:
    assert fqn == "model" or fqn.startswith("model."), fqn
    return fqn[len("model."):] if fqn != "model" else ""


def _check_mutations(ep) -> None:
    sig = ep.graph_signature
    if sig.buffers_to_mutate:
        names = sorted(_strip(b) for b in sig.buffers_to_mutate.values())
        raise TraceError(
            f"buffers {names} are updated in forward (e.g. BatchNorm running stats); "
            "expected no buffer mutation. Fix: put those modules in eval() mode or use "
            "track_running_stats=False."
        )
    if sig.user_inputs_to_mutate:
        raise TraceError(
            f"forward mutates its inputs {sorted(sig.user_inputs_to_mutate.values())} in "
            "place; expected pure inputs. Fix: clone an input before writing into it."
        )


def _mutated_base(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The placeholder an in-place op of ``node`` writes into (through views), if any."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return None
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        while isinstance(value, torch.fx.Node) and value.op == "call_function" and \
                getattr(value.target, "is_view", False):
            value = value.args[0]
        if isinstance(value, torch.fx.Node) and value.op == "placeholder":
            return value
    return None


def _check_inplace(graph: torch.fx.Graph) -> None:
    """Reject in-place writes into params, buffers or inputs (export keeps them as ops)."""
    for node in graph.nodes:
        base = _mutated_base(node)
        if base is None:
            continue
        what = f"{base.meta.get('dpfx_kind', 'graph input')} {base.meta.get('dpfx_name', base.name)!r}"
        where = node.meta.get("dpfx_module") or "top-level code"
        raise TraceError(
            f"{what} is written in place by {node.target} in module {where!r} (e.g. BatchNorm "
            "running stats in train mode); expected forward() to leave params, buffers and "
            "inputs unchanged. Fix: put that module in eval() mode, use "
            "track_running_stats=False, or clone the tensor before writing into it."
        )


def _canonical_names(model: nn.Module) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """FQN -> first FQN of the same tensor, and first FQN -> its aliases (tied weights)."""
    first: dict[int, str] = {}
    canon: dict[str, str] = {}
    aliases: dict[str, list[str]] = {}
    named = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        root = first.setdefault(id(t), name)
        canon[name] = root
        if root != name:
            aliases.setdefault(root, []).append(name)
    return canon, {k: tuple(v) for k, v in aliases.items()}


def _lift_placeholders(gm, ep, model, num_inputs, has_target):
    """Annotate placeholders, merge tied ones, turn lifted constants into get_attr."""
    canon, aliases = _canonical_names(model)
    kinds = {s.arg.name: s for s in ep.graph_signature.input_specs}
    graph = gm.graph
    params, buffers, by_name, user_i = [], [], {}, 0
    first_non_ph = next(n for n in graph.nodes if n.op != "placeholder")
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        spec = kinds[node.name]
        kind = spec.kind.name
        if kind in ("PARAMETER", "BUFFER"):
            fqn = canon.get(_strip(spec.target), _strip(spec.target))
            if fqn in by_name:  # tied: one placeholder for all aliases
                node.replace_all_uses_with(by_name[fqn])
                graph.erase_node(node)
                continue
            by_name[fqn] = node
            node.meta["dpfx_kind"] = "param" if kind == "PARAMETER" else "buffer"
            node.meta["dpfx_name"] = fqn
            (params if kind == "PARAMETER" else buffers).append(fqn)
        elif kind == "CONSTANT_TENSOR":
            _constant_to_get_attr(gm, node, ep.constants[spec.target], first_non_ph)
        elif kind == "USER_INPUT":
            is_target = has_target and user_i == num_inputs
            node.meta["dpfx_kind"] = "target" if is_target else "input"
            node.meta["dpfx_name"] = "target" if is_target else f"input:{user_i}"
            user_i += 1
        else:
            raise TraceError(f"unsupported graph input kind {kind} for {node.name}; "
                             "expected parameters, buffers and tensor inputs only")
    used_aliases = {k: v for k, v in aliases.items() if k in by_name}
    return tuple(params), tuple(buffers), used_aliases


def _constant_to_get_attr(gm, node, value, before_node):
    attr = f"_dpfx_const_{node.name}"
    gm.register_buffer(attr, value.detach().clone() if isinstance(value, torch.Tensor) else value,
                       persistent=False)
    with gm.graph.inserting_before(before_node):
        new = gm.graph.get_attr(attr)
    new.meta.update(node.meta)
    new.meta["dpfx_module"] = ""
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _annotate_modules(graph: torch.fx.Graph) -> None:
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        node.meta["dpfx_module"] = _strip(path) if path.startswith("model") else ""


def _collect_regions(graph: torch.fx.Graph) -> dict[int, RegionInfo]:
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


def _check_outputs(gm: torch.fx.GraphModule) -> int:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    values = out.args[0]
    loss = values[0].meta.get("val") if isinstance(values[0], torch.fx.Node) else values[0]
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.dtype.is_floating_point:
        desc = f"shape {tuple(loss.shape)} {loss.dtype}" if isinstance(loss, torch.Tensor) else repr(loss)
        raise TypeError(f"loss_fn must return a scalar floating tensor, got {desc}. Fix: "
                        "reduce the loss (e.g. reduction='mean').")
    for v in values[1:]:
        if not (isinstance(v, torch.fx.Node) and isinstance(v.meta.get("val"), torch.Tensor)):
            raise TypeError(f"model outputs must be tensors (in any pytree), got {v!r}")
    return len(values) - 1


def _as_inputs(example_inputs) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"example_inputs[{i}] is {type(x).__name__}; expected a tensor. "
                            "Fix: pass non-tensor options to the model's constructor.")
    return inputs


def capture(model: nn.Module, loss_fn: Callable, example_inputs, example_target=None) -> Captured:
    """Trace ``loss_fn(model(*inputs), target)`` into one ATen-level FX graph.

    **Contract**: ``(model, loss_fn, example micro-batch) -> Captured`` whose ``gm`` maps
    ``(*params, *buffers, *inputs[, target]) -> (loss, *model_outputs)``. Placeholders carry
    ``meta["dpfx_kind"]`` (param/buffer/input/target) and ``meta["dpfx_name"]`` (FQN,
    ``input:i`` or ``target``); tied params are one placeholder (first FQN; the rest in
    ``param_aliases``). Every node has ``meta["val"]``; call nodes ``meta["dpfx_module"]``
    (innermost module FQN, ``""`` for top-level code and the loss). Nodes of a custom
    ``autograd.Function`` call carry ``meta["dpfx_region"]`` (+ ``dpfx_region_spec``, and
    ``dpfx_region_input``/``dpfx_region_output`` on entry/exit nodes).

    **Pseudocode**::

        wrap model+loss; patch Function.apply to tag each call's nodes as a region
        ep = torch.export.export(wrapper, (*inputs, target), strict=False)
        reject buffer/input mutation; merge tied params; constants -> get_attr
        annotate placeholders, module FQNs, regions; lint; recompile

    Args:
        model: any ``nn.Module`` traceable by ``torch.export(strict=False)``.
        loss_fn: ``loss_fn(output, target)`` (or ``loss_fn(output)`` without a target),
            returning a scalar.
        example_inputs: a tensor or tuple of tensors, one micro-batch.
        example_target: the target tensor, or None.

    Returns:
        :class:`Captured`.

    Raises:
        TraceError: the model cannot be traced (the message names the user's source line
            and suggests a fix), or mutates buffers/inputs in forward.
        TypeError: non-tensor inputs, non-scalar loss or non-tensor model outputs.
    """
    inputs = _as_inputs(example_inputs)
    ep, out_spec = _export(model, loss_fn, inputs, example_target)
    _check_mutations(ep)
    gm = ep.graph_module
    params, buffers, aliases = _lift_placeholders(gm, ep, model, len(inputs), example_target is not None)
    _annotate_modules(gm.graph)
    _check_inplace(gm.graph)
    regions = _collect_regions(gm.graph)
    num_outputs = _check_outputs(gm)
    gm.graph.lint()
    gm.recompile()
    return Captured(
        gm=gm, param_names=params, buffer_names=buffers, num_inputs=len(inputs),
        has_target=example_target is not None, regions=MappingProxyType(regions),
        param_aliases=MappingProxyType(aliases), output_spec=out_spec,
        num_model_outputs=num_outputs,
    )
