"""Rank functions for the fault-injection tests: each runs several cases in one process group.

A case returns ``{"type", "message", "seconds", ...}`` for the error it raised (or
``type=None``), so the parent asserts the exception type and rank on every rank.
Cases that leave the group healthy run in sequence on one spawn, to keep the suite short.
"""
from __future__ import annotations

import time
from datetime import timedelta

import torch

import dualpipe_fx
from tests.runtime.cases import make_case


def _outcome(fn) -> dict:
    start = time.monotonic()
    try:
        value = fn()
    except Exception as err:  # noqa: BLE001 - the test asserts the type
        return {"type": type(err).__name__, "message": str(err), "seconds": time.monotonic() - start,
                "rank": getattr(err, "rank", None), "peer": getattr(err, "peer", None)}
    return {"type": None, "value": value, "seconds": time.monotonic() - start}


def _compile(rank, kind="linear", schedule="dualpipev", num_microbatches=4, seed=0, batch_mb=None, **kw):
    model, loss_fn, x, y = make_case(kind, num_microbatches, seed=seed)
    mb = x.shape[0] // num_microbatches if batch_mb is None else batch_mb
    kw.setdefault("timeout", timedelta(seconds=20))
    pipe = dualpipe_fx.compile(model, loss_fn, (x[:mb],), y[:mb], schedule=schedule,
                               num_microbatches=num_microbatches, **kw)
    return pipe, x, y


def _loss(pipe, x, y):
    loss = pipe.step(x, target=y)
    return None if loss is None else loss.item()


def disagreements(rank, world):
    """Ranks that call compile() differently: every rank raises the same ValueError at once."""
    cases = {
        "seed": lambda: _compile(rank, seed=rank),
        "num_microbatches": lambda: _compile(rank, num_microbatches=4 * (rank + 1)),
        "schedule": lambda: _compile(rank, schedule="dualpipev" if rank == 0 else "1f1b"),
        "example_shape": lambda: _compile(rank, batch_mb=2 if rank == 0 else 1),
        "int_timeout": lambda: _loss(*_compile(rank, timeout=20)),
        "bad_timeout": lambda: _compile(rank, timeout="20s"),
    }
    return {name: _outcome(fn) for name, fn in cases.items()}
