"""accumulate_grads: a grad graph that sums into given buffers == the grads added to them.

What it rebuilds: for every stage of every zoo model, ``acc + W(saved)`` (the W graph's
grads added to the buffers one by one) equals running the accumulating W graph on the
buffers, which are updated in place and returned as themselves. The Linear weight grads
become one ``addmm_`` each (no separate GEMM and add); a multiplexed F&B graph keeps
its other results bitwise; the input graph is untouched.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
import torch
from torch import nn
from torch._dynamo.utils import counters

from passes.accumulate_grads import accumulate_grads, accumulated_positions
from passes.capture import capture
from passes.multiplex import drop_send_hooks, multiplex
from passes.split_backward import compile_graph, split_backward
from passes.split_stages import split_stages
from tests.models import zoo

_aten = torch.ops.aten


def _stages(case, num_stages=2):
    part = split_stages(capture(case.model, case.loss_fn, case.inputs, case.target), num_stages)
    return [split_backward(g, index=i, is_last=i == num_stages - 1) for i, g in enumerate(part.stages)]


def _params(model, stage):
    named = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    return [named[n].detach() for n in stage.param_names] + [buffers[n] for n in stage.buffer_names]


def _run_backwards(case, sg):
    """Each stage's saved_for_weight for the case's example micro-batch."""
    acts, saved, ext = (), [], {f"input:{i}": x for i, x in enumerate(case.inputs)} | {"target": case.target}
    for s in sg:
        acts, sv = s.forward(_params(case.model, s), (*acts, *(ext[n] for n in s.external_inputs)))
        saved.append(sv)
    grad_out, for_weight = (torch.ones_like(acts[0]),), [None] * len(sg)
    for s in reversed(sg):
        grad_out, for_weight[s.index] = s.backward_input(saved[s.index], grad_out)
    return for_weight


def _accumulators(grads, positions, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(grads[p].shape, generator=gen, dtype=grads[p].dtype) for p in positions]


@pytest.mark.parametrize("case", zoo(0), ids=lambda c: c.name)
def test_accumulating_weight_graph_equals_grads_added_to_the_buffers(case):
    sg = _stages(case)
    for stage, saved_w in zip(sg, _run_backwards(case, sg)):
        grads = stage.backward_weight(saved_w)
        gm = accumulate_grads(stage.backward_weight.gm, range(len(stage.param_names)))
        positions = accumulated_positions(gm)
        assert positions == tuple(i for i, g in enumerate(grads) if g is not None)
        accs = _accumulators(grads, positions)
        expect = [a + grads[p] for a, p in zip(accs, positions)]
        with torch.no_grad():
            out = gm(*saved_w, *accs)
        for acc, want, p in zip(accs, expect, positions):
            assert out[p] is acc, "the result must be the buffer itself, summed in place"
            torch.testing.assert_close(acc, want, rtol=1e-5, atol=1e-6)


def test_linear_weight_grads_become_one_addmm_each_and_the_input_is_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8), nn.GELU())
    x, y = torch.randn(4, 16), torch.randn(4, 8)
    (stage,) = [split_backward(g, index=0, is_last=True)
                for g in split_stages(capture(model, lambda o, t: ((o - t) ** 2).mean(), (x,), y), 1).stages]
    before = stage.backward_weight.gm.code
    gm = accumulate_grads(stage.backward_weight.gm, range(len(stage.param_names)))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    mms_before = sum(n.target is _aten.mm.default for n in stage.backward_weight.gm.graph.nodes)
    assert targets.count(_aten.addmm_.default) == 2  # the two weights
    assert targets.count(_aten.add_.Tensor) == 2     # the two biases (a sum, not a GEMM)
    assert targets.count(_aten.mm.default) == mms_before - 2  # no GEMM left making a fresh grad
    assert stage.backward_weight.gm.code == before


def test_transposed_gemm_result_is_accumulated_with_swapped_operands():
    class G(torch.nn.Module):
        def forward(self, a, b):  # a: [k, m], b: [k, n] -> grad [n, m] = (a^T b)^T
            return (torch.ops.aten.t.default(torch.ops.aten.mm.default(a.t(), b)),)

    gm = torch.fx.symbolic_trace(G())
    a, b = torch.randn(5, 3), torch.randn(5, 4)
    acc = torch.randn(4, 3)
    want = acc + (a.t() @ b).t()
    out = accumulate_grads(gm, [0])
    assert any(n.target is _aten.addmm_.default for n in out.graph.nodes)
    out(a, b, acc)
    torch.testing.assert_close(acc, want)


def test_a_grad_used_twice_is_added_not_fused():
    class G(torch.nn.Module):
        def forward(self, a, b):
            g = torch.ops.aten.mm.default(a, b)
            return (g, g * 2)

    gm = torch.fx.symbolic_trace(G())
    a, b, acc = torch.randn(2, 3), torch.randn(3, 4), torch.zeros(2, 4)
    out = accumulate_grads(gm, [0])
    assert not any(n.target is _aten.addmm_.default for n in out.graph.nodes)
    res = out(a, b, acc)
    torch.testing.assert_close(acc, a @ b)
    torch.testing.assert_close(res[1], 2 * (a @ b))


def _pair(seed: int):
    """A 2-stage Linear/GELU stack's F&B pair graph (stage 0's F with stage 1's I and W):
    ``(stage graphs, pair graph, its multiplex info, its arguments, stage 1's parameters)``."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(12, 12), nn.GELU())])
    x, y = torch.randn(3, 12), torch.randn(3, 12)
    part = split_stages(capture(model, lambda o, t: ((o - t) ** 2).mean(), (x,), y), 2)
    sg = [split_backward(g, index=i, is_last=i == 1) for i, g in enumerate(part.stages)]
    named = dict(model.named_parameters())
    p0, p1 = ([named[n].detach() for n in s.param_names] for s in sg)
    _, saved1 = sg[1].forward(p1, [sg[0].forward(p0, [x])[0][0], y])
    gm = multiplex(sg[0].forward, sg[1].backward_input, sg[1].backward_weight)
    return sg, gm, gm.meta["dpfx_multiplex"], [*p0, x, *saved1, torch.ones(())], p1


def test_multiplexed_pair_keeps_every_other_result_bitwise():
    sg, gm, info, args, p1 = _pair(seed=1)
    plain = gm(*args)
    at = info.num_forward_results + info.num_grad_inputs
    acc_gm = accumulate_grads(gm, range(at, at + len(sg[1].param_names)))
    accs = [torch.zeros_like(plain[p]) for p in accumulated_positions(acc_gm)]
    out = acc_gm(*args, *accs)
    for i, (a, b) in enumerate(zip(out, plain)):
        if i >= at:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(a, b), f"result {i} changed"
    assert acc_gm.meta["dpfx_multiplex"] is info


def test_a_position_outside_the_results_names_the_range():
    gm = torch.fx.symbolic_trace(lambda a: (a * 2,))
    with pytest.raises(ValueError, match=r"positions \[3\].*0\.\.0"):
        accumulate_grads(gm, [3])


def _breaks() -> int:
    return sum(counters["graph_break"].values())


def test_opaque_sums_stay_in_place_under_torch_compile():
    """Compiled, an in-place sum on an input would become a GEMM into a new buffer and a
    copy; the opaque form is a custom op that mutates the buffer: one graph (no break), the
    buffer is the same object, and nothing of its size is allocated."""
    class G(torch.nn.Module):
        def forward(self, a, b, c):
            return (torch.ops.aten.mm.default(torch.ops.aten.gelu.default(a), b), torch.ops.aten.mul.Tensor(c, 2))

    gm = torch.fx.symbolic_trace(G())
    out = accumulate_grads(gm, [0, 1], opaque=True)
    a, b, c = torch.randn(64, 48), torch.randn(48, 80), torch.randn(80, 64)
    acc, acc_c = torch.randn(64, 80), torch.randn(80, 64)
    want, want_c = acc + 2 * (torch.nn.functional.gelu(a) @ b), acc_c + 4 * c
    compiled = compile_graph(out)
    breaks = _breaks()
    compiled(a, b, c, acc, acc_c)  # compiles
    with torch.profiler.profile(profile_memory=True) as prof:
        res = compiled(a, b, c, acc, acc_c)
    assert res[0] is acc and res[1] is acc_c
    assert _breaks() == breaks, dict(counters["graph_break"])
    big = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage >= acc_c.nbytes]
    assert big == [], f"a grad-sized temporary: {big}"
    torch.testing.assert_close(acc, want)
    torch.testing.assert_close(acc_c, want_c)


