"""dualpipe_fx.planning.memory without processes: the allocator count, the per-stage byte figures
against tensors a stage really keeps, the byte walk against the simulator's chunk count,
the optimizer rule, and the plan of a meta model (nothing allocated)."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import dualpipe_fx
from dualpipe_fx import examples as ex
from dualpipe_fx.planning.memory import (MemoryPlan, allocator_events, optimizer_bytes, peak_activation_bytes,
                                peak_live_bytes, split_plan, stage_memory)
from dualpipe_fx.schedules import generate
from dualpipe_fx.planning.simulate import Costs, simulate

MiB = 1 << 20
CFG = ex.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_hidden=48, max_seq_len=32)


def test_allocator_count_gives_the_peak_and_the_live_bytes_at_the_end():
    """The profiler's CPU allocator events, summed in time order, give a known pattern's
    peak (4 + 1 MiB) and end (1 + 2 MiB), counting only blocks allocated inside."""
    before = torch.empty(MiB // 4)  # allocated before: its free is not reported
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.empty(MiB)  # 4 MiB of float32
        b = torch.empty(MiB // 4)
        del a
        c = torch.empty(MiB // 2)
        del before
    got = peak_live_bytes(allocator_events(prof))
    assert got == {"peak": 5 * MiB, "end": 3 * MiB}, got
    del b, c


def _storage_bytes(values, exclude) -> int:
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in values
            if isinstance(t, torch.Tensor)}
    return sum(n for p, n in seen.items() if p not in exclude)


def test_stage_figures_are_the_storages_a_stage_keeps():
    """saved / for_weight read off the graphs == the distinct storages F and I really return
    (views once, parameters and the batch never), on every stage of a real split."""
    model = ex.LlamaDecoder(CFG)
    tokens, target = ex.llama_batch(CFG, batch=2, seq=16)
    sp = dualpipe_fx.split(model, ex.llama_loss, tokens, target, num_stages=4)
    external = {"input:0": tokens, "target": target}
    acts: tuple = ()
    kept = []
    for sg in sp.stages:
        params = sp._stage_params(sg)
        ext = tuple(external[n] for n in sg.external_inputs)
        acts, saved = sg.forward(params, (*acts, *ext))
        kept.append((params + list(ext), saved))  # the batch is the caller's: never counted
    grads: tuple = (torch.ones(()),)
    for sg in reversed(sp.stages):
        params, saved = kept[sg.index]
        mine = {p.untyped_storage().data_ptr() for p in params}
        mem = stage_memory(sg)
        assert mem.saved == _storage_bytes(saved, mine), sg.index
        grads, for_weight = sg.backward_input(saved, grads)
        assert mem.for_weight == _storage_bytes(for_weight, mine), sg.index
        assert set(mem.param_grads) == set(sg.param_names)


@pytest.mark.parametrize("schedule,ranks,c", [("1f1b", 4, 8), ("gpipe", 2, 4), ("dualpipev", 4, 10),
                                              ("zbv", 2, 6), ("dualpipe", 4, 8)])
def test_byte_walk_with_unit_bytes_counts_the_simulators_chunks(schedule, ranks, c):
    """One byte saved and one kept for W per chunk: the simulator's chunk count (held from F
    to the last backward part), plus at most one where an I holds its saved byte while it
    makes the byte for W; exactly the count where every backward is a full B."""
    program = generate(schedule, ranks, c)
    parts = program.num_model_parts
    peak = peak_activation_bytes(program, [1] * parts, [1] * parts)
    chunks = simulate(program, Costs(F=1, B=2, W=1)).peak_activations
    has_i = any(p.kind == "I" for acts in program.values() for a in acts for p in a.parts())
    for rank in program:
        assert chunks[rank] <= peak[rank] <= chunks[rank] + has_i, (rank, peak, chunks)
        assert has_i or peak[rank] == chunks[rank]
    assert peak_activation_bytes(program, [0] * parts, [0] * parts) == dict.fromkeys(program, 0)


def test_optimizer_state_rule():
    assert optimizer_bytes("adamw", 400, 100, 2) == 2 * 400 + 4 * 2  # exp_avg, exp_avg_sq; fp32 step each
    assert optimizer_bytes("sgd", 400, 100, 2) == 0
    assert optimizer_bytes("sgd_momentum", 400, 100, 2) == 400
    assert optimizer_bytes(12, 400, 100, 2) == 1200
    with pytest.raises(ValueError, match="'adamw'"):
        optimizer_bytes("lion", 400, 100, 2)
    with pytest.raises(TypeError):
        optimizer_bytes(None, 400, 100, 2)


def test_plan_of_a_meta_model_allocates_nothing_and_adds_up():
    with torch.device("meta"):
        model = ex.LlamaDecoder(CFG).to(torch.bfloat16)
    tokens, target = ex.llama_batch(CFG, batch=1, seq=16)
    plan = dualpipe_fx.plan(model, ex.llama_loss, tokens, target, ranks=2, num_microbatches=4, device="cpu")
    assert isinstance(plan, MemoryPlan) and [r.rank for r in plan.ranks] == [0, 1]
    assert all(p.is_meta for p in model.parameters())
    n_bytes = sum(p.numel() * 2 for p in model.parameters())  # bf16, no tied weights
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # RoPE tables, read on each rank
    assert sum(r.grads for r in plan.ranks) == n_bytes
    assert all(r.params - r.grads in (0, buffers) for r in plan.ranks)
    for r in plan.ranks:
        assert r.optimizer == 2 * r.grads + 4 * len([n for s in plan.stages if s.index in r.stages
                                                     for n in s.param_grads])
        assert r.total == r.params + r.grads + r.optimizer + r.activations + r.recv_buffers + r.send_buffers \
            + r.kept_outputs + r.intermediates
        # (the total peaks where the sum does: saved + for_weight alone may peak elsewhere)
        assert r.activations > 0 and r.peak_activations > 0 and r.step_increase >= r.step_peak
    d = plan.to_dict()
    assert d["ranks"][0]["total"] == plan.ranks[0].total and len(d["stages"]) == 4
    table = plan.table()
    assert "activations" in table and f"{plan.ranks[1].total:,}" in table


def test_split_plan_shows_a_split_beside_its_describe():
    model = ex.LlamaDecoder(CFG)
    tokens, target = ex.llama_batch(CFG, batch=1, seq=16)
    sp = dualpipe_fx.split(model, ex.llama_loss, tokens, target, num_stages=4)
    plan = split_plan(sp, generate("dualpipev", 2, 4))
    assert [r.stages for r in plan.ranks] == [(0, 3), (1, 2)]
    assert [s.saved for s in plan.stages] == [stage_memory(sg).saved for sg in sp.stages]
    with pytest.raises(ValueError, match="num_stages=8"):
        split_plan(sp, generate("dualpipev", 4, 8))
