"""Point-to-point exchanges after a step: shared-parameter grads and partial losses.

A parameter held by several ranks (DualPipe's mirror copies, or a parameter used by
stages on different ranks: a tied embedding and LM head under 1F1B, a shared
encoder/decoder embedding) must end a step with the same grad everywhere: the sum of
every holder's grad, as Megatron all-reduces its embedding grads. Every holder adds the
same values in the same (rank) order, so the copies stay bitwise equal. Each rank
exchanges with its peers in ascending rank order, a total order on the pairs, so three
or more holders cannot wait on each other in a cycle.

``wait`` is where every wait of the runtime's P2P and collectives goes: a host wait with
the pipeline's timeout on CPU, stream order on a GPU (docs/cuda.md lists why).
"""
from __future__ import annotations

from datetime import timedelta
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from dualpipe_fx.runtime.errors import PeerTimeoutError


def wait(work, timeout: timedelta, device: torch.device) -> None:
    """Wait for a send, receive or collective on tensors of ``device``.

    On CPU (gloo) the host blocks until it is done, at most ``timeout``. On a GPU the current
    stream waits for it and the host goes on launching: NCCL's ``wait(timeout)`` would also
    block the host until the transfer ends (a host sync per receive), so no timeout is
    passed there; the process group's own timeout (``init_process_group(timeout=...)``, NCCL's
    watchdog) catches a lost peer instead.
    """
    if device.type == "cpu":
        work.wait(timeout)
    else:
        work.wait()


def exchange(tensors: Sequence[torch.Tensor], peer: int, group: Optional[dist.ProcessGroup],
             rank: int, timeout: timedelta, what: str) -> list[torch.Tensor]:
    """Send ``tensors`` to ``peer`` and receive the same shapes back from it."""
    bufs = [torch.empty_like(t) for t in tensors]
    works = [dist.isend(t.contiguous(), group=group, group_dst=peer) for t in tensors]
    works += [dist.irecv(b, group=group, group_src=peer) for b in bufs]
    for work in works:
        try:
            wait(work, timeout, bufs[0].device)
        except RuntimeError as err:
            raise PeerTimeoutError(rank, peer, what, timeout, err) from err
    return bufs


def shared_holders(names_by_rank: dict[int, set[str]]) -> dict[str, tuple[int, ...]]:
    """``{name: ranks holding it}`` for every parameter held by more than one rank."""
    holders: dict[str, list[int]] = {}
    for rank in sorted(names_by_rank):
        for name in names_by_rank[rank]:
            holders.setdefault(name, []).append(rank)
    return {n: tuple(r) for n, r in sorted(holders.items()) if len(r) > 1}


def set_aside_shared_grads(params: dict[str, torch.nn.Parameter], holders: dict[str, tuple[int, ...]],
                           rank: int) -> dict[str, torch.Tensor]:
    """Take the grads earlier steps left on this rank's shared parameters (``.grad`` -> None).

    Each holder's earlier grad is the same synced sum, so summing it over the holders would
    count it once per holder; ``sync_shared_grads`` sums this step's grads, then adds it once.
    """
    earlier = {}
    for name, ranks in holders.items():
        if rank in ranks and params[name].grad is not None:
            earlier[name], params[name].grad = params[name].grad, None
    return earlier


def sync_shared_grads(params: dict[str, torch.nn.Parameter], holders: dict[str, tuple[int, ...]],
                      group: Optional[dist.ProcessGroup], rank: int, timeout: timedelta,
                      earlier: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Give every holder of a shared parameter the sum of all holders' grads (rank order).

    ``earlier``: what ``set_aside_shared_grads`` took before the step, added back once.
    """
    mine = [n for n, ranks in holders.items() if rank in ranks]
    totals = sum_shared_grads({n: _grad(params[n]) for n in mine}, holders, group, rank, timeout)
    for name, total in totals.items():
        if earlier and name in earlier:
            total = earlier[name].add_(total)
        params[name].grad = total


def sum_shared_grads(grads: dict[str, torch.Tensor], holders: dict[str, tuple[int, ...]],
                     group: Optional[dist.ProcessGroup], rank: int, timeout: timedelta) -> dict[str, torch.Tensor]:
    """``{name: sum of every holder's grads[name]}`` (rank order) for this rank's shared names.

    ``grads`` holds this rank's grad of each shared name it holds (the full grad, or under
    data-parallel sharding its shard: the holders of a name shard it alike).
    """
    mine = [n for n, ranks in holders.items() if rank in ranks]
    got: dict[tuple[int, str], torch.Tensor] = {}
    for peer in sorted({r for n in mine for r in holders[n]} - {rank}):
        got.update(_swap(grads, [n for n in mine if peer in holders[n]], peer, group, rank, timeout))
    totals = {}
    for name in mine:
        parts = [grads[name] if r == rank else got[(r, name)] for r in holders[name]]
        total = parts[0].clone()
        for part in parts[1:]:
            total.add_(part)
        totals[name] = total
    return totals


def _swap(grads: dict[str, torch.Tensor], names: list[str], peer: int, group, rank: int,
          timeout: timedelta) -> dict[tuple[int, str], torch.Tensor]:
    """``{(peer, name): peer's grad}`` for ``names``, sent and received as one flat tensor per dtype.

    One flat per dtype: a mixed cat would promote, and the holders would then sum in
    different dtypes. Both sides list ``names`` and the dtypes in the same order.
    """
    by_dtype: dict[str, list[str]] = {}
    for name in names:
        by_dtype.setdefault(str(grads[name].dtype), []).append(name)
    groups = [by_dtype[k] for k in sorted(by_dtype)]
    flats = [torch.cat([grads[n].reshape(-1) for n in g]) for g in groups]
    received = exchange(flats, peer, group, rank, timeout, "shared parameter grads")
    got = {}
    for g, flat in zip(groups, received):
        for name, piece in zip(g, flat.split([grads[n].numel() for n in g])):
            got[(peer, name)] = piece.view_as(grads[name])
    return got


def _grad(param: torch.nn.Parameter) -> torch.Tensor:
    return param.grad if param.grad is not None else torch.zeros_like(param)