def test_compiled_accumulating_pair_is_one_graph_and_each_send_hook_one_break():
    """A multiplexed F&B graph with its sums in place, compiled: without send hooks one graph
    (no break: the sums are custom ops), equal to the eager graph; with them, one break per
    hook and nothing else (``torch.compiler.disable``d ``SendHook``, by design)."""
    sg, gm, info, args, p1 = _pair(seed=2)
    at = info.num_forward_results + info.num_grad_inputs
    acc_gm = accumulate_grads(gm, range(at, at + len(sg[1].param_names)), opaque=True)
    hooks = sum(bool(n.meta.get("dpfx_send")) for n in acc_gm.graph.nodes)
    bare = drop_send_hooks(acc_gm, ["F", "B"])
    assert hooks > 0 and not any(n.meta.get("dpfx_send") for n in bare.graph.nodes)
    plain_accs = [torch.zeros_like(p) for p in p1]
    with torch.no_grad():
        want = acc_gm(*args, *plain_accs)
    for graph, expected_breaks in ((bare, 0), (acc_gm, hooks)):
        accs = [torch.zeros_like(p) for p in p1]
        breaks = _breaks()
        with torch.no_grad():
            got = compile_graph(graph)(*args, *accs)
        assert _breaks() - breaks == expected_breaks, dict(counters["graph_break"])
        for i, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=f"result {i}")
        assert all(got[at + k] is acc for k, acc in enumerate(accs))


