"""Activation recomputation: fewer saved bytes, the same loss and grads, nothing run twice.

``split(..., recompute=...)`` moves forward values that the policy recomputes into each
stage's backward-input graph. What must hold: ``Split.run`` equals eager autograd in every
mode; ``full`` saves no more than a quarter, ``selective`` no more than 0.6 of the bytes
saved without recompute (the llama example); random ops are never recomputed; each
recomputed op runs once per backward (in I, not again in W); ``torch.utils.checkpoint``
regions recompute without any policy, and ``use_reentrant=True`` gets a TraceError.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import dualpipe_fx
from dualpipe_fx.examples import llama_loss
from passes.capture import TraceError
from passes.split_backward import saved_bytes


def _eager_grads(model, loss_fn, x, y):
    model.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def llama_modes(llama_recompute_splits):
    model, tokens, target, splits = llama_recompute_splits  # one cut for every mode (conftest)
    ref = _eager_grads(model, llama_loss, tokens, target)
    return model, tokens, target, ref, splits


@pytest.mark.parametrize("mode", [None, "selective", "full"])
def test_every_mode_gives_eager_loss_and_grads(llama_modes, mode):
    _, tokens, target, (ref_loss, ref_grads), splits = llama_modes
    loss, grads = splits[mode].run(tokens, target)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{mode} {name}: {m}")


def test_saved_bytes_fall_to_the_targets(llama_modes):
    splits = llama_modes[-1]
    total = {mode: sum(saved_bytes(sg) for sg in sp.stages) for mode, sp in splits.items()}
    assert total["full"] <= 0.25 * total[None], total
    assert total["selective"] <= 0.6 * total[None], total
    assert "saved (B)" in splits["full"].describe()


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_full_recomputes_at_most_once_in_input_grad_and_once_in_weight_grad(llama_modes):
    sg = llama_modes[-1]["full"].stages[1]
    mm = torch.ops.aten.mm.default
    fwd_mms = _ops(sg.forward.gm).count(mm)
    plain = llama_modes[-1][None].stages[1]
    # I's matmuls: its own input-grad GEMMs plus at most one recomputation of each forward
    # GEMM (one whose output no grad needs, as the stage's last projection, is not redone)
    plain_i = _ops(plain.backward_input.gm).count(mm)
    assert plain_i < _ops(sg.backward_input.gm).count(mm) <= plain_i + fwd_mms
    # W's: the weight grads', plus the forward GEMMs whose outputs lead to what the weight grads
    # read, recomputed from the stage's input rather than kept from I (passes.weight_inputs);
    # attention is saved (Tag.nondeterministic_seeded), never run again
    plain_w = _ops(plain.backward_weight.gm).count(mm)
    assert plain_w < _ops(sg.backward_weight.gm).count(mm) <= plain_w + fwd_mms
    assert not any("attention" in str(op) for op in _ops(sg.backward_weight.gm))


class _Dropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(nn.functional.dropout(self.a(x).relu(), 0.5, training=True))


def test_random_ops_are_saved_not_recomputed():
    model, x = _Dropout(), torch.randn(4, 8)
    for mode in ("full", "selective", lambda node: "recompute"):
        sp = dualpipe_fx.split(model, lambda o, y: ((o - y) ** 2).mean(), (x,), torch.randn(4, 8),
                               num_stages=1, memory=dualpipe_fx.MemoryPolicy(recompute=mode))
        i_ops = _ops(sp.stages[0].backward_input.gm) + _ops(sp.stages[0].backward_weight.gm)
        assert not [op for op in i_ops if isinstance(op, torch._ops.OpOverload)
                    and torch.Tag.nondeterministic_seeded in op.tags], i_ops


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool = False):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.reentrant = reentrant

    def _block(self, t):
        return torch.tanh(self.a(t)).sigmoid() * 3

    def forward(self, x):
        return self.b(checkpoint(self._block, x, use_reentrant=self.reentrant))


def mse(out, y):
    return ((out - y) ** 2).mean()


def test_checkpoint_regions_are_recomputed_and_exact():
    model, x, y = _Checkpointed(), torch.randn(4, 8), torch.randn(4, 8)
    sp = dualpipe_fx.split(model, mse, (x,), y, num_stages=1)
    fwd_ops = set(_ops(sp.stages[0].backward_input.gm))
    assert torch.ops.aten.tanh.default in fwd_ops and torch.ops.aten.sigmoid.default in fwd_ops
    saved_ops = {n.target for n in sp.stages[0].forward.gm.graph.nodes if n.op == "call_function"
                 and n in set(list(sp.stages[0].forward.gm.graph.nodes)[-1].args[0][1:])}
    assert not saved_ops & {torch.ops.aten.tanh.default, torch.ops.aten.sigmoid.default}, saved_ops
    ref_loss, ref = _eager_grads(model, mse, x, y)
    loss, grads = sp.run((x,), y)
    torch.testing.assert_close(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name])


def test_reentrant_checkpoint_is_a_trace_error_naming_the_fix():
    with pytest.raises(TraceError, match="use_reentrant=False"):
        dualpipe_fx.split(_Checkpointed(reentrant=True), mse, (torch.randn(4, 8),), torch.randn(4, 8),
                          num_stages=1)


def test_bad_policies_are_refused():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="recompute='everything'"):
        dualpipe_fx.split(_Dropout(), mse, (x,), y, num_stages=1, memory=dualpipe_fx.MemoryPolicy(recompute="everything"))
    with pytest.raises(TypeError, match="expected 'save' or 'recompute'"):
        dualpipe_fx.split(_Checkpointed(), mse, (x,), y, num_stages=1,
                          memory=dualpipe_fx.MemoryPolicy(recompute=lambda node: True))
