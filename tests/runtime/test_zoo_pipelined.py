"""Every traceable zoo model, compiled for 2-rank dualpipev, trains like the unsplit model.

What a user's model meets first: ``compile(model, loss_fn, (x_mb,), y_mb,
schedule="dualpipev", num_microbatches=4)``, then ``step(x, target=y)`` and
``named_parameters()``. Two steps each (the second starts from zeroed grads, and F&B pairs
and W sum grads in place from each step's second micro-batch on): loss and every grad
equal the unsplit model's on the same full batch. (The BatchNorm case has too few ops
for 4 stages and gets the ValueError that says so.)
"""
from __future__ import annotations

import pytest
import torch

from tests.models import zoo
from tests.runtime.dist_harness import run_ranks

C = 4
TOO_SMALL = {"batchnorm"}


def _full_batch(t):
    """C micro-batches like the example one (shifted copies), concatenated."""
    if t is None:
        return None
    parts = [t + 0.1 * k if t.dtype.is_floating_point else t.roll(k, dims=-1) for k in range(C)]
    return torch.cat(parts)


def _cases():
    return [c for c in zoo(0) if c.name not in TOO_SMALL]


def zoo_steps(rank, world):
    import dualpipe_fx

    out = {}
    for case in _cases():
        xs = tuple(_full_batch(x) for x in case.inputs)
        pipe = dualpipe_fx.compile(case.model, case.loss_fn, case.inputs, case.target,
                                   schedule="dualpipev", num_microbatches=C)
        for _ in range(2):
            pipe.zero_grad()
            loss = pipe.step(*xs, target=_full_batch(case.target))
        out[case.name] = (None if loss is None else loss.item(),
                          {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None})
    return out


@pytest.mark.timeout(900)
def test_every_zoo_model_trains_like_one_process_on_two_ranks():
    results = run_ranks(zoo_steps, 2, timeout=800)
    for case in _cases():
        xs, y = tuple(_full_batch(x) for x in case.inputs), _full_batch(case.target)
        ref = case.loss_fn(case.model(*xs), y)
        ref.backward()
        grads = {n: p.grad for n, p in case.model.named_parameters(remove_duplicate=False)}
        losses = [r[case.name][0] for r in results if r[case.name][0] is not None]
        assert losses, case.name
        for loss in losses:
            assert loss == pytest.approx(ref.item(), rel=1e-6), case.name
        seen = set()
        for r in results:
            for name, grad in r[case.name][1].items():
                torch.testing.assert_close(grad, grads[name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{case.name} {name}: {m}")
                seen.add(name)
        assert seen >= {n for n, _ in case.model.named_parameters()}, case.name
