"""transformers Llama, GPT-2 and Mixtral, passed unchanged to ``compile``, train on 2-rank
DualPipeV as in one process.

What a user does with an HF model: ``compile(model, loss_fn, (ids_mb,), y_mb,
example_kwargs={"attention_mask": mask_mb}, schedule="dualpipev", num_microbatches=4)``,
then ``step(ids, target=y, attention_mask=mask)`` (or ``step(target=y, input_ids=ids)``),
the loss on ``out.logits``. Two steps each, the second from zeroed grads: the loss and
every grad equal the unsplit model's on the same full batch; then a forward-only step
(``torch.no_grad()``) returns the model's own output type with its logits. Llama and GPT-2 tie the LM head
to the embedding; DualPipeV puts stage 0 and the last stage on rank 0, which sums the two
uses. Mixtral's experts (grouped_mm: sort by expert, histc counts, one grouped GEMM) and
router run inside stages like any other op. All cases run in one pair of ranks (one spawn, one import of transformers).
"""
from __future__ import annotations

import pytest
import torch

from tests import hf_models as hm
from tests.runtime.dist_harness import run_ranks

C = 4


def _full(name: str) -> hm.Case:
    """The case's model with a full batch of C micro-batches (rows 1, 3, ... left-padded)."""
    case = hm.CASES[name]()
    ids, target, mask = hm.tokens(C * hm.MB, seed=2)
    kwargs = {k: {"attention_mask": mask, "input_ids": ids}[k] for k in case.kwargs}
    return hm.Case(case.model, case.loss_fn, (ids,) if case.args else (), kwargs, target)


def _first_microbatch(case: hm.Case) -> hm.Case:
    mb = lambda t: t[: hm.MB]  # noqa: E731
    return hm.Case(case.model, case.loss_fn, tuple(map(mb, case.args)),
                   {k: mb(v) for k, v in case.kwargs.items()}, mb(case.target))


def hf_steps(rank, world):
    import dualpipe_fx

    out = {}
    for name in hm.PIPELINED:
        full = _full(name)
        ex = _first_microbatch(full)
        pipe = dualpipe_fx.compile(full.model, full.loss_fn, ex.args, ex.target, example_kwargs=ex.kwargs,
                                   schedule="dualpipev", num_microbatches=C)
        losses = []
        for _ in range(2):
            pipe.zero_grad()
            loss = pipe.step(*full.args, target=full.target, **full.kwargs)
            losses.append(None if loss is None else loss.item())
        grads = {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}
        with torch.no_grad():  # forward only: the model's own ModelOutput, on rank 0
            fwd = pipe.step(*full.args, **full.kwargs)
        fwd = None if fwd is None else (type(fwd).__name__, dict(fwd))
        out[name] = (losses, grads, fwd)
    return out


@pytest.mark.timeout(400)
def test_hf_llama_gpt2_mixtral_train_like_one_process_on_two_ranks():
    results = run_ranks(hf_steps, 2, timeout=360)
    for name in hm.PIPELINED:
        full = _full(name)
        ref_out = full.model(*full.args, **full.kwargs)
        ref = full.loss_fn(ref_out, full.target)
        ref.backward()
        grads = {n: p.grad for n, p in full.model.named_parameters(remove_duplicate=False)}
        losses = [r[name][0] for r in results if r[name][0][0] is not None]
        assert len(losses) == 1, name  # the loss lives on rank 0 (first and last stage)
        for loss in losses[0]:
            assert loss == pytest.approx(ref.item(), rel=1e-6), name
        seen = set()
        for r in results:
            for param, grad in r[name][1].items():
                torch.testing.assert_close(grad, grads[param], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{name} {param}: {m}")
                seen.add(param)
        own = {n for n, _ in full.model.named_parameters()}  # tied aliases once
        assert seen >= own, (name, own - seen)
        (cls, fields), = [r[name][2] for r in results if r[name][2] is not None]
        assert cls == type(ref_out).__name__
        # logits only: the DynamicCache that use_cache=True builds holds one traced
        # micro-batch's fake tensors, so the output carries None in its place
        assert list(fields) == ["logits"], (name, list(fields))
        torch.testing.assert_close(fields["logits"], ref_out.logits.detach(), rtol=1e-5, atol=1e-6)
