"""Point-to-point exchanges after a step: shared-parameter grads and partial losses.

A parameter held by several ranks (DualPipe's mirror copies, or tied weights on
different ranks) must end a step with the same grad everywhere: the sum of every
holder's grad. Every holder adds the same values in the same (rank) order, so the
copies stay bitwise equal.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from dualpipe_fx.runtime.errors import PeerTimeoutError


def exchange(tensors: Sequence[torch.Tensor], peer: int, group: Optional[dist.ProcessGroup],
             rank: int, timeout: timedelta, what: str) -> list[torch.Tensor]:
    """Send ``tensors`` to ``peer`` and receive the same shapes back from it."""
    bufs = [torch.empty_like(t) for t in tensors]
    works = [dist.isend(t.contiguous(), group=group, group_dst=peer) for t in tensors]
    works += [dist.irecv(b, group=group, group_src=peer) for b in bufs]
    for work in works:
        try:
            work.wait(timeout)
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


def sync_shared_grads(params: dict[str, torch.nn.Parameter], holders: dict[str, tuple[int, ...]],
                      group: Optional[dist.ProcessGroup], rank: int, timeout: timedelta) -> None:
    """Give every holder of a shared parameter the sum of all holders' grads (rank order)."""
    mine = [n for n, ranks in holders.items() if rank in ranks]
    grads = {n: _grad(params[n]) for n in mine}
    got: dict[tuple[int, str], torch.Tensor] = {}
    peers = sorted({r for n in mine for r in holders[n]} - {rank})
    for peer in peers:
        names = [n for n in mine if peer in holders[n]]
        flat = torch.cat([grads[n].reshape(-1) for n in names])
        (recv,) = exchange([flat], peer, group, rank, timeout, "shared parameter grads")
        for name, piece in zip(names, recv.split([grads[n].numel() for n in names])):
            got[(peer, name)] = piece.view_as(grads[name])
    for name in mine:
        parts = [grads[name] if r == rank else got[(r, name)] for r in holders[name]]
        total = parts[0].clone()
        for part in parts[1:]:
            total.add_(part)
        params[name].grad = total


def _grad(param: torch.nn.Parameter) -> torch.Tensor:
    return param.grad if param.grad is not None else torch.zeros_like(param)
