"""``dualpipe_fx.autoplan`` and ``compile(schedule="auto")``: the search ranks what it can build,
prunes by the memory plan and says why, and the pick trains like one process.

The device and network models (``planning.devices``) are checked as arithmetic: the roofline
takes the larger of compute and memory time, and a probe measures positive figures.
"""
from __future__ import annotations

import pytest
import torch

import dualpipe_fx
from dualpipe_fx import ActivationBudget, MemoryPolicy
from dualpipe_fx.api.autoplan import DEFAULT_SCHEDULES, Plans, autoplan, fit_recompute
from dualpipe_fx.examples import (LinearGeluStack, LlamaConfig, LlamaDecoder, linear_gelu_batch, llama_batch, llama_loss,
                                  mse_loss)
from dualpipe_fx.examples.moe import MoEConfig, MoEDecoder, expert_shard, is_expert_param, moe_batch, moe_loss
from dualpipe_fx.planning.devices import DEVICES, NETWORKS, DeviceModel, node_seconds, probe_device
from tests.runtime import cases
from tests.runtime.dist_harness import run_ranks
from tests.runtime.test_equivalence import check_step

SPACE = {"schedule": ["dualpipev", "1f1b", "gpipe"], "num_microbatches": [2, 4], "recompute": [None, "full"]}


@pytest.fixture(scope="module")
def searched():
    model = LinearGeluStack(depth=4, width=32)
    x, y = linear_gelu_batch(32, batch=8)
    return model, x, y, autoplan(model, mse_loss, (x,), y, world_size=2, pp_degree=2, device="h100", space=SPACE,
                                 top=None)


def test_every_candidate_is_ranked_or_rejected_with_its_reason(searched):
    *_, plans = searched
    assert isinstance(plans, Plans) and plans
    steps = [p.predicted_step_s for p in plans]
    assert steps == sorted(steps) and all(s > 0 for s in steps)
    # dualpipev needs C >= 2N = 4 on 2 ranks: C=2 is rejected, by the schedule's own rule
    rejected = {(r.schedule, r.num_microbatches, r.recompute): r.reason for r in plans.rejected}
    cannot = {k for k, reason in rejected.items() if "C >= 2N" in reason}
    assert cannot == {("dualpipev", 2, None), ("dualpipev", 2, "full")}, rejected
    # an H100 holds it without recompute: "full" is not tried where None fits (it only adds compute)
    assert all(p.recompute is None for p in plans)
    assert {k for k, reason in rejected.items() if reason.startswith("not tried")} == \
        {(p.schedule, p.num_microbatches, "full") for p in plans}
    assert len(plans) + len(rejected) == 3 * 2 * 2
    for plan in plans:
        assert len(plan.memory.ranks) == 2 and plan.peak_bytes > 0
        assert plan.microbatch_size * plan.num_microbatches == 8
        kwargs = plan.compile_kwargs
        assert kwargs["schedule"] == plan.schedule and kwargs["num_microbatches"] == plan.num_microbatches
        assert kwargs["memory"].recompute == plan.recompute
    assert "schedule" in plans.table() and "rejected: pp=2, dualpipev, C=2" in plans.table()
    # top=2 skips the memory plan of what cannot enter the top 2, and returns the same 2
    model, x, y, _ = searched
    best = autoplan(model, mse_loss, (x,), y, world_size=2, pp_degree=2, device="h100", space=SPACE, top=2)
    assert [(p.schedule, p.num_microbatches, p.predicted_step_s) for p in best] == \
        [(p.schedule, p.num_microbatches, p.predicted_step_s) for p in plans[:2]]
    assert any("slower than the top 2 found" in r.reason for r in best.rejected), best.table()


