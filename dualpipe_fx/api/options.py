"""The option groups of ``compile()``, ``split()`` and ``plan()``: how the pipeline composes
with the other parallel dims (:class:`Parallelism`) and how it spends memory
(:class:`MemoryPolicy`), as FSDP2 groups its precision options in ``MixedPrecisionPolicy``.

The common call needs neither: ``compile(model, loss_fn, x, y, num_microbatches=8)``. The
keywords they replace (``dp_group=``, ``dp_mode=``, ``expert_parallel=``, ``recompute=``,
``balance=``, ``memory_budget=``, ``optimizer=``, as 0.1 took them) still work in 0.2 and
warn (``FutureWarning``, which Python shows by default); they go in 0.3.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Optional, Union

import torch.distributed as dist

from dualpipe_fx.runtime.data_parallel import ExpertParallel


@dataclass(frozen=True)
class Parallelism:
    """The parallel dims beside the pipeline.

    Attributes:
        dp_group: the ranks holding this rank's stages in the other pipeline replicas
            (``group`` and ``dp_group`` are a row and a column of one grid), or None.
        dp_mode: ``"replicate"`` (DDP), ``"shard"`` (ZeRO-3, FSDP ``FULL_SHARD``) or
            ``"shard_grad_op"`` (ZeRO-2); see ``compile``.
        expert_parallel: an ``ExpertParallel(group, params, replica_group)`` when the model's
            experts are split over an EP group inside ``dp_group``, or None.
    """

    dp_group: Optional[dist.ProcessGroup] = None
    dp_mode: str = "replicate"
    expert_parallel: Optional[ExpertParallel] = None


@dataclass(frozen=True)
class ActivationBudget:
    """``MemoryPolicy(recompute=ActivationBudget(fraction))``: let ``compile()`` choose the
    recompute policy. It takes the one that recomputes least (None, then ``"selective"``, then
    ``"full"``) whose activations saved for the backward stay within ``fraction`` x those
    saved without recompute on every rank (``RankMemory.peak_activations`` of the memory
    plan, the model ``plan()`` and the cut use), and ``"full"`` where none does. With
    ``schedule="auto"`` the planner applies the rule per schedule. torchtitan's
    ``activation_checkpoint.mode = "memory_budget"`` maps onto it, its ``memory_budget`` being
    ``fraction`` (0: recompute the most, 1: none), as torch.compile's partitioner reads it.
    ``split()`` and ``plan()`` take a policy, not a budget: pass them ``Pipeline.recompute``
    or a ``Plan``'s ``recompute``."""

    fraction: float

    def __post_init__(self) -> None:
        if not (isinstance(self.fraction, (int, float)) and 0 <= self.fraction <= 1):
            raise ValueError(f"ActivationBudget(fraction={self.fraction!r}); expected a number in [0, 1]: the "
                             "share of the activations saved without recompute that may be kept")


@dataclass(frozen=True)
class MemoryPolicy:
    """What the cut and the stage graphs do about memory.

    Attributes:
        recompute: None (save what the backward reads), ``"full"``, ``"selective"``,
            ``policy(node) -> "save" | "recompute"`` (``passes.recompute``), or, for
            ``compile()``, an :class:`ActivationBudget` (the least recompute within it).
        balance: what the cut evens out per rank: ``"both"`` (time and memory, default),
            ``"time"``, ``"memory"`` or ``"stage"`` (see ``split``).
        budget: bytes per rank the cut must stay within (the least time among those
            cuts), or None.
        optimizer: the optimizer whose state the memory model counts: ``"adamw"``,
            ``"adam"``, ``"sgd"``, ``"sgd_momentum"``, or bytes per parameter element.
    """

    recompute: Union[None, str, Callable[[Any], str], ActivationBudget] = None
    balance: str = "both"
    budget: Optional[int] = None
    optimizer: Union[str, int, float] = "adamw"


# old keyword -> (its group's keyword, the group's class, the field)
_MOVED = {
    "dp_group": ("parallelism", Parallelism, "dp_group"),
    "dp_mode": ("parallelism", Parallelism, "dp_mode"),
    "expert_parallel": ("parallelism", Parallelism, "expert_parallel"),
    "recompute": ("memory", MemoryPolicy, "recompute"),
    "balance": ("memory", MemoryPolicy, "balance"),
    "memory_budget": ("memory", MemoryPolicy, "budget"),
    "optimizer": ("memory", MemoryPolicy, "optimizer"),
}


def _checked(fn: str, keyword: str, value, cls):
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise TypeError(f"{fn}({keyword}={value!r}): expected a dualpipe_fx.{cls.__name__} or None")
    return value


def resolve(fn: str, legacy: Mapping[str, Any], allowed: tuple[str, ...] = ("parallelism", "memory"),
            **groups) -> dict[str, Any]:
    """``groups`` (``parallelism=``, ``memory=``) with the deprecated keywords in ``legacy``
    folded in; each deprecated keyword warns once per call site.

    Raises:
        TypeError: a keyword ``fn`` never took, a deprecated keyword whose group ``fn`` does not
            take, or a group that is not its class.
        ValueError: a deprecated keyword beside its group object (which wins is unclear).
    """
    out = {name: _checked(fn, name, groups.get(name), cls)
           for name, cls in (("parallelism", Parallelism), ("memory", MemoryPolicy)) if name in allowed}
    for keyword, value in legacy.items():
        if keyword not in _MOVED or _MOVED[keyword][0] not in allowed:
            raise TypeError(f"{fn}() got an unexpected keyword argument {keyword!r}")
        group, cls, field = _MOVED[keyword]
        if groups.get(group) is not None:
            raise ValueError(f"{fn}({keyword}=..., {group}=...): {keyword} is a field of {group}; expected "
                             f"one of them. Fix: {group}={cls.__name__}(..., {field}={value!r})")
        warnings.warn(f"{fn}({keyword}=...) is deprecated since dualpipe_fx 0.2 and goes in 0.3; pass "
                      f"{group}=dualpipe_fx.{cls.__name__}({field}=...) instead", FutureWarning, stacklevel=3)
        out[group] = replace(out[group], **{field: value})
    return out


def check_max_programs(value) -> None:
    """``compile(max_programs=)``: how many programs (one per input-shape signature, see
    ``Pipeline.step``) a pipeline keeps, least recently used evicted first: an int >= 1.

    Raises:
        ValueError: another value, naming it and the fix.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"compile(max_programs={value!r}); expected an int >= 1 (default 8): how many programs, "
                         "one per batch shape, the pipeline keeps")
