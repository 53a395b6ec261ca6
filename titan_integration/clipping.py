"""Grad-norm clipping that counts a parameter held by several pipeline ranks once.

torchtitan's ``clip_grad_norm_`` sums each rank's squared grad norm over the pipeline group.
Under the bidirectional ``dualpipe`` schedule every model part lives on two ranks (the mirror
copies; their grads are summed, so both copies hold the full grad), and a weight tied
across ranks is held by each; summed as they are, those count twice (1.7322 against
DualPipeV's 1.2248 on the llama3 debug model). Here:

- :func:`mark_replicas` (at pipeline build, one ``all_gather_object`` of FQNs over the
  pipeline group) marks each of this rank's parameters that a lower pipeline rank also
  holds;
- :func:`clip_grad_norm_` is torchtitan's, except that the marked copies are left out of
  the norm (every copy is still scaled by the clip coefficient), so the norm, and the
  clipping, are DualPipeV's. With expert parallelism the grads live on several meshes
  (expert slices on ``"ep"``, the rest on the data-parallel mesh): one norm per mesh,
  combined. Without marked parameters or EP it is torchtitan's own function.
- :func:`use_replica_aware_clipping` points the trainer module's ``dist_utils`` at a
  stand-in module whose ``clip_grad_norm_`` is this one (every other name is torchtitan's).
"""
from __future__ import annotations

import importlib
import math

import torch
import torch.distributed as dist
from torch import nn

_MARK = "_dualpipe_fx_counted_elsewhere"


def mark_replicas(part: nn.Module, group) -> int:
    """Mark ``part``'s parameters that a lower rank of ``group`` also holds (by FQN).

    Returns:
        how many parameters of this rank were marked.
    """
    mine = [name for name, _ in part.named_parameters()]
    held = [None] * dist.get_world_size(group)
    dist.all_gather_object(held, mine, group=group)
    lower = {name for names in held[: dist.get_rank(group)] for name in names}
    marked = 0
    for name, param in part.named_parameters():
        counted_elsewhere = name in lower
        setattr(param, _MARK, counted_elsewhere)
        marked += counted_elsewhere
    return marked


def _by_mesh(tensors) -> list[list[torch.Tensor]]:
    """``tensors`` grouped by DTensor mesh (plain tensors together): a norm or foreach op per group."""
    from torch.distributed.tensor import DTensor

    groups: dict[object, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(id(t.device_mesh) if isinstance(t, DTensor) else None, []).append(t)
    return list(groups.values())


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach=None, pp_mesh=None, ep_enabled: bool = False) -> torch.Tensor:
    """torchtitan's ``dist_utils.clip_grad_norm_``, counting each marked replica once.

    With marked replicas or expert parallelism (dualpipe_fx's expert slices are DTensors on an
    ``"ep"`` mesh, the other parameters on the data-parallel mesh or plain): the norm of each
    mesh's grads (a full norm over that mesh), combined over the meshes as torchtitan's EP path
    combines its two, then over the pipeline group; every grad is scaled, mesh by mesh."""
    from torch.distributed.tensor import DTensor
    from torchtitan.distributed import utils as dist_utils

    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    if not ep_enabled and not any(getattr(p, _MARK, False) for p in parameters):
        return dist_utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach,
                                          pp_mesh, ep_enabled)
    counted = [p.grad for p in parameters if p.grad is not None and not getattr(p, _MARK, False)]
    norms = []
    for grads in _by_mesh(counted):
        norm = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        grads = [p.grad for p in parameters if p.grad is not None]
        norms = [torch.zeros((), device=grads[0].device if grads else "cpu")]
    if math.isinf(norm_type):
        total_norm = torch.stack(norms).max()
    else:
        total_norm = sum(n ** norm_type for n in norms) ** (1.0 / norm_type)
    if pp_mesh is not None:
        if math.isinf(norm_type):
            dist.all_reduce(total_norm, op=dist.ReduceOp.MAX, group=pp_mesh.get_group())
        else:
            total_norm **= norm_type
            dist.all_reduce(total_norm, op=dist.ReduceOp.SUM, group=pp_mesh.get_group())
            total_norm **= 1.0 / norm_type
    for group in _by_mesh([p for p in parameters if p.grad is not None]):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total_norm, foreach)
    return total_norm


class _DistUtils:
    """``torchtitan.distributed.utils`` with :func:`clip_grad_norm_` in place of its own."""

    def __init__(self, module) -> None:
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    clip_grad_norm_ = staticmethod(clip_grad_norm_)


def use_replica_aware_clipping(trainer_module: str = "torchtitan.train") -> None:
    """The trainer (0.2.2's ``torchtitan.train``, 0.3's ``torchtitan.trainer``) clips with
    :func:`clip_grad_norm_`."""
    train = importlib.import_module(trainer_module)
    if not isinstance(train.dist_utils, _DistUtils):
        train.dist_utils = _DistUtils(train.dist_utils)