def test_the_memory_budget_prunes_by_the_plan_and_names_the_rank(searched):
    model, x, y, plans = searched
    peaks = sorted({p.peak_bytes for p in plans})
    budget = (peaks[0] + peaks[-1]) // 2
    kept = autoplan(model, mse_loss, (x,), y, world_size=2, pp_degree=2, device="h100", space=SPACE, top=None,
                    memory_budget=budget)
    assert kept and all(p.peak_bytes <= budget for p in kept)
    oom = [r.reason for r in kept.rejected if "out of memory" in r.reason]
    assert oom and all("on rank" in r and "GiB" in r for r in oom), kept.rejected
    with pytest.raises(ValueError, match="no configuration fits on 2 ranks") as err:
        autoplan(model, mse_loss, (x,), y, world_size=2, pp_degree=2, device="h100", space=SPACE, memory_budget=1)
    # pruned before any cut: not even the params, grads and optimizer state fit
    assert "out of memory on every cut" in str(err.value) and "Fix:" in str(err.value)


def test_the_network_and_the_device_change_the_prediction(searched):
    model, x, y, plans = searched
    space = {"schedule": ["1f1b"], "num_microbatches": [4], "recompute": [None]}
    fast, slow = (autoplan(model, mse_loss, (x,), y, world_size=2, device="h100", network=net, space=space)[0]
                  for net in ("nvlink", "ethernet-100g"))
    assert slow.predicted_step_s > fast.predicted_step_s
    a100 = autoplan(model, mse_loss, (x,), y, world_size=2, device="a100", network="nvlink", space=space)[0]
    assert a100.predicted_step_s >= fast.predicted_step_s


def test_the_runtime_costs_each_action_and_each_transfer_it_posts():
    """An action costs the device's per-action overhead plus one per-transfer overhead for each
    receive or send across ranks; a merged F&B pair is one action with both parts' transfers."""
    from dualpipe_fx.api.autoplan import _Pipeline, stage_costs
    from dualpipe_fx.schedules.registry import generate

    def costs_of(program):  # no kernels: only the runtime's costs remain
        pipe = _Pipeline(program, {k: (0.0, 0.0, 0.0) for k in range(program.num_model_parts)}, 0, {}, {},
                         lambda: None)
        return stage_costs(pipe, device, NETWORKS["nvlink"])

    device = DeviceModel("runtime only", {"float32": 1.0}, 1.0, 0, action_overhead_s=1.0, p2p_overhead_s=10.0)
    program = generate("dualpipev", 2, 4)  # stages 0, 3 on rank 0 and 1, 2 on rank 1
    costs = costs_of(program)
    crossing = {("F", 0): 1, ("F", 1): 1, ("F", 2): 1, ("F", 3): 1, ("I", 0): 1, ("I", 3): 1, ("B", 0): 1,
                ("I", 1): 1, ("I", 2): 1, ("B", 1): 1, ("B", 2): 1, ("B", 3): 1, ("W", 0): 0, ("W", 1): 0,
                ("W", 2): 0, ("W", 3): 0}
    seen = set()
    for action in (a for actions in program.values() for a in actions):
        seen.add(action.kind)
        assert costs.of(action) == 1.0 + 10.0 * sum(crossing[(p.kind, p.stage)] for p in action.parts()), action
    assert "FB" in seen and "W" in seen
    one_rank = generate("1f1b", 2, 4)
    assert {costs_of(one_rank).of(a) for a in one_rank[0]} == {11.0}
    # and each step its votes: an all_reduce of a flag per vote, over the pipeline's ranks
    from dualpipe_fx.api.autoplan import STEP_VOTES, vote_seconds
    net = NETWORKS["ib-400g"]
    assert vote_seconds(1, net) == 0.0
    assert vote_seconds(4, net) == pytest.approx(STEP_VOTES * 2 * (0.75 * 8 / net.bandwidth + 3 * net.latency_s))


