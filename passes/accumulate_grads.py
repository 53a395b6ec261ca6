"""Accumulate grads in place: a graph that returns param grads adds them into given buffers.

Over ``C`` micro-batches each parameter's grad is a sum, and a weight-grad graph that
returns a fresh ``[out, in]`` tensor per micro-batch costs an allocation (page faults for
a large one) and a separate ``grad += new`` pass over the weight per micro-batch. This
pass fuses the sum into the GEMM that makes the grad, as Megatron's gradient-accumulation
fusion does: ``acc.addmm_(a, b)`` (BLAS ``beta = 1``) instead of ``acc += a @ b``. Any
other grad is added with ``acc.add_(grad)``; the values are those of ``acc + grad``
(the GEMM's rounding differs only in where the sum is taken). Under mixed precision a
grad made in ``param_dtype`` (bf16) is summed into an accumulator of the parameter's own
dtype (fp32): ``acc.add_(grad)`` converts as it adds (no fp32 copy of the grad), one grad
at a time where it is made, so the graph never holds all of its bf16 grads at once.
An embedding's grad (``embedding_dense_backward``, a ``[num_weights, dim]`` tensor per
micro-batch) is summed row by row instead: ``acc.index_put_((indices,), grad_output,
accumulate=True)``, so no grad-sized tensor is made at all (same dtype only: a bf16
embedding grad is summed per micro-batch in bf16, as the mixed-precision policy says, then
added).

**Contract**: ``gm(*args) -> results`` with ``results[i]`` a grad for ``i`` in
``positions`` becomes ``gm'(*args, *accs) -> results'`` where, for the positions
holding a tensor (``gm'.meta["dpfx_accumulated"]`` lists them, one ``acc`` each in
that order), ``acc += results[i]`` in place and ``results'[i] is acc``; every other
result is unchanged.

**Pseudocode**
    for each position i whose result v is a node (k-th accumulator acc_k):
        peel t() users-of-one off v, counting transposes
        v == mm(a, b) used once, same dtype: acc_k.addmm_(a, b)  (transposed: addmm_(b.t(), a.t()))
        v == embedding_dense_backward(g, idx), same dtype: acc_k.index_put_((idx,), rows of g, accumulate=True)
        else:                                acc_k.add_(v)
        result i := that in-place node; dead code removed; lint; recompile
"""
from __future__ import annotations

from typing import Collection, Iterable, Optional

import torch
import torch.fx as fx

_aten = torch.ops.aten


def _peel(value: fx.Node) -> tuple[fx.Node, bool]:
    """``value`` without the 2-D transposes ``t()`` it is made of (each inner value used by
    that transpose only), and whether an odd number came off."""
    transposed = False
    while value.op == "call_function" and value.target is _aten.t.default:
        inner = value.args[0]
        if not isinstance(inner, fx.Node) or len(inner.users) != 1:
            break
        value, transposed = inner, not transposed
    return value, transposed


