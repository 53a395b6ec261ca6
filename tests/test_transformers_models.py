"""transformers models passed to ``dualpipe_fx.split`` as users bring them, in one process.

Each tiny model (``tests/hf_models.py``: built from a config, random init, nothing
downloaded) goes in unchanged, called as ``model(input_ids, attention_mask=..., ...)`` with
the loss on ``out.logits`` (or the model's own ``out.loss`` from ``labels=``). What is
rebuilt: the 4 stages run in sequence (every F, then I from the last stage, then W) give
eager autograd's loss and the grad of every parameter, tied aliases included. Families that
cannot be captured get a ``TraceError`` naming their usual way out.
"""
from __future__ import annotations

import pytest
import torch

import dualpipe_fx
from passes.capture import TraceError
from passes.model_call import Slot
from tests import hf_models as hm

pytestmark = pytest.mark.timeout(120)


def _eager(case: hm.Case):
    case.model.zero_grad(set_to_none=True)
    out = case.model(*case.args, **case.kwargs)
    loss = case.loss_fn(out) if case.target is None else case.loss_fn(out, case.target)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in case.model.named_parameters(remove_duplicate=False)
                           if p.grad is not None}


def _split(case: hm.Case, num_stages: int = 4):
    return dualpipe_fx.split(case.model, case.loss_fn, case.args, case.target,
                             num_stages=num_stages, example_kwargs=case.kwargs)


def _assert_matches(loss, grads, ref_loss, ref_grads, name):
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6), name
    assert ref_grads.keys() <= grads.keys(), (name, ref_grads.keys() - grads.keys())
    for param, want in ref_grads.items():
        torch.testing.assert_close(grads[param], want, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name} {param}: {m}")


@pytest.mark.parametrize("name", list(hm.CASES))
def test_four_stages_in_sequence_give_eager_loss_and_grads(name):
    case = hm.CASES[name]()
    sp = _split(case)
    loss, grads = sp.run(case.args, case.target, **case.kwargs)
    _assert_matches(loss, grads, *_eager(case), name)
    # every parameter, the tied LM head's alias too, gets a grad
    assert {n for n, _ in case.model.named_parameters(remove_duplicate=False)} <= grads.keys()
    # outputs: tensors, or constants; never the trace's own DynamicCache of fake tensors
    assert all(isinstance(x, (Slot, int, float, str, type(None)))
               for x in sp.partition.captured.output_layout.leaves), name
    if name in hm.TIED:
        # one tensor, two uses: the embedding in stage 0 and the LM head in the last stage
        # (both on rank 0 under DualPipeV); its grad is the sum of both
        emb = case.model.get_input_embeddings().weight
        assert emb is case.model.get_output_embeddings().weight
        fqn = next(n for n, p in case.model.named_parameters() if p is emb)
        assert sp.partition.param_stages[fqn] == (0, 3)


def test_dropout_masks_follow_the_seed_as_in_eager():
    """Stages run their forwards in the model's order, so one seed draws eager's masks."""
    model = hm.gpt2(dropout=0.1, layers=2)
    ids, target, _ = hm.tokens()
    sp = dualpipe_fx.split(model, hm.lm_loss, ids, target, num_stages=2)
    torch.manual_seed(7)
    loss, grads = sp.run(ids, target)
    torch.manual_seed(7)
    _assert_matches(loss, grads, *_eager(hm.Case(model, hm.lm_loss, (ids,), {}, target)), "gpt2-dropout")


# --------------------------------------------------------------------------------------
# Known library patterns that cannot be captured: the TraceError names the way out


def test_eager_moe_experts_loop_names_grouped_mm():
    case = hm._causal_case(hm.mixtral("eager"))
    with pytest.raises(TraceError) as info:
        _split(case, num_stages=2)
    msg = str(info.value)
    assert "modeling_mixtral.py" in msg and "for expert_idx in expert_hit" in msg
    assert 'experts_implementation="eager"' in msg
    assert 'experts_implementation="grouped_mm"' in msg and "set_experts_implementation" in msg


def test_layerdrop_names_the_config_key():
    cfg = hm.hf.BartConfig(vocab_size=hm.VOCAB, d_model=16, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_position_embeddings=32, encoder_layerdrop=0.1,
                           forced_eos_token_id=None)
    model = hm._seeded(0, lambda: hm.hf.BartForConditionalGeneration(cfg))
    ids, target, _ = hm.tokens()
    with pytest.raises(TraceError) as info:
        dualpipe_fx.split(model, hm.lm_loss, ids, target, num_stages=2,
                          example_kwargs={"decoder_input_ids": target})
    msg = str(info.value)
    assert "LayerDrop" in msg and "layerdrop = 0.1" in msg
    assert "encoder_layerdrop=0.0" in msg and ".layerdrop = 0.0" in msg


def test_expert_loop_without_an_implementation_switch_says_so():
    """DBRX's experts have only the loop: the hint names its class and the static form."""
    cfg = hm.hf.DbrxConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=64, vocab_size=hm.VOCAB,
                           attn_config={"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8.0},
                           ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
                           pad_token_id=0, bos_token_id=0, eos_token_id=0)
    case = hm._causal_case(hm._seeded(0, lambda: hm.hf.DbrxForCausalLM(cfg)))
    with pytest.raises(TraceError) as info:
        _split(case, num_stages=2)
    msg = str(info.value)
    assert "modeling_dbrx.py" in msg and "DbrxExperts" in msg
    assert "replace DbrxExperts.forward" in msg and "grouped_mm" in msg


class _ConvertsInForward(torch.nn.Module):
    """As SwitchTransformers' and NLLB-MoE's routers: ``self.classifier.to(dtype)`` per call."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        self.lin = self.lin.to(torch.float32)
        return self.lin(x)


def test_module_to_in_forward_names_the_fix():
    x = torch.randn(2, 4)
    with pytest.raises(TraceError, match=r"self\.lin = self\.lin\.to\(torch\.float32\).*Couldn't swap.*"
                                         r"Fix: convert the model once before compile\(\)/split\(\)"):
        dualpipe_fx.split(_ConvertsInForward(), lambda out, y: (out - y).pow(2).mean(), x, x, num_stages=1)


def test_a_users_own_data_dependent_branch_keeps_the_generic_fix():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            if self.lin(x).sum() > 0:
                return x
            return -x

    x = torch.randn(2, 4)
    with pytest.raises(TraceError, match=r"test_transformers_models\.py.*Fix: replace the branch by "
                                         r"`torch\.where"):
        dualpipe_fx.split(Branchy(), lambda out, y: (out - y).pow(2).mean(), x, x, num_stages=1)