@pytest.mark.parametrize("kwargs,match", [
    ({"pp_degree": 3}, r"pipeline degrees \[3\] do not divide world_size=2"),
    ({"space": {"dp_mode": ["zero9"]}}, "dp_mode"),
    ({"space": {"schedules": ["1f1b"]}}, "space has keys"),
    ({"space": {"schedule": ["nope"]}}, "unknown schedules"),
    ({"device": "tpu9"}, "unknown device 'tpu9'"),
    ({"network": "carrier-pigeon"}, "unknown network"),
])
def test_bad_arguments_name_the_problem(searched, kwargs, match):
    model, x, y, _ = searched
    with pytest.raises(ValueError, match=match):
        autoplan(model, mse_loss, (x,), y, **{"world_size": 2, "device": "h100", **kwargs})


def test_the_ranks_beside_the_pipeline_are_data_parallel_replicas(searched):
    """4 ranks: pipelines of 1, 2 and 4 ranks, the rest replicas (``replicate`` or ``shard``),
    each fed its share of the batch. A replica's ranks hold what the pipeline's do (shard: the
    optimizer state and the kept params and grads / dp), and its step waits for the reductions."""
    model, x, y, _ = searched
    space = {"schedule": ["1f1b"], "recompute": [None], "num_microbatches": [2]}
    plans = autoplan(model, mse_loss, (x,), y, world_size=4, device="h100", network="ethernet-100g", space=space,
                     top=None)
    got = {(p.pp_degree, p.dp_degree, p.dp_mode): p for p in plans}
    assert set(got) == {(1, 4, "replicate"), (1, 4, "shard"), (2, 2, "replicate"), (2, 2, "shard")}, plans.table()
    assert [(r.pp_degree, r.dp_degree) for r in plans.rejected if "C >= N" in r.reason] == [(4, 1)]
    alone = autoplan(model, mse_loss, (x[:4],), y[:4], world_size=2, pp_degree=2, device="h100",
                     network="ethernet-100g", space=space)[0]  # one replica's pipeline, its half of the batch
    for mode in ("replicate", "shard"):
        plan = got[2, 2, mode]
        assert plan.microbatch_size == 2 and plan.predicted_step_s > alone.predicted_step_s
        for mine, one in zip(plan.memory.ranks, alone.memory.ranks):
            kept = mine.params + mine.grads + mine.optimizer
            assert (kept < one.params + one.grads + one.optimizer) == (mode == "shard"), (mode, mine, one)
    kwargs = got[2, 2, "shard"].compile_kwargs
    assert kwargs["schedule"] == "1f1b" and "parallelism" not in kwargs  # build_kwargs() makes the groups
    assert "2 shard" in plans.table() and "rejected: pp=4, 1f1b, C=2" in plans.table()
    # 8 ranks and a batch of 4: no 8 replicas of one rank each (and nothing else fits C=2 here)
    with pytest.raises(ValueError, match="the batch of 4 does not split into 8 data-parallel replicas"):
        autoplan(model, mse_loss, (x[:4],), y[:4], world_size=8, device="h100", space=space)


def test_data_parallel_bytes_and_waits_follow_the_mode():
    """``planning.data_parallel``: per mode, what a rank keeps (P, G, O over dp in the shard
    modes; ZeRO-2 keeps the gathered P too) and adds during the step; ring collective times."""
    from dualpipe_fx.planning.data_parallel import exposed_seconds, replicated
    from dualpipe_fx.planning.memory import MemoryPlan, RankMemory

    rank = RankMemory(rank=0, stages=(0, 3), params=800, grads=800, optimizer=1600, activations=10,
                      recv_buffers=0, send_buffers=0, kept_outputs=0, intermediates=0, peak_action="W0",
                      step_increase=0, peak_activations=10)
    plan = MemoryPlan(ranks=(rank,), schedule="dualpipev", num_microbatches=4, optimizer="adamw")
    kept = {mode: [(r.params, r.grads, r.optimizer, r.intermediates) for r in replicated(plan, 4, mode).ranks][0]
            for mode in ("replicate", "shard", "shard_grad_op")}
    assert kept == {"replicate": (800, 800, 1600, 400), "shard": (200, 200, 400, 1600),
                    "shard_grad_op": (1000, 200, 400, 800)}
    assert replicated(plan, 1, "shard") is plan and exposed_seconds(plan, 1, "shard", NETWORKS["nvlink"]) == 0
    net = NETWORKS["ib-400g"]
    stage = 400  # one of the rank's two stages
    assert exposed_seconds(plan, 4, "replicate", net) == pytest.approx(2 * (0.75 * stage / net.bandwidth
                                                                             + 3 * net.latency_s))
    assert exposed_seconds(plan, 8, "replicate", net) > exposed_seconds(plan, 2, "replicate", net)
    with pytest.raises(ValueError, match="dp_mode='zero9'"):
        replicated(plan, 2, "zero9")


