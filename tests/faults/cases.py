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
import dualpipe_fx.examples
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


class _BranchyOn(torch.nn.Module):
    """A linear stack whose forward branches on data when ``branchy``: untraceable on that rank only."""

    def __init__(self, branchy: bool) -> None:
        super().__init__()
        self.stack, self.branchy = dualpipe_fx.examples.LinearGeluStack(depth=8, width=8), branchy

    def forward(self, x):
        if self.branchy and x.sum() > 0:
            return self.stack(x) * 2
        return self.stack(x)


def _one_rank_fails(rank, where: str):
    """compile() of the linear stack where rank 1 alone fails ``where``: its device, its trace
    or its param_init_fn (the model on meta)."""
    model, loss_fn, x, y = make_case("linear", 4)
    kw = {"timeout": timedelta(seconds=20)}
    if where == "device":
        kw["device"] = "meta" if rank == 1 else None
    elif where == "trace":
        model = _BranchyOn(branchy=rank == 1)
    else:
        with torch.device("meta"):
            model = dualpipe_fx.examples.LinearGeluStack(depth=8, width=8)

        def init(module):
            if rank == 1:
                raise RuntimeError(f"injected init failure in {type(module).__name__}")
            module.reset_parameters()
        kw.update(device="cpu", param_init_fn=init)
    return dualpipe_fx.compile(model, loss_fn, (x[:2],), y[:2], num_microbatches=4, **kw)


def disagreements(rank, world):
    """Ranks that call compile() differently: every rank raises the same ValueError at once.
    A compile() that fails on one rank only, after the first agreement, stops every rank."""
    cases = {
        "seed": lambda: _compile(rank, seed=rank),
        "num_microbatches": lambda: _compile(rank, num_microbatches=4 * (rank + 1)),
        "schedule": lambda: _compile(rank, schedule="dualpipev" if rank == 0 else "1f1b"),
        "example_shape": lambda: _compile(rank, batch_mb=2 if rank == 0 else 1),
        "device_one_rank": lambda: _one_rank_fails(rank, "device"),
        "trace_one_rank": lambda: _one_rank_fails(rank, "trace"),
        "init_one_rank": lambda: _one_rank_fails(rank, "init"),
        "int_timeout": lambda: _loss(*_compile(rank, timeout=20)),
        "bad_timeout": lambda: _compile(rank, timeout="20s"),
    }
    return {name: _outcome(fn) for name, fn in cases.items()}


def _grads(pipe) -> dict:
    return {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}


def _good(pipe, x, y) -> dict:
    pipe.zero_grad()
    return {"loss": _loss(pipe, x, y), "grads": _grads(pipe)}


def _fail_once(stage, method: str, mb: int):
    """Make ``stage.<method>`` raise once, for micro-batch ``mb``."""
    real = getattr(stage, method)

    def failing(m, *args, **kwargs):
        if m == mb:
            setattr(stage, method, real)
            raise RuntimeError(f"injected failure in {method}({m})")
        return real(m, *args, **kwargs)
    setattr(stage, method, failing)


def step_failures(rank, world):
    """Steps that fail on one rank: every rank raises the same error, and the next step is clean."""
    out = {}
    pipe, x, y = _compile(rank)
    out["before"] = _good(pipe, x, y)
    bad = x[:-1] if rank == 1 else x
    out["bad_batch_one_rank"] = _outcome(lambda: pipe.step(bad, target=y))
    out["after_bad_batch"] = _good(pipe, x, y)
    if rank == 1:  # stage 1 (rank 1) raises in its backward of micro-batch 1
        _fail_once(pipe.stages[1], "run_backward_input", 1)
    out["backward_raises"] = _outcome(lambda: pipe.step(x, target=y))
    out["grads_after_failure"] = _grads(pipe)
    # the failed step ran on stand-ins to its end: every send waited for, none left holding a tensor
    out["sends_after_failure"] = sum(s.pending_sends for s in pipe.stages.values())
    out["after_backward_raises"] = _good(pipe, x, y)
    nan_x = x.clone()
    nan_x[3, 0] = float("nan")
    out["nan_input"] = _outcome(lambda: _loss(pipe, nan_x, y))
    out["after_nan"] = _good(pipe, x, y)
    tied, tokens, targets = _compile(rank, kind="tied")
    out["tied_before"] = _good(tied, tokens, targets)
    wild = tokens.clone()
    if rank == 0:
        wild[2, 1] = 99  # micro-batch 2: an id past the vocabulary (16) -> IndexError in F0.2
    out["token_out_of_range"] = _outcome(lambda: tied.step(wild, target=targets))
    out["tied_after"] = _good(tied, tokens, targets)
    return out


def lost_peer(rank, world, victim, action_index, signal_name, timeout_s):
    """``victim`` sends itself ``signal_name`` (SIGKILL or SIGSTOP) at its ``action_index``-th
    compute action of step 2; the survivors report what they raised, then what a third step
    raises. A survivor kills a stopped victim, so no process is left behind."""
    import os
    import signal

    import torch.distributed as dist
    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    pipe, x, y = _compile(rank, num_microbatches=2 * world, timeout=timedelta(seconds=timeout_s))
    pipe.step(x, target=y)
    if rank == victim:
        executor, count = pipe._executor, [0]
        real = executor._timed

        def timed(action, fn, *args):
            if count[0] == action_index:
                os.kill(os.getpid(), getattr(signal, signal_name))
            count[0] += 1
            return real(action, fn, *args)
        executor._timed = timed
    out = {"step": _outcome(lambda: pipe.step(x, target=y)), "pid": os.getpid()}
    out["reason"] = None
    if out["step"]["type"] == "PeerTimeoutError":
        out["reason"] = "closed" if "closed the connection" in out["step"]["message"] else "timeout"
    out["next"] = _outcome(lambda: pipe.step(x, target=y))
    if signal_name == "SIGSTOP" and rank == min(r for r in range(world) if r != victim):
        os.kill(pids[victim], signal.SIGKILL)
    return out


def compute_actions(world: int) -> int:
    """How many compute actions each rank runs per dualpipev step with 2·world micro-batches."""
    from dualpipe_fx.schedules import generate
    return min(len(actions) for actions in generate("dualpipev", world, 2 * world).values())
