"""The schedule IR: compute actions and per-rank programs, as plain data.

A program maps each rank to its ordered list of compute actions. Communication is
not part of the IR; the runtime lowers compute-only programs to torch's ``_Action``
lists (with sends and receives) at the last moment.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

KINDS = ("F", "B", "I", "W", "FB")


@dataclass(frozen=True)
class Action:
    """One compute action of a pipeline program.

    ``kind`` is ``F`` (forward), ``B`` (full backward), ``I`` (backward-input only),
    ``W`` (deferred weight grad) or ``FB`` (an overlapped pair: ``forward`` is an F,
    ``backward`` is a B or an I). ``stage`` is the global stage index, ``microbatch``
    the micro-batch index; both are ``None`` for ``FB``, whose sub-actions carry them.
    """

    kind: str
    stage: Optional[int] = None
    microbatch: Optional[int] = None
    forward: Optional["Action"] = None
    backward: Optional["Action"] = None

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind
        if self.kind == "FB":
            assert self.forward is not None and self.forward.kind == "F"
            assert self.backward is not None and self.backward.kind in ("B", "I")
        else:
            assert self.stage is not None and self.microbatch is not None

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"{self.forward}&{self.backward}"
        return f"{self.kind}{self.stage}.{self.microbatch}"

    __repr__ = __str__

    def parts(self) -> tuple["Action", ...]:
        """The single actions this action runs: itself, or an FB's F then its B/I."""
        if self.kind == "FB":
            return (self.forward, self.backward)
        return (self,)


def F(stage: int, mb: int) -> Action:
    return Action("F", stage, mb)


def B(stage: int, mb: int) -> Action:
    return Action("B", stage, mb)


def I(stage: int, mb: int) -> Action:  # noqa: E743 - the paper's name
    return Action("I", stage, mb)


def W(stage: int, mb: int) -> Action:
    return Action("W", stage, mb)


def FB(forward: Action, backward: Action) -> Action:
    return Action("FB", forward=forward, backward=backward)


class Program(dict):
    """``dict[rank, list[Action]]`` plus the pipeline topology the actions follow.

    ``chains`` lists the stage sequences a micro-batch flows through, first stage
    first. Most schedules have one chain ``(0, 1, ..., S-1)``; bidirectional DualPipe
    has two (``0..N-1`` and ``N..2N-1``). ``num_microbatches`` is per chain.
    ``name`` is the generator's name, for tables and pictures.
    """

    def __init__(self, actions: dict[int, list[Action]], *, chains: tuple[tuple[int, ...], ...],
                 num_microbatches: int, name: str = "") -> None:
        super().__init__(actions)
        self.chains = tuple(tuple(c) for c in chains)
        self.num_microbatches = num_microbatches
        self.name = name

    @property
    def num_ranks(self) -> int:
        return len(self)

    @property
    def num_stages(self) -> int:
        return sum(len(c) for c in self.chains)

    def stage_to_rank(self) -> dict[int, int]:
        """The rank that runs each stage, read off the actions."""
        placement: dict[int, int] = {}
        for rank, actions in self.items():
            for action in actions:
                for part in action.parts():
                    placement.setdefault(part.stage, rank)
        return placement

    def previous_stage(self, stage: int) -> Optional[int]:
        """The stage feeding ``stage`` in its chain, or None for a chain's first stage."""
        for chain in self.chains:
            if stage in chain:
                i = chain.index(stage)
                return chain[i - 1] if i > 0 else None
        raise KeyError(stage)

    def next_stage(self, stage: int) -> Optional[int]:
        """The stage ``stage`` feeds in its chain, or None for a chain's last stage."""
        for chain in self.chains:
            if stage in chain:
                i = chain.index(stage)
                return chain[i + 1] if i + 1 < len(chain) else None
        raise KeyError(stage)

    def iter_parts(self, rank: int) -> Iterator[Action]:
        """Single actions of ``rank`` in execution order (FB pairs expanded F first)."""
        for action in self[rank]:
            yield from action.parts()

    def format(self) -> str:
        """One line per rank, actions in order, e.g. ``rank 0: F0.0 F0.1 ...``."""
        return "\n".join(f"rank {r}: " + " ".join(str(a) for a in acts) for r, acts in sorted(self.items()))