def test_bf16_grads_sum_into_fp32_accumulators_with_add_not_addmm():
    """Mixed precision: the graph computes bf16 grads, ``.grad`` is fp32 (``cast`` positions):
    each grad is added where it is made, converted as it is added, never an addmm_ across dtypes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).to(torch.bfloat16)
    x, y = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    (stage,) = [split_backward(g, index=0, is_last=True)
                for g in split_stages(capture(model, lambda o, t: ((o - t) ** 2).mean(), (x,), y), 1).stages]
    grads_out, saved = stage.forward([p.detach() for p in model.parameters()], [x, y])
    _, saved_w = stage.backward_input(saved, (torch.ones((), dtype=torch.bfloat16),))
    grads = stage.backward_weight(saved_w)
    n = len(stage.param_names)
    gm = accumulate_grads(stage.backward_weight.gm, range(n), cast=range(n))
    targets = [node.target for node in gm.graph.nodes if node.op == "call_function"]
    assert _aten.addmm_.default not in targets and targets.count(_aten.add_.Tensor) == n
    accs = [torch.randn(g.shape, dtype=torch.float32) for g in grads]
    expect = [a + g.to(torch.float32) for a, g in zip(accs, grads)]
    with torch.no_grad():
        out = gm(*saved_w, *accs)
    for acc, want, got in zip(accs, expect, out):
        assert got is acc and acc.dtype == torch.float32
        assert torch.equal(acc, want)



class _Embed(nn.Module):
    def __init__(self, vocab: int, dim: int, padding_idx) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.emb(tokens))


def _embedding_sum(vocab, dim, shape, padding_idx, seed, opaque, compiled=False):
    """(``acc`` after the accumulating W graph, ``acc + W's grad``, the graph's call targets)."""
    gen = torch.Generator().manual_seed(seed)
    model = _Embed(vocab, dim, padding_idx)
    tokens = torch.randint(0, vocab, shape, generator=gen)
    (stage,) = [split_backward(g, index=0, is_last=True)
                for g in split_stages(capture(model, lambda o: (o ** 2).mean(), (tokens,)), 1).stages]
    _, saved = stage.forward([p.detach() for p in model.parameters()], [tokens])
    _, saved_w = stage.backward_input(saved, (torch.ones(()),))
    (grad,) = stage.backward_weight(saved_w)
    gm = accumulate_grads(stage.backward_weight.gm, [0], opaque=opaque)
    acc = torch.randn(vocab, dim, generator=gen)
    want = acc + grad
    with torch.no_grad():
        (out,) = (compile_graph(gm) if compiled else gm)(*saved_w, acc)
    assert out is acc, "the result must be the buffer itself, summed in place"
    return acc, want, [n.target for n in gm.graph.nodes if n.op == "call_function"]


@settings(max_examples=25, deadline=None)
@given(vocab=st.integers(1, 9), dim=st.integers(1, 5), shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       padding=st.booleans(), seed=st.integers(0, 2 ** 16), opaque=st.booleans())
def test_embedding_grads_are_summed_row_by_row_into_the_buffer(vocab, dim, shape, padding, seed, opaque):
    """An embedding's [vocab, dim] grad is never made: each grad_output row is added to its
    index's row of the buffer (repeated indices add up; the padding row gets nothing), equal to
    acc + embedding_dense_backward."""
    acc, want, targets = _embedding_sum(vocab, dim, shape, seed % vocab if padding else None, seed, opaque)
    assert _aten.embedding_dense_backward.default not in targets and _aten.add_.Tensor not in targets, targets
    torch.testing.assert_close(acc, want, rtol=1e-6, atol=1e-6)


def test_embedding_row_sums_stay_in_place_under_torch_compile():
    acc, want, _ = _embedding_sum(7, 3, [2, 5], 2, seed=0, opaque=True, compiled=True)
    torch.testing.assert_close(acc, want, rtol=1e-6, atol=1e-6)
