"""state_dict round trip (union over ranks == full checkpoint) and forward-only steps."""
from __future__ import annotations

import pytest
import torch

from tests.runtime import cases
from tests.runtime.dist_harness import run_ranks


@pytest.mark.parametrize("schedule", ["dualpipev", "dualpipe"])
def test_state_dict_round_trip_and_no_grad_outputs(schedule):
    results = run_ranks(cases.checkpoint_and_forward, 2, ("linear", schedule, 4), timeout=400)
    union = {}
    for r in results:
        union.update(r["state"])
        for key, value in r["state"].items():  # load_state_dict into another pipe lost nothing
            torch.testing.assert_close(r["reloaded"][key], value, rtol=0, atol=0)
    model, loss_fn, x, y = cases.make_case("linear", 4)
    assert set(union) == set(model.state_dict())
    model.load_state_dict(union)  # strict: the union is a full checkpoint of the unsplit model
    with torch.no_grad():
        expected = model(x)
        expected_loss = loss_fn(expected, y)
    outputs = [r["outputs"] for r in results if r["outputs"] is not None]
    assert outputs, "no rank returned the forward-only outputs"
    for out in outputs:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for r in results:  # a wrong shape is named, with both shapes, before anything is copied
        assert r["untouched"], r["shape_error"]
        assert r["shape_error"].startswith("ValueError") and f"size mismatch for {r['bad_key']}" in \
            r["shape_error"] and str(r["bad_shape"]) in r["shape_error"], r["shape_error"]
    for r in results:
        if r["loss_after_reload"] is not None:
            assert r["loss_after_reload"].item() == pytest.approx(expected_loss.item(), rel=1e-6)
