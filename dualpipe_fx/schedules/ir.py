"""The schedule IR: compute actions and per-rank programs, as plain data.

A program maps each rank to its ordered list of compute actions. Communication is
not part of the IR; the runtime lowers compute-only programs to torch's ``_Action``
lists (with sends and receives) at the last moment.
"""
from __future__ import annotations

from dataclasses import dataclass
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


DepKey = tuple[str, int, int]


def dependency_key(part: Action) -> DepKey:
    """What other actions wait on: ``("G", stage, mb)`` for the backward that produces the
    input gradient (a B or an I, whichever the program runs), else ``(kind, stage, mb)``."""
    return ("G" if part.kind in ("B", "I") else part.kind, part.stage, part.microbatch)


class Program(dict):
    """``dict[rank, list[Action]]`` plus the pipeline topology the actions follow.

    ``chains`` lists the stage sequences a micro-batch flows through, first stage
    first. Most schedules have one chain ``(0, 1, ..., S-1)``; bidirectional DualPipe
    has two (``0..N-1`` and ``N..2N-1``). ``num_microbatches`` is per chain.
    ``name`` is the generator's name, for tables and pictures.
    """

    def __init__(self, actions: dict[int, list[Action]], *, chains: tuple[tuple[int, ...], ...],
                 num_microbatches: int, name: str = "",
                 model_parts: Optional[tuple[int, ...]] = None) -> None:
        super().__init__(actions)
        self.chains = tuple(tuple(c) for c in chains)
        self.num_microbatches = num_microbatches
        self.name = name
        # model_parts[stage] = the model part (stage graph) that stage runs; None = identity.
        self.model_parts = None if model_parts is None else tuple(model_parts)

    def model_part(self, stage: int) -> int:
        """The model part (index into the stage graphs) that ``stage`` runs.

        Identity for every single-direction schedule. Bidirectional DualPipe runs the
        model twice, so its stage ``N + s`` runs part ``s`` (a mirror copy of stage ``s``).
        """
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} is not in 0..{self.num_stages - 1}; pass a stage of this program")
        return stage if self.model_parts is None else self.model_parts[stage]

    @property
    def num_model_parts(self) -> int:
        """How many distinct model parts the stages run (N for DualPipe, S otherwise)."""
        return self.num_stages if self.model_parts is None else len(set(self.model_parts))

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

    def dependencies(self, part: Action) -> list[DepKey]:
        """The ``dependency_key``s a single action waits for: F its input (the previous
        stage's F), B/I its own F and its output gradient (the next stage's B/I), W its I."""
        s, m = part.stage, part.microbatch
        if part.kind == "F":
            prev = self.previous_stage(s)
            return [] if prev is None else [("F", prev, m)]
        if part.kind == "W":
            return [("G", s, m)]
        nxt = self.next_stage(s)
        return [("F", s, m)] + ([] if nxt is None else [("G", nxt, m)])

    def iter_parts(self, rank: int) -> Iterator[Action]:
        """Single actions of ``rank`` in execution order (FB pairs expanded F first)."""
        for action in self[rank]:
            yield from action.parts()

    def format(self) -> str:
        """One line per rank, actions in order, e.g. ``rank 0: F0.0 F0.1 ...``."""
        return "\n".join(f"rank {r}: " + " ".join(str(a) for a in acts) for r, acts in sorted(self.items()))


class RankBuilder:
    """Appends one rank's actions, numbering micro-batches per stage as they are used.

    Generators name only stages (``f(s)``, ``b(s)``); the builder hands out the next
    micro-batch for that stage and kind, as every pipeline runtime does with its
    per-stage counters. Split backwards (``b(s, split=True)``) emit an ``I`` and queue
    its ``W``; ``w()`` emits the oldest queued ``W`` (first in, first out).
    """

    def __init__(self) -> None:
        self.actions: list[Action] = []
        self._next_f: dict[int, int] = {}
        self._next_b: dict[int, int] = {}
        self._pending_w: list[Action] = []

    def _take(self, counters: dict[int, int], stage: int) -> int:
        mb = counters.get(stage, 0)
        counters[stage] = mb + 1
        return mb

    def _backward(self, stage: int, split: bool) -> Action:
        mb = self._take(self._next_b, stage)
        if split:
            self._pending_w.append(W(stage, mb))
            return I(stage, mb)
        return B(stage, mb)

    def f(self, stage: int) -> None:
        self.actions.append(F(stage, self._take(self._next_f, stage)))

    def b(self, stage: int, split: bool = False) -> None:
        self.actions.append(self._backward(stage, split))

    def w(self) -> None:
        """Run the oldest deferred weight gradient (no-op when none is pending)."""
        if self._pending_w:
            self.actions.append(self._pending_w.pop(0))

    def fb(self, f_stage: int, b_stage: int, split: bool = False) -> None:
        """An overlapped pair: forward of ``f_stage`` with the backward of ``b_stage``."""
        fwd = F(f_stage, self._take(self._next_f, f_stage))
        self.actions.append(FB(fwd, self._backward(b_stage, split)))

    @property
    def pending_w(self) -> int:
        return len(self._pending_w)
