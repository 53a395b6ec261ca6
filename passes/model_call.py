"""How the model is called and what it returns, as templates around the graph's tensors.

``ModelCall``: ``model(*args, **kwargs)`` of the example micro-batch, the tensors (and a
flex-attention ``BlockMask``'s, ``passes.block_masks``) as graph inputs, every other keyword
value a constant of the trace; it maps a later call's arguments onto the graph inputs, refusing
another structure or constant. ``OutputLayout``: the model output's pytree (dict, dataclass,
``ModelOutput``) around its tensor leaves. ``as_inputs``/``as_kwargs`` check the example's
positional and keyword arguments.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch

from passes._compat import tree_flatten, tree_map, tree_unflatten
from passes.block_masks import MaskLayout, flatten_mask, is_block_mask


@dataclass(frozen=True)
class Slot:
    """Placeholder for the ``index``-th tensor in a region's argument or result template."""

    index: int


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


def as_inputs(example_inputs) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` as the tuple of positional tensors ``model(*inputs)`` takes."""
    if isinstance(example_inputs, Mapping):
        raise TypeError(f"example_inputs is a {type(example_inputs).__name__} with keys "
                        f"{sorted(map(str, example_inputs))}; example_inputs is positional: a tensor or a "
                        "tuple of tensors, model(*example_inputs). Fix: pass keyword inputs as "
                        "example_kwargs={...} (and to step() as keywords)")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"example_inputs[{i}] is {type(x).__name__}; expected a tensor. Fix: pass "
                            "non-tensor options as keyword arguments (example_kwargs), where they are "
                            "constants of the trace, or to the model's constructor.")
    return inputs


def as_kwargs(example_kwargs) -> dict[str, Any]:
    if example_kwargs is None:
        return {}
    if not isinstance(example_kwargs, Mapping) or not all(isinstance(k, str) for k in example_kwargs):
        raise TypeError(f"example_kwargs is {type(example_kwargs).__name__}; expected a dict of keyword "
                        "arguments, {name: value}, for model(*example_inputs, **example_kwargs)")
    return dict(example_kwargs)
