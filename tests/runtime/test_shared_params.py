"""Parameters used by stages on different ranks: each holder keeps its copy, grads are summed.

What these rebuild: pipelined SGD steps == single-process SGD steps on the same batch
(loss rel 1e-6, grads allclose) for a tied embedding/LM head whose stages sit on two ranks
(1F1B, GPipe, interleaved 1F1B) and for an encoder-decoder whose one embedding is read by
stages 0 and 3 on rank 0 and stage 1 on rank 1 (DualPipeV); after the steps both holders'
copies and grads are bitwise equal; a third step without ``zero_grad`` adds to the kept
grad once (not once per holder); the ranks' ``state_dict``s together load into the unsplit
model, and ``load_state_dict`` sets both copies. ``sync_shared_grads`` itself: four ranks
as threads, parameters held by two to four of them, two dtypes.
"""
from __future__ import annotations

import queue
import threading
from datetime import timedelta

import pytest
import torch

from dualpipe_fx.runtime import sync
from tests import shared_models
from tests.runtime import cases
from tests.runtime.dist_harness import run_ranks

C = 4
LR = 0.1
RUNS = [("tied", "1f1b"), ("tied", "gpipe"), ("tied", "interleaved_1f1b"), ("seq2seq", "dualpipev")]
SHARED = {"tied": "emb.weight", "seq2seq": "embed.weight"}


def _case(kind: str):
    """(fresh model, loss_fn, full-batch inputs, full-batch target); micro-batches are 1/C of it."""
    if kind == "tied":
        model, loss_fn, x, y = cases.make_case("tied", C)
        return model, loss_fn, (x,), y
    case = shared_models.seq2seq(batch=2 * C)
    return case.model, case.loss_fn, case.inputs, case.target


def _train(step, params, zero_grad) -> dict:
    """Two SGD steps, then a third step's grads without zero_grad (added to the second's)."""
    opt = torch.optim.SGD(params(), lr=LR)
    out = {"losses": [], "grads": []}
    for k in range(3):
        if k < 2:
            zero_grad()
        loss = step()
        out["losses"].append(None if loss is None else loss.item())
        out["grads"].append({n: p.grad.clone() for n, p in params(named=True) if p.grad is not None})
        if k < 2:
            opt.step()
            out["params"] = {n: p.detach().clone() for n, p in params(named=True)}
    return out


def shared_param_steps(rank, world):
    import dualpipe_fx

    out = {}
    for kind, schedule in RUNS:
        model, loss_fn, xs, y = _case(kind)
        mb = xs[0].shape[0] // C
        pipe = dualpipe_fx.compile(model, loss_fn, tuple(x[:mb] for x in xs), y[:mb], schedule=schedule,
                                   num_microbatches=C)

        def params(named=False):
            return pipe.named_parameters() if named else pipe.parameters()

        run = _train(lambda: pipe.step(*xs, target=y), params, pipe.zero_grad)
        run["state"] = pipe.state_dict()
        fresh = _case(kind)[0].state_dict()
        pipe.load_state_dict(fresh)
        run["reloaded"] = all(torch.equal(p, fresh[n]) for n, p in pipe.named_parameters())
        out[(kind, schedule)] = run
    return out


def _reference(kind: str) -> dict:
    model, loss_fn, xs, y = _case(kind)

    def params(named=False):
        return model.named_parameters() if named else model.parameters()

    return _train(lambda: _backward(loss_fn(model(*xs), y)), params, model.zero_grad)


def _backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()
    return loss.detach()


def _check_run(kind: str, schedule: str, ranks: list[dict], ref: dict) -> None:
    what = f"{kind}/{schedule}"
    shared = SHARED[kind]
    assert all(shared in r["params"] for r in ranks), f"{what}: {shared} is not on both ranks"
    for k, want in enumerate(ref["losses"]):
        losses = [r["losses"][k] for r in ranks if r["losses"][k] is not None]
        assert losses and all(got == pytest.approx(want, rel=1e-6) for got in losses), (what, k, losses, want)
        for rank, r in enumerate(ranks):
            for name, grad in r["grads"][k].items():
                torch.testing.assert_close(grad, ref["grads"][k][name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{what} step {k} rank {rank} {name}: {m}")
        assert torch.equal(ranks[0]["grads"][k][shared], ranks[1]["grads"][k][shared]), (what, k)
    assert torch.equal(ranks[0]["params"][shared], ranks[1]["params"][shared]), what
    model = _case(kind)[0]
    model.load_state_dict({**ranks[0]["state"], **ranks[1]["state"]})  # strict: the union is all of it
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref["params"][name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} {name}: {m}")
    keys = [k for k, v in ranks[0]["state"].items() if k in ranks[1]["state"]]
    assert shared in keys and all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in keys), what
    assert all(r["reloaded"] for r in ranks), what


@pytest.mark.timeout(600)
def test_shared_params_across_ranks_train_like_one_process():
    results = run_ranks(shared_param_steps, 2, timeout=500)
    refs = {kind: _reference(kind) for kind in SHARED}
    for kind, schedule in RUNS:
        _check_run(kind, schedule, [r[(kind, schedule)] for r in results], refs[kind])


# --------------------------------------------------------------------------------------
# sync_shared_grads with more than two holders: ranks as threads, a queue per direction


def _thread_exchange(boxes):
    def exchange(tensors, peer, group, rank, timeout, what):
        boxes[(rank, peer)].put([t.clone() for t in tensors])
        return boxes[(peer, rank)].get(timeout=10)
    return exchange


def test_sync_shared_grads_sums_over_three_and_four_holders(monkeypatch):
    world = 4
    holders = {"all": (0, 1, 2, 3), "even": (0, 2), "odd64": (1, 2, 3), "pair": (2, 3)}
    dtype = {n: torch.float64 if n == "odd64" else torch.float32 for n in holders}
    gen = torch.Generator().manual_seed(0)
    earlier = {n: torch.full((3, 5), 0.5, dtype=dtype[n]) for n in holders}  # synced by a past step
    params, this_step, set_aside = [], [], []
    for r in range(world):
        mine = {n: torch.nn.Parameter(torch.zeros(3, 5, dtype=dtype[n])) for n in holders if r in holders[n]}
        for n, p in mine.items():
            p.grad = earlier[n].clone()
        set_aside.append(sync.set_aside_shared_grads(mine, holders, r))
        assert all(p.grad is None for p in mine.values())
        this_step.append({n: torch.randn(3, 5, generator=gen, dtype=dtype[n]) for n in mine})
        for n, p in mine.items():
            p.grad = this_step[r][n].clone()  # what this step's W summed into .grad
        params.append(mine)
    boxes = {(a, b): queue.Queue() for a in range(world) for b in range(world) if a != b}
    monkeypatch.setattr(sync, "exchange", _thread_exchange(boxes))
    errors = []

    def run(r):
        try:
            sync.sync_shared_grads(params[r], holders, None, r, timedelta(seconds=10), set_aside[r])
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append((r, err))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    for name, ranks in holders.items():
        want = earlier[name] + sum(this_step[r][name] for r in ranks)
        first = params[ranks[0]][name].grad
        assert first.dtype == dtype[name]
        torch.testing.assert_close(first, want)
        for r in ranks[1:]:
            assert torch.equal(params[r][name].grad, first), (name, r)
