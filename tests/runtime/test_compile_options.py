"""compile(cost="measured") cuts alike on every rank; compile(overlap=False) runs F then B.

Both must still give the single-process loss and grads.
"""
import pytest
import torch

import dualpipe_fx
from tests.runtime.cases import make_case
from tests.runtime.dist_harness import run_ranks


def _rank(rank, world, options):
    model, loss_fn, x, y = make_case("llama", 4)
    mb = x.shape[0] // 4
    pipe = dualpipe_fx.compile(model, loss_fn, (x[:mb],), y[:mb], schedule="dualpipev",
                               num_microbatches=4, **options)
    loss = pipe.step(x, target=y)
    return loss, {n: p.grad.clone() for n, p in pipe.named_parameters()}


@pytest.mark.parametrize("options", [{"cost": "measured"}, {"overlap": False}], ids=["measured", "no-overlap"])
def test_option_keeps_single_process_numerics(options):
    results = run_ranks(_rank, 2, args=(options,))
    model, loss_fn, x, y = make_case("llama", 4)
    ref = loss_fn(model(x), y)
    ref.backward()
    torch.testing.assert_close(results[0][0], ref.detach(), rtol=1e-6, atol=0)
    grads = {**results[1][1], **results[0][1]}
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6)
