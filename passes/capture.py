"""Capture: a model and its loss become one flat ATen-level FX graph with lifted params.

The graph is what ``torch.export.export(..., strict=False)`` produces for
``(loss, *model_outputs) = loss_fn(model(*args, **kwargs), target)``, post-processed so that
the later passes can rely on a few annotations (see :func:`capture`). The tensors among
``args`` and ``kwargs`` are the graph's inputs, and so are a flex-attention ``BlockMask``'s
tensors and those its ``mask_mod`` closes over (``passes.block_masks``); every other keyword
value (``use_cache=False``, ``None``) is a constant baked into the graph (:class:`ModelCall`). The model output may be
any pytree (dict, tuple, dataclass, ``transformers`` ``ModelOutput``): its tensor leaves are
graph outputs, the rest is kept as traced (:class:`OutputLayout`).

Custom ``torch.autograd.Function`` calls are recorded as atomic *regions*: export inlines
``Function.forward`` and forgets the user's ``backward``; we tag the inlined nodes so that
``split_backward`` can call the Function again and make the user's own backward run.

Buffers mutated in forward (BatchNorm running statistics in train mode) are NOT
supported: :func:`capture` raises :class:`TraceError` naming the buffer. Put such modules
in ``eval()`` or use ``track_running_stats=False``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import linecache
import logging
import os
import sys
import traceback
import types
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.fx
from torch import nn

from passes import _compat
from passes._compat import tree_flatten, tree_map, tree_unflatten
from passes.block_masks import MaskLayout, flatten_mask, is_block_mask

__all__ = ["Captured", "ModelCall", "OutputLayout", "RegionInfo", "RegionSpec", "Slot", "TraceError",
           "capture"]

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


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
    return repr(value)


def _one_line(spec: Any) -> str:
    return " ".join(str(spec).split())


def _same_constant(got: Any, want: Any) -> bool:
    """Whether a step-time non-tensor argument equals the one baked into the trace."""
    if isinstance(got, torch.Tensor) or type(got) is not type(want):
        return False
    try:
        return got is want or bool(got == want)
    except Exception:  # noqa: BLE001 - an object without a usable == is only equal to itself
        return False


@dataclass(frozen=True)
class ModelCall:
    """How :func:`capture` called the model: ``model(*args, **kwargs)``.

    ``args`` are ``num_args`` tensors, graph inputs ``input:i``. Keyword ``k``'s value is a
    pytree ``kwargs[k] = (spec, leaves)``: a leaf is :class:`Slot` ``j`` for the ``j``-th
    tensor graph input (named ``names[j]``: ``kwarg:k``, or ``kwarg:k/<leaf index>`` inside a
    container; ``labels[j]`` says it the user's way, ``kwargs['k']``), any other leaf is a
    constant baked into the graph. Tensors come first positional, then in keyword order.
    A flex-attention ``BlockMask`` leaf is :class:`MaskSlots`: its tensors and its
    ``mask_mod``'s (``passes.block_masks``) are graph inputs ``kwarg:k/<field>`` and
    ``kwarg:k/mask_mod.<i>``, listed in ``mask_names``.
    """

    num_args: int
    kwargs: Mapping[str, tuple[Any, tuple]]
    names: tuple[str, ...]
    labels: tuple[str, ...]
    # graph inputs that come from a flex-attention BlockMask (passes.block_masks): shared
    # across micro-batches when the step's value has the example's shape
    mask_names: frozenset = frozenset()

    @staticmethod
    def of(args: Sequence[torch.Tensor], kwargs: Mapping[str, Any]) -> "ModelCall":
        """The call ``model(*args, **kwargs)`` of the example micro-batch."""
        names = [f"input:{i}" for i in range(len(args))]
        labels = [f"inputs[{i}]" for i in range(len(args))]
        masks: list[str] = []
        templates = {}
        for key, value in kwargs.items():
            leaves, spec = tree_flatten(value)
            tmpl: list = []
            nested = not spec.is_leaf()
            for j, leaf in enumerate(leaves):
                name = f"kwarg:{key}/{j}" if nested else f"kwarg:{key}"
                label = f"kwargs[{key!r}] leaf {j}" if nested else f"kwargs[{key!r}]"
                if is_block_mask(leaf):
                    tensors, layout = flatten_mask(leaf, "compile()")
                    tmpl.append(MaskSlots(layout, len(names)))
                    for part in layout.tensor_names():
                        masks.append(f"{name}/{part}")
                        names.append(masks[-1])
                        labels.append(f"{label}.{part}")
                elif isinstance(leaf, torch.Tensor):
                    tmpl.append(Slot(len(names)))
                    names.append(name)
                    labels.append(label)
                else:
                    tmpl.append(leaf)
            templates[key] = (spec, tuple(tmpl))
        return ModelCall(len(args), MappingProxyType(templates), tuple(names), tuple(labels), frozenset(masks))

    def label(self, name: str) -> str:
        """The user's name for graph input ``name`` (``kwargs['mask']``); ``target`` as is."""
        return self.labels[self.names.index(name)] if name in self.names else name

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for the model, from its tensor graph inputs in ``names`` order."""
        kwargs = {}
        for key, (spec, tmpl) in self.kwargs.items():
            kwargs[key] = tree_unflatten([_fill(x, tensors) for x in tmpl], spec)
        return tuple(tensors[: self.num_args]), kwargs

    def values(self, args: Sequence, kwargs: Mapping[str, Any], where: str, fix: str) -> dict[str, Any]:
        """``{name: value}`` of every tensor graph input in a call like the traced one.

        Raises TypeError for another positional count or other keywords, ValueError for
        another container structure or another constant; ``where`` prefixes the message
        (``"step()"``) and ``fix`` says how to trace again (``"call dualpipe_fx.compile()
        again"``). Tensor leaves are returned unchecked: shapes are the caller's rule.
        """
        if len(args) != self.num_args:
            raise TypeError(f"{where} got {len(args)} positional model inputs; the model was traced with "
                            f"{self.num_args} (pass them in the same order as example_inputs)")
        self._check_keywords(kwargs, where, fix)
        found = dict(zip(self.names, args))
        for key, (spec, tmpl) in self.kwargs.items():
            leaves, got_spec = tree_flatten(kwargs[key])
            if got_spec != spec:
                raise ValueError(f"{where}: kwargs[{key!r}] has the pytree structure {_one_line(got_spec)}, "
                                 f"but the model was traced with {_one_line(spec)}. Fix: pass the same "
                                 f"structure, or {fix} with this one in example_kwargs")
            for j, (want, got) in enumerate(zip(tmpl, leaves)):
                if isinstance(want, Slot):
                    found[self.names[want.index]] = got
                elif isinstance(want, MaskSlots):
                    found.update(self._mask_values(key, j, spec, want, got, where, fix))
                elif not _same_constant(got, want):
                    raise ValueError(self._constant_error(key, j, spec, got, want, where, fix))
        return found

    def _mask_values(self, key, j, spec, want: "MaskSlots", got, where: str, fix: str) -> dict[str, Any]:
        """A BlockMask leaf's tensors by graph-input name, once its layout is the traced one."""
        what = f"kwargs[{key!r}]" + (f" leaf {j}" if not spec.is_leaf() else "")
        if not is_block_mask(got):
            raise TypeError(f"{where}: {what} is {_describe(got)}, but the model was traced with a flex-attention "
                            f"BlockMask there. Fix: pass a BlockMask built the same way, or {fix}")
        tensors, layout = flatten_mask(got, where)
        differs = want.layout.difference(layout)
        if differs:
            raise ValueError(f"{where}: the BlockMask {what} is not built like the traced one: {differs}. Fix: "
                             f"build it with the same function and block size, or {fix} with this mask in "
                             f"example_kwargs")
        return dict(zip(self.names[want.first:want.first + len(tensors)], tensors))

    def _check_keywords(self, kwargs: Mapping[str, Any], where: str, fix: str) -> None:
        missing = sorted(set(self.kwargs) - set(kwargs))
        extra = sorted(set(kwargs) - set(self.kwargs))
        if missing or extra:
            raise TypeError(f"{where}: keyword arguments {sorted(kwargs)} differ from the traced "
                            f"{sorted(self.kwargs)} (missing {missing}, unexpected {extra}). Fix: pass the "
                            f"keywords of example_kwargs, or {fix} with these in example_kwargs")

    @staticmethod
    def _constant_error(key, j, spec, got, want, where, fix) -> str:
        what, how = f"kwargs[{key!r}]", f"pass {key}={want!r}"
        if not spec.is_leaf():
            what, how = f"{what} leaf {j}", f"pass {want!r} as leaf {j} of {key}"
        return (f"{where}: {what} is {_describe(got)}, but the model was traced with {_describe(want)}; "
                f"non-tensor arguments are constants baked into the trace. Fix: {how}, or {fix} with "
                f"{_describe(got)} there in example_kwargs")


@dataclass(frozen=True, eq=False)
class MaskSlots:
    """Placeholder for a flex-attention ``BlockMask`` among the keyword arguments: its
    tensors (``layout.tensor_names()``) are the graph inputs ``first, first + 1, ...``."""

    layout: MaskLayout
    first: int


def _fill(x: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """A keyword template leaf with its tensors: a Slot's, a BlockMask around its own, a constant."""
    if isinstance(x, Slot):
        return tensors[x.index]
    if isinstance(x, MaskSlots):
        return x.layout.rebuild(tensors[x.first:x.first + x.layout.num_tensors])
    return x


@dataclass(frozen=True)
class _DataclassNode:
    """Marks ``(marker, {field: value})`` as an instance of ``cls``, a dataclass pytree
    does not know: torch's pytree keeps such objects whole, and export cannot return them."""

    cls: type


def _is_dataclass_node(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], _DataclassNode)


def _to_tree(value: Any) -> Any:
    """``value`` with every unregistered dataclass turned into ``(marker, {init field: value})``."""
    def leaf(x):
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            fields = {f.name: _to_tree(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}
            return (_DataclassNode(type(x)), fields)
        return x
    return tree_map(leaf, value)


def _from_tree(value: Any) -> Any:
    """The inverse of :func:`_to_tree`: ``cls(**fields)`` for every marked pair."""
    def node(x):
        return x[0].cls(**_from_tree(x[1])) if _is_dataclass_node(x) else x
    return tree_map(node, value, is_leaf=_is_dataclass_node)


def _holds_tensors(x: Any, depth: int = 4) -> bool:
    """Whether a leaf pytree cannot see into holds tensors within ``depth`` attribute levels
    (a transformers ``DynamicCache``: ``.layers[i].keys``)."""
    if isinstance(x, torch.Tensor):
        return True
    if depth == 0:
        return False
    if isinstance(x, (list, tuple)):
        return any(_holds_tensors(v, depth - 1) for v in x)
    if isinstance(x, dict):
        return any(_holds_tensors(v, depth - 1) for v in x.values())
    attrs = getattr(x, "__dict__", None)
    return isinstance(attrs, dict) and any(_holds_tensors(v, depth - 1) for v in attrs.values())


@dataclass(frozen=True)
class OutputLayout:
    """The model output's structure: ``tree_unflatten(leaves, spec)`` with :class:`Slot` ``j``
    replaced by tensor model output ``j``; any other leaf is a constant kept as traced
    (``None``, ints). Dataclasses that torch's pytree does not know are rebuilt with
    ``cls(**init_fields)``; registered nodes (``ModelOutput``, namedtuples) by their own rule.
    An opaque leaf that holds tensors (a transformers ``DynamicCache`` built by
    ``use_cache=True``) becomes ``None``: kept, it would hand back the trace's fake tensors
    of one example micro-batch, not values of the run.
    """

    spec: Any
    leaves: tuple

    @staticmethod
    def of(output: Any) -> tuple["OutputLayout", list[torch.Tensor]]:
        """The layout of ``output`` and its tensor leaves in Slot order."""
        leaves, spec = tree_flatten(_to_tree(output))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        slots, j = [], 0
        for x in leaves:
            slots.append(Slot(j) if isinstance(x, torch.Tensor) else None if _holds_tensors(x) else x)
            j += isinstance(x, torch.Tensor)
        return OutputLayout(spec, tuple(slots)), tensors

    def rebuild(self, tensors: Sequence[Any]) -> Any:
        """The model's output structure around ``tensors`` (one per tensor leaf, in order)."""
        leaves = [tensors[x.index] if isinstance(x, Slot) else x for x in self.leaves]
        return _from_tree(tree_unflatten(leaves, self.spec))


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
    call: Optional[ModelCall] = None
    output_layout: Optional[OutputLayout] = None


# --------------------------------------------------------------------------------------
# Tracing: wrapper module and region recording


class _WithLoss(nn.Module):
    """``forward(*tensor_inputs[, target]) -> (loss, *tensor leaves of model(*args, **kwargs))``.

    Export sees positional tensors only: ``call`` rebuilds the model's ``(args, kwargs)``
    around them, so every non-tensor keyword is a Python constant of the trace.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, call: ModelCall, has_target: bool):
        super().__init__()
        self.model = model
        # Not a submodule: a loss module's tensors must not become "model" params/buffers.
        object.__setattr__(self, "_loss_fn", loss_fn)
        object.__setattr__(self, "_call", call)
        object.__setattr__(self, "_has_target", has_target)
        object.__setattr__(self, "out_spec", _Holder())
        # The graph export records into: a custom Function traced into another graph (a
        # flex_attention mask_mod's subgraph, which indexes through torch's own Function) is
        # part of that higher-order op, not a region of the model.
        object.__setattr__(self, "graph", _Holder())

    def forward(self, *tensors):
        self.graph.value = _compat.current_tracer_graph()
        args, kwargs = self._call.rebuild(tensors[: len(self._call.names)])
        out = self.model(*args, **kwargs)
        loss = self._loss_fn(out, tensors[-1]) if self._has_target else self._loss_fn(out)
        layout, leaves = OutputLayout.of(out)
        self.out_spec.value = layout
        return (loss, *leaves)


class _Holder:
    """A slot that survives the module copies export makes (deepcopy returns itself)."""

    def __init__(self) -> None:
        self.value = None

    def __deepcopy__(self, memo):
        return self


class _RegionRecorder:
    """Wraps ``torch.autograd.Function.apply`` while tracing; tags each call's nodes."""

    def __init__(self, graph: "_Holder") -> None:
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


def _mark_recompute(mark: torch.fx.Node, graph: torch.fx.Graph) -> None:
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


# Known library patterns: (a test of the failing user frame) -> the usual way out. Each
# hint gets the FrameSummary and, when the traceback still holds it, the live frame (for
# ``self``); it returns the advice, or None when the pattern is not its own.


def _live_frame(exc: BaseException, fs: traceback.FrameSummary) -> Optional[types.FrameType]:
    """The frame behind ``fs`` (its locals name the module), searched over the exception chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == fs.filename and tb.tb_lineno == fs.lineno:
                return tb.tb_frame
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return None


def _frame_self(frame: Optional[types.FrameType]) -> Optional[nn.Module]:
    module = frame.f_locals.get("self") if frame is not None else None
    return module if isinstance(module, nn.Module) else None


def _in_transformers(fs: traceback.FrameSummary) -> bool:
    return f"{os.sep}transformers{os.sep}" in os.path.abspath(fs.filename)


def _hint_hf_eager_experts(fs, frame) -> Optional[str]:
    """transformers' eager MoE experts (``@use_experts_implementation`` classes): one matmul
    per expert that received tokens, looped over ``nonzero()``, a count known only at run time."""
    module = _frame_self(frame)
    # use_experts_implementation's __init__ sets these on the experts module
    decorated = all(hasattr(module, a) for a in ("config", "is_concatenated", "has_gate"))
    if (not _in_transformers(fs) or not decorated
            or getattr(module.config, "_experts_implementation", None) != "eager"):
        return None
    return (f"This is transformers' eager MoE experts loop ({type(module).__name__} with "
            'experts_implementation="eager"): one matmul per expert that received tokens. Fix: '
            'use the default experts_implementation="grouped_mm" (one grouped GEMM over all '
            'experts, traceable; "batched_mm" works too): build the config with '
            'experts_implementation="grouped_mm", or call '
            'model.set_experts_implementation("grouped_mm") before compile()/split().')


def _hint_hf_expert_loop(fs, frame) -> Optional[str]:
    """A transformers MoE whose only experts code is that loop (DBRX, SwitchTransformers, NLLB-MoE)."""
    line = fs.line or linecache.getline(fs.filename, fs.lineno)
    if not _in_transformers(fs) or "expert" not in line:
        return None
    module = _frame_self(frame)
    name = type(module).__name__ if module is not None else "this MoE layer"
    return (f"This is a transformers MoE experts loop ({name}): one matmul per expert that "
            "received tokens. Fix: if the model takes experts_implementation, use the default "
            '"grouped_mm"; models without it (DBRX, SwitchTransformers, NLLB-MoE) cannot be '
            f"captured as they are: replace {name}.forward by a static form (sort the tokens by "
            "expert and call torch.nn.functional.grouped_mm with offsets, as Mixtral, Qwen2-MoE, "
            "Qwen3-MoE, OLMoE and DeepSeek-V3 do by default).")


def _hint_layerdrop(fs, frame) -> Optional[str]:
    """LayerDrop (transformers encoders/decoders in train mode): ``if torch.rand([]) < self.layerdrop``."""
    line = fs.line or linecache.getline(fs.filename, fs.lineno)
    if "layerdrop" not in line:
        return None
    module = _frame_self(frame)
    what = (f"{type(module).__name__}.layerdrop = {module.layerdrop}"
            if hasattr(module, "layerdrop") else "layerdrop > 0")
    return (f"This is LayerDrop ({what} in train mode): every call skips layers at random, "
            "which one static graph per stage cannot express. Fix: build the config with "
            "encoder_layerdrop=0.0 and decoder_layerdrop=0.0 (layerdrop=0.0 where the model has "
            "one stack), or set .layerdrop = 0.0 on its encoder and decoder modules, or trace in "
            "eval() mode for inference.")


_DATA_DEPENDENT_HINTS = (_hint_hf_eager_experts, _hint_hf_expert_loop, _hint_layerdrop)


def _hint_module_to(exc: BaseException) -> Optional[str]:
    """``Module.to()``/``.float()`` in forward: export's fake parameters cannot be swapped."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if "Couldn't swap" in str(exc):
            return ("forward() converts a module's parameters (Module.to(), .float(), .half(), "
                    "...) while it runs, even to the dtype they have; torch.export cannot swap "
                    "parameters during a trace. Fix: convert the model once before "
                    "compile()/split() and take the call out of forward().")
        exc = exc.__cause__ or exc.__context__
    return None


def _first_hint(hints, fs, frame) -> Optional[str]:
    return next((h for h in (hint(fs, frame) for hint in hints) if h is not None), None)


def _trace_error(model: nn.Module, exc: BaseException) -> TraceError:
    fs = _user_frame(exc)
    where = "an unknown location"
    if fs is not None:
        line = (fs.line or linecache.getline(fs.filename, fs.lineno)).strip()
        where = f"{fs.filename}:{fs.lineno} (`{line}`)"
    name = type(model).__name__
    if _is_data_dependent(exc):
        hint = None if fs is None else _first_hint(_DATA_DEPENDENT_HINTS, fs, _live_frame(exc, fs))
        return TraceError(
            f"cannot capture {name}: Python control flow at {where} depends on tensor "
            "values, which a static graph cannot express. " + (hint or
            "Fix: replace the branch by `torch.where(cond, a, b)` or `torch.cond(...)`, or "
            "move it out of forward().")
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TraceError(
        f"cannot capture {name}: torch.export failed at {where}: {type(exc).__name__}: "
        f"{first}. " + (_hint_module_to(exc) or
                        "Fix: make forward() traceable by torch.export(strict=False).")
    )


# --------------------------------------------------------------------------------------
# Post-processing of the exported graph


def _held(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _fake_device(model: nn.Module, named_inputs: Sequence[tuple[str, Any]], device) -> Optional[torch.device]:
    """The device to trace on with fake tensors, or None to trace the real ones.

    A tensor on meta runs meta kernels (``scaled_dot_product_attention`` becomes bmm +
    softmax there), so a model or example on meta is traced on fake tensors of ``device``.
    """
    named = list(_held(model)) + [(n, t) for n, t in named_inputs if isinstance(t, torch.Tensor)]
    on_meta = [n for n, t in named if t.is_meta]
    if not on_meta:
        return None
    if device is None:
        raise ValueError(f"capture(): {on_meta[:3]} {'is' if len(on_meta) == 1 else 'are'} on meta and "
                         "device=None; expected the device the graphs will run on. Fix: pass device='cpu' "
                         "(or 'cuda', ...), so that the trace uses that device's kernels")
    return torch.device(device)


def _fake_like(mode, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    with mode:
        return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=device)


@contextlib.contextmanager
def _fake_model(model: nn.Module, mode, device: torch.device) -> Iterator[None]:
    """While active, every parameter and buffer of ``model`` is a fake tensor of ``device``
    (tied tensors stay tied); the model's own tensors are put back after."""
    fakes: dict[int, torch.Tensor] = {}
    undo: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        for module in model.modules():
            for name, t in [*module.named_parameters(recurse=False, remove_duplicate=False),
                            *module.named_buffers(recurse=False, remove_duplicate=False)]:
                if id(t) not in fakes:
                    fake = _fake_like(mode, t, device)
                    fakes[id(t)] = nn.Parameter(fake, t.requires_grad) if isinstance(t, nn.Parameter) else fake
                undo.append((module, name, t))
                setattr(module, name, fakes[id(t)])
        yield
    finally:
        for module, name, t in reversed(undo):
            setattr(module, name, t)


class _HeldLogs(logging.Filter):
    """Holds the records one of torch's log handlers gets while it exports (on a failure, ~25
    lines of warnings and graph code per process before our message); ``release`` hands
    them on to that handler, or, after a failure, to this module's debug log."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def release(self, failed: bool) -> None:
        self.handler.removeFilter(self)
        for record in self.records:
            if not failed:
                self.handler.handle(record)
            elif record.levelno >= logging.INFO:  # our TraceError says what failed
                logging.getLogger(__name__).debug("torch while exporting: %s", record.getMessage())


@contextlib.contextmanager
def _torch_logs_held():
    # torch gives each of its loggers its own handler (propagate=False)
    loggers = [lg for name, lg in logging.root.manager.loggerDict.items()
               if (name == "torch" or name.startswith("torch.")) and isinstance(lg, logging.Logger)]
    held = [_HeldLogs(h) for h in {id(h): h for lg in loggers for h in lg.handlers}.values()]
    for hold in held:
        hold.handler.addFilter(hold)
    failed, printed = True, io.StringIO()  # export prints a failed trace's partial graph to stderr
    try:
        with contextlib.redirect_stderr(printed):
            yield
        failed = False
    finally:
        for hold in held:
            hold.release(failed)
        if failed and printed.getvalue():
            logging.getLogger(__name__).debug("torch while exporting (stderr): %s", printed.getvalue())
        elif printed.getvalue():
            sys.stderr.write(printed.getvalue())


def _check_loss_needs_no_target(loss_fn: Callable) -> None:
    """``example_target=None`` calls ``loss_fn(output)``: refuse a loss that needs a target."""
    try:
        params = list(inspect.signature(loss_fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: let the trace tell
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) >= 2:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise ValueError(
            f"example_target=None, but loss_fn {name}{inspect.signature(loss_fn)} takes a target "
            f"({required[1].name!r}); expected one micro-batch of targets. Fix: pass example_target= "
            f"(and target= to step()), or a loss_fn(output) of one argument")


def _export(model, loss_fn, call: ModelCall, tensors, target, device: Optional[torch.device] = None):
    wrapper = _WithLoss(model, loss_fn, call, target is not None)
    args = (*tensors, target) if target is not None else tuple(tensors)
    recorder = _RegionRecorder(wrapper.graph)
    try:
        with contextlib.ExitStack() as fake, _torch_logs_held():
            if device is not None:
                # torch.export takes fake inputs under an active fake mode; constants made
                # in forward (torch.tensor(...)) stay real, hence non-fake inputs are allowed
                mode = _compat.FakeTensorMode(allow_non_fake_inputs=True)
                args = tuple(_fake_like(mode, a, device) for a in args)
                fake.enter_context(_fake_model(model, mode, device))
                fake.enter_context(mode)
            with recorder.patched(), _compat.on_checkpoint_regions(_mark_recompute):
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


def mutated_base(node: torch.fx.Node) -> Optional[torch.fx.Node]:
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
        base = mutated_base(node)
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


def _lift_placeholders(gm, ep, model, input_names: Sequence[str]):
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
        elif kind == "USER_INPUT":  # the model's tensor inputs in ModelCall order, then the target
            is_target = user_i == len(input_names)
            node.meta["dpfx_kind"] = "target" if is_target else "input"
            node.meta["dpfx_name"] = "target" if is_target else input_names[user_i]
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
        # make_fx copies meta["custom"] onto the nodes a node becomes when re-traced under
        # torch.fx.traceback.preserve_node_meta (split_backward's joint trace)
        node.meta["custom"] = {**node.meta.get("custom", {}), "dpfx_module": node.meta["dpfx_module"],
                               "dpfx_recompute": bool(node.meta.get("dpfx_recompute"))}


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
            raise TypeError(f"example_inputs[{i}] is {type(x).__name__}; expected a tensor. Fix: pass "
                            "non-tensor options as keyword arguments (example_kwargs), where they are "
                            "constants of the trace, or to the model's constructor.")
    return inputs


def _as_kwargs(example_kwargs) -> dict[str, Any]:
    if example_kwargs is None:
        return {}
    if not isinstance(example_kwargs, Mapping) or not all(isinstance(k, str) for k in example_kwargs):
        raise TypeError(f"example_kwargs is {type(example_kwargs).__name__}; expected a dict of keyword "
                        "arguments, {name: value}, for model(*example_inputs, **example_kwargs)")
    return dict(example_kwargs)


def capture(model: nn.Module, loss_fn: Callable, example_inputs, example_target=None, *,
            example_kwargs: Optional[Mapping[str, Any]] = None, device=None) -> Captured:
    """Trace ``loss_fn(model(*args, **kwargs), target)`` into one ATen-level FX graph.

    **Contract**: ``(model, loss_fn, example micro-batch) -> Captured`` whose ``gm`` maps
    ``(*params, *buffers, *inputs[, target]) -> (loss, *model_outputs)``: ``inputs`` are the
    tensors of ``args`` then of ``kwargs`` (``Captured.call``), ``model_outputs`` the tensor
    leaves of the model's output (``Captured.output_layout`` rebuilds it). Placeholders carry
    ``meta["dpfx_kind"]`` (param/buffer/input/target) and ``meta["dpfx_name"]`` (FQN,
    ``input:i``, ``kwarg:name`` or ``target``); tied params are one placeholder (first FQN;
    the rest in ``param_aliases``). Every node has ``meta["val"]``; call nodes ``meta["dpfx_module"]``
    (innermost module FQN, ``""`` for top-level code and the loss). Nodes of a custom
    ``autograd.Function`` call carry ``meta["dpfx_region"]`` (+ ``dpfx_region_spec``, and
    ``dpfx_region_input``/``dpfx_region_output`` on entry/exit nodes).

    **Pseudocode**::

        wrap model+loss (non-tensor kwargs as constants); patch Function.apply to tag regions
        anything on meta: params, buffers and inputs become fake tensors of `device` for the trace
        ep = torch.export.export(wrapper, (*tensor_inputs, target), strict=False)
        reject buffer/input mutation; merge tied params; constants -> get_attr
        annotate placeholders, module FQNs, regions; lint; recompile

    Args:
        model: any ``nn.Module`` traceable by ``torch.export(strict=False)``.
        loss_fn: ``loss_fn(output, target)`` (or ``loss_fn(output)`` without a target),
            returning a scalar; ``output`` is the model's own output (dict, dataclass, ...).
        example_inputs: a tensor or tuple of tensors, one micro-batch (may be empty).
        example_target: the target tensor, or None.
        example_kwargs: keyword arguments of the model: tensors (or pytrees of tensors) are
            graph inputs like ``example_inputs``; anything else is a constant of the graph.
        device: where the graphs will run. Needed when the model (built under
            ``torch.device("meta")``) or an example is on meta: the trace then runs on fake
            tensors of ``device``, so it records that device's kernels (CPU SDPA stays
            ``_scaled_dot_product_flash_attention_for_cpu``, not meta's bmm + softmax), and
            ``meta["val"]`` is on ``device``. The model is left as it was.

    Returns:
        :class:`Captured`.

    Raises:
        TraceError: the model cannot be traced (the message names the user's source line
            and suggests a fix), or mutates buffers/inputs in forward.
        TypeError: non-tensor positional inputs, non-scalar loss.
        ValueError: a tensor on meta and ``device=None``.
    """
    inputs, kwargs = _as_inputs(example_inputs), _as_kwargs(example_kwargs)
    if example_target is None:
        _check_loss_needs_no_target(loss_fn)
    call = ModelCall.of(inputs, kwargs)
    found = call.values(inputs, kwargs, "capture()", "")
    # flex_attention traces its mask_mod through Dynamo, which makes a view's storage size
    # symbolic and then fails to trace it: the mask's tensors are traced as fresh tensors.
    found = {n: t.clone() if n in call.mask_names else t for n, t in found.items()}
    fake_on = _fake_device(model, [*found.items(), ("target", example_target)], device)
    ep, layout = _export(model, loss_fn, call, [found[n] for n in call.names], example_target, fake_on)
    _check_mutations(ep)
    gm = ep.graph_module
    params, buffers, aliases = _lift_placeholders(gm, ep, model, call.names)
    _annotate_modules(gm.graph)
    _check_inplace(gm.graph)
    regions = _collect_regions(gm.graph)
    num_outputs = _check_outputs(gm)
    gm.graph.lint()
    gm.recompile()
    return Captured(
        gm=gm, param_names=params, buffer_names=buffers, num_inputs=len(call.names),
        has_target=example_target is not None, regions=MappingProxyType(regions),
        param_aliases=MappingProxyType(aliases), output_spec=layout.spec,
        num_model_outputs=num_outputs, call=call, output_layout=layout,
    )
