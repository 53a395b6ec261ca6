"""Pipelined training == single-process training: every schedule, world sizes 1, 2 and 4.

Each test spawns gloo ranks (tests/runtime/dist_harness.py) that compile a tiny model with
``dualpipe_fx.compile`` and run real steps; the parent compares the loss and every
parameter's grad with the unsplit model on the same batch.
"""
from __future__ import annotations

import pytest
import torch

from tests.runtime import cases
from tests.runtime.dist_harness import run_ranks

ALL_2 = [("dualpipev", 4), ("dualpipe", 4), ("zbv", 4), ("1f1b", 4), ("gpipe", 4),
         ("interleaved_1f1b", 4), ("zb1p", 4)]


def reference(kind: str, num_microbatches: int):
    """Loss and grads (by FQN, tied aliases included) of the unsplit model on the whole batch."""
    model, loss_fn, x, y = cases.make_case(kind, num_microbatches)
    loss = loss_fn(model(x), y)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters(remove_duplicate=False)}
    return loss.item(), grads, {n for n, _ in model.named_parameters()}


def check_step(results: list[dict], kind: str, schedule: str, num_microbatches: int) -> None:
    ref_loss, ref_grads, all_names = reference(kind, num_microbatches)
    losses = [r[schedule]["loss"] for r in results if r[schedule]["loss"] is not None]
    assert losses, f"{schedule}: no rank returned a loss"
    for loss in losses:
        assert loss == pytest.approx(ref_loss, rel=1e-6), schedule
    seen = set()
    for rank, r in enumerate(results):
        for name, grad in r[schedule]["grads"].items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{schedule} rank {rank} {name}: {m}")
            seen.add(name)
    # every parameter is held, and has a grad, on at least one rank (tied: under one of its names)
    assert len(seen) == len(all_names), (schedule, sorted(all_names - seen))


def test_world_1_every_single_rank_schedule():
    schedules = [("dualpipev", 2), ("1f1b", 2), ("gpipe", 2), ("zbv", 2)]
    (result,) = run_ranks(cases.one_step_per_schedule, 1, ("linear", schedules), timeout=400)
    for schedule, c in schedules:
        check_step([result], "linear", schedule, c)


def test_world_2_every_schedule_linear():
    results = run_ranks(cases.one_step_per_schedule, 2, ("linear", ALL_2), timeout=600)
    for schedule, c in ALL_2:
        check_step(results, "linear", schedule, c)


@pytest.mark.parametrize("kind", ["llama", "tied"])
def test_world_2_token_models_v_schedules(kind):
    """Integer inputs (no grad sent to them); a tied embedding/head, both on rank 0 (one .grad)."""
    schedules = [("dualpipev", 4), ("zbv", 4)]
    results = run_ranks(cases.one_step_per_schedule, 2, (kind, schedules), timeout=600)
    for schedule, c in schedules:
        check_step(results, kind, schedule, c)


def test_world_4_v_and_bidirectional_and_1f1b():
    schedules = [("dualpipev", 8), ("dualpipe", 8), ("1f1b", 4)]
    results = run_ranks(cases.one_step_per_schedule, 4, ("linear", schedules), timeout=600)
    for schedule, c in schedules:
        check_step(results, "linear", schedule, c)


@pytest.mark.parametrize("schedule", ["dualpipev", "dualpipe"])
def test_three_adam_steps_follow_the_single_process_trajectory(schedule):
    results = run_ranks(cases.optimizer_trajectory, 2, ("linear", schedule, 4), timeout=400)
    model, loss_fn, x, y = cases.make_case("linear", 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        ref_losses.append(loss.item())
        opt.step()
    ref = dict(model.named_parameters())
    loss_ranks = [r for r in results if r["losses"][0] is not None]
    assert loss_ranks
    for r in loss_ranks:
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-5)
    for r in results:
        for name, value in r["params"].items():
            torch.testing.assert_close(value, ref[name].detach(), rtol=1e-5, atol=1e-6)
