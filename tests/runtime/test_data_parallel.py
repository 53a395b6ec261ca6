"""Data parallelism (compile(dp_group=, dp_mode=)) on 4 gloo ranks, 2 PP x 2 DP:
pipelined + data-parallel training == single-process training on the global batch.

One spawned 4-rank group runs every case (``_all_cases``): for each schedule and mode, 3
optimizer steps where replica ``d`` steps on its half of the global batch. The parent
replays the same steps on the unsplit model with the whole batch and compares each step's
loss (the mean of the replicas' losses), the first step's full grads (DTensor shards
gathered with ``full_tensor()``) and the final parameters. The validation errors (a
dp_group that is no grid column, an unknown mode) are raised before any communication.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

import pytest
import torch
import torch.distributed as dist

import dualpipe_fx
from tests.runtime import cases
from tests.runtime.dist_harness import run_ranks

PP, DP, STEPS = 2, 2, 3
# (model kind, schedule, C, mode, optimizer): tied 1f1b shares the embedding across the two
# pipeline ranks; dualpipe mirrors every part on two pipeline ranks; dualpipev holds the tied
# embedding and head on one rank (two local stages read it)
CASES = [
    ("linear", "dualpipev", 4, "replicate", "sgd"),
    ("linear", "1f1b", 4, "replicate", "sgd"),
    ("linear", "dualpipev", 4, "shard", "adamw"),
    ("linear", "1f1b", 4, "shard", "sgd"),
    ("linear", "dualpipev", 4, "shard_grad_op", "sgd"),
    ("tied", "1f1b", 4, "shard", "sgd"),
    ("tied", "dualpipev", 4, "replicate", "adamw"),
    ("tied", "dualpipe", 4, "replicate", "sgd"),
    ("tied", "dualpipe", 4, "shard", "sgd"),
    # compile(schedule="auto") with a dp_group: the search counts the replicas (shard: the kept
    # bytes / dp, the gathers and reductions), and every replica builds the first one's pick
    ("linear", "auto", 4, "shard", "sgd"),
]


def _optimizer(kind: str, params):
    params = list(params)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _errors(rank: int, pp_group, dp_group) -> dict[str, str]:
    """The validation errors, each raised before any communication."""
    model, loss_fn, x, y = cases.make_case("linear", 4)
    out = {}
    for what, kwargs in (("shares ranks", {"dp_group": pp_group}), ("mode", {"dp_group": dp_group, "dp_mode": "zero"})):
        try:
            dualpipe_fx.compile(model, loss_fn, (x[:2],), y[:2], num_microbatches=4, group=pp_group,
                                parallelism=dualpipe_fx.Parallelism(**kwargs))
        except ValueError as err:
            out[what] = str(err)
    # the 0.1 keywords still reach the same checks, with a FutureWarning naming the new spelling
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dualpipe_fx.compile(model, loss_fn, (x[:2],), y[:2], num_microbatches=4, group=pp_group,
                                dp_group=dp_group, dp_mode="zero")
        except ValueError as err:
            out["0.1 keywords"] = str(err)
    out["0.1 warnings"] = [str(w.message) for w in caught if w.category is FutureWarning]
    return out


def _all_cases(rank: int, world: int):
    groups = {}
    for r in range(world // PP):  # pipeline rows [0, 1], [2, 3]; data-parallel columns [0, 2], [1, 3]
        groups[("pp", r)] = dist.new_group(list(range(r * PP, (r + 1) * PP)))
    for i in range(PP):
        groups[("dp", i)] = dist.new_group(list(range(i, world, PP)))
    pp_group, dp_group = groups[("pp", rank // PP)], groups[("dp", rank % PP)]
    replica = rank // PP
    results = {"errors": _errors(rank, pp_group, dp_group)}
    for kind, schedule, c, mode, opt_kind in CASES:
        model, loss_fn, x, y = cases.make_case(kind, c * DP)  # the global batch
        local = x.shape[0] // DP
        xs, ys = x[replica * local:(replica + 1) * local], y[replica * local:(replica + 1) * local]
        mb = local // c
        # "auto": recompute given, so that the search ranks the schedules alone (fewer candidates)
        memory = dualpipe_fx.MemoryPolicy(recompute="full" if schedule == "auto" else None)
        with _logged("dualpipe_fx.api.autoplan") as log:
            pipe = dualpipe_fx.compile(model, loss_fn, (xs[:mb],), ys[:mb], schedule=schedule, num_microbatches=c,
                                       group=pp_group, parallelism=dualpipe_fx.Parallelism(dp_group, mode),
                                       memory=memory)
        opt = _optimizer(opt_kind, pipe.parameters())
        losses, grads = [], {}
        for step in range(STEPS):
            opt.zero_grad()
            loss = pipe.step(xs, target=ys)
            losses.append(None if loss is None else loss.item())
            grads[step] = {n: _full(p.grad) for n, p in pipe.named_parameters() if p.grad is not None}
            opt.step()
        params = {n: _full(p) for n, p in pipe.named_parameters()}
        state = {k: _full(v) for k, v in pipe.state_dict().items()}
        gathered = [p for st in pipe.stages.values() for p in st.params[: st.num_params]]
        memory = {"gathered bytes": sum(p.untyped_storage().nbytes() for p in gathered),
                  "full bytes": sum(p.numel() * p.element_size() for p in gathered),
                  "local numel": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                     for p in pipe.parameters()),
                  "numel": sum(p.numel() for p in pipe.parameters())}
        results[(kind, schedule, mode)] = {"losses": losses, "grads": grads, "params": params, "state": state,
                                           "memory": memory, "picked": pipe.program.name, "log": log}
    results["replica failure"] = _replica_failure(rank, pp_group, dp_group)
    return results


@contextlib.contextmanager
def _logged(name: str):
    """The messages logger ``name`` emits inside the block."""
    messages, logger = [], logging.getLogger(name)

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _replica_failure(rank: int, pp_group, dp_group) -> dict:
    """Replica 1 alone gets a bad batch: every rank of both replicas raises its ValueError at
    once (the replicas vote too; replica 0's step would otherwise wait on replica 1 in its
    dp_group collectives), then a good step runs on all four."""
    import time

    model, loss_fn, x, y = cases.make_case("linear", 4 * DP)
    xs, ys = x[:8], y[:8]
    pipe = dualpipe_fx.compile(model, loss_fn, (xs[:2],), ys[:2], num_microbatches=4, group=pp_group,
                               parallelism=dualpipe_fx.Parallelism(dp_group, "replicate"), timeout=60)
    start, error = time.perf_counter(), None
    try:
        pipe.step(xs[:7] if rank // PP == 1 else xs, target=ys[:7] if rank // PP == 1 else ys)
    except ValueError as err:
        error = str(err)
    seconds = time.perf_counter() - start
    new_shape = None  # a batch of new shapes on one replica: refused on every rank (no replica builds alone)
    try:
        pipe.step(x[:16] if rank // PP == 1 else xs, target=y[:16] if rank // PP == 1 else ys)
    except ValueError as err:
        new_shape = str(err)
    loss = pipe.step(xs, target=ys)
    grads = {n: _full(p.grad) for n, p in pipe.named_parameters() if p.grad is not None}
    return {"error": error, "seconds": seconds, "loss": None if loss is None else loss.item(), "grads": grads,
            "new shape": new_shape}


def _reference(kind: str, c: int, opt_kind: str):
    model, loss_fn, x, y = cases.make_case(kind, c * DP)
    opt = _optimizer(opt_kind, model.parameters())
    losses, grads = [], {}
    for step in range(STEPS):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        losses.append(loss.item())
        grads[step] = {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}
        opt.step()
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


@pytest.fixture(scope="module")
def results():
    return run_ranks(_all_cases, PP * DP, timeout=400)


def test_validation_errors_name_the_groups_and_the_modes(results):
    for r in results:
        assert "share ranks" in r["errors"]["shares ranks"] and "grid" in r["errors"]["shares ranks"]
        assert "'shard_grad_op'" in r["errors"]["mode"]
        assert r["errors"]["0.1 keywords"] == r["errors"]["mode"]
        assert sorted(r["errors"]["0.1 warnings"]) == [
            "compile(dp_group=...) is deprecated since dualpipe_fx 0.2 and goes in 0.3; pass "
            "parallelism=dualpipe_fx.Parallelism(dp_group=...) instead",
            "compile(dp_mode=...) is deprecated since dualpipe_fx 0.2 and goes in 0.3; pass "
            "parallelism=dualpipe_fx.Parallelism(dp_mode=...) instead"]


@pytest.mark.parametrize("kind,schedule,c,mode,opt_kind", CASES)
def test_pp2_x_dp2_equals_single_process_on_the_global_batch(results, kind, schedule, c, mode, opt_kind):
    ref_losses, ref_grads, ref_params = _reference(kind, c, opt_kind)
    got = [r[(kind, schedule, mode)] for r in results]
    seen = set()
    for rank, g in enumerate(got):
        for step in range(STEPS):
            for name, grad in g["grads"][step].items():
                torch.testing.assert_close(grad, ref_grads[step][name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"rank {rank} step {step} grad {name}: {m}")
                seen.add(name)
        for name, value in g["params"].items():
            torch.testing.assert_close(value, ref_params[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {rank} param {name} after {STEPS} steps: {m}")
        for name, value in g["state"].items():  # full FQNs; sharded entries gathered whole
            if name in ref_params:
                torch.testing.assert_close(value, ref_params[name], rtol=1e-5, atol=1e-6)
    for step in range(STEPS):
        per_replica = [g["losses"][step] for g in got if g["losses"][step] is not None]
        assert len(per_replica) >= DP, "every replica reports a loss"
        replicas = [got[d * PP:(d + 1) * PP] for d in range(DP)]
        means = [next(g["losses"][step] for g in rep if g["losses"][step] is not None) for rep in replicas]
        assert sum(means) / DP == pytest.approx(ref_losses[step], rel=1e-5), (step, means, ref_losses[step])
    assert seen >= {n for n, _ in cases.make_case(kind, c)[0].named_parameters()}
    # replicas agree bitwise: the same reduced bytes, the same update
    for i in range(PP):
        a, b = got[i]["params"], got[PP + i]["params"]
        assert all(torch.equal(a[n], b[n]) for n in a), f"pipeline rank {i}: replicas differ"


def test_auto_counts_the_replicas_and_every_replica_builds_one_pick(results):
    got = [r[("linear", "auto", "shard")] for r in results]
    assert len({g["picked"] for g in got}) == 1, [g["picked"] for g in got]
    for rank in (0, PP):  # each pipeline's rank 0 logs its ranking: pipelines of 2, 2 replicas sharded
        (table,) = [m for m in got[rank]["log"] if "picked" in m]
        rows = [line.split() for line in table.splitlines() if line.split() and line.split()[0].isdigit()]
        assert rows and all(row[:3] == ["2", "2", "shard"] for row in rows), table


def test_shard_modes_hold_a_shard_and_zero3_frees_the_gathered_parameters(results):
    for r in results:
        for (kind, schedule, mode), got in ((k, v) for k, v in r.items() if isinstance(k, tuple)):
            m = got["memory"]
            if mode == "replicate":
                assert m["local numel"] == m["numel"]
                continue
            assert m["local numel"] <= m["numel"] // DP + 64, (kind, schedule, mode, m)  # rows split in two
            if mode == "shard":  # ZeRO-3: nothing gathered between steps
                assert m["gathered bytes"] == 0, (kind, schedule, mode, m)
            else:  # ZeRO-2: the gathered copies stay
                assert m["gathered bytes"] >= m["full bytes"], (kind, schedule, mode, m)


def test_a_bad_batch_on_one_replica_raises_on_every_rank_at_once(results):
    got = {rank: res["replica failure"] for rank, res in enumerate(results)}
    for rank, res in got.items():
        assert res["error"] is not None and "batch size 7" in res["error"], (rank, res["error"])
        assert res["seconds"] < 20, (rank, res["seconds"])  # a vote, not dp_group's timeout
    assert "data-parallel replica of global rank" in got[0]["error"]  # replica 0 names replica 1's rank
    for rank, res in got.items():
        assert res["new shape"] is not None and "parallelism.dp_group" in res["new shape"], (rank, res["new shape"])
    # the next step runs everywhere, and the replicas' reduced grads are bitwise equal
    for a, b in ((0, 2), (1, 3)):
        assert got[a]["grads"].keys() == got[b]["grads"].keys() and got[a]["grads"]
        for name in got[a]["grads"]:
            assert torch.equal(got[a]["grads"][name], got[b]["grads"][name]), name
