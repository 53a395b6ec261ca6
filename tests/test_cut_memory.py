"""The memory-aware cut and ``dualpipe_fx.plan`` count a rank's memory with one model.

``planning.memory.peak_models`` turns the plan's walk of a rank's program into a linear form
per action in its stages' per-micro-batch figures (``passes.balance.PeakModel``). The plan's
totals are that form on the split's exact figures; the cut scores its candidates with the same
form on its estimates. Checked here: the form reproduces ``plan()``'s totals to the byte, the
cut's figure for its own cut is close to them, and on drawn per-node figures the ``"memory"``
cut's largest rank total over the mean, as the form counts it, is no worse than ``"time"``'s.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

import dualpipe_fx
from dualpipe_fx.api.compile import split_for_program
from dualpipe_fx.planning.memory import peak_models, split_plan, stage_figures
from dualpipe_fx.schedules import generate
from dualpipe_fx.schedules.lowering import RECV_LOOKAHEAD
from passes.balance import CUT_FIGURES, MemorySpec, RankLoads, best_cuts
from passes.split_backward import kept_for_weight
from tests import models


@pytest.fixture(scope="module")
def memory_cut():
    """A 6-layer tiny llama cut with balance="memory" for DualPipeV on 2 ranks, 4 micro-batches,
    and its plan (``dualpipe_fx.plan`` is these two calls)."""
    case = models.tiny_llama(n_layers=6)
    program = generate("dualpipev", 2, 4)
    sp = split_for_program(program, case.model, case.loss_fn, case.inputs, case.target,
                           memory=dualpipe_fx.MemoryPolicy(balance="memory"))
    return program, sp, split_plan(sp, program, recv_lookahead=RECV_LOOKAHEAD)


def test_plan_totals_are_the_shared_form_on_exact_figures(memory_cut):
    """To the byte where an F&B pair's temporaries are its two halves' (``overlap=False``); with
    the pairs overlapped the plan reads each pair's merged graph (known only once split), whose
    peak the form bounds from above."""
    program, sp, plan = memory_cut
    halves = split_plan(sp, program, recv_lookahead=RECV_LOOKAHEAD, overlap=False)
    figures = {k: stage_figures(m) for k, m in enumerate(halves.stages)}
    peaks = peak_models(program, {k: f.keys() for k, f in figures.items()}, RECV_LOOKAHEAD)
    flat = {(k, name): v for k, f in figures.items() for name, v in f.items()}
    for row, merged in zip(halves.ranks, plan.ranks):
        form = row.params + row.grads + row.optimizer + peaks[row.rank].peak(flat)
        assert form == row.total, halves.table()
        assert merged.total <= form, (plan.table(), form)


def test_the_cuts_figure_for_its_cut_is_the_plans_total(memory_cut):
    """The cut's estimates (saved bytes, matmul inputs and output grads kept for W, bytes
    crossing the cut; no temporaries) through the same form: within 8% of plan() per rank."""
    _, sp, plan = memory_cut
    for row in plan.ranks:
        cut = sp.partition.rank_loads[row.rank][1]
        assert abs(cut / row.total - 1) < 0.08, (row.rank, cut, row.total, plan.table())


@pytest.fixture(scope="module")
def selective_cut():
    """The same model and program, cut with balance="memory" under recompute="selective"."""
    case = models.tiny_llama(n_layers=6)
    program = generate("dualpipev", 2, 4)
    memory = dualpipe_fx.MemoryPolicy(balance="memory", recompute="selective")
    sp = split_for_program(program, case.model, case.loss_fn, case.inputs, case.target, memory=memory)
    return program, sp, split_plan(sp, program, recv_lookahead=RECV_LOOKAHEAD, recompute="selective")


def test_under_recompute_the_cut_counts_what_the_split_keeps_for_w(selective_cut):
    """What I keeps for W, as the cut reads it (``kept_for_weight``: the split's own minimum
    cut, per weight), is the plan's figure of each stage to the byte (F's values and I's;
    the received ones the cut counts as crossing bytes), and the cut's total per rank is
    within 3% of plan()'s (the older estimate, every matmul input and output grad: 2.8% and 6.1% under)."""
    _, sp, plan = selective_cut
    kept = kept_for_weight(sp.partition.stages, "selective")
    stage_of = {name: stages[0] for name, stages in dict(sp.partition.param_stages).items()}
    for k, mem in enumerate(plan.stages):
        planned = [sum(b for src, keep, b in mem.held if src == which and "for_weight" in keep) for which in "FI"]
        estimated = [sum(v[j] for name, v in kept.items() if stage_of[name] == k) for j in (0, 1)]
        assert estimated == planned, (k, estimated, planned)
    for row in plan.ranks:
        cut = sp.partition.rank_loads[row.rank][1]
        assert abs(cut / row.total - 1) < 0.03, (row.rank, cut, row.total, plan.table())


def _prefix(values):
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return out


def _even(prefix, num_stages):
    """Cuts with each stage near an equal share of ``prefix``'s total (distinct, 1..n-1)."""
    n = len(prefix) - 1
    cuts, at = [], 0
    for s in range(1, num_stages):
        target = prefix[-1] * s / num_stages
        k = min(range(at + 1, n - (num_stages - s) + 1), key=lambda j: abs(prefix[j] - target))
        cuts.append(k)
        at = k
    return tuple(cuts)


@st.composite
def _layers(draw):
    ranks = draw(st.sampled_from([2, 3]))
    n = draw(st.integers(4 * ranks, 20))
    unit = st.integers(1, 4)
    time = _prefix([float(draw(unit)) for _ in range(n)])
    params = _prefix([float(draw(st.integers(0, 6))) for _ in range(n)])
    acts = [float(draw(unit)) for _ in range(n)]
    for_weight = _prefix([a * draw(st.sampled_from([0.0, 0.5, 1.0])) for a in acts])
    grads = _prefix([float(draw(st.integers(0, 2))) for _ in range(n)])
    received = [0] + [draw(st.integers(0, 2)) for _ in range(n - 1)] + [0, 0]
    return ranks, draw(st.sampled_from([2 * ranks, 8])), (time, params, _prefix(acts), received, for_weight, grads)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(_layers())
def test_memory_cut_is_no_worse_than_time_cut_as_the_plan_counts(case):
    ranks, microbatches, (time, params, acts, received, for_weight, grads) = case
    program = generate("dualpipev", ranks, microbatches)
    num_stages = program.num_model_parts
    placement = {s: r for s, r in program.stage_to_rank().items()}
    spec = MemorySpec(peaks=peak_models(program, dict.fromkeys(range(num_stages), CUT_FIGURES), RECV_LOOKAHEAD))
    n = len(time) - 1
    allowed, no_bytes = list(range(1, n)), [0] * (n + 1)

    def cut(mode, starts):
        loads = RankLoads(time, params, acts, received[: n + 1], placement, spec, mode, for_weight, grads)
        return loads, best_cuts(loads, starts, allowed, [], no_bytes, num_stages)

    by_time = _even(time, num_stages)
    loads, time_cut = cut("time", [by_time])
    _, memory_cut = cut("memory", sorted({by_time, _even([p + a for p, a in zip(params, acts)], num_stages)}))

    def ratio(cuts):
        mem = [m for _, m, _ in loads.ranks(cuts).values()]
        return max(mem) / (sum(mem) / len(mem))

    assert ratio(memory_cut) <= ratio(time_cut) * (1 + 1e-9), (time_cut, memory_cut)
