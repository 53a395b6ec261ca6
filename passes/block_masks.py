"""A flex-attention ``BlockMask`` as graph inputs: its tensors and its ``mask_mod``'s tensors.

A ``BlockMask`` passed to the model is batch data, like the tokens. Traced as it is, its
tensors, and the tensors its ``mask_mod`` closes over (a document mask's per-sample document
ids ``[B, S]``), would be constants of the graph: every step would use the example's
documents. :func:`flatten_mask` takes all of them out, so that they become graph inputs;
:meth:`MaskLayout.rebuild` puts a mask together again around other tensors (the trace's
inputs, or one micro-batch's share), with a ``mask_mod`` of the same code.

What a ``mask_mod`` may close over, at any depth (closure cells, default arguments,
``functools.partial`` arguments, tuples/lists/dicts of these, functions they hold such as
``and_masks(causal, document)``): tensors, which become inputs, and constants (ints, other
functions), which are part of the trace and must be the same at every step. An object that
holds tensors in its attributes cannot be taken apart and is refused.

The split rule (``dualpipe_fx.runtime.values.micro_batches``): a mask tensor whose step
value has the example's shape with dim 0 times ``C`` is per-sample and split along dim 0,
like the tokens; one whose step value has the example's shape is shared (a ``B=None``
mask's ``[1, H, ...]`` block counts, a lookup table) and given whole to every micro-batch.
Micro-batch ``i``'s mask is then exactly the mask built on micro-batch ``i`` provided the
``mask_mod`` reads ``b`` only to index its per-sample tensors (no Python-int batch offset
is ever made: the trace's ``b`` counts from 0 in every micro-batch).
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from passes import _compat

__all__ = ["MaskLayout", "flatten_mask", "is_block_mask"]

_DEPTH = 8  # how deep a mask_mod's closures are searched for tensors


def is_block_mask(x: Any) -> bool:
    return isinstance(x, _compat.BlockMask)


@dataclass(frozen=True)
class _Leaf:
    """The ``index``-th lifted tensor."""

    index: int


@dataclass(frozen=True)
class _Const:
    """A value kept as it is (part of the trace)."""

    value: Any

    def __eq__(self, other) -> bool:
        if not isinstance(other, _Const) or type(self.value) is not type(other.value):
            return False
        try:
            return self.value is other.value or bool(self.value == other.value)
        except Exception:  # noqa: BLE001 - without a usable ==, only the object itself is equal
            return False

    __hash__ = None


@dataclass(frozen=True)
class _Fn:
    """A Python function rebuilt around new closure cells and defaults."""

    fn: types.FunctionType
    cells: tuple
    defaults: Optional[tuple]

    def __eq__(self, other) -> bool:
        return (isinstance(other, _Fn) and self.fn.__code__ is other.fn.__code__
                and self.cells == other.cells and self.defaults == other.defaults)

    __hash__ = None


@dataclass(frozen=True)
class _Partial:
    func: Any
    args: tuple
    keywords: tuple  # ((name, node), ...)


@dataclass(frozen=True)
class _Seq:
    kind: type
    items: tuple  # for dicts: ((key, node), ...)


def _holds_tensors(x: Any, depth: int = 3) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    attrs = getattr(x, "__dict__", None)
    return depth > 0 and isinstance(attrs, dict) and any(_holds_tensors(v, depth - 1) for v in attrs.values())


def _lift(obj: Any, tensors: list, depth: int, where: str) -> Any:
    """``obj`` as a node tree; its tensors appended to ``tensors`` (in a fixed order)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Leaf(len(tensors) - 1)
    if depth == 0:
        return _Const(obj)
    go = functools.partial(_lift, tensors=tensors, depth=depth - 1, where=where)
    if isinstance(obj, types.FunctionType):
        cells = tuple(go(c.cell_contents) for c in obj.__closure__ or ())
        defaults = tuple(go(d) for d in obj.__defaults__) if obj.__defaults__ else None
        return _Fn(obj, cells, defaults)
    if isinstance(obj, functools.partial):
        return _Partial(go(obj.func), tuple(go(a) for a in obj.args),
                        tuple((k, go(v)) for k, v in sorted(obj.keywords.items())))
    if type(obj) in (tuple, list):
        return _Seq(type(obj), tuple(go(v) for v in obj))
    if type(obj) is dict:
        return _Seq(dict, tuple((k, go(v)) for k, v in obj.items()))
    if _holds_tensors(obj):
        raise TypeError(
            f"{where}: the mask_mod closes over a {type(obj).__name__} that holds tensors; dualpipe_fx "
            "cannot split it into micro-batches (expected tensors, constants, functions, "
            "functools.partial or tuples/lists/dicts of these). Fix: let the mask_mod close over the "
            "tensors themselves (e.g. the document ids [B, S])")
    return _Const(obj)


