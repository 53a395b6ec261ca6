"""Balance a stage cut per rank: each rank's time and memory, not only each stage's cost.

A pipeline places stage ``s`` on rank ``placement[s]``; DualPipeV gives rank ``r`` stages
``r`` and ``S-1-r``, so rank 0 holds the embedding *and* the LM head. Balancing stages one
by one leaves that rank with both: 2.85 GiB of llama3 8B bf16 parameters on rank 0 against
1.66-1.81 GiB on the others (8 ranks). This pass moves the cuts of a stage partition until
the ranks' loads are even.

A rank's load, from per-node figures (prefix sums over the graph's compute nodes):

- time: the FLOPs (or measured seconds) of its stages' nodes;
- memory: for each of its parameters (counted at its first use) ``MemorySpec.param_bytes``
  (parameter + grad + optimizer state), plus for each of its stages ``in_flight[s]`` times
  that stage's activation estimate: what autograd saves for its ops, found by running each
  distinct op once on fake tensors (``passes.cost_model.saved_bytes_estimate``), plus what
  it receives (``recompute="full"``: what it receives only). The exact saved bytes come from
  the I/W split, which a rank runs for its own stages only, so the cut uses this estimate
  (within 10% of the split's figure on llama stages); ``dualpipe_fx.planning.memory`` reports the
  exact plan.

**Contract**: ``search_cuts(loads, allowed, cut_bytes, S, upper) -> cuts | None`` (chain
and V placements; None for others) and ``balance_cuts(loads, cuts, allowed, forced,
cut_bytes) -> cuts``: ``S - 1`` sorted cuts, each in ``allowed`` or ``forced`` (kept); local
moves never raise the largest rank load above the start's.

**Pseudocode**::

    search: bisect the largest rank load L; at each L a frontier DP over <= 400 candidate cuts
            (V: inward from both ends, rank by rank; chain: greedy); then, within 1% of the
            least L, bisect the largest stage time for the most even stages
    local moves, until none moves: cut k (stage k-1 on rank a | stage k on rank b) goes to the
            allowed position between its neighbours that lowers max(load a, load b) most
            (ties: fewest bytes crossing)

Each local move lowers the larger of two loads without raising any load above it, so the
largest load never grows and the sweeps end.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = ["BALANCE_MODES", "MemorySpec", "RankLoads", "balance_cuts", "search_cuts"]

BALANCE_MODES = ("time", "memory", "both")
_RTOL = 1e-9  # loads this close count as equal (float noise)
_MAX_SWEEPS = 400


def _adamw_like(param: torch.Tensor) -> int:
    """Parameter, grad and two optimizer states, all in the parameter's dtype (torch AdamW)."""
    return 4 * param.numel() * param.element_size()


@dataclass(frozen=True)
class MemorySpec:
    """What a rank holds, as the cut estimates it.

    ``param_bytes(param)``: bytes a parameter costs its rank (value + grad + optimizer
    state); ``in_flight[s]``: micro-batches whose activations stage ``s`` holds at once at its
    rank's peak (from the schedule; 1 where absent); ``budget``: bytes per rank, or None;
    ``inputs_only``: activations are the stage's received inputs only (full recompute);
    ``selective``: they are what selective recompute keeps (matmul and attention outputs).
    """

    param_bytes: Callable[[torch.Tensor], int] = _adamw_like
    in_flight: Mapping[int, int] = field(default_factory=dict)
    budget: Optional[int] = None
    inputs_only: bool = False
    selective: bool = False  # activations: what recompute="selective" keeps