MOE = MoEConfig(vocab_size=32, dim=16, n_layers=4, n_heads=2, n_experts=4, top_k=2, expert_hidden=24)
MOE_SPACE = {"schedule": ["dualpipev", "1f1b"], "num_microbatches": [4], "recompute": [None], "pp_degree": [2],
             "dp_mode": ["replicate"]}


@pytest.fixture(scope="module")
def moe_plans():
    """The small MoE on 4 ranks: pipelines of 2, 2 data-parallel replicas, the experts split
    over EP groups of 1 (none) or 2."""
    x, y = moe_batch(MOE, 8, 4, seed=5)
    return x, y, autoplan(MoEDecoder(MOE, seed=2), moe_loss, (x,), y, world_size=4, device="h100",
                          network="ib-400g", space=MOE_SPACE, top=None, experts=is_expert_param)


def test_expert_parallel_plans_split_the_experts_and_pay_their_all_to_alls(moe_plans):
    """EP degrees divide the dp degree and the expert count; a plan with EP keeps 1 / ep of
    each rank's expert params, grads and optimizer state (the rest as without EP), and its
    step adds the MoE layers' all_to_alls; build_kwargs says how to build it."""
    *_, plans = moe_plans
    got = {(p.schedule, p.ep_degree): p for p in plans}
    assert set(got) == {(s, e) for s in ("dualpipev", "1f1b") for e in (1, 2)}, plans.table()
    steps = [p.predicted_step_s for p in plans]
    assert steps == sorted(steps)
    model = MoEDecoder(MOE)
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if is_expert_param(n))
    for schedule in ("dualpipev", "1f1b"):
        one, two = got[schedule, 1], got[schedule, 2]
        assert two.predicted_step_s > one.predicted_step_s  # the all_to_alls; nothing else changes
        kept = [sum(r.params for r in p.memory.ranks) for p in (one, two)]
        assert kept[0] - kept[1] == experts // 2, (kept, experts)  # each pipeline holds half of the experts
        for a, b in zip(one.memory.ranks, two.memory.ranks):
            assert b.optimizer < a.optimizer and b.grads < a.grads
    assert "ep2" in plans.table() and got["dualpipev", 2].compile_kwargs["num_microbatches"] == 4


