"""Rank functions for the runtime tests (top level, so spawned ranks can import them).

Each returns plain data (losses, grads, messages); the tests compare it with the
single-process model on the same batch, computed in the parent.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
from torch import nn

import dualpipe_fx
from dualpipe_fx import examples as ex


class TiedLM(nn.Module):
    """Embedding -> 4 x (Linear + tanh) -> head whose weight IS the embedding's (tied)."""

    def __init__(self, vocab: int = 16, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.emb = nn.Embedding(vocab, dim)
            self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(4))
            self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(h)


def tied_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())


def make_case(kind: str, num_microbatches: int, seed: int = 0):
    """(model, loss_fn, x, y) for a tiny model; the batch holds ``num_microbatches`` micro-batches."""
    if kind == "linear":
        model, loss_fn = ex.LinearGeluStack(depth=8, width=8, seed=seed), ex.mse_loss
        x, y = ex.linear_gelu_batch(8, batch=2 * num_microbatches, seed=1)
    elif kind == "wide":  # weight grads (64 x 64) far larger than any activation (1 x 64)
        model, loss_fn = ex.LinearGeluStack(depth=4, width=64, seed=seed), ex.mse_loss
        x, y = ex.linear_gelu_batch(64, batch=num_microbatches, seed=1)
    elif kind == "llama":
        cfg = ex.LlamaConfig(vocab_size=32, dim=16, n_layers=4, n_heads=2, ffn_hidden=24, max_seq_len=8)
        model, loss_fn = ex.LlamaDecoder(cfg, seed=seed), ex.llama_loss
        x, y = ex.llama_batch(cfg, batch=num_microbatches, seq=4, seed=1)
    elif kind == "tied":
        model, loss_fn = TiedLM(seed=seed), tied_loss
        gen = torch.Generator().manual_seed(1)
        x = torch.randint(0, 16, (num_microbatches, 3), generator=gen)
        y = torch.randint(0, 16, (num_microbatches, 3), generator=gen)
    else:
        raise ValueError(kind)
    return model, loss_fn, x, y


def _compile(kind, schedule, num_microbatches, **kw):
    model, loss_fn, x, y = make_case(kind, num_microbatches)
    mb = x.shape[0] // num_microbatches
    pipe = dualpipe_fx.compile(model, loss_fn, (x[:mb],), y[:mb], schedule=schedule,
                               num_microbatches=num_microbatches, **kw)
    return pipe, x, y


def _grads(pipe) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}


def one_step_per_schedule(rank, world, kind, schedules):
    """For each (schedule, C): the loss and the grads of one step."""
    out = {}
    for schedule, num_microbatches in schedules:
        pipe, x, y = _compile(kind, schedule, num_microbatches)
        loss = pipe.step(x, target=y)
        out[schedule] = {"loss": None if loss is None else loss.item(), "grads": _grads(pipe),
                         "names": [n for n, _ in pipe.named_parameters()]}
    return out


def optimizer_trajectory(rank, world, kind, schedule, num_microbatches, steps=3):
    """Losses and final params of ``steps`` Adam steps on the same batch."""
    pipe, x, y = _compile(kind, schedule, num_microbatches)
    opt = torch.optim.Adam(pipe.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = pipe.step(x, target=y)
        losses.append(None if loss is None else loss.item())
        opt.step()
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in pipe.named_parameters()}}


def checkpoint_and_forward(rank, world, kind, schedule, num_microbatches):
    """state_dict of a trained pipe; a pipe of another seed after load_state_dict; no_grad outputs."""
    pipe, x, y = _compile(kind, schedule, num_microbatches)
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    pipe.step(x, target=y)
    opt.step()
    state = pipe.state_dict()
    model2, loss_fn, _, _ = make_case(kind, num_microbatches, seed=7)
    mb = x.shape[0] // num_microbatches
    pipe2 = dualpipe_fx.compile(model2, loss_fn, (x[:mb],), y[:mb], schedule=schedule,
                                num_microbatches=num_microbatches)
    before = pipe2.state_dict()
    key = sorted(state)[-1]
    bad = {**state, key: torch.zeros(*state[key].shape, 3)}  # one entry of the wrong shape
    shape_error = _expect_value_error(lambda: pipe2.load_state_dict(bad))
    untouched = all(torch.equal(before[k], v) for k, v in pipe2.state_dict().items())
    pipe2.load_state_dict(state)
    with torch.no_grad():
        outputs = pipe2.step(x)
    return {"state": state, "reloaded": pipe2.state_dict(), "outputs": outputs,
            "loss_after_reload": pipe2.step(x, target=y), "shape_error": shape_error, "bad_key": key,
            "bad_shape": (*state[key].shape, 3), "untouched": untouched}