@dataclass(frozen=True)
class RankLoads:
    """Per-position prefix sums and the rule that turns a cut into per-rank loads.

    ``time[k]``, ``params[k]``, ``acts[k]``: time, parameter bytes (``MemorySpec.param_bytes``
    at first use) and activation-estimate bytes of the first ``k`` compute nodes;
    ``received[k]``: bytes crossing cut ``k`` (a stage starting there receives them).
    """

    time: Sequence[float]
    params: Sequence[float]
    acts: Sequence[float]
    received: Sequence[int]
    placement: Mapping[int, int]
    memory: MemorySpec
    mode: str

    # ---- per stage and per rank

    def stage_time(self, a: int, b: int) -> float:
        return self.time[b] - self.time[a]

    def stage_acts(self, s: int, a: int, b: int) -> float:
        own = 0.0 if self.memory.inputs_only else self.acts[b] - self.acts[a]
        return self.memory.in_flight.get(s, 1) * (own + (self.received[a] if a > 0 else 0))

    def stage_memory(self, s: int, a: int, b: int) -> float:
        return self.params[b] - self.params[a] + self.stage_acts(s, a, b)

    def add_stage(self, into: dict[int, list[float]], s: int, a: int, b: int) -> None:
        """Add stage ``s`` on ``[a, b)`` to its rank's ``[time, memory, parameter state]``."""
        load = into.setdefault(self.placement[s], [0.0, 0.0, 0.0])
        load[0] += self.stage_time(a, b)
        load[1] += self.stage_memory(s, a, b)
        load[2] += self.params[b] - self.params[a]

    def ranks(self, cuts: Sequence[int]) -> dict[int, tuple[float, float, float]]:
        """``{rank: (time, memory bytes, parameter-state bytes)}`` for ``cuts``."""
        out: dict[int, list[float]] = {}
        for s, (a, b) in enumerate(zip((0, *cuts), (*cuts, len(self.time) - 1))):
            self.add_stage(out, s, a, b)
        return {r: tuple(v) for r, v in out.items()}

    # ---- the scalar a cut minimises the largest of

    @cached_property
    def _means(self) -> tuple[float, float]:
        n = len(set(self.placement.values()))
        mean_flight = sum(self.memory.in_flight.get(s, 1) for s in self.placement) / len(self.placement)
        mem = self.params[-1] + mean_flight * self.acts[-1]
        return max(self.time[-1] / n, 1e-300), max(mem / n, 1e-300)

    def load(self, time: float, memory: float) -> float:
        """"time": time; "memory": memory; "both": the larger of time and memory, each over its
        mean; with a budget: time, and every over-budget rank above every within-budget one.
        (A rank's parameter state is reported by ``ranks``, not balanced on its own.)"""
        if self.mode == "time":
            return time
        if self.mode == "memory":
            return memory
        t_mean, m_mean = self._means
        budget = self.memory.budget
        if budget is not None:
            return time / t_mean + (1e6 + memory / budget if memory > budget else 0.0)
        return max(time / t_mean, memory / m_mean)


def _pair_loads(loads: RankLoads, cuts: list[int], k: int, p: int, other: Mapping[int, list[float]]) -> float:
    """max load of the ranks of stages k-1 and k when cut k sits at ``p``."""
    a0 = cuts[k - 2] if k >= 2 else 0
    b1 = cuts[k] if k < len(cuts) else len(loads.time) - 1
    got: dict[int, list[float]] = {r: list(v) for r, v in other.items()}
    loads.add_stage(got, k - 1, a0, p)
    loads.add_stage(got, k, p, b1)
    return max(loads.load(t, m) for t, m, _ in got.values())


def _others(loads: RankLoads, cuts: list[int], k: int) -> dict[int, list[float]]:
    """The two ranks' loads from their stages other than k-1 and k."""
    ranks = {loads.placement[k - 1], loads.placement[k]}
    out: dict[int, list[float]] = {r: [0.0, 0.0, 0.0] for r in ranks}
    for s, (a, b) in enumerate(zip((0, *cuts), (*cuts, len(loads.time) - 1))):
        if s not in (k - 1, k) and loads.placement[s] in ranks:
            loads.add_stage(out, s, a, b)
    return out


def _best_position(loads: RankLoads, cuts: list[int], k: int, candidates: Sequence[int],
                   cut_bytes: Sequence[int]) -> tuple[int, float]:
    """The candidate position for cut k (1-based) with the lowest pair load; ties: fewest bytes."""
    lo = cuts[k - 2] if k >= 2 else 0
    hi = cuts[k] if k < len(cuts) else len(loads.time) - 1
    i, j = bisect.bisect_right(candidates, lo), bisect.bisect_left(candidates, hi)
    other = _others(loads, cuts, k)
    scored = [(_pair_loads(loads, cuts, k, p, other), p) for p in candidates[i:j]]
    best = min(v for v, _ in scored)
    near = [p for v, p in scored if v <= best * (1 + _RTOL) + 1e-300]
    pick = min(near, key=lambda p: (cut_bytes[p], abs(p - cuts[k - 1])))
    return pick, best


def balance_cuts(loads: RankLoads, cuts: Sequence[int], allowed: Sequence[int], forced: Sequence[int],
                 cut_bytes: Sequence[int]) -> tuple[int, ...]:
    """Move ``cuts`` (positions 1..N-1, sorted) until no single move lowers a pair of ranks' load.

    See the module docstring. ``forced`` cuts stay; the others move within ``allowed``.
    """
    cuts = list(cuts)
    candidates = sorted(set(allowed) - set(forced))
    for _ in range(_MAX_SWEEPS):
        moved = False
        for k in range(1, len(cuts) + 1):
            if cuts[k - 1] in forced:
                continue
            now = _pair_loads(loads, cuts, k, cuts[k - 1], _others(loads, cuts, k))
            p, best = _best_position(loads, cuts, k, candidates, cut_bytes)
            if best < now * (1 - _RTOL) and p != cuts[k - 1]:
                cuts[k - 1] = p
                moved = True
        if not moved:
            break
    return tuple(cuts)