def _build(node: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """The object of a node tree, with ``tensors`` at its leaves."""
    if isinstance(node, _Leaf):
        return tensors[node.index]
    if isinstance(node, _Const):
        return node.value
    if isinstance(node, _Fn):
        fn = node.fn
        cells = tuple(types.CellType(_build(c, tensors)) for c in node.cells) or None
        defaults = tuple(_build(d, tensors) for d in node.defaults) if node.defaults else fn.__defaults__
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, defaults, cells)
        new.__kwdefaults__, new.__qualname__ = fn.__kwdefaults__, fn.__qualname__
        new.__dict__.update(fn.__dict__)
        return new
    if isinstance(node, _Partial):
        return functools.partial(_build(node.func, tensors), *(_build(a, tensors) for a in node.args),
                                 **{k: _build(v, tensors) for k, v in node.keywords})
    if node.kind is dict:
        return {k: _build(v, tensors) for k, v in node.items}
    return node.kind(_build(v, tensors) for v in node.items)


@dataclass(frozen=True)
class MaskLayout:
    """A ``BlockMask`` without its tensors: ``rebuild(tensors)`` is that mask around
    ``tensors`` (``len(fields)`` block tensors, then the ``mask_mod``'s, as :func:`flatten_mask`
    lists them). Two layouts are equal when their masks differ in tensor values only."""

    fields: tuple[str, ...]  # the BlockMask's tensor fields present (kv_num_blocks, kv_indices, ...)
    constants: tuple  # its other fields: ((name, value), ...), seq_lengths and BLOCK_SIZE among them
    mask_mod: Any  # node tree of the mask_mod
    num_tensors: int
    template: Any  # a BlockMask of this layout, whose other fields the rebuilt masks copy

    def __eq__(self, other) -> bool:
        return (isinstance(other, MaskLayout) and self.fields == other.fields and self.mask_mod == other.mask_mod
                and _Const(self.constants) == _Const(other.constants))

    __hash__ = None

    def rebuild(self, tensors: Sequence[torch.Tensor]):
        n = len(self.fields)
        mask_mod = _build(self.mask_mod, tensors)  # leaf indices count the block tensors too
        return _compat.block_mask_with(self.template, dict(zip(self.fields, tensors[:n])), mask_mod)

    def tensor_names(self) -> tuple[str, ...]:
        """A name per tensor: the field, or ``mask_mod.<i>`` for the ``i``-th closure tensor."""
        return (*self.fields, *(f"mask_mod.{i}" for i in range(self.num_tensors - len(self.fields))))

    def difference(self, other: "MaskLayout") -> str:
        """What differs from ``other``, in words (empty when equal)."""
        if self.fields != other.fields:
            return f"its tensor fields are {list(other.fields)}, traced with {list(self.fields)}"
        if _Const(self.constants) != _Const(other.constants):
            return f"its fields {dict(other.constants)} differ from the traced {dict(self.constants)}"
        if self.mask_mod != other.mask_mod:
            return ("its mask_mod differs from the traced one in code or in a non-tensor value it closes "
                    "over (an int, a flag, a function): those are constants of the trace")
        return ""


def flatten_mask(mask, where: str = "compile()") -> tuple[list[torch.Tensor], MaskLayout]:
    """``mask``'s tensors (its block tensors, then every tensor its ``mask_mod`` closes over)
    and its :class:`MaskLayout`.

    Raises:
        TypeError: the ``mask_mod`` closes over an object that holds tensors.
    """
    fields = _compat.block_mask_tensor_fields(mask)
    tensors = [getattr(mask, f) for f in fields]
    node = _lift(mask.mask_mod, tensors, _DEPTH, where)
    return tensors, MaskLayout(fields, _compat.block_mask_constants(mask), node, len(tensors), mask)
