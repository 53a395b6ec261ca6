"""BatchNorm in train mode, pipelined on two ranks: loss, grads AND running statistics equal
eager micro-batching (grad accumulation over the same micro-batches, in micro-batch order).

Each micro-batch is normalised by its own statistics and updates ``running_mean``,
``running_var`` and ``num_batches_tracked`` once, in micro-batch order: a stage's forwards run
in that order on the one rank that holds it (the F graph writes the buffers back in place).
Two steps in a row. The bidirectional DualPipe holds every stage twice, each copy seeing half
of the micro-batches: it is refused for such a model, naming the buffers.
(``momentum=None``, the cumulative average, is refused at capture: tests/passes/test_capture.py.)
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.runtime.dist_harness import run_ranks

C, MB, STEPS = 4, 3, 2


class BNNet(nn.Module):
    """4 x (Linear -> BatchNorm1d -> ReLU) -> Linear, each BatchNorm with its own momentum."""

    def __init__(self, width: int = 8, depth: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width, momentum=0.1 + 0.2 * i), nn.ReLU())
            for i in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target)


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(C * MB, 8, generator=gen) * 3 + 1, torch.randn(C * MB, 2, generator=gen)


def _pipelined(rank, world, schedule):
    import dualpipe_fx

    x, y = _batch()
    try:
        pipe = dualpipe_fx.compile(BNNet(), _loss, (x[:MB],), y[:MB], schedule=schedule, num_microbatches=C)
    except ValueError as e:
        return {"error": str(e)}
    losses = []
    for _ in range(STEPS):
        pipe.zero_grad()
        loss = pipe.step(x, target=y)
        losses.append(None if loss is None else loss.item())
    return {"losses": losses, "grads": {n: p.grad.clone() for n, p in pipe.named_parameters()},
            "buffers": {n: b.clone() for n, b in pipe.state_dict().items() if "running" in n or "num_batches" in n}}


def _both_schedules(rank, world):
    return {schedule: _pipelined(rank, world, schedule) for schedule in ("dualpipev", "1f1b", "dualpipe")}


def _eager():
    model, (x, y) = BNNet(), _batch()
    losses = []
    for _ in range(STEPS):
        model.zero_grad()
        total = 0.0
        for xs, ys in zip(x.chunk(C), y.chunk(C)):
            loss = _loss(model(xs), ys) / C
            loss.backward()
            total += loss.item()
        losses.append(total)
    state = {n: b for n, b in model.state_dict().items() if "running" in n or "num_batches" in n}
    return losses, {n: p.grad for n, p in model.named_parameters()}, state


def test_batchnorm_train_mode_updates_running_stats_per_micro_batch_like_eager():
    results = run_ranks(_both_schedules, 2, timeout=240)
    losses, grads, buffers = _eager()
    for schedule in ("dualpipev", "1f1b"):
        got = [r[schedule] for r in results]
        assert all("error" not in g for g in got), got
        loss = [v for g in got for v in g["losses"] if v is not None] or None
        held = [g["losses"] for g in got if g["losses"][0] is not None]
        assert len(held) == 1, (schedule, got)
        assert held[0] == pytest.approx(losses, rel=1e-6), (schedule, held, losses, loss)
        seen_grads = {n: t for g in got for n, t in g["grads"].items()}
        assert sorted(seen_grads) == sorted(grads)
        for n, g in grads.items():
            torch.testing.assert_close(seen_grads[n], g, rtol=1e-5, atol=1e-6, msg=f"{schedule} grad {n}")
        seen_buffers = {n: t for g in got for n, t in g["buffers"].items()}
        assert sorted(seen_buffers) == sorted(buffers)
        for n, b in buffers.items():
            torch.testing.assert_close(seen_buffers[n], b, rtol=1e-5, atol=1e-6, msg=f"{schedule} buffer {n}")
    for r in results:
        error = r["dualpipe"].get("error", "")
        assert "dualpipe" in error and "running_mean" in error and "dualpipev" in error, r["dualpipe"]