# --------------------------------------------------------------------------------------
# The exact search: bisection on the largest load, a frontier DP per rank (numpy)

_MAX_CANDIDATES = 400
_STAGE_SLACK = 0.01  # rank load given up for more even stages


def _candidates(allowed: Sequence[int], cut_bytes: Sequence[int], loads: RankLoads, num_stages: int) -> list[int]:
    """At most ~_MAX_CANDIDATES cut positions: the fewest-bytes ones, plus fill-ins wherever
    consecutive ones are more than 1/(8 S) of the total time or parameters apart."""
    allowed = sorted(allowed)
    if len(allowed) <= _MAX_CANDIDATES:
        return allowed
    by_bytes = sorted(allowed, key=lambda k: cut_bytes[k])
    limit = cut_bytes[by_bytes[_MAX_CANDIDATES // 2]]
    cheap = [k for k in allowed if cut_bytes[k] <= limit]
    step = max(1, len(cheap) // (_MAX_CANDIDATES // 2))
    chosen = set(cheap[::step])
    for prefix in (loads.time, loads.params):
        gap = (prefix[-1] or 1.0) / (8 * num_stages)
        last = 0
        for k in allowed:
            if prefix[k] - prefix[last] > gap and k not in chosen:
                chosen.add(k)
            if k in chosen:
                last = k
    return sorted(chosen)


@dataclass(frozen=True)
class _Grid:
    """Prefix sums at the candidate positions (index 0 = position 0, last = N)."""

    pos: "np.ndarray"
    time: "np.ndarray"
    params: "np.ndarray"
    acts: "np.ndarray"
    received: "np.ndarray"  # bytes a stage starting there receives (0 at position 0)


def _caps(loads: RankLoads, lam: float) -> tuple[float, float]:
    """``(time cap, memory cap)`` per rank for a largest load of ``lam``."""
    if loads.mode == "time":
        return lam, math.inf
    if loads.mode == "memory":
        return math.inf, lam
    t_mean, m_mean = loads._means
    if loads.memory.budget is not None:
        return lam * t_mean, float(loads.memory.budget)
    return lam * t_mean, lam * m_mean


def _weight(loads: RankLoads, stage: int) -> float:
    return float(loads.memory.in_flight.get(stage, 1))


def _v_search(grid: _Grid, loads: RankLoads, num_stages: int, caps: tuple[float, float, float]
              ) -> Optional[list[int]]:
    """Cut indices (into ``grid``) with every rank within ``caps`` for the V placement (rank r:
    stages r and S-1-r), or None. States after rank r: (front end a, back start b), kept on
    the frontier (a larger a and a smaller b are both better: less is left). ``caps``: per
    rank time and memory, per stage time."""
    cap_t, cap_m, cap_s = caps
    K, P = len(grid.pos), num_stages // 2
    front, back = np.array([0]), np.array([K - 1])
    trail = []  # per rank: (states' a', their b', predecessor state index)
    j = np.arange(K)[None, :]
    for r in range(P - 1):
        wf, wb = _weight(loads, r), _weight(loads, num_stages - 1 - r)
        a, b = front[:, None], back[:, None]
        t_front = grid.time[j] - grid.time[a]
        m_front = grid.params[j] - grid.params[a] + wf * (grid.acts[j] - grid.acts[a] + grid.received[a])
        q_back = grid.params + wb * grid.acts
        # what the back stage receives depends on where it starts: counted at its largest
        back_cap = cap_m - m_front - wb * grid.received.max()
        ib = np.maximum(np.searchsorted(grid.time, grid.time[b] - np.minimum(cap_t - t_front, cap_s), "left"),
                        np.searchsorted(q_back, q_back[b] - back_cap, "left"))
        room = num_stages - 2 - 2 * r  # stages still to place between a' and b'
        ib = np.maximum(ib, j + room)  # a shorter back stage leaves them room, within the caps
        ok = (j > a) & (ib < b) & (t_front <= cap_s)
        best = np.where(ok, ib, K + 1)
        pred = best.argmin(axis=0)
        best = best.min(axis=0)
        suffix = np.minimum.accumulate(best[::-1])[::-1]
        keep = np.nonzero((best <= K) & (best < np.append(suffix[1:], K + 2)))[0]
        if keep.size == 0:
            return None
        trail.append((keep, best[keep], pred[keep]))
        front, back = keep, best[keep]
    w1, w2 = _weight(loads, P - 1), _weight(loads, P)
    a, b, c = front[:, None], back[:, None], j
    t_mid = grid.time[b] - grid.time[a]
    m_mid = grid.params[b] - grid.params[a] + w1 * (grid.acts[c] - grid.acts[a] + grid.received[a]) \
        + w2 * (grid.acts[b] - grid.acts[c] + grid.received[c])
    ok = (c > a) & (c < b) & (t_mid <= cap_t) & (m_mid <= cap_m)
    ok &= (grid.time[c] - grid.time[a] <= cap_s) & (grid.time[b] - grid.time[c] <= cap_s)
    hits = np.argwhere(ok)
    if hits.size == 0:
        return None
    state, mid = hits[np.argmin(m_mid[ok])]
    fronts, backs = [], []
    for keep, bs, pred in reversed(trail):
        fronts.append(int(keep[state]))
        backs.append(int(bs[state]))
        state = int(pred[state])
    return list(reversed(fronts)) + [int(mid)] + backs


def _chain_search(grid: _Grid, loads: RankLoads, num_stages: int, caps: tuple[float, float, float]
                  ) -> Optional[list[int]]:
    """One stage per rank: each stage runs as far as the caps let it (greedy)."""
    cap_t, cap_m, cap_s = caps
    cap_t = min(cap_t, cap_s)
    K, at, cuts = len(grid.pos), 0, []
    for s in range(num_stages - 1):
        q = grid.params + _weight(loads, s) * grid.acts
        mem_cap = cap_m - _weight(loads, s) * grid.received[at]
        far = min(np.searchsorted(grid.time, grid.time[at] + cap_t, "right"),
                  np.searchsorted(q, q[at] + mem_cap, "right")) - 1
        far = min(far, K - 1 - (num_stages - 1 - s))
        if far <= at:
            return None
        cuts.append(int(far))
        at = far
    w = _weight(loads, num_stages - 1)
    q = grid.params + w * grid.acts
    if grid.time[K - 1] - grid.time[at] > cap_t or q[K - 1] - q[at] + w * grid.received[at] > cap_m:
        return None
    return cuts


def _shape(placement: Mapping[int, int]) -> Optional[str]:
    S = len(placement)
    if len(set(placement.values())) == S:
        return "chain" if all(placement[s] < placement[s + 1] for s in range(S - 1)) else None
    if S % 2 == 0 and all(placement[s] == placement[S - 1 - s] for s in range(S // 2)) and \
            len({placement[s] for s in range(S // 2)}) == S // 2:
        return "v"
    return None


def search_cuts(loads: RankLoads, allowed: Sequence[int], cut_bytes: Sequence[int], num_stages: int,
                upper: float) -> Optional[tuple[int, ...]]:
    """The cut with the least largest rank load (bisection to 1e-4 relative) over candidate
    positions, for a chain or V placement; None for other placements or when nothing fits
    (``upper``: a load known to be reachable)."""
    shape = _shape(loads.placement)
    if shape is None or num_stages < 2:
        return None
    cand = _candidates(allowed, cut_bytes, loads, num_stages)
    if len(cand) < num_stages - 1:
        return None
    idx = [0, *cand, len(loads.time) - 1]
    grid = _Grid(np.array(idx), np.array([loads.time[k] for k in idx], dtype=np.float64),
                 np.array([loads.params[k] for k in idx], dtype=np.float64),
                 np.array([0.0 if loads.memory.inputs_only else loads.acts[k] for k in idx], dtype=np.float64),
                 np.array([loads.received[k] if k > 0 else 0 for k in idx], dtype=np.float64))
    search = _v_search if shape == "v" else _chain_search

    def least(lo: float, hi: float, caps) -> tuple[float, Optional[list[int]]]:
        """The least value in (lo, hi] for which caps(value) has a cut (bisection, 1e-4 relative)."""
        found = None
        for _ in range(8):  # the candidates may not reach `hi` exactly: widen until they fit
            found = search(grid, loads, num_stages, caps(hi))
            if found is not None:
                break
            hi *= 1.25
        if found is None:
            return hi, None
        while hi - lo > 1e-4 * hi:
            mid = (lo + hi) / 2
            got = search(grid, loads, num_stages, caps(mid))
            lo, hi, found = (mid, hi, found) if got is None else (lo, mid, got)
        return hi, found

    lam, found = least(0.0, upper * (1 + 1e-6), lambda v: (*_caps(loads, v), math.inf))
    if found is None:
        return None
    # among cuts within _STAGE_SLACK of the least largest rank load, the most even stages
    # (DualPipeV's bubble grows with its largest chunk)
    total = float(grid.time[-1])
    _, even = least(total / num_stages * (1 - 1e-9), total,
                    lambda v: (*_caps(loads, lam * (1 + _STAGE_SLACK)), v))
    return tuple(int(grid.pos[i]) for i in (even or found))
