"""Checks on schedule sizes and on whole programs: completeness, placement, dependency order.

``validate_program`` is what the runtime calls before it trusts a program: it proves that
every (stage, micro-batch) is computed exactly once and that the ranks, each running its
own list in order, can all finish (no deadlock) when an action waits only for its data.
"""
from __future__ import annotations

from collections import Counter

from dualpipe_fx.schedules.ir import Action, Program, dependency_key

# A single action's identity: (kind, stage, micro-batch); FB pairs are split first.
Key = tuple[str, int, int]


def check_sizes(schedule: str, num_ranks: int, num_microbatches: int, *,
                min_microbatches: int, rule: str) -> None:
    """Raise ValueError unless ``num_ranks >= 1`` and ``num_microbatches >= min_microbatches``."""
    for name, value in (("num_ranks", num_ranks), ("num_microbatches", num_microbatches)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{schedule}: {name} must be an int, got {value!r} ({type(value).__name__})")
    if num_ranks < 1:
        raise ValueError(f"{schedule}: num_ranks={num_ranks}, expected N >= 1; use at least one rank")
    if num_microbatches < min_microbatches:
        raise ValueError(
            f"{schedule}: num_microbatches={num_microbatches} with num_ranks={num_ranks}, "
            f"expected {rule} (at least {min_microbatches}); raise the micro-batch count")


def _key(action: Action) -> Key:
    return (action.kind, action.stage, action.microbatch)


def _check_counts(program: Program) -> None:
    """Each (stage, mb): one F, one B or one I, a W exactly when there is an I; one rank per stage."""
    counts: Counter[Key] = Counter()
    owner: dict[int, int] = {}
    stages = {s for chain in program.chains for s in chain}
    for rank, actions in sorted(program.items()):
        for part in (p for a in actions for p in a.parts()):
            if part.stage not in stages or not 0 <= part.microbatch < program.num_microbatches:
                raise ValueError(f"{part} on rank {rank}: stage must be in {sorted(stages)} and "
                                 f"micro-batch in 0..{program.num_microbatches - 1}")
            if owner.setdefault(part.stage, rank) != rank:
                raise ValueError(f"{part} on rank {rank}: stage {part.stage} already runs on rank {owner[part.stage]}")
            counts[_key(part)] += 1
            if counts[_key(part)] > 1:
                raise ValueError(f"{part} on rank {rank} appears twice; each (stage, micro-batch) runs once")
    for s in sorted(stages):
        for m in range(program.num_microbatches):
            f, b, i, w = (counts[(k, s, m)] for k in "FBIW")
            if f != 1 or b + i != 1 or w != i:
                raise ValueError(f"stage {s} micro-batch {m}: found F={f} B={b} I={i} W={w}; "
                                 "expected one F and either one B or one I with one W")


def _check_same_rank_order(program: Program) -> None:
    """Catch a rank that runs an action before one of its own earlier-needed actions."""
    for rank, actions in sorted(program.items()):
        later = {dependency_key(p): p for a in actions for p in a.parts()}
        for action in actions:
            for part in action.parts():
                later.pop(dependency_key(part), None)
            for dep in (d for p in action.parts() for d in program.dependencies(p)):
                if dep in later:
                    raise ValueError(f"{action} on rank {rank} runs before {later[dep]}, "
                                     "which it needs and which this rank runs later")


def _replay(program: Program) -> None:
    """Run all ranks in order, each action once its dependencies ran; raise on a deadlock."""
    position = {rank: 0 for rank in program}
    done: set = set()
    progress = True
    while progress:
        progress = False
        for rank, actions in sorted(program.items()):
            while position[rank] < len(actions):
                action = actions[position[rank]]
                inner = {dependency_key(p) for p in action.parts()}
                deps = [d for p in action.parts() for d in program.dependencies(p)]
                if not all(d in done for d in deps if d not in inner):
                    break
                if any(d in inner for d in deps):
                    raise ValueError(f"{action} on rank {rank} overlaps an action with its own dependency")
                done |= inner
                position[rank] += 1
                progress = True
    stuck = {r: program[r][i] for r, i in sorted(position.items()) if i < len(program[r])}
    if stuck:
        first = next(iter(stuck.items()))
        raise ValueError(f"deadlock: {first[1]} on rank {first[0]} never gets its inputs; "
                         f"ranks stuck at {', '.join(f'{r}:{a}' for r, a in stuck.items())}")


def validate_program(program: Program) -> None:
    """Check that a program computes every (stage, micro-batch) once, in an order that can run.

    **Contract**: ``Program -> None``; raises on the first bad action, never mutates.

    **Pseudocode**::

        count F, B, I, W per (stage, mb); one F, one B or I, a W per I; one rank per stage
        per rank: no action before an action of its own stage it needs (B before its F, W before its I)
        replay: each rank runs its list in order; an action runs once its inputs ran; all must finish

    Args:
        program: the program to check.

    Raises:
        ValueError: naming the first action that is missing, repeated, misplaced, out of
            order, or that deadlocks.
    """
    _check_counts(program)
    _check_same_rank_order(program)
    _replay(program)
