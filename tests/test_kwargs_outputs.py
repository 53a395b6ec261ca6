"""Keyword inputs and structured outputs, in one process: split() of ``model(src, tgt=...,
src_mask=..., use_flag=True)`` gives eager autograd's loss and grads; tensors among the
kwargs are graph inputs named ``kwarg:<name>``, other values constants whose change is a
clear error; the captured outputs rebuild the model's dict / dataclass / ModelOutput."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dualpipe_fx
from passes.capture import capture
from tests import kwargs_models as km

CONSTANTS = {"use_flag": True, "scale": 2.0, "mode": "dict"}


def _example():
    b = km.seq2seq_batch(2)
    return b["src"], {"tgt": b["tgt"], "src_mask": b["src_mask"], **CONSTANTS}, b["target"]


def _eager(model, loss_fn, args, kwargs, target):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(*args, **kwargs), target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _split(num_stages=4):
    model = km.Seq2Seq()
    src, kwargs, target = _example()
    return model, dualpipe_fx.split(model, km.seq2seq_loss, src, target, num_stages=num_stages,
                                    example_kwargs=kwargs)


def test_split_with_tensor_and_constant_kwargs_equals_eager():
    model, sp = _split()
    src, kwargs, target = _example()
    names = [n.meta["dpfx_name"] for n in sp.partition.captured.gm.graph.nodes
             if n.op == "placeholder" and n.meta["dpfx_kind"] in ("input", "target")]
    assert names == ["input:0", "kwarg:tgt", "kwarg:src_mask", "target"]
    b = km.seq2seq_batch(2, seed=5)  # a new micro-batch of the same shapes
    new_kwargs = {**CONSTANTS, "src_mask": b["src_mask"], "tgt": b["tgt"]}  # any keyword order
    loss, grads = sp.run(b["src"], b["target"], **new_kwargs)
    ref_loss, ref = _eager(model, km.seq2seq_loss, (b["src"],), new_kwargs, b["target"])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref.keys()
    for name, want in ref.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-6)


def test_another_constant_missing_or_extra_kwarg_or_shape_is_a_clear_error():
    _, sp = _split(num_stages=2)
    src, kwargs, target = _example()
    with pytest.raises(ValueError, match=r"Split.run: kwargs\['use_flag'\] is False, but the model was "
                                         r"traced with True.*Fix: pass use_flag=True.*dualpipe_fx.split\(\)"):
        sp.run(src, target, **{**kwargs, "use_flag": False})
    with pytest.raises(ValueError, match=r"kwargs\['mode'\] is 'tensor'.*traced with 'dict'"):
        sp.run(src, target, **{**kwargs, "mode": "tensor"})
    with pytest.raises(TypeError, match=r"missing \['src_mask'\], unexpected \[\]"):
        sp.run(src, target, **{k: v for k, v in kwargs.items() if k != "src_mask"})
    with pytest.raises(TypeError, match=r"missing \[\], unexpected \['dropout'\]"):
        sp.run(src, target, **kwargs, dropout=0.1)
    with pytest.raises(ValueError, match=r"Split.run: kwargs\['src_mask'\] is \(3, 5\).*expected \(2, 5\)"):
        sp.run(src, target, **{**kwargs, "src_mask": torch.ones(3, 5, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"kwargs\['scale'\] is a tensor of shape \(\).*traced with 2.0"):
        sp.run(src, target, **{**kwargs, "scale": torch.tensor(2.0)})


def test_a_keyword_named_target_is_refused():
    src, kwargs, target = _example()
    with pytest.raises(ValueError, match=r"example_kwargs has the key 'target'"):
        dualpipe_fx.split(km.Seq2Seq(), km.seq2seq_loss, src, target, num_stages=2,
                          example_kwargs={**kwargs, "target": target})


class _Nested(nn.Module):
    """Keyword pytrees: a list of tensors and a dict with a tensor and a None."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, extras=(), opts=None):
        y = self.fc(x)
        for e in extras:
            y = torch.tanh(self.fc(y + e))
        return y * opts["gain"] if opts["bias"] is None else y


def test_nested_kwargs_leaves_are_inputs_and_their_structure_is_checked():
    torch.manual_seed(0)
    model, x, y = _Nested(), torch.randn(2, 4), torch.randn(2, 4)
    kwargs = {"extras": [torch.randn(2, 4), torch.randn(2, 4)],
              "opts": {"gain": torch.randn(2, 4), "bias": None}}
    loss_fn = torch.nn.functional.mse_loss
    sp = dualpipe_fx.split(model, loss_fn, x, y, num_stages=2, example_kwargs=kwargs)
    assert sp.partition.captured.call.names == ("input:0", "kwarg:extras/0", "kwarg:extras/1", "kwarg:opts/0")
    loss, grads = sp.run(x, y, **kwargs)
    ref_loss, ref = _eager(model, loss_fn, (x,), kwargs, y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, want in ref.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"kwargs\['extras'\] has the pytree structure"):
        sp.run(x, y, **{**kwargs, "extras": kwargs["extras"][:1]})
    with pytest.raises(ValueError, match=r"kwargs\['opts'\] leaf 1 is a tensor.*traced with None"):
        sp.run(x, y, **{**kwargs, "opts": {"gain": x, "bias": x}})


def _captured_outputs(model, loss_fn, args, kwargs, target):
    c = capture(model, loss_fn, args, target, example_kwargs=kwargs)
    named = dict(model.named_parameters())
    inputs = c.call.values(args, kwargs, "", "")
    tensors = [named[n] for n in c.param_names] + [inputs[n] for n in c.call.names]
    with torch.no_grad():
        loss, *outs = c.gm(*tensors, target)
    return c.output_layout.rebuild(outs)


def test_outputs_rebuild_dict_dataclass_and_model_output():
    src, kwargs, target = _example()
    model = km.Seq2Seq()
    got = _captured_outputs(model, km.seq2seq_loss, (src,), kwargs, target)
    with torch.no_grad():
        want = model(src, **kwargs)
    assert set(got) == {"logits", "context", "note"} and got["note"] is None
    assert isinstance(got["context"], km.Context) and (got["context"].count, got["context"].tag) == (5, "ctx")
    torch.testing.assert_close(got["logits"], want["logits"])
    torch.testing.assert_close(got["context"].mean, want["context"].mean)

    from transformers.modeling_outputs import CausalLMOutput
    b = km.seq2seq_batch(2)
    lm = km.TinyCausalLM()
    lm_kwargs = {"attention_mask": b["src_mask"], "return_dict": True}
    got = _captured_outputs(lm, km.causal_lm_loss, (b["src"],), lm_kwargs, b["target"])
    with torch.no_grad():
        want = lm(b["src"], **lm_kwargs)
    assert type(got) is CausalLMOutput and got.loss is None
    assert list(got.keys()) == ["logits", "hidden_states"]
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.hidden_states[0], want.hidden_states[0])
