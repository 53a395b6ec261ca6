"""Batches whose shapes change: one program per shape signature, agreed and cached.

**Contract**: ``Shapes(build, schedule, world, num_microbatches, max_programs, refusal)``
is what ``Pipeline.step`` needs to run a batch of shapes other than the traced ones:
``signature(values, target, forward_only, call)`` says which program a batch needs (its
micro-batch count and each tensor's micro-batch shape and dtype); ``build(examples, target,
kwargs, num_microbatches)`` (``api.compile``'s per-shape part) traces, cuts at the first
build's cut and builds that program; the results are kept in an LRU of ``max_programs``.

**Pseudocode**
    C' = C if the batch (dim 0 of the first input) divides into C, else the largest c < C
         dividing it that the schedule accepts on these ranks (else today's error)
    signature = (C', per micro-batch: (name, shape, dtype) of each input, the target's)
    the ranks compare signature digests inside the step's input vote (runtime.agree.vote_keyed)
    a miss: build on every rank (the same cut, the same parameters), evict the least recently used

The cache's order is the same on every rank: every rank sees the same agreed signatures in
the same order, and a build that fails on one rank fails on all (``agree.together``).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from dualpipe_fx.schedules import get_schedule


@dataclass(frozen=True)
class Signature:
    """What a step's program is specialised to: ``num_microbatches`` and, per micro-batch, the
    ``(label, shape, dtype)`` of each tensor input and of the target (None: no target given, a
    forward-only step, which any program of these inputs serves)."""

    num_microbatches: int
    inputs: tuple[tuple[str, tuple[int, ...], str], ...]
    target: Optional[tuple[tuple[int, ...], str]]

    @property
    def key(self) -> int:
        """A 62-bit digest, the same on every rank (Python's ``hash`` of a str is salted per process)."""
        digest = hashlib.blake2b(repr((self.num_microbatches, self.inputs, self.target)).encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "little") >> 2

    def serves(self, other: "Signature") -> bool:
        """Whether a program built for ``self`` runs a step of signature ``other``."""
        return (self.num_microbatches, self.inputs) == (other.num_microbatches, other.inputs) and (
            other.target is None or other.target == self.target)

    def describe(self) -> str:
        parts = [f"{label} {list(shape)} {dtype}" for label, shape, dtype in self.inputs]
        if self.target is not None:
            parts.append(f"target {list(self.target[0])} {self.target[1]}")
        return f"{self.num_microbatches} micro-batches of " + ", ".join(parts)


def microbatch_count(batch: int, num_microbatches: int, schedule: str, world: int) -> int:
    """The micro-batch count for a batch of ``batch`` samples: ``num_microbatches`` when it
    divides the batch, else the largest smaller count that divides it and that ``schedule``
    accepts on ``world`` ranks (e.g. DualPipeV: C >= 2N).

    Raises:
        ValueError: no such count, naming the schedule's rule and the fix.
    """
    if batch % num_microbatches == 0:
        return num_microbatches
    spec = get_schedule(schedule)
    for count in range(min(num_microbatches, batch) - 1, 0, -1):
        if batch % count:
            continue
        try:
            spec.validate(world, count)
        except ValueError:
            continue
        return count
    raise ValueError(
        f"step(): batch size {batch} does not divide into num_microbatches={num_microbatches}, and no smaller "
        f"micro-batch count that divides it fits {schedule!r} on {world} ranks ({spec.min_microbatches_rule}, "
        f"N={world}). Fix: pass a batch that is a multiple of {num_microbatches}, or drop the last batch "
        "(DataLoader(drop_last=True))")


def _tensor(label: str, value: Any, device: Optional[torch.device]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"step(): {label} is a {type(value).__name__}; expected a torch.Tensor like the example "
                        "passed to compile()")
    if device is not None and value.device != device:
        raise ValueError(f"step(): {label} is on {value.device}, but the pipeline's stages are on {device}; move it "
                         f"with .to({str(device)!r})")
    if value.dim() == 0:
        raise ValueError(f"step(): {label} is a 0-dim tensor; expected a batch (dim 0 is split into micro-batches)")
    return value


def first_microbatch(value: Any, count: int) -> Any:
    """A tensor's first micro-batch of ``count`` (other values as they are)."""
    return value.tensor_split(count)[0] if isinstance(value, torch.Tensor) else value


class Shapes:
    """The pipeline's programs by signature (see the module docstring)."""

    def __init__(self, build: Callable[..., Any], schedule: str, world: int, num_microbatches: int,
                 max_programs: int, refusal: Optional[str] = None) -> None:
        self.build = build  # (examples, target, kwargs, num_microbatches) -> a Pipeline of those shapes
        self.schedule, self.world = schedule, world
        self.num_microbatches = num_microbatches  # compile()'s C: a batch that divides into it keeps it
        self.max_programs = max_programs
        self.refusal = refusal  # why this pipeline cannot build a new shape (data parallelism), or None
        self.programs: OrderedDict[Signature, dict] = OrderedDict()  # least recently used first
        self.builds = 0  # programs built after compile()'s

    def signature(self, values: Mapping[str, Any], target, call, shared: Mapping[str, tuple[int, ...]],
                  device: Optional[torch.device] = None) -> Signature:
        """The step's signature; ``shared``: a BlockMask tensor's example shape (a step value of
        that shape is shared by every micro-batch, not split); ``device``: where every tensor must be."""
        tensors = [(call.label(name), _tensor(call.label(name), v, device), name) for name, v in values.items()]
        if target is not None:
            tensors.append(("target", _tensor("target", target, device), "target"))
        whole = [tuple(t.shape) == shared.get(name) for _, t, name in tensors]
        batches = [(label, t.shape[0]) for (label, t, _), w in zip(tensors, whole) if not w]
        batch = batches[0][1] if batches else self.num_microbatches
        count = microbatch_count(batch, self.num_microbatches, self.schedule, self.world)
        for label, size in batches:  # e.g. a target flattened to [batch * seq] splits too
            if size % count:
                raise ValueError(f"step(): {label} has batch size {size}, which does not divide into the step's "
                                 f"{count} micro-batches (from {batches[0][0]}'s batch size {batch}); pass "
                                 f"{label} with dim 0 a multiple of {count}")
        per_mb = [(label, tuple(t.shape) if w else (t.shape[0] // count, *t.shape[1:]), str(t.dtype)[6:], name)
                  for (label, t, name), w in zip(tensors, whole)]
        inputs = tuple((label, shape, dtype) for label, shape, dtype, name in per_mb if name != "target")
        target_sig = next(((shape, dtype) for _, shape, dtype, name in per_mb if name == "target"), None)
        return Signature(count, inputs, target_sig)

    def find(self, signature: Signature) -> Optional[Signature]:
        """The cached program's signature that serves ``signature``, or None."""
        return next((s for s in reversed(self.programs) if s.serves(signature)), None)

    def used(self, signature: Signature) -> None:
        """Mark a program most recently used: only once the ranks agreed on the step (a rank
        whose step was refused must not reorder its cache alone, or the ranks would evict
        different programs later)."""
        self.programs.move_to_end(signature)

    def add(self, signature: Signature, program: dict) -> list[Signature]:
        """Keep ``program``; returns the signatures evicted to stay within ``max_programs``."""
        self.programs[signature] = program
        evicted = []
        while len(self.programs) > self.max_programs:
            evicted.append(self.programs.popitem(last=False)[0])
        return evicted
