"""MoE under DualPipeV / DualPipe with overlapped F&B pairs (and expert parallelism) == one process.

Every FB action runs as one multiplexed graph (``runtime/overlap.OverlapRunner``). The
ranks' loss and grads must equal the unsplit model's on the same (whole) batch:
- 2 pipeline ranks, experts local (dualpipev and dualpipe);
- 2 pipeline ranks x 2 expert ranks = 4 processes: each EP rank routes its own half of
  the batch, experts sharded over the EP group with all_to_all inside the stage graphs.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import dualpipe_fx
from dualpipe_fx.examples.moe import MoEConfig, MoEDecoder, expert_shard, is_expert_param, moe_batch, moe_loss
from dualpipe_fx.runtime.overlap import OverlapRunner
from tests.runtime.dist_harness import run_ranks

CFG = MoEConfig(vocab_size=32, dim=16, n_layers=4, n_heads=2, n_experts=4, top_k=2, expert_hidden=24)
C = 4     # micro-batches per step (>= 2 x pipeline ranks)
SEQ = 4


def _step(model, x, y, schedule, group):
    pipe = dualpipe_fx.compile(model, moe_loss, (x[:x.shape[0] // C],), y[:y.shape[0] // C],
                               schedule=schedule, num_microbatches=C, group=group)
    runner = pipe._executor.overlap
    assert isinstance(runner, OverlapRunner), f"FB actions run by {runner}, not the multiplexed graph"
    loss = pipe.step(x, target=y)
    multiplexed = sum(gm is not None for gm in runner._graphs.values())
    return pipe, loss, multiplexed


def pipeline_only(rank, world):
    """2 pipeline ranks, no expert parallelism: dualpipev then dualpipe."""
    x, y = moe_batch(CFG, C, SEQ, seed=3)
    out = {}
    for schedule in ("dualpipev", "dualpipe"):
        pipe, loss, multiplexed = _step(MoEDecoder(CFG, seed=1), x, y, schedule, None)
        out[schedule] = {"loss": loss, "multiplexed": multiplexed,
                         "grads": {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}}
    return out


def pipeline_x_expert(rank, world):
    """Rank = 2 * pp_rank + ep_rank; EP (= data-parallel) groups {0,1}, {2,3}; pipeline groups
    {0,2}, {1,3}. compile(expert_parallel=...) averages the non-expert grads over the EP group
    and divides the expert grads (summed over its losses by the reverse all_to_all): first
    with replicated non-expert parameters, then sharded (ZeRO-3, DTensors), two steps each."""
    from torch.distributed.tensor import DTensor

    pp_rank, ep_rank = divmod(rank, 2)
    ep_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    ep_group, pp_group = ep_groups[pp_rank], pp_groups[ep_rank]
    x, y = moe_batch(CFG, 2 * C, SEQ, seed=5)
    mine = slice(ep_rank * C, (ep_rank + 1) * C)  # this EP rank's half of the batch
    out = {"ep_rank": ep_rank, "refused": []}
    for bad in ({"dp_group": None}, {"dp_group": ep_group, "replica_group": pp_group}):  # local checks, no comm
        try:
            dualpipe_fx.compile(MoEDecoder(CFG, seed=2, group=ep_group), moe_loss, (x[:1],), y[:1],
                                num_microbatches=C, group=pp_group, parallelism=dualpipe_fx.Parallelism(
                                    dp_group=bad["dp_group"], expert_parallel=dualpipe_fx.ExpertParallel(
                                        ep_group, is_expert_param, bad.get("replica_group"))))
        except ValueError as err:
            out["refused"].append(str(err))
    for mode in ("replicate", "shard"):
        model = MoEDecoder(CFG, seed=2, group=ep_group)
        experts = dualpipe_fx.ExpertParallel(ep_group, is_expert_param)
        pipe = dualpipe_fx.compile(model, moe_loss, (x[mine][:1],), y[mine][:1], schedule="dualpipev",
                                   num_microbatches=C, group=pp_group,
                                   parallelism=dualpipe_fx.Parallelism(ep_group, mode, experts))
        runner = pipe._executor.overlap
        assert isinstance(runner, OverlapRunner), f"FB actions run by {runner}, not the multiplexed graph"
        params = dict(pipe.named_parameters())
        placements = {n: (type(p).__name__, repr(p.placements[0]) if isinstance(p, DTensor) else None,
                          tuple(p.shape)) for n, p in params.items()}
        for _ in range(2):  # the second step accumulates onto the first
            loss = pipe.step(x[mine], target=y[mine])
        if loss is not None:  # the EP group's mean of its ranks' losses
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=ep_group)
            loss /= 2

        def local(g):  # the expert slice this rank holds, or the whole non-expert grad
            if isinstance(g, DTensor):
                return g.to_local() if g.device_mesh.mesh_dim_names == ("ep",) else g.full_tensor()
            return g

        out[mode] = {"loss": loss, "placements": placements,
                     "multiplexed": sum(gm is not None for gm in runner._graphs.values()),
                     "grads": {n: local(p.grad) / 2 for n, p in params.items() if p.grad is not None}}
    out["replicas"] = _ep_with_replicas(rank, x, y, local)
    return out


def _ep_with_replicas(rank, x, y, local):
    """The same 4 processes as one pipeline rank each (DualPipeV's two stages on one rank), all
    4 data-parallel: EP groups {0,1}, {2,3}, the expert slices' replica groups {0,2}, {1,3}.
    Each rank steps on its quarter of the batch; grads equal one process on the whole batch."""
    ep_group, _ = dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])
    replicas, _ = dist.new_subgroups_by_enumeration([[0, 2], [1, 3]])
    alone, _ = dist.new_subgroups_by_enumeration([[0], [1], [2], [3]])
    quarter = slice(rank * C // 2, (rank + 1) * C // 2)
    pipe = dualpipe_fx.compile(MoEDecoder(CFG, seed=2, group=ep_group), moe_loss, (x[quarter][:1],),
                               y[quarter][:1], num_microbatches=C // 2, group=alone,
                               parallelism=dualpipe_fx.Parallelism(dist.group.WORLD, "shard", dualpipe_fx.ExpertParallel(
                                   ep_group, is_expert_param, replicas)))
    loss = pipe.step(x[quarter], target=y[quarter]).detach().clone()
    dist.all_reduce(loss)
    return {"loss": loss / 4, "multiplexed": 1, "ep_rank": rank % 2,
            "grads": {n: local(p.grad) for n, p in pipe.named_parameters() if p.grad is not None}}


def _reference(seed, x, y):
    model = MoEDecoder(CFG, seed=seed)
    loss = moe_loss(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _check(results, ref_loss, ref_grads, ep_size):
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert losses, "no rank returned a loss"
    for loss in losses:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    seen = set()
    for r in results:
        assert r["multiplexed"] > 0, "no FB pair ran as a multiplexed graph"
        for name, grad in r["grads"].items():
            expect = expert_shard(name, ref_grads[name], r.get("ep_rank", 0), ep_size)
            torch.testing.assert_close(grad, expect, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
            seen.add(name)
    assert seen == set(ref_grads), sorted(set(ref_grads) - seen)


@pytest.mark.timeout(600)
def test_moe_dualpipev_and_dualpipe_with_multiplexed_pairs_equal_one_process():
    results = run_ranks(pipeline_only, 2, timeout=500)
    x, y = moe_batch(CFG, C, SEQ, seed=3)
    ref_loss, ref_grads = _reference(1, x, y)
    for schedule in ("dualpipev", "dualpipe"):
        _check([r[schedule] for r in results], ref_loss, ref_grads, 1)


@pytest.mark.timeout(600)
def test_moe_dualpipev_times_expert_parallel_4_processes_equal_one_process():
    results = run_ranks(pipeline_x_expert, 4, timeout=500)
    x, y = moe_batch(CFG, 2 * C, SEQ, seed=5)
    ref_loss, ref_grads = _reference(2, x, y)
    for mode in ("replicate", "shard"):
        _check([{**r[mode], "ep_rank": r["ep_rank"]} for r in results], ref_loss, ref_grads, 2)
    _check([r["replicas"] for r in results], ref_loss, ref_grads, 2)
    for r in results:
        assert len(r["refused"]) == 2, r["refused"]
        assert "needs dp_group" in r["refused"][0] and "lie within dp_group" in r["refused"][1], r["refused"]
    for r in results:  # expert slices: global shapes on the "ep" mesh when sharded; local ones replicated
        w1 = next(n for n in r["shard"]["placements"] if n.endswith("moe.w1"))
        assert r["shard"]["placements"][w1] == ("DTensor", "Shard(dim=0)", (CFG.n_experts, CFG.dim, CFG.expert_hidden))
        assert r["replicate"]["placements"][w1][2] == (CFG.n_experts // 2, CFG.dim, CFG.expert_hidden)


def test_run_overlapped_equals_f_then_b_and_reports_each_sent_value_once():
    from dualpipe_fx.runtime.overlap import run_overlapped
    from dualpipe_fx.api.split import split

    model = MoEDecoder(CFG, seed=4)
    x, y = moe_batch(CFG, 2, SEQ, seed=6)
    sg = split(model, moe_loss, (x[:1],), y[:1], num_stages=2).stages
    named = dict(model.named_parameters())
    params = [[named[n].detach() for n in s.param_names] for s in sg]
    outs, _ = sg[0].forward(params[0], [x[:1]])
    _, saved1 = sg[1].forward(params[1], list(outs) + [y[:1]])
    ready = []
    (f_out, f_saved), (grad_in, param_grads) = run_overlapped(
        sg[0], (params[0], [x[1:]]), sg[1], (saved1, (torch.ones(()),)),
        on_ready=lambda kind, i, t: ready.append((kind, i, t)))
    ref_out, ref_saved = sg[0].forward(params[0], [x[1:]])
    ref_grad_in, saved_w = sg[1].backward_input(saved1, (torch.ones(()),))
    for got, want in zip((f_out, f_saved, grad_in, param_grads),
                         (ref_out, ref_saved, ref_grad_in, sg[1].backward_weight(saved_w))):
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert sorted((k, i) for k, i, _ in ready) == [("B", i) for i in range(len(grad_in))] + [
        ("F", i) for i in range(len(f_out))]