def _expect_value_error(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return "NO ERROR"


def step_errors(rank, world):
    """Each user error of step()/compile() raised on every rank, then a good step still works."""
    model, loss_fn, x, y = make_case("linear", 4)  # kept: the new width's step traces it again
    pipe = dualpipe_fx.compile(model, loss_fn, (x[:2],), y[:2], schedule="dualpipev", num_microbatches=4)
    errors = {
        "indivisible": _expect_value_error(lambda: pipe.step(x[:-1], target=y[:-1])),
        "shape": _expect_value_error(lambda: pipe.step(x, target=torch.cat([y, y[:2]]))),
        "width": _expect_value_error(lambda: pipe.step(torch.zeros(8, 9), target=y)),
        "device": _expect_value_error(lambda: pipe.step(x.to("meta"), target=y.to("meta"))),
        "no_target": _expect_value_error(lambda: pipe.step(x)),
        "few_microbatches": _expect_value_error(lambda: _compile("linear", "dualpipev", world)),
    }
    loss = pipe.step(x, target=y)
    return {"errors": errors, "loss": None if loss is None else loss.item(), "grads": _grads(pipe)}


def world_size_error(rank, world):
    """DualPipe needs an even number of ranks: compile on an odd world must refuse."""
    return _expect_value_error(lambda: _compile("linear", "dualpipe", 4))


def dead_or_hung_peer(rank, world, mode, timeout_s):
    """Rank 1 dies (``exit``) or stalls (``hang``) in its 3rd forward of step 2; rank 0 reports."""
    pipe, x, y = _compile("linear", "dualpipev", 4, timeout=timedelta(seconds=timeout_s))
    pipe.step(x, target=y)
    if rank == 1:
        stage = pipe.stages[1]
        real = stage.run_forward

        def failing(mb, keep_saved=True):
            if mb == 2:
                if mode == "exit":
                    os._exit(3)
                time.sleep(timeout_s * 2)  # well past the survivor's timeout
            return real(mb, keep_saved)

        stage.run_forward = failing
    start = time.monotonic()
    try:
        pipe.step(x, target=y)
    except dualpipe_fx.PeerTimeoutError as err:
        return {"error": str(err), "type": type(err).__name__, "peer": err.peer,
                "seconds": time.monotonic() - start}
    return {"error": None}


def fast_paths_step(rank, world, kind, compile_stages, early_sends, recompute=None):
    """One dualpipev step, counting what the fast paths did: sends started inside F&B
    pairs, in-place grad sums, and (compiled) merged graphs run through torch.compile;
    and the sends still pending after each compute action (a send is waited for and dropped
    at its release point, not at the step's end: ``schedules.release``)."""
    import dualpipe_fx

    pipe, x, y = _compile(kind, "dualpipev", 4, compile_stages=compile_stages,
                          memory=dualpipe_fx.MemoryPolicy(recompute=recompute))
    counts = {"early_sends": 0, "in_place_sums": 0}
    for stage in pipe.stages.values():
        stage.early_sends = early_sends
        early, buffers = stage.send_early, stage.grad_buffers

        def counted_early(kind, mb, index, tensor, early=early, stage=stage):
            early(kind, mb, index, tensor)
            counts["early_sends"] += (kind, mb, index) in stage._sent_early

        def counted_buffers(positions, buffers=buffers):
            got = buffers(positions)
            counts["in_place_sums"] += got is not None
            return got
        stage.send_early, stage.grad_buffers = counted_early, counted_buffers
    pending = _count_pending_sends(pipe)
    dynamo = _dynamo_counts()
    loss = pipe.step(x, target=y)
    first = _dynamo_counts()
    pairs = [p for p in pipe._executor.overlap._graphs.values() if p is not None]
    counts["pairs"] = len(pairs)
    counts["compiled_pairs"] = sum(p.run is not p.gm for p in pairs)
    counts["accumulating_pairs"] = sum("dpfx_accumulated" in p.gm.meta for p in pairs)
    counts["pending_after_step"] = sum(s.pending_sends for s in pipe.stages.values())
    counts["compiled_weights"] = sum(s._run_accumulating_weight not in (None, s._accumulating_weight)
                                     for s in pipe.stages.values())  # accumulating W graphs compiled
    counts["send_hooks"] = sum(bool(n.meta.get("dpfx_send")) for p in pairs for n in p.gm.graph.nodes)
    out = {"dualpipev": {"loss": None if loss is None else loss.item(), "grads": _grads(pipe),
                         "names": [n for n, _ in pipe.named_parameters()]}, "counts": counts,
           "pending": pending, "released": _released_plan(pipe)}
    if compile_stages:  # a second step: what torch.compile did in a steady state
        pipe.step(x, target=y)
        second = _dynamo_counts()
        out["dynamo"] = {"first": {k: first[k] - dynamo[k] for k in ("graphs", "frames")},
                         "second": {k: second[k] - first[k] for k in ("graphs", "frames")},
                         "breaks": {r: n - dynamo["breaks"].get(r, 0) for r, n in second["breaks"].items()
                                    if n > dynamo["breaks"].get(r, 0)},
                         # the pairs that ran: an I pair, or a B pair's accumulating form (all
                         # of this case's B pairs sum in place; the plain form is only built)
                         "hooks_run": sum(bool(n.meta.get("dpfx_send"))
                                          for (_, _, full, acc), p in pipe._executor.overlap._graphs.items()
                                          if p is not None and (acc or not full) for n in p.gm.graph.nodes)}
    return out


def _dynamo_counts() -> dict:
    """torch.compile's running totals in this process: graphs compiled, frames (a graph
    break's resume is one more) and graph breaks by reason."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "frames": counters["frames"]["total"],
            "breaks": dict(counters["graph_break"])}


def _count_pending_sends(pipe) -> list:
    """``[(action, works pending after it, {(stage, "F"|"B", mb) pending before its release},
    {... after it})]`` for each compute action, filled as the step runs (the executor's
    ``_release_sends`` is wrapped)."""
    executor, seen = pipe._executor, []
    release = executor._release_sends

    def pending():
        return {(s.stage_index, kind, mb) for s in pipe.stages.values() for kind, mb in s._sends}

    def counted(schedule, torch_action):
        before = pending()
        release(schedule, torch_action)
        seen.append((str(torch_action), sum(s.pending_sends for s in pipe.stages.values()), before, pending()))
    executor._release_sends = counted
    return seen


def _released_plan(pipe) -> dict:
    """What ``schedules.release`` says for this rank: ``{action: [(stage, "F"|"B", mb) released after it]}``."""
    return {str(a): list(keys) for a, keys in pipe.schedule.send_release.items()}


def grad_allocations(rank, world, settings):
    """Per ``(name, kind, compile kwargs)`` of ``settings``: one dualpipev step from no grads, and one
    with grads zeroed in place, each under the profiler's allocator events; the loss and grads
    of the first, and for each step the allocations at least as large as this rank's smallest
    weight grad, as ``(bytes, the compute action they happened in)``, plus each stage's first
    action that makes weight grads (W, B or an F&B pair's B)."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    grid = _pp_dp_groups(rank, world) if world > 2 else None
    out = {}
    for name, kind, kw in settings:
        if "dp_mode" in kw:  # 2 pipeline ranks x 2 replicas (each on the same batch: only bytes are compared)
            kw = {k: v for k, v in kw.items() if k != "dp_mode"}
            kw.update(group=grid[0], parallelism=dualpipe_fx.Parallelism(grid[1], settings_mode(name, settings)))
        pipe, x, y = _compile(kind, "dualpipev", 4, **kw)
        pipe.step(x, target=y)  # warm-up: builds the F&B pairs' graphs
        executor, timed = pipe._executor, pipe._executor._timed

        def named(action, fn, *args, timed=timed):
            with record_function(f"action {action}"):
                return timed(action, fn, *args)
        executor._timed = named
        smallest = min(p.numel() * p.element_size() for p in pipe.parameters() if p.dim() == 2)
        steps = {}
        for step, set_to_none in (("fresh", True), ("zeroed", False)):
            pipe.zero_grad(set_to_none=set_to_none)
            dist.barrier()
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                loss = pipe.step(x, target=y)
            dist.barrier()
            events = prof.profiler.kineto_results.events()
            actions = [(e.start_ns(), e.end_ns(), e.name()[len("action "):]) for e in events
                       if e.name().startswith("action ")]
            big = [(e.nbytes(), [a for s, t, a in actions if s <= e.start_ns() <= t])
                   for e in events if e.name() == "[memory]" and e.nbytes() >= smallest]
            steps[step] = {"big": big, "order": [a for _, _, a in sorted(actions)],
                           "loss": None if loss is None else loss.item(), "grads": {} if grid else _grads(pipe)}
        out[name] = {"steps": steps, "stages": sorted(pipe.stages),
                     "weights": sorted(p.numel() * p.element_size() for p in pipe.parameters() if p.dim() == 2)}
    return out


def settings_mode(name, settings) -> str:
    """The ``dp_mode`` of the setting called ``name``."""
    return next(kw["dp_mode"] for n, _, kw in settings if n == name)


def _pp_dp_groups(rank, world, pp=2):
    """This rank's (pipeline group, data-parallel group): rows [0, 1], [2, 3]; columns [0, 2], [1, 3]."""
    import torch.distributed as dist

    rows = [dist.new_group(list(range(r * pp, (r + 1) * pp))) for r in range(world // pp)]
    cols = [dist.new_group(list(range(i, world, pp))) for i in range(pp)]
    return rows[rank // pp], cols[rank % pp]