def test_the_plan_builds_its_process_groups(moe_plans):
    """4 gloo ranks, one job: the groups of a pp 2 x dp 2 plan; then the searched MoE plan
    with EP 2, built by build_kwargs(), steps like one process on the whole batch."""
    x, y, plans = moe_plans
    plan = next(p for p in plans if p.ep_degree == 2 and p.schedule == "dualpipev")
    results = run_ranks(plan_groups, 4, (plan, x, y), timeout=300)
    assert [r["pp"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["dp"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert {r["mode"] for r in results} == {"shard"}
    assert [r["ep"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]  # EP spans each dp group
    model = MoEDecoder(MOE, seed=2)
    loss = moe_loss(model(x), y)
    loss.backward()
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert losses
    for got in losses:
        torch.testing.assert_close(got, loss.detach(), rtol=1e-6, atol=0)
    seen = set()
    for r in results:
        for name, grad in r["grads"].items():
            want = expert_shard(name, dict(model.named_parameters())[name].grad, r["ep_rank"], 2)
            torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
            seen.add(name)
    assert seen == {n for n, _ in model.named_parameters()}


def plan_groups(rank, world, plan, x, y):
    import torch.distributed as dist
    from dualpipe_fx.api.autoplan import Plan

    grid = Plan("1f1b", 2, None, 1.0, 0.0, None, 1, 1.0, pp_degree=2, dp_degree=2, dp_mode="shard")
    kwargs = grid.build_kwargs()
    dp = kwargs["parallelism"]
    out = {"pp": dist.get_process_group_ranks(kwargs["group"]), "dp": dist.get_process_group_ranks(dp.dp_group),
           "mode": dp.dp_mode}
    kwargs = plan.build_kwargs()
    experts = kwargs["parallelism"].expert_parallel
    assert experts.replica_group is None
    mine = slice(rank // plan.pp_degree * 4, (rank // plan.pp_degree + 1) * 4)  # this replica's half
    mb = plan.microbatch_size
    pipe = dualpipe_fx.compile(MoEDecoder(MOE, seed=2, group=experts.group), moe_loss, (x[mine][:mb],),
                               y[mine][:mb], **kwargs)
    loss = pipe.step(x[mine], target=y[mine])
    if loss is not None:  # the mean over the replicas' halves
        loss = loss.detach().clone()
        dist.all_reduce(loss, group=kwargs["parallelism"].dp_group)
        loss /= 2
    return {**out, "ep": dist.get_process_group_ranks(experts.group), "loss": loss,
            "ep_rank": dist.get_rank(experts.group),
            "grads": {n: p.grad for n, p in pipe.named_parameters() if p.grad is not None}}


def test_the_layer_search_ranks_like_the_op_search():
    """granularity="layer" (one traced layer of each kind, stages of whole layers) ranks a
    small model's candidates as the op-level search does (ties aside: every schedule shares
    one cut there), its step times within 10% and its peaks within 10%."""
    model = LinearGeluStack(depth=8, width=32)
    x, y = linear_gelu_batch(32, batch=8)
    space = {"schedule": ["dualpipev", "1f1b", "gpipe", "zbv"], "num_microbatches": [2, 4, 8], "recompute": [None]}
    op, layer = (autoplan(model, mse_loss, (x,), y, world_size=2, pp_degree=2, device="h100", space=space, top=None,
                          granularity=g) for g in ("op", "layer"))
    key = lambda p: (p.schedule, p.num_microbatches, p.recompute)  # noqa: E731
    by_layer = {key(p): p for p in layer}
    assert set(by_layer) == {key(p) for p in op}
    in_op_order = [by_layer[key(p)].predicted_step_s for p in op]
    assert in_op_order == sorted(in_op_order), (op.table(), layer.table())
    for p in op:
        q = by_layer[key(p)]
        assert q.predicted_step_s == pytest.approx(p.predicted_step_s, rel=0.1)
        assert q.peak_bytes == pytest.approx(p.peak_bytes, rel=0.1)
    with pytest.raises(ValueError, match="granularity='layer' needs a model whose layers"):
        autoplan(torch.nn.Linear(4, 4), mse_loss, (x[:, :4],), y[:, :4], world_size=2, device="h100",
                 granularity="layer")


def test_roofline_takes_the_slower_of_compute_and_memory():
    h100 = DEVICES["h100"]
    gemm = node_seconds(2 * 4096 ** 3, 3 * 4096 ** 2 * 2, torch.bfloat16, h100)
    assert gemm == pytest.approx(2 * 4096 ** 3 / (989.5e12 * 0.7) + h100.kernel_overhead_s)
    copy = node_seconds(0, 1 << 30, torch.bfloat16, h100)
    assert copy == pytest.approx((1 << 30) / (3350e9 * 0.8) + h100.kernel_overhead_s)
    assert node_seconds(1e12, 0, torch.float32, h100) > node_seconds(1e12, 0, torch.bfloat16, h100)
    assert NETWORKS["ib-400g"].seconds(1 << 30) > NETWORKS["nvlink"].seconds(1 << 30)
    assert all(d.source for d in DEVICES.values()) and all(n.source for n in NETWORKS.values())


def test_the_cpu_probe_measures_positive_figures():
    cpu = probe_device("cpu", size=128)
    assert isinstance(cpu, DeviceModel)
    assert cpu.peak_flops["float32"] > 0 and cpu.bandwidth > 0 and cpu.kernel_overhead_s > 0
    assert "probe_device" in cpu.source


def auto_step(rank, world):
    out = {}
    # recompute given: the search keeps it and ranks the 7 schedules (None would try 3 policies each);
    # then a named schedule whose recompute an ActivationBudget picks (0: nothing but "full" fits)
    for name, schedule, recompute in (("auto", "auto", "full"), ("budget", "dualpipev", ActivationBudget(0.0))):
        pipe, x, y = cases._compile("linear", schedule, 4, memory=dualpipe_fx.MemoryPolicy(recompute=recompute))
        loss = pipe.step(x, target=y)
        out[name] = {"loss": None if loss is None else loss.item(), "grads": cases._grads(pipe),
                     "names": [n for n, _ in pipe.named_parameters()], "picked": pipe.program.name,
                     "recompute": pipe.recompute}
    return out


def test_compile_auto_picks_alike_on_every_rank_and_trains_like_one_process():
    results = run_ranks(auto_step, 2, timeout=600)
    for name in ("auto", "budget"):
        check_step(results, "linear", name, 4)
    picked = {r["auto"]["picked"] for r in results}
    assert len(picked) == 1 and picked <= set(DEFAULT_SCHEDULES), picked
    assert [r["budget"]["recompute"] for r in results] == ["full", "full"]


@pytest.fixture(scope="module")
def llama_peaks():
    """A small llama (selective saves less than none, full less still) and each policy's saved
    activations per rank under DualPipeV on 2 ranks, by the memory plan."""
    cfg = LlamaConfig(dim=16, n_layers=4, n_heads=2, vocab_size=32, ffn_hidden=32, max_seq_len=8)
    model = LlamaDecoder(cfg)
    x, y = llama_batch(cfg, batch=4, seq=8)
    peaks = {}
    for policy in (None, "selective"):  # one policy per search: it stops at the first that fits
        (plan,) = autoplan(model, llama_loss, (x,), y, world_size=2, device="h100", top=None, space={
            "schedule": ["dualpipev"], "num_microbatches": [4], "recompute": [policy]})
        peaks[policy] = [r.peak_activations for r in plan.memory.ranks]
    return model, x[:1], y[:1], peaks


def test_an_activation_budget_picks_the_least_recompute_within_it(llama_peaks):
    """``ActivationBudget(f)``: the first of None, "selective", "full" whose saved activations
    are within f x None's on every rank, by the memory plan: f at selective's largest ratio
    takes "selective", just below it "full" (and f = 1 keeps None: None is within itself)."""
    model, x, y, peaks = llama_peaks
    share = max(s / n for s, n in zip(peaks["selective"], peaks[None]))
    assert share < 0.9, peaks
    for fraction, want in ((share, "selective"), (share - 0.01, "full")):
        got = fit_recompute(model, llama_loss, (x,), y, None, schedule="dualpipev", world=2, num_microbatches=4,
                            device="cpu", memory=MemoryPolicy(recompute=ActivationBudget(fraction))).recompute
        assert got == want, (fraction, got, peaks)


def test_an_activation_budget_outside_0_1_is_refused():
    with pytest.raises(ValueError, match=r"ActivationBudget\(fraction=1.5\); expected a number in \[0, 1\]"):
        ActivationBudget(1.5)


def test_autoplan_is_exported():
    assert dualpipe_fx.autoplan is autoplan
