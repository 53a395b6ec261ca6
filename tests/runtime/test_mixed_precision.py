"""Mixed precision (compile(mixed_precision=MixedPrecisionPolicy(bf16, fp32))) on 4 gloo ranks.

One spawned job: PP=2 x dp_mode="shard" (pipeline rows [0, 1], [2, 3]; data-parallel
columns [0, 2], [1, 3]), and in the same processes PP alone (each row its own 2-rank
pipeline, no dp_group), in fp32 and in bf16.

Reference (both cases): FSDP2's ``fully_shard(model, mp_policy=policy)`` on the unsplit model
in one process (a 1-rank group on rank 0), one backward over the global batch. The pipelined
step equals it within bf16 tolerance in loss and grads; the activations crossing a cut are
bf16; ``.grad`` and the parameters the optimizer steps on are fp32; the grads are reduced over
dp_group in fp32 (``reduce_dtype``); the memory plan's activations halve.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy

import dualpipe_fx
from tests.runtime import cases
from tests.runtime.dist_harness import run_ranks

PP, DP, C, STEPS = 2, 2, 4, 2
POLICY = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _fsdp2_reference(x, y, solo) -> dict:
    """One process, FSDP2 with ``POLICY`` on the unsplit model: losses, first grads (fp32) and dtypes."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    model, loss_fn, _, _ = cases.make_case("tied", C * DP)
    fully_shard(model, mesh=DeviceMesh.from_group(solo, "cpu"), mp_policy=POLICY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, grads = [], {}
    for step in range(STEPS):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            grads = {n: _full(p.grad) for n, p in model.named_parameters()}
        opt.step()
    return {"losses": losses, "grads": grads}


def _spy(pipe, sent: set, reduced: set) -> None:
    """Record the dtypes of the activations each stage hands on, and of the dp reductions."""
    for stage in pipe.stages.values():
        def run_forward(mb, keep_saved=True, stage=stage, run=stage.run_forward):
            outputs = run(mb, keep_saved)
            if not stage.is_chain_last:
                sent.update(str(t.dtype) for t in outputs if t.is_floating_point())
            return outputs
        stage.run_forward = run_forward
    dp = pipe._data_parallel
    if dp is not None and dp.group is not None:
        def reduce(layouts, over, run=dp._reduce):
            run(layouts, over)
            reduced.add(str(dp._reducing[-1].flat.dtype))
        dp._reduce = reduce


def _train(pipe, xs, ys) -> dict:
    sent, reduced = set(), set()
    _spy(pipe, sent, reduced)
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-2)
    losses, grads = [], {}
    for step in range(STEPS):
        opt.zero_grad()
        loss = pipe.step(xs, target=ys)
        losses.append(None if loss is None else loss.item())
        if step == 0:
            grads = {n: _full(p.grad) for n, p in pipe.named_parameters()}
            grad_dtypes = {str(p.grad.dtype) for p in pipe.parameters()}
        opt.step()
    return {"losses": losses, "grads": grads, "sent": sent, "reduced": reduced, "grad dtypes": grad_dtypes,
            "param dtypes": {str(p.dtype) for p in pipe.parameters()}}


def _all_cases(rank: int, world: int) -> dict:
    rows = [dist.new_group(list(range(r * PP, (r + 1) * PP))) for r in range(world // PP)]
    cols = [dist.new_group(list(range(i, world, PP))) for i in range(PP)]
    solo = dist.new_group([0])  # the reference's one process (every rank takes part in new_group)
    pp_group, dp_group, replica = rows[rank // PP], cols[rank % PP], rank // PP
    model, loss_fn, x, y = cases.make_case("tied", C * DP)  # the global batch
    out = {"reference": _fsdp2_reference(x, y, solo) if rank == 0 else None}
    local = x.shape[0] // DP
    xs, ys = x[replica * local:(replica + 1) * local], y[replica * local:(replica + 1) * local]
    mb = local // C
    pipe = dualpipe_fx.compile(model, loss_fn, (xs[:mb],), ys[:mb], num_microbatches=C, group=pp_group,
                               parallelism=dualpipe_fx.Parallelism(dp_group, "shard"), mixed_precision=POLICY)
    with pipe.full_parameters():  # gathered in fp32 and written back: the shards keep their values
        pass
    out["pp x shard"] = _train(pipe, xs, ys)
    # PP alone on the global batch (each row its own pipeline), fp32 then bf16
    plans = {}
    for name, policy in (("pp fp32", None), ("pp bf16", POLICY)):
        model, loss_fn, x, y = cases.make_case("tied", C * DP)
        pipe = dualpipe_fx.compile(model, loss_fn, (x[:DP],), y[:DP], num_microbatches=C * DP // DP,
                                   group=pp_group, mixed_precision=policy)
        plans[name] = pipe.memory_plan().ranks[0]
        if policy is not None:
            out[name] = _train(pipe, x, y)
    out["activations"] = {k: (p.activations, p.peak_activations) for k, p in plans.items()}
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_all_cases, PP * DP, timeout=400)


def _loss(results, name, step, ranks):
    return next(results[r][name]["losses"][step] for r in ranks if results[r][name]["losses"][step] is not None)


@pytest.mark.parametrize("name", ["pp x shard", "pp bf16"])
def test_bf16_pipeline_equals_fsdp2_with_the_same_policy(results, name):
    ref = results[0]["reference"]
    for step in range(STEPS):
        if name == "pp x shard":  # the mean of the replicas' losses
            loss = sum(_loss(results, name, step, range(d * PP, (d + 1) * PP)) for d in range(DP)) / DP
        else:
            loss = _loss(results, name, step, range(PP))
        assert loss == pytest.approx(ref["losses"][step], rel=1e-2), (name, step, loss, ref["losses"])
    seen = set()
    for rank, r in enumerate(results):
        for n, g in r[name]["grads"].items():
            scale = ref["grads"][n].abs().max().item()
            torch.testing.assert_close(g, ref["grads"][n], rtol=0.05, atol=0.01 * scale,
                                       msg=lambda m: f"rank {rank} {name} grad {n}: {m}")
            seen.add(n)
    assert seen == set(ref["grads"])


@pytest.mark.parametrize("name", ["pp x shard", "pp bf16"])
def test_cut_activations_are_bf16_and_the_optimizer_sees_fp32(results, name):
    for r in results:
        got = r[name]
        assert got["sent"] == {"torch.bfloat16"}, got["sent"]
        assert got["grad dtypes"] == got["param dtypes"] == {"torch.float32"}, got
    assert all(r["pp x shard"]["reduced"] == {"torch.float32"} for r in results)  # reduce_dtype


def test_memory_plan_counts_bf16_activations(results):
    for r in results:
        fp32, bf16 = r["activations"]["pp fp32"], r["activations"]["pp bf16"]
        for a, b in zip(fp32, bf16):
            assert 0.4 * a <= b <= 0.6 * a, (fp32, bf16)
