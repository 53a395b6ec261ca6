"""2-rank DualPipeV with keyword inputs and structured outputs, in one spawn.

``compile(Seq2Seq(), loss, (src_mb,), y_mb, example_kwargs={tgt, src_mask, use_flag, ...})``
then ``step(src, target=y, tgt=..., src_mask=..., use_flag=True, ...)``: two steps give the
unsplit model's loss and grads; forward-only steps return the model's own dict (holding a
plain dataclass) and a transformers ``CausalLMOutput``, equal to the unsplit outputs; a
step with another constant, a missing keyword or a bad keyword batch raises the same error
on both ranks before any communication (the next good step is still exact).
"""
from __future__ import annotations

import pytest
import torch

from tests import kwargs_models as km
from tests.runtime.dist_harness import run_ranks

C = 4  # micro-batches; each holds 2 samples
CONSTANTS = {"use_flag": True, "scale": 2.0, "mode": "dict"}


def _kwargs(batch: dict) -> dict:
    return {"tgt": batch["tgt"], "src_mask": batch["src_mask"], **CONSTANTS}


def _mb(batch: dict) -> dict:
    return {k: v[:2] for k, v in batch.items()}


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return "NO ERROR"


def _bad_steps(pipe, b: dict) -> dict:
    kw = _kwargs(b)
    return {
        "constant": _error(lambda: pipe.step(b["src"], target=b["target"], **{**kw, "use_flag": False})),
        "missing": _error(lambda: pipe.step(b["src"], target=b["target"],
                                            **{k: v for k, v in kw.items() if k != "tgt"})),
        "batch": _error(lambda: pipe.step(b["src"], target=b["target"],
                                          **{**kw, "src_mask": kw["src_mask"][:-1]})),
    }


def _grads(pipe) -> dict:
    return {n: p.grad.clone() for n, p in pipe.named_parameters()}


def kwargs_and_outputs(rank, world):
    import dualpipe_fx

    b = km.seq2seq_batch(2 * C)
    mb = _mb(b)  # the example micro-batch
    pipe = dualpipe_fx.compile(km.Seq2Seq(), km.seq2seq_loss, (mb["src"],), mb["target"],
                               example_kwargs=_kwargs(mb), schedule="dualpipev", num_microbatches=C)
    out = {"errors": _bad_steps(pipe, b), "losses": [], "grads": []}
    for _ in range(2):
        pipe.zero_grad()
        loss = pipe.step(b["src"], target=b["target"], **_kwargs(b))
        out["losses"].append(None if loss is None else loss.item())
        out["grads"].append(_grads(pipe))
    with torch.no_grad():
        out["forward"] = pipe.step(b["src"], **_kwargs(b))
    lm = dualpipe_fx.compile(km.TinyCausalLM(), km.causal_lm_loss, (mb["src"],), mb["target"],
                             example_kwargs={"attention_mask": mb["src_mask"], "return_dict": True},
                             schedule="dualpipev", num_microbatches=C)
    with torch.no_grad():
        out["lm"] = lm.step(b["src"], attention_mask=b["src_mask"], return_dict=True)
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(kwargs_and_outputs, 2, timeout=500)


def _reference():
    b = km.seq2seq_batch(2 * C)
    model = km.Seq2Seq()
    loss = km.seq2seq_loss(model(b["src"], **_kwargs(b)), b["target"])
    loss.backward()
    with torch.no_grad():
        forward = model(b["src"], **_kwargs(b))
        lm = km.TinyCausalLM()(b["src"], attention_mask=b["src_mask"], return_dict=True)
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, forward, lm


def test_kwargs_model_trains_like_the_unsplit_model(results):
    ref_loss, ref_grads, _, _ = _reference()
    assert results[0]["losses"][0] is not None and results[1]["losses"] == [None, None]
    for loss in results[0]["losses"]:
        assert loss == pytest.approx(ref_loss, rel=1e-6)
    union = {}
    for r in results:
        for step_grads in r["grads"]:
            union.update(step_grads)
            for name, grad in step_grads.items():
                torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6)
    assert union.keys() == ref_grads.keys()


def test_forward_only_returns_the_models_own_structures(results):
    from transformers.modeling_outputs import CausalLMOutput

    _, _, want, want_lm = _reference()
    assert results[1]["forward"] is None and results[1]["lm"] is None  # rank 1 holds no last stage
    got = results[0]["forward"]
    assert set(got) == {"logits", "context", "note"} and got["note"] is None
    ctx = got["context"]
    assert type(ctx) is km.Context and (ctx.count, ctx.tag) == (km.SEQ, "ctx")
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["context"].mean, want["context"].mean, rtol=1e-5, atol=1e-6)
    lm = results[0]["lm"]
    assert type(lm) is CausalLMOutput and lm.loss is None and list(lm.keys()) == ["logits", "hidden_states"]
    torch.testing.assert_close(lm.logits, want_lm.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lm.hidden_states[0], want_lm.hidden_states[0], rtol=1e-5, atol=1e-6)


def test_a_bad_keyword_step_fails_alike_on_both_ranks(results):
    errors = results[0]["errors"]
    assert errors == results[1]["errors"]
    # the step's input vote raises the failing rank's message on every rank, prefixed with that rank
    assert errors["constant"].startswith("ValueError: rank 0: step(): kwargs['use_flag'] is False"), errors
    assert "traced with True" in errors["constant"] and "dualpipe_fx.compile() again" in errors["constant"]
    assert errors["missing"].startswith("TypeError") and "missing ['tgt']" in errors["missing"], errors
    assert errors["batch"].startswith("ValueError: rank 0: step(): kwargs['src_mask'] has batch size 7"), errors
