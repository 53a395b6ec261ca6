"""weight_inputs: under recompute, what I keeps for W is a minimum cut, and I then W still
equal eager autograd.

- Hypothesis-drawn programs (``test_inplace_programs``' in-place programs, ``models.random_cases``'
  MLPs and small transformers) split under ``"full"``, ``"selective"`` and an arbitrary
  callable policy: loss and grads equal ``loss.backward()``; and what I keeps for W weighs no
  more than under the hand-over split (None's, on the same stage graph): the cut's own
  measure, which never exceeds a feasible choice.
- The llama example under ``"full"``: the storages I keeps for W are at most the stage's
  matmul output grads (what the weight grads must read), what F saved and the norms' weight
  grads I computed; under both
  policies less than None's by a wide margin; under ``"selective"`` W recomputes no matmul.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

import dualpipe_fx
from dualpipe_fx.planning.memory import stage_memory
from passes.capture import capture
from passes.cost_model import activation_bytes, scalar_costs, weight_inputs_estimate
from passes.split_backward import saved_bytes, split_backward
from tests import models
from tests.passes.test_inplace_programs import B, D, Program, _eager, _policy, mse, programs
from tests.passes.test_split_backward import as_one_stage, assert_rel_close, eager, run_stage

_aten = torch.ops.aten


def _for_weight_nodes(sg):
    out = next(n for n in sg.backward_input.gm.graph.nodes if n.op == "output").args[0]
    return [n for n in out[sg.backward_input.num_grad_inputs:] if isinstance(n, torch.fx.Node)]


def _kept_bytes(sg) -> int:
    """What I hands W, as the cut counts it: each value's bytes, the parameters' none."""
    n_par = len(sg.param_names) + len(sg.buffer_names)
    i_phs = [n for n in sg.backward_input.gm.graph.nodes if n.op == "placeholder"]
    f_phs = [n for n in sg.forward.gm.graph.nodes if n.op == "placeholder"][:n_par]
    f_out = next(n for n in sg.forward.gm.graph.nodes if n.op == "output").args[0][sg.forward.num_outputs:]
    params = {i_phs[k] for k, v in enumerate(f_out) if v in f_phs}
    return sum(activation_bytes(n) for n in _for_weight_nodes(sg) if n not in params)


@pytest.mark.timeout(600)
@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(steps=programs, num_stages=st.integers(1, 3), seed=st.integers(0, 2 ** 16),
       recompute=st.sampled_from(["full", "selective", "arbitrary"]))
def test_drawn_programs_equal_eager_and_keep_no_more_for_weight(steps, num_stages, seed, recompute):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randn(B, D, generator=g, dtype=torch.float64)
    model = Program(steps)
    ref_loss, ref_grads = _eager(model, x, y)
    try:
        # balance="time": one cut for every policy, so that the stages compare
        plain = dualpipe_fx.split(model, mse, (x,), y, num_stages=num_stages,
                                  memory=dualpipe_fx.MemoryPolicy(balance="time"))
    except ValueError as err:
        if "stage" in str(err) and num_stages > 1:
            reject()  # too few ops for this many stages
        raise
    parts = dualpipe_fx.split(model, mse, (x,), y, num_stages=num_stages,
                              memory=dualpipe_fx.MemoryPolicy(recompute=_policy(recompute), balance="time"))
    loss, grads = parts.run((x,), y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-12)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads.get(name, torch.zeros_like(ref)), ref, rtol=1e-7, atol=1e-9,
                                   msg=lambda m: f"{name} ({num_stages} stages, {recompute}, {steps}): {m}")
    for sg, old in zip(parts.stages, plain.stages):
        assert _kept_bytes(sg) <= _kept_bytes(old), (sg.index, recompute, steps)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=models.random_cases(), recompute=st.sampled_from(["full", "selective", "arbitrary"]))
def test_drawn_models_one_stage_equal_autograd(case, recompute):
    c = capture(case.model, case.loss_fn, case.inputs, case.target)
    sg = split_backward(as_one_stage(c), is_last=True, recompute=_policy(recompute))
    outs, grad_in, grads, _, _ = run_stage(sg, case.model, case.inputs, case.target)
    loss, ref_in, ref_grads = eager(case)
    torch.testing.assert_close(outs[0], loss, rtol=1e-6, atol=0)
    for got, want in zip(grad_in, ref_in):
        assert_rel_close(got, want)
    for name in ref_grads:
        assert_rel_close(grads[name], ref_grads[name])


@pytest.fixture(scope="module")
def llama_splits(llama_recompute_splits):
    model, _, _, splits = llama_recompute_splits  # one cut for every mode (conftest)
    return {"model": model, **splits}


def test_full_keeps_for_weight_at_most_the_output_grads_and_what_f_saved(llama_splits):
    params = dict(llama_splits["model"].named_parameters())
    for sg, gm in zip(llama_splits["full"].stages, llama_splits["full"].partition.stages):
        output_grads = sum(weight_inputs_estimate(gm)[1].values())  # each weight matmul's output grad
        kept = stage_memory(sg).for_weight  # storages, parameters excluded
        # I may compute the 1-D parameters' grads (a norm weight's: a [dim] sum) and hand them over
        grads = sum(params[n].nbytes for n in sg.param_names if params[n].dim() == 1)
        assert kept <= output_grads + saved_bytes(sg) + grads, (sg.index, kept, output_grads, saved_bytes(sg), grads)


def test_recompute_keeps_less_for_weight_than_none(llama_splits):
    kept = {mode: sum(stage_memory(sg).for_weight for sg in llama_splits[mode].stages)
            for mode in (None, "selective", "full")}
    assert kept["full"] <= 0.75 * kept[None], kept
    assert kept["selective"] <= 0.85 * kept[None], kept


def _mms(gm) -> int:
    return sum(n.target is _aten.mm.default for n in gm.graph.nodes)


def test_selective_weight_grad_recomputes_no_matmul_and_input_grad_does_no_matmul_weight_work(llama_splits):
    for sg, plain in zip(llama_splits["selective"].stages, llama_splits[None].stages):
        assert _mms(sg.backward_weight.gm) == _mms(plain.backward_weight.gm)
    for mode in ("selective", "full"):
        for sg, plain in zip(llama_splits[mode].stages, llama_splits[None].stages):
            fwd = _mms(plain.forward.gm)
            # I: its input-grad matmuls and at most one recomputation of the forward's; never a weight grad's
            assert _mms(sg.backward_input.gm) <= _mms(plain.backward_input.gm) + fwd


def test_weight_grads_recompute_is_counted_in_their_cost(llama_splits):
    """W's recomputation is in W's graph, so the cost model (autoplan's roofline, the
    simulator's W) counts it in W's time: full's W costs its weight grads' FLOPs and more."""
    def flops(gm):
        return sum(scalar_costs(gm).values())

    pairs = [(flops(sg.backward_weight.gm), flops(p.backward_weight.gm))
             for sg, p in zip(llama_splits["full"].stages, llama_splits[None].stages)]
    assert all(full >= plain for full, plain in pairs) and any(full > plain for full, plain in pairs), pairs


def test_a_full_backward_pair_recomputes_once(llama_splits):
    """In an F&B pair whose B is a full backward (I and W merged), W's recomputation is I's
    (passes.multiplex reuses equal nodes): the merged graph's GEMMs are F's, I's and the
    weight grads' only."""
    from passes.multiplex import multiplex

    full, plain = llama_splits["full"].stages, llama_splits[None].stages
    gm = multiplex(full[0].forward, full[1].backward_input, full[1].backward_weight)
    assert _mms(gm) == _mms(full[0].forward.gm) + _mms(full[1].backward_input.gm) + _mms(plain[1].backward_weight.gm)
