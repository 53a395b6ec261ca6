"""The schedule registry: every generator by name, with its placement and size rules.

The CLI, the simulator, the runtime and the torchtitan plugin look schedules up here,
so a new schedule is one entry in ``_SPECS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

from dualpipe_fx.schedules import baselines
from dualpipe_fx.schedules.dualpipe import dualpipe
from dualpipe_fx.schedules.dualpipev import dualpipev
from dualpipe_fx.schedules.ir import Program


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule: its generator and the rules its sizes must follow.

    ``stages_per_rank`` is 2 for the V/interleaved/bidirectional schedules, 1 otherwise;
    ``has_fb`` says whether the generator emits overlapped ``FB`` actions;
    ``bidirectional`` is True only for DualPipe (two chains, ``C/2`` micro-batches each).
    ``min_microbatches_rule`` is the rule in words, for error messages and ``--help``.
    """

    name: str
    generator: Callable[[int, int], Program]
    stages_per_rank: int
    min_microbatches_fn: Callable[[int], int]
    min_microbatches_rule: str
    has_fb: bool = False
    bidirectional: bool = False
    description: str = ""

    def min_microbatches(self, num_ranks: int) -> int:
        """The fewest micro-batches this schedule accepts on ``num_ranks`` ranks."""
        return self.min_microbatches_fn(num_ranks)

    def validate(self, num_ranks: int, num_microbatches: int) -> None:
        """Raise ValueError (naming the value and the rule) if the sizes are not accepted."""
        self.generator(num_ranks, num_microbatches)

    def num_stages(self, num_ranks: int) -> int:
        return self.stages_per_rank * num_ranks


def _specs() -> dict[str, ScheduleSpec]:
    specs = [
        ScheduleSpec("dualpipev", dualpipev, 2, lambda n: 2 * n, "C >= 2N", has_fb=True,
                     description="DeepSeek DualPipeV: V placement, overlapped F&B, zero-bubble W"),
        ScheduleSpec("dualpipe", dualpipe, 2, lambda n: 2 * n, "C >= 2N, N and C even", has_fb=True,
                     bidirectional=True,
                     description="DeepSeek DualPipe: two directions, C/2 micro-batches each, model held twice"),
        ScheduleSpec("gpipe", baselines.gpipe, 1, lambda n: 1, "C >= 1",
                     description="GPipe: all forwards, then all backwards"),
        ScheduleSpec("1f1b", baselines.one_f_one_b, 1, lambda n: n, "C >= N",
                     description="1F1B: one forward, one backward in steady state"),
        ScheduleSpec("zb1p", baselines.zb1p, 1, lambda n: 1, "C >= 1",
                     description="ZB-H1: 1F1B with I/W split, W fills the cool-down bubble"),
        ScheduleSpec("zbv", baselines.zbv, 2, lambda n: 1, "C >= 1",
                     description="ZB-V: V placement, every backward split, W fills bubbles"),
        ScheduleSpec("interleaved_1f1b", baselines.interleaved_1f1b, 2, lambda n: 1,
                     "C >= 1 and C a multiple of max(1, C // N)",
                     description="Megatron interleaved 1F1B, stage s on rank s mod N"),
    ]
    return {s.name: s for s in specs}


SCHEDULES: Mapping[str, ScheduleSpec] = MappingProxyType(_specs())
ALIASES: Mapping[str, str] = MappingProxyType({"one_f_one_b": "1f1b"})


def get_schedule(name: str) -> ScheduleSpec:
    """The spec registered under ``name`` (or an alias such as ``one_f_one_b``).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    key = ALIASES.get(name, name)
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known schedules: {', '.join(SCHEDULES)} "
                         f"(aliases: {', '.join(ALIASES)})")
    return SCHEDULES[key]


def generate(name: str, num_ranks: int, num_microbatches: int) -> Program:
    """The program of schedule ``name`` for ``num_ranks`` ranks and ``num_microbatches`` micro-batches."""
    return get_schedule(name).generator(num_ranks, num_microbatches)
