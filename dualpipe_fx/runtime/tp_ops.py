"""Tensor parallelism's communication as traceable local ops with DTensor's (Megatron's) autograd.

A TP model runs on local tensors inside the stage graphs. Each local tensor stands for a
DTensor on the 1-D TP mesh with a placement the code around it knows (``Replicate``,
``Shard(d)``, ``Partial``), and its gradient is held in the SAME placement: the grad of a
``Replicate`` value is whole and equal on every TP rank, the grad of a ``Shard(d)`` value is
this rank's chunk of it, the grad of a ``Partial`` value is the grad of the sum (whole).

Every redistribution is then a forward collective on a detached tensor (a plain
``_c10d_functional`` op + ``wait_tensor``, which the multiplex pass splits into issue and
wait so that an F&B pair overlaps it) followed by :func:`route`, a custom op that returns
the collective's value and sends the gradient back to the source with the adjoint
collective (traced into the joint graph by ``passes.split_backward``: it lies on the input-
grad path, so it lands in I, and W stays local):

```
redistribute     forward                  backward (adjoint, convention above)
Shard(d)->Repl   all_gather(d)            my chunk of the grad            ("slice")
Repl->Shard(d)   my chunk                 all_gather(d)                   ("gather")
Partial->Repl    all_reduce               identity                        ("identity")
Partial->Shard(d) reduce_scatter(d)       all_gather(d)                   ("gather")
into a sharded matmul (ColwiseParallel's input: its local grad is a partial sum):
Repl             identity                 all_reduce                      ("all_reduce")
Shard(d)         all_gather(d)            reduce_scatter(d)               ("reduce_scatter")
```

**Contract**: ``redistribute(x, src, dst, tp)`` and ``into_sharded_matmul(x, src, tp)`` take
and return local tensors; ``tp`` is a :class:`TPGroup` (group name, size, this rank).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dualpipe_fx import _compat

# kind -> the adjoint collective route's backward applies to the grad (see the table above)
KINDS = ("slice", "gather", "identity", "all_reduce", "reduce_scatter")


@dataclass(frozen=True)
class TPGroup:
    """The TP process group as the traced ops name it."""

    name: str
    size: int
    rank: int


def _gather(x: torch.Tensor, dim: int, name: str, size: int) -> torch.Tensor:
    """Ranks' chunks of ``x`` concatenated along ``dim`` (rank order), as ``Shard(dim)`` gathers."""
    front = x.movedim(dim, 0).contiguous()
    out = _compat.functional_wait_tensor(_compat.functional_all_gather(front, size, name))
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, name: str, size: int) -> torch.Tensor:
    """This rank's chunk along ``dim`` of the sum over ranks of ``x``."""
    front = x.movedim(dim, 0).contiguous()
    out = _compat.functional_wait_tensor(_compat.functional_reduce_scatter(front, size, name))
    return out.movedim(0, dim)


def _all_reduce(x: torch.Tensor, name: str) -> torch.Tensor:
    return _compat.functional_wait_tensor(_compat.functional_all_reduce(x.contiguous(), name))


def _chunk(x: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
    return x.narrow(dim, rank * (x.shape[dim] // size), x.shape[dim] // size)


@torch.library.custom_op("dualpipe_fx::tp_route", mutates_args=())
def route(value: torch.Tensor, source: torch.Tensor, kind: str, dim: int, group: str, size: int,
          rank: int) -> torch.Tensor:
    """``value`` (computed from ``source`` without autograd); its grad goes to ``source``
    through ``kind``'s adjoint collective (module docstring). A copy: a custom op's output
    may not alias its input."""
    return value.clone()


@route.register_fake
def _(value, source, kind, dim, group, size, rank):
    return torch.empty_like(value)


def _route_setup(ctx, inputs, output) -> None:
    _, _, ctx.kind, ctx.dim, ctx.group, ctx.size, ctx.rank = inputs


def _route_backward(ctx, grad):
    kind, dim, name, size, rank = ctx.kind, ctx.dim, ctx.group, ctx.size, ctx.rank
    if kind == "slice":
        g = _chunk(grad, dim, size, rank).contiguous()
    elif kind == "gather":
        g = _gather(grad, dim, name, size)
    elif kind == "identity":
        g = grad
    elif kind == "all_reduce":
        g = _all_reduce(grad, name)
    else:
        assert kind == "reduce_scatter", kind
        g = _reduce_scatter(grad, dim, name, size)
    return None, g, None, None, None, None, None


route.register_autograd(_route_backward, setup_context=_route_setup)


def _routed(value: torch.Tensor, source: torch.Tensor, kind: str, dim: int, tp: TPGroup) -> torch.Tensor:
    if not source.is_floating_point():  # token ids: no grad to route (always routed otherwise:
        return value                     # the capture's requires_grad is not the joint trace's)
    return route(value, source, kind, dim, tp.name, tp.size, tp.rank)


def _dim(placement, ndim: int) -> int:
    return placement.dim % ndim


def redistribute(x: torch.Tensor, src, dst, tp: TPGroup) -> torch.Tensor:
    """``x`` (this rank's local tensor of a DTensor placed ``src``) placed ``dst``, local.

    Raises:
        ValueError: a redistribution TP styles do not produce (``Shard(a)`` to ``Shard(b)``,
            to ``Partial``), naming both placements.
    """
    if src.is_replicate() and dst.is_replicate() or src.is_shard() and dst.is_shard() and \
            _dim(src, x.ndim) == _dim(dst, x.ndim) or src.is_partial() and dst.is_partial():
        return x
    d = x.detach()
    if src.is_shard() and dst.is_replicate():
        dim = _dim(src, x.ndim)
        return _routed(_gather(d, dim, tp.name, tp.size), x, "slice", dim, tp)
    if src.is_replicate() and dst.is_shard():
        dim = _dim(dst, x.ndim)
        return _routed(_chunk(d, dim, tp.size, tp.rank).contiguous(), x, "gather", dim, tp)
    if src.is_partial() and dst.is_replicate():
        return _routed(_all_reduce(d, tp.name), x, "identity", 0, tp)
    if src.is_partial() and dst.is_shard():
        dim = _dim(dst, x.ndim)
        return _routed(_reduce_scatter(d, dim, tp.name, tp.size), x, "gather", dim, tp)
    raise ValueError(f"tensor parallelism: a redistribution from {src} to {dst}; expected one that "
                     "ColwiseParallel/RowwiseParallel/SequenceParallel/PrepareModuleInput/Output make "
                     "(Shard <-> Replicate, Partial -> Replicate/Shard). Fix: change the plan's layouts")


def into_sharded_matmul(x: torch.Tensor, src, tp: TPGroup) -> torch.Tensor:
    """``x`` (placed ``src``) replicated, for a matmul with a weight sharded on its output
    dim (ColwiseParallel): the local input grad of that matmul is a partial sum, so the
    backward reduces it (``Shard(d)``: all_gather forward, reduce_scatter backward, Megatron's
    sequence parallelism; ``Replicate``: identity forward, all_reduce backward)."""
    if src.is_shard():
        dim = _dim(src, x.ndim)
        return _routed(_gather(x.detach(), dim, tp.name, tp.size), x, "reduce_scatter", dim, tp)
    if src.is_partial():
        x = _routed(_all_reduce(x.detach(), tp.name), x, "all_reduce", 0, tp)
        return x
    return _routed(x.detach(), x, "all_reduce", 0, tp)