# The in-place sums of a graph that will be compiled are custom ops that mutate ``acc``:
# Dynamo keeps them in its graph (no break, so Inductor compiles the whole graph as one),
# functionalization records the mutation, and Inductor re-applies it in place to ``acc``
# (a graph input), so the sum still makes no grad-sized temporary. The Python wrappers
# return ``acc`` so that the graph's result *is* the accumulator, as with ``addmm_``.
@torch.library.custom_op("dualpipe_fx::addmm_into", mutates_args=("acc",))
def _addmm_into_op(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    acc.addmm_(a, b)


@_addmm_into_op.register_fake
def _addmm_into_fake(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    return None


@torch.library.custom_op("dualpipe_fx::add_into", mutates_args=("acc",))
def _add_into_op(acc: torch.Tensor, value: torch.Tensor) -> None:
    acc.add_(value)


@_add_into_op.register_fake
def _add_into_fake(acc: torch.Tensor, value: torch.Tensor) -> None:
    return None


def addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` in place, kept in place inside torch.compile (which would otherwise
    turn the input mutation into a GEMM to a new buffer plus a copy); returns ``acc``."""
    _addmm_into_op(acc, a, b)
    return acc


def add_into(acc: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``acc += value`` in place (converting to ``acc``'s dtype), kept in place inside
    torch.compile; returns ``acc``."""
    _add_into_op(acc, value)
    return acc


def _rows_into(acc: torch.Tensor, grad_output: torch.Tensor, indices: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """``acc += embedding_dense_backward(grad_output, indices, acc.shape[0], padding_idx, False)``
    in place: each row of ``grad_output`` added to the row of ``acc`` its index names (none
    to ``padding_idx``); no ``[num_weights, dim]`` grad is made. Only activation-sized views
    (and, with a ``padding_idx``, one activation-sized copy) are made."""
    rows = grad_output.reshape(-1, grad_output.shape[-1])
    flat = indices.reshape(-1)
    if padding_idx >= 0:
        rows = rows.masked_fill((flat == padding_idx).unsqueeze(-1), 0)
    return acc.index_put_((flat,), rows, accumulate=True)


@torch.library.custom_op("dualpipe_fx::rows_into", mutates_args=("acc",))
def _rows_into_op(acc: torch.Tensor, grad_output: torch.Tensor, indices: torch.Tensor, padding_idx: int) -> None:
    _rows_into(acc, grad_output, indices, padding_idx)


@_rows_into_op.register_fake
def _rows_into_fake(acc: torch.Tensor, grad_output: torch.Tensor, indices: torch.Tensor, padding_idx: int) -> None:
    return None


def rows_into(acc: torch.Tensor, grad_output: torch.Tensor, indices: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """``_rows_into``, kept in place inside torch.compile; returns ``acc``."""
    _rows_into_op(acc, grad_output, indices, padding_idx)
    return acc


def _is_embedding_grad(node: fx.Node) -> bool:
    """An ``embedding_dense_backward`` without ``scale_grad_by_freq`` (which divides by counts)."""
    return (node.op == "call_function" and node.target is _aten.embedding_dense_backward.default
            and not node.args[4])


def _fused(graph: fx.Graph, acc: fx.Node, value: fx.Node, uses: int, opaque: bool, cast: bool) -> fx.Node:
    """``acc += value`` as one in-place node right where ``value`` was made (so the node
    order, e.g. a multiplexed schedule, holds); ``uses``: how often ``value`` is used at all;
    ``cast``: ``acc`` has another dtype than ``value`` (addmm_ takes one dtype)."""
    core, transposed = _peel(value)
    with graph.inserting_before(value.next):  # keeps the creation order of the new nodes
        if not cast and uses == 1 and core.op == "call_function" and core.target is _aten.mm.default:
            a, b = core.args
            if transposed:  # (a @ b)^T = b^T @ a^T
                a, b = graph.call_function(_aten.t.default, (b,)), graph.call_function(_aten.t.default, (a,))
            return graph.call_function(addmm_into if opaque else _aten.addmm_.default, (acc, a, b))
        if not cast and uses == 1 and not transposed and _is_embedding_grad(core):
            grad_output, indices, _, padding_idx, _ = core.args
            return graph.call_function(rows_into if opaque else _rows_into, (acc, grad_output, indices, padding_idx))
        return graph.call_function(add_into if opaque else _aten.add_.Tensor, (acc, value))


def accumulate_grads(gm: fx.GraphModule, positions: Iterable[int], *, opaque: bool = False,
                     cast: Collection[int] = ()) -> fx.GraphModule:
    """``gm`` with the results at ``positions`` accumulated into extra trailing inputs.

    Args:
        gm: a flat graph returning a tuple (e.g. a ``backward_weight`` or a multiplexed
            F&B graph's ``.gm``); it is not modified.
        positions: indices into its results that are grads to accumulate.
        opaque: emit the in-place sums as the ``dualpipe_fx::addmm_into`` / ``add_into`` /
            ``rows_into`` custom ops (for a graph that will be compiled: Inductor keeps them
            in place and in one graph, where it would turn ``aten.addmm_`` on a graph input
            into a GEMM to a new buffer plus a copy).
        cast: positions whose accumulator has another dtype than the grad (mixed precision:
            fp32 ``.grad``, bf16 grad): summed with ``add_``, which converts as it adds.

    Returns:
        A new GraphModule; ``meta["dpfx_accumulated"]`` is the tuple of positions that
        take an accumulator (results that are None or constants take none).

    Raises:
        ValueError: a position outside the results.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out_args = None
    for node in gm.graph.nodes:
        if node.op == "output":
            out_args = node.args[0]
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
    results = list(out_args) if isinstance(out_args, (tuple, list)) else [out_args]
    positions = tuple(positions)
    bad = [p for p in positions if not 0 <= p < len(results)]
    if bad:
        raise ValueError(f"accumulate_grads: positions {bad} are outside the graph's {len(results)} results; "
                         f"pass indices in 0..{len(results) - 1}")
    new_results = [fx.node.map_arg(r, lambda n: env[n]) for r in results]
    taken = tuple(p for p in positions if isinstance(new_results[p], fx.Node))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    accs = []
    for k in range(len(taken)):  # trailing inputs, after the graph's own
        with graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(next(iter(graph.nodes))):
            anchor = graph.placeholder(f"grad_acc_{k}")
        accs.append(anchor)
    output = graph.output(tuple(new_results))
    in_output = {}
    for r in new_results:
        if isinstance(r, fx.Node):
            in_output[r] = in_output.get(r, 0) + 1
    for acc, pos in zip(accs, taken):
        value = new_results[pos]
        uses = len(value.users) - 1 + in_output[value]  # other nodes, plus each output slot
        new_results[pos] = _fused(graph, acc, value, uses, opaque, pos in cast)
    output.args = (tuple(new_results),)
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.graph.eliminate_dead_code()  # the replaced GEMMs and transposes (needs the owning module)
    out.graph.lint()
    out.meta.update(gm.meta)
    out.meta["dpfx_accumulated"] = taken
    out.recompile()
    return out


def accumulated_positions(gm: fx.GraphModule) -> Optional[tuple[int, ...]]:
    """The positions an ``accumulate_grads`` graph takes accumulators for (None for other graphs)."""
    return gm.meta.get("dpfx_accumulated")
