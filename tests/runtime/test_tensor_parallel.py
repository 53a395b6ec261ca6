"""Tensor and sequence parallelism beside the pipeline (issue 23, core API), 4 gloo ranks PP=2 x TP=2.

One spawned 4-rank job (``tp_cases.all_cases``) runs every case:
- a llama-shaped decoder parallelised with torchtitan's llama3 plan (sequence parallel norms,
  rowwise vocab embedding, colwise head) through ``compile(..., group=pp_group)``, DualPipeV
  (from the full model; its state_dict saved with DCP) and 1F1B (built and parallelised on
  meta, initialised per rank, then that checkpoint loaded with DCP into the other layout): 3
  SGD steps' losses, gathered grads and final weights equal one process on the unsplit
  model; parameters, state_dict entries and grads are DTensors with the plan's placements;
- PP=1 x DP=2 x TP=2 with ``dp_mode="replicate"`` on a net of the other styles and placements
  against one process on the whole batch;
- where the collectives went: every TP collective of I is the adjoint of one in F, and W is
  local on every stage; F&B pairs ran merged;
- the local comm ops against DTensor's own redistribute on hypothesis-drawn shapes and placements;
- a ParallelStyle of the user's own refused, naming the module and the style; a sharded DTensor
  model output (loss parallel's head) refused.
"""
from __future__ import annotations

import pytest
import torch

from tests.runtime import tp_cases
from tests.runtime.dist_harness import run_ranks

_ADJOINT = {"all_gather_into_tensor": "reduce_scatter_tensor", "reduce_scatter_tensor": "all_gather_into_tensor"}


def _placement(name: str) -> str:
    """The placement torchtitan's plan gives parameter ``name`` (tp_cases.plan)."""
    module, _, leaf = name.rpartition(".")
    if module.endswith(("wq", "wk", "wv", "w1", "w3")) or module in ("output", "tok_embeddings"):
        return "Shard(dim=0)"  # colwise Linear; the rowwise embedding's vocabulary rows
    if module.endswith(("wo", "w2")):
        return "Shard(dim=1)" if leaf == "weight" else "Replicate()"
    return "Replicate()"  # the norms (SequenceParallel)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(tp_cases.all_cases, 4, args=(str(tmp_path_factory.mktemp("tp_dcp")),), timeout=600)


@pytest.fixture(scope="module")
def reference():
    return tp_cases.reference(steps=3)


def test_local_ops_equal_dtensor(results):
    for rank, out in enumerate(results):
        assert out["ops"] == [], f"rank {rank}: {out['ops'][:5]}"


def test_unknown_style_and_sharded_output_refused(results):
    for out in results:
        msg = out["refused"]["style"]
        assert msg.startswith("ValueError") and "'layers.1.feed_forward.w2'" in msg and "ScaledInput" in msg, msg
        msg = out["refused"]["output"]
        assert msg.startswith("ValueError") and "Shard(dim=-1)" in msg and "output_layouts=Replicate()" in msg, msg


@pytest.mark.parametrize("run", [("dualpipev", False), ("1f1b", True)], ids=["dualpipev", "1f1b-meta-dcp"])
def test_pp_x_tp_equals_one_process(results, reference, run):
    steps, final = reference
    names = set()
    for rank, out in enumerate(results):
        got = out["train"][run]
        for step, (mine, ref) in enumerate(zip(got["steps"], steps)):
            if mine["loss"] is not None:
                assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-6), (rank, step)
            for name, grad in mine["grads"].items():
                torch.testing.assert_close(grad, ref["grads"][name], rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"rank {rank} step {step} {name}: {m}")
                assert mine["grad_types"][name] == "DTensor", (name, mine["grad_types"][name])
            names |= set(mine["grads"])
        for name, value in got["state"].items():
            torch.testing.assert_close(value, final[name], rtol=1e-4, atol=1e-6)
        for name, (kind, placements, shape) in got["kinds"].items():  # the plan's DTensors, global shapes
            assert kind == "DTensor" and shape == tuple(final[name].shape), (name, kind, shape)
            assert placements == (_placement(name),), (name, placements)
        assert got["plan_params"] == got["local_param_bytes"], "the memory plan counts local shards"
    assert names == set(steps[0]["grads"]), "every parameter is held (and checked) by some rank"
    losses = [out["train"][run]["steps"][-1]["loss"] for out in results]
    assert sum(v is not None for v in losses) == 2, "the loss on both TP ranks of the loss stage"


@pytest.mark.parametrize("run", [("dualpipev", False), ("1f1b", True)], ids=["dualpipev", "1f1b-meta-dcp"])
def test_collectives_in_f_and_i(results, run):
    """F's all_gathers and reduce_scatters come back as reduce_scatters and all_gathers in I
    (a slice's backward has none); W is local on every stage, the first (token ids, no input
    grad) included."""
    for out in results:
        got = out["train"][run]
        if run[0] == "dualpipev":
            assert got["multiplexed"] > 0, "F&B pairs ran as merged graphs"
        for stage, graphs in got["graphs"].items():
            assert graphs["F"], f"stage {stage}: no TP collective traced into F"
            assert graphs["I"], f"stage {stage}: no TP collective traced into I"
            assert graphs["W"] == [], f"stage {stage}: W holds {graphs['W']}"
            adjoints = [_ADJOINT[c] for c in graphs["F"]]
            assert all(graphs["I"].count(c) <= adjoints.count(c) for c in set(graphs["I"])), (stage, graphs)


def test_dp_x_tp_equals_one_process(results):
    """PP=1 x DP=2 x TP=2, dp_mode="replicate", on MixNet (the other styles: colwise embedding,
    PrepareModuleOutput, SequenceParallel LayerNorm with bias, a DTensor output through gelu,
    a plain layer): the mean of the replicas' losses and the gathered grads equal one process
    on the whole batch."""
    steps, _ = tp_cases.reference(steps=3, model_cls=tp_cases.MixNet)
    for step, ref in enumerate(steps):
        losses = {out["dp"]["replica"]: out["dp"]["steps"][step]["loss"] for out in results}
        assert sum(losses.values()) / len(losses) == pytest.approx(ref["loss"], rel=1e-6), (step, losses)
        for rank, out in enumerate(results):
            for name, grad in out["dp"]["steps"][step]["grads"].items():
                torch.testing.assert_close(grad, ref["grads"][name], rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"rank {rank} step {step} {name}: {m}")
