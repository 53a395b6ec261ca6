"""Timelines: when each action of a program ran, simulated or measured.

The simulator (``dualpipe_fx.simulate``) and the runtime's profiler both produce lists
of ``TimelineEntry``; ``dualpipe_fx.visualize`` draws either one the same way, so a
simulated picture and a measured one can be put side by side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from dualpipe_fx.schedules.ir import Action


@dataclass(frozen=True)
class TimelineEntry:
    """One action on one rank, from ``start`` to ``end`` (any unit: simulated or seconds).

    An overlapped pair is one entry whose ``action`` has kind ``FB``.
    """

    rank: int
    action: Action
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def by_rank(timeline: Iterable[TimelineEntry]) -> dict[int, list[TimelineEntry]]:
    """The entries of each rank, sorted by start time."""
    rows: dict[int, list[TimelineEntry]] = {}
    for entry in timeline:
        rows.setdefault(entry.rank, []).append(entry)
    return {rank: sorted(entries, key=lambda e: (e.start, e.end)) for rank, entries in sorted(rows.items())}


def busy_time(timeline: Iterable[TimelineEntry]) -> dict[int, float]:
    """Total time each rank spent running actions (entries of one rank never overlap)."""
    busy: dict[int, float] = {}
    for entry in timeline:
        busy[entry.rank] = busy.get(entry.rank, 0.0) + entry.duration
    return busy
