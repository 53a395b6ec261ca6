"""The runtime's fast paths still give single-process numerics, and really run.

- sends started inside an F&B pair (gloo: tagged streams) and the same step without them;
- grads summed in place (``passes.accumulate_grads``) from a step's second micro-batch on;
- with ``compile_stages=True``, every F&B pair runs its merged graph through torch.compile, the
  only graph breaks are the send hooks that can send (none on one rank), and a second step
  compiles nothing (recompute with compiled stages: torchtitan's ``compile.enable`` with full activation
  checkpointing, tests/titan/test_train.py, long tier);
- sends released as they complete: each send is waited for and dropped at its release point
  (``schedules.release``), so the sends pending after each action (the stages' own count of
  works, each holding its tensor) follow the plan, not the step's end.
Each case is one 2-rank (one: 1-rank) dualpipev step compared with the unsplit model on the same batch.
"""
from __future__ import annotations

import pytest

from dualpipe_fx.planning.memory import _comms
from dualpipe_fx.runtime.stage import pipeline_tag
from dualpipe_fx.schedules.lowering import RECV_LOOKAHEAD, to_torch_action
from dualpipe_fx.schedules.registry import generate
from tests.runtime import cases
from tests.runtime.dist_harness import run_ranks
from tests.runtime.test_equivalence import check_step


def _total(results, key):
    return sum(r["counts"][key] for r in results)


@pytest.mark.parametrize("early", [True, False], ids=["early-sends", "sends-after-pair"])
def test_eager_pairs_with_and_without_early_sends_equal_one_process(early):
    results = run_ranks(cases.fast_paths_step, 2, ("linear", False, early), timeout=400)
    check_step(results, "linear", "dualpipev", 4)
    assert (_total(results, "early_sends") > 0) == early
    assert _total(results, "in_place_sums") > 0, "no W summed its grads in place"
    assert _total(results, "accumulating_pairs") > 0, "no F&B pair summed its grads in place"
    assert _total(results, "compiled_pairs") == 0 and _total(results, "compiled_weights") == 0
    _check_sends_released(results)


def _check_sends_released(results):
    """Each send is pending (its work, holding its tensor) from its issue until the action
    ``schedules.release`` names and gone right after it; so mid-step a rank holds fewer than
    all of its sends, and none after the step."""
    for rank, r in enumerate(results):
        assert r["counts"]["pending_after_step"] == 0, rank
        released = r["released"]
        assert released, f"rank {rank}: no send is released before the step's end"
        for action, _, before, after in r["pending"]:
            here = set(released.get(action, ()))
            assert here <= before and not here & after, (rank, action, here, before, after)
        every = {k for keys in released.values() for k in keys}
        assert max(n for _, n, _, _ in r["pending"]) < len(every), (rank, r["pending"])
    # the memory plan frees each sent tensor after the very action the runtime waits at
    program = generate("dualpipev", 2, 4)
    planned: dict = {}
    for (kind, stage, mb), at in _comms(program, RECV_LOOKAHEAD).releases.items():
        rank = program.stage_to_rank()[stage]
        if at != float("inf"):
            planned.setdefault(rank, {}).setdefault(str(to_torch_action(program[rank][at])), set()).add((stage, kind, mb))
    for rank, r in enumerate(results):
        assert {a: set(keys) for a, keys in r["released"].items()} == planned[rank], rank


def test_compiled_stages_run_compiled_merged_pairs_and_equal_one_process():
    """Compiled: single-process numerics; every pair compiled; the only graph breaks are the
    send hooks of the pairs that ran (one each: the in-place grad sums are custom ops, and
    hooks that could never send are dropped); a second step compiles nothing (one Dynamo
    cache entry per graph, no recompiles)."""
    results = run_ranks(cases.fast_paths_step, 2, ("llama", True, True), timeout=600)
    check_step(results, "llama", "dualpipev", 4)
    assert _total(results, "pairs") > 0
    assert _total(results, "compiled_pairs") == _total(results, "pairs")
    assert _total(results, "early_sends") > 0, "the compiled pairs' send hooks did not fire"
    assert _total(results, "compiled_weights") > 0, "no accumulating W ran compiled"
    for rank, r in enumerate(results):
        dynamo = r["dynamo"]
        assert dynamo["first"]["graphs"] > 0, (rank, dynamo)
        assert dynamo["second"] == {"graphs": 0, "frames": 0}, (rank, dynamo)
        assert all("SendHook.forward" in reason for reason in dynamo["breaks"]), (rank, list(dynamo["breaks"]))
        assert sum(dynamo["breaks"].values()) == dynamo["hooks_run"] > 0, (rank, dynamo)


def test_compiled_stages_on_one_rank_compile_each_graph_whole():
    """Both DualPipeV stages on one rank (as on one GPU): no send can start early, so the
    compiled pairs keep no send hook and no graph breaks at all; W compiled; a second step
    compiles nothing; single-process numerics."""
    (result,) = run_ranks(cases.fast_paths_step, 1, ("linear", True, True), timeout=300)
    check_step([result], "linear", "dualpipev", 4)
    counts, dynamo = result["counts"], result["dynamo"]
    assert counts["compiled_pairs"] == counts["pairs"] > 0 and counts["compiled_weights"] > 0, counts
    assert counts["send_hooks"] == 0 and dynamo["breaks"] == {}, (counts, dynamo)
    assert dynamo["second"] == {"graphs": 0, "frames": 0}, dynamo


def test_pipeline_tags_are_distinct_streams_and_leave_tag_zero_free():
    tags = {pipeline_tag(stage, kind, i) for stage in range(16) for kind in "FB" for i in range(8)}
    assert len(tags) == 16 * 2 * 8 and 0 not in tags
