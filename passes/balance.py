"""Balance a stage cut per rank: each rank's time and memory, not only each stage's cost.

A pipeline places stage ``s`` on rank ``placement[s]``; DualPipeV gives rank ``r`` stages
``r`` and ``S-1-r``, so rank 0 holds the embedding *and* the LM head. Balancing stages one
by one leaves that rank with both: 2.85 GiB of llama3 8B bf16 parameters on rank 0 against
1.66-1.81 GiB on the others (8 ranks). This pass moves the cuts of a stage partition until
the ranks' loads are even.

A rank's load, from per-node figures (prefix sums over the graph's compute nodes):

- time: the FLOPs (or measured seconds) of its stages' nodes;
- memory: for each of its parameters (counted at its first use) ``MemorySpec.param_bytes``
  (parameter + grad + optimizer state), plus its step's peak. With ``MemorySpec.peaks``
  (``compile()`` and ``dualpipe_fx.plan`` pass them) the peak is the memory plan's own walk of
  the rank's program (``dualpipe_fx.planning.memory.peak_models``, a ``PeakModel`` per rank: at
  each action a linear form in the stages' per-micro-batch figures), on the cut's estimates of
  those figures (``CUT_FIGURES``): what autograd saves, found by running each distinct op once
  on fake tensors (``passes.cost_model.saved_bytes_estimate``), of it the matmul inputs that I
  hands W and the matmul output grads I keeps for W (``weight_inputs_estimate``; under a
  recompute policy, ``MemorySpec.recompute``: what the split's minimum cut keeps, from the I/W
  split of the time-balanced cut's stages, each value charged to the weight it serves,
  ``passes.split_backward.kept_for_weight``), the bytes
  crossing each cut (received, sent, and their grads), the model outputs of the last stage
  and the largest value's grad as I's temporary. ``plan()``'s totals are the same form on
  the I/W split's exact figures (``tests/test_cut_memory.py``). Without ``peaks`` (``split()``
  alone, which knows no schedule): ``in_flight[s]`` times stage ``s``'s saved and received
  bytes. (The exact figures come from the I/W split, which a rank runs for its own stages
  only, so the cut estimates them.)

**Contract**: ``search_cuts(loads, allowed, cut_bytes, S, upper) -> cuts | None`` (chain
and V placements; None for others) and ``balance_cuts(loads, cuts, allowed, forced,
cut_bytes) -> cuts``: ``S - 1`` sorted cuts, each in ``allowed`` or ``forced`` (kept); local
moves never raise the largest rank load above the start's.

**Pseudocode**::

    search: bisect the largest rank load L; at each L a frontier DP over <= 400 candidate cuts
            (V: inward from both ends, rank by rank; chain: greedy); then, within 1% of the
            least L, bisect the largest stage time for the most even stages
    peaks: the search runs on per-stage weights read off the walk at the best cut so far
            (twice); local moves and the final choice use the walk itself ("memory": the
            lowest largest rank over the mean, the rank-balanced time cut competing)
    local moves, until none moves: cut k (stage k-1 on rank a | stage k on rank b) goes to the
            allowed position between its neighbours that lowers max(load a, load b) most
            (ties: fewest bytes crossing)

Each local move lowers the larger of two loads without raising any load above it, so the
largest load never grows and the sweeps end.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = ["BALANCE_MODES", "CUT_FIGURES", "MemorySpec", "PeakModel", "RankLoads", "balance_cuts", "best_cuts",
           "search_cuts"]

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
    in_flight: Mapping[int, float] = field(default_factory=dict)
    budget: Optional[int] = None
    inputs_only: bool = False
    selective: bool = False  # activations: what recompute="selective" keeps
    recompute: Any = None  # the policy itself: what I keeps for W is the split's (``split_backward.kept_for_weight``)
    peaks: Optional[Mapping[int, "PeakModel"]] = None  # rank -> its step peak as the plan walks it


# the per-micro-batch figures of a stage the cut estimates (``dualpipe_fx.planning.memory.held_key``
# names: where a storage comes from | what keeps it past its action)
CUT_FIGURES = ("input|saved", "F|saved", "F|for_weight,saved", "I|for_weight", "F|output", "grad_output|",
               "I|grad_input", "F|model_output", "temp|I", "temp|B")


@dataclass(frozen=True, eq=False)
class PeakModel:
    """One rank's step peak (activations, receive buffers, sent tensors, kept losses, one
    action's temporaries) as ``dualpipe_fx.planning.memory`` walks its program: at action
    ``i`` the rank holds ``coef[i] @ figures`` bytes, ``figures`` being per-micro-batch byte
    figures of its stages keyed ``keys[j] = (model part, name)`` (micro-batches alive at ``i``
    for a held figure, 1 for the temporaries of the action's graphs). The plan
    (``planning.memory.peak_models``) builds it; the plan's totals and the cut's score are
    this one form, on exact figures and on the cut's estimates."""

    keys: tuple[tuple[int, str], ...]
    coef: "np.ndarray"

    @cached_property
    def _col(self) -> dict[tuple[int, str], int]:
        return {k: j for j, k in enumerate(self.keys)}

    def vector(self, figures: Mapping[tuple[int, str], float]) -> "np.ndarray":
        v = np.zeros(len(self.keys))
        for k, x in figures.items():
            j = self._col.get(k)
            if j is not None:
                v[j] = x
        return v

    def peak(self, figures: Mapping[tuple[int, str], float]) -> float:
        """The most bytes held at once (max over actions)."""
        return float((self.coef @ self.vector(figures)).max()) if self.keys else 0.0


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
    for_weight: Sequence[float] = ()  # F's bytes I hands W (matmul inputs), prefix sums; () = none
    grad_for_weight: Sequence[float] = ()  # I's bytes kept for W (matmul output grads), prefix sums
    mem_mean: Optional[float] = None  # "both": the mean rank memory (peaks: from a reference cut)
    largest: Sequence[Sequence[float]] = ()  # sparse table: largest[j][k] = max node bytes in [k, k + 2**j)
    model_outputs: float = 0.0  # bytes of the model's outputs (the last stage's F holds them)

    def largest_value(self, a: int, b: int) -> float:
        """The most bytes one node of ``[a, b)`` produces (its grad is I's largest temporary)."""
        if not self.largest or b <= a:
            return 0.0
        j = (b - a).bit_length() - 1
        return float(max(self.largest[j][a], self.largest[j][b - (1 << j)]))

    # ---- per stage and per rank

    def stage_figures(self, a: int, b: int) -> dict[str, float]:
        """Stage ``[a, b)``'s per-micro-batch figures (``CUT_FIGURES``), estimated."""
        last = len(self.time) - 1
        recv = float(self.received[a]) if a > 0 else 0.0
        sent = float(self.received[b]) if b < last else 0.0
        gw = self.grad_for_weight[b] - self.grad_for_weight[a] if self.grad_for_weight else 0.0
        if self.memory.inputs_only:
            out = {"input|saved": recv, "F|output": sent, "grad_output|": sent, "I|grad_input": recv}
            if self.for_weight:  # what the split's minimum cut keeps for W (kept_for_weight)
                temp = 2 * self.largest_value(a, b)
                out.update({"F|for_weight,saved": self.for_weight[b] - self.for_weight[a], "I|for_weight": gw,
                            "temp|I": temp, "temp|B": temp, "F|model_output": self.model_outputs if b == last else 0.0})
            return out
        own = self.acts[b] - self.acts[a]
        fw = min(own, self.for_weight[b] - self.for_weight[a]) if self.for_weight else 0.0
        temp = 2 * self.largest_value(a, b)  # I holds a value's grad and its input's grad at once
        return {"input|saved": recv, "F|saved": own - fw, "F|for_weight,saved": fw, "I|for_weight": gw,
                "F|output": sent, "grad_output|": sent, "I|grad_input": recv, "temp|I": temp, "temp|B": temp,
                "F|model_output": self.model_outputs if b == last else 0.0}

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

    def ranks(self, cuts: Sequence[int], only=None) -> dict[int, tuple[float, float, float]]:
        """``{rank: (time, memory bytes, parameter-state bytes)}`` for ``cuts`` (``only``: those
        ranks). With ``memory.peaks`` a rank's memory is its parameter state plus its
        ``PeakModel`` peak of its stages' figures: the plan's walk, on the cut's estimates."""
        out: dict[int, list[float]] = {}
        figures: dict[int, dict[tuple[int, str], float]] = {}
        peaks = self.memory.peaks
        for s, (a, b) in enumerate(zip((0, *cuts), (*cuts, len(self.time) - 1))):
            rank = self.placement[s]
            if only is not None and rank not in only:
                continue
            if peaks is None:
                self.add_stage(out, s, a, b)
                continue
            load = out.setdefault(rank, [0.0, 0.0, 0.0])
            state = self.params[b] - self.params[a]
            load[0] += self.stage_time(a, b)
            load[1] += state
            load[2] += state
            figures.setdefault(rank, {}).update({(s, k): v for k, v in self.stage_figures(a, b).items()})
        for rank, figs in figures.items():
            out[rank][1] += peaks[rank].peak(figs)
        return {r: tuple(v) for r, v in out.items()}

    def in_flight_at_peak(self, cuts: Sequence[int]) -> dict[int, float]:
        """Per stage, its activation bytes at its rank's peak (``PeakModel``) over its
        per-micro-batch activations and received bytes: the weight the exact search's
        separable estimate gives it, so that at ``cuts`` that estimate meets the walk."""
        out: dict[int, float] = {}
        bounds = list(zip((0, *cuts), (*cuts, len(self.time) - 1)))
        by_rank: dict[int, list[int]] = {}
        for s in range(len(bounds)):
            by_rank.setdefault(self.placement[s], []).append(s)
        for rank, stages in by_rank.items():
            model = self.memory.peaks[rank]
            figs = {(s, k): v for s in stages for k, v in self.stage_figures(*bounds[s]).items()}
            v = model.vector(figs)
            row = model.coef[int(np.argmax(model.coef @ v))] if model.keys else np.zeros(0)
            for s in stages:
                a, b = bounds[s]
                base = (0.0 if self.memory.inputs_only else self.acts[b] - self.acts[a]) + \
                    (self.received[a] if a > 0 else 0)
                held = sum(row[j] * v[j] for j, (part, _) in enumerate(model.keys) if part == s)
                out[s] = held / base if base > 0 else float(self.memory.in_flight.get(s, 1))
        return out

    # ---- the scalar a cut minimises the largest of

    @cached_property
    def _means(self) -> tuple[float, float]:
        n = len(set(self.placement.values()))
        if self.mem_mean is not None:
            return max(self.time[-1] / n, 1e-300), max(self.mem_mean, 1e-300)
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
    if loads.memory.peaks is not None and loads.mode != "time":  # a peak is no sum over stages: walk both
        moved = list(cuts)
        moved[k - 1] = p
        got = loads.ranks(moved, only={loads.placement[k - 1], loads.placement[k]})
        return max(loads.load(t, m) for t, m, _ in got.values())
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
    if loads.memory.peaks is not None and loads.mode != "time":
        return out  # unused: _pair_loads walks the two ranks whole ("time" reads time alone)
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


def best_cuts(loads: RankLoads, starts: Sequence[Sequence[int]], allowed: Sequence[int], forced: Sequence[int],
              cut_bytes: Sequence[int], num_stages: int) -> tuple[int, ...]:
    """The least largest rank load from ``starts``: each polished by local moves, plus the
    exact search (no ``forced`` cuts) polished too; the lowest wins (ties: fewer bytes).

    With ``memory.peaks`` a rank's memory is the plan's walk (``PeakModel``), not a sum over
    its stages, which the exact search needs: it runs on per-stage weights read off the walk
    at the best cut so far (``RankLoads.in_flight_at_peak``; twice, the second from the
    first's result), and the walk judges every result. ``"both"`` divides memory by the mean
    of the ``"time"`` cut's ranks, then by that of its first result; ``"memory"`` keeps the lowest largest memory over the mean among its own result and the
    ``"time"`` and ``"both"`` cuts (a rank's total is no fixed share of a fixed sum: a layer
    on a stage with many micro-batches in flight costs more, so the mean moves with the cut).
    """
    if loads.memory.peaks is not None and loads.mode == "both":
        # "both" divides memory by its mean, which moves with the cut: the mean of the
        # rank-balanced time cut, then of the first result
        timed = _best_cuts(replace(loads, mode="time"), starts, allowed, forced, cut_bytes, num_stages)
        first = _best_cuts(replace(loads, mem_mean=_mean_memory(loads, timed)), [*starts, timed],
                           allowed, forced, cut_bytes, num_stages)
        loads = replace(loads, mem_mean=_mean_memory(loads, first))
        starts = [*starts, timed, first]
    return _best_cuts(loads, starts, allowed, forced, cut_bytes, num_stages)


def _mean_memory(loads: RankLoads, cuts: Sequence[int]) -> float:
    got = loads.ranks(cuts)
    return sum(m for _, m, _ in got.values()) / len(got)


def _best_cuts(loads: RankLoads, starts: Sequence[Sequence[int]], allowed: Sequence[int], forced: Sequence[int],
               cut_bytes: Sequence[int], num_stages: int) -> tuple[int, ...]:
    def score(cuts, by=loads):
        worst = max(by.load(t, m) for t, m, _ in by.ranks(cuts).values())
        return worst, sum(cut_bytes[k] for k in cuts)

    done = [balance_cuts(loads, c, allowed, forced, cut_bytes) for c in starts]
    if forced:  # the exact search knows no forced cuts: split_points keep the local moves only
        return _pick(loads, done, score)
    for _ in range(1 if loads.memory.peaks is None else 2):
        best = min(done, key=score)
        search = loads
        if loads.memory.peaks is not None:
            spec = replace(loads.memory, in_flight=loads.in_flight_at_peak(best), peaks=None)
            search = replace(loads, memory=spec, mem_mean=None)
            if loads.mode == "both":
                ref = search.ranks(best)
                search = replace(search, mem_mean=sum(m for _, m, _ in ref.values()) / len(ref))
        found = search_cuts(search, allowed, cut_bytes, num_stages, score(best, search)[0])
        if found is None:
            break
        done.append(balance_cuts(loads, found, allowed, forced, cut_bytes))
    if loads.memory.peaks is not None and loads.mode == "memory":
        # the plan's totals are not a fixed sum (a stage holds as many micro-batches as its
        # place in the schedule): the least largest rank may also shrink the mean, so the
        # rank-balanced time cut competes on largest over mean
        for mode in ("time", "both"):
            done.append(best_cuts(replace(loads, mode=mode), starts, allowed, forced, cut_bytes, num_stages))
    return _pick(loads, done, score)


def _pick(loads: RankLoads, done: Sequence[Sequence[int]], score) -> tuple[int, ...]:
    """The lowest score; with the plan's walk under ``"memory"``: the lowest largest rank
    memory over the mean (the balance ``plan()`` reports), then the lowest largest."""
    if loads.memory.peaks is None or loads.mode != "memory":
        return tuple(min(done, key=score))

    def balance(cuts):
        mem = [m for _, m, _ in loads.ranks(cuts).values()]
        return round(max(mem) / (sum(mem) / len(mem)), 9), score(cuts)
    return tuple(min(done, key=balance))
