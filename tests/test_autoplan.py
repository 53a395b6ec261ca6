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
from dualpipe_fx.planning.devices import DEVICES, NETWORKS, DeviceModel, node_seconds, probe_device
from tests.runtime import cases
from tests.runtime.dist_harness import run_ranks
from tests.runtime.test_equivalence import check_step

SPACE = {"schedule": ["dualpipev", "1f1b", "gpipe"], "num_microbatches": [2, 4], "recompute": [None, "full"]}


@pytest.fixture(scope="module")
def searched():
    model = LinearGeluStack(depth=4, width=32)
    x, y = linear_gelu_batch(32, batch=8)
    return model, x, y, autoplan(model, mse_loss, (x,), y, world_size=2, device="h100", space=SPACE, top=None)


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
    assert "schedule" in plans.table() and "rejected: dualpipev, C=2" in plans.table()


def test_the_memory_budget_prunes_by_the_plan_and_names_the_rank(searched):
    model, x, y, plans = searched
    peaks = sorted({p.peak_bytes for p in plans})
    budget = (peaks[0] + peaks[-1]) // 2
    kept = autoplan(model, mse_loss, (x,), y, world_size=2, device="h100", space=SPACE, top=None,
                    memory_budget=budget)
    assert kept and all(p.peak_bytes <= budget for p in kept)
    oom = [r.reason for r in kept.rejected if "out of memory" in r.reason]
    assert oom and all("on rank" in r and "GiB" in r for r in oom), kept.rejected
    with pytest.raises(ValueError, match="no configuration fits on 2 ranks") as err:
        autoplan(model, mse_loss, (x,), y, world_size=2, device="h100", space=SPACE, memory_budget=1)
    assert "out of memory on rank" in str(err.value) and "Fix:" in str(err.value)


def test_the_network_and_the_device_change_the_prediction(searched):
    model, x, y, plans = searched
    space = {"schedule": ["1f1b"], "num_microbatches": [4], "recompute": [None]}
    fast, slow = (autoplan(model, mse_loss, (x,), y, world_size=2, device="h100", network=net, space=space)[0]
                  for net in ("nvlink", "ethernet-100g"))
    assert slow.predicted_step_s > fast.predicted_step_s
    a100 = autoplan(model, mse_loss, (x,), y, world_size=2, device="a100", network="nvlink", space=space)[0]
    assert a100.predicted_step_s >= fast.predicted_step_s


@pytest.mark.parametrize("kwargs,match", [
    ({"pp_degree": 1}, "pp_degree=1, world_size=2"),
    ({"space": {"schedules": ["1f1b"]}}, "space has keys"),
    ({"space": {"schedule": ["nope"]}}, "unknown schedules"),
    ({"device": "tpu9"}, "unknown device 'tpu9'"),
    ({"network": "carrier-pigeon"}, "unknown network"),
])
def test_bad_arguments_name_the_problem(searched, kwargs, match):
    model, x, y, _ = searched
    with pytest.raises(ValueError, match=match):
        autoplan(model, mse_loss, (x,), y, **{"world_size": 2, "device": "h100", **kwargs})


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
