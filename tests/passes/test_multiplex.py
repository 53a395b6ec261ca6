"""multiplex: F of stage a & B of stage b as one graph == running F, then B, separately.

Also: the schedule issues each collective before the other chunk's compute and waits
for it after (single-process group for the synthetic graphs, 2 gloo ranks for the MoE
stages), sends fire right after their value, the input graphs are untouched.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from passes._compat import is_functional_collective, is_functional_wait
from passes.capture import capture
from passes.multiplex import multiplex
from passes.split_backward import split_backward
from passes.split_stages import split_stages
from tests.runtime.dist_harness import run_ranks


# ----------------------------------------------------------------------------- helpers
def _stage_graphs(model, loss_fn, x, y, num_stages):
    part = split_stages(capture(model, loss_fn, (x,), y), num_stages)
    return [split_backward(g, index=i) for i, g in enumerate(part.stages)]


def _params(model, stage):
    named = dict(model.named_parameters())
    return [named[n].detach() for n in stage.param_names]


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _check_pair(model, sg, a, b, fwd_inputs, bwd_saved, bwd_grads, with_weight):
    """Multiplex F(a) & B(b); its results must be bitwise those of F, I (and W) run alone."""
    f_ref = sg[a].forward(_params(model, sg[a]), fwd_inputs)
    grad_inputs, saved_for_weight = sg[b].backward_input(bwd_saved, bwd_grads)
    param_grads = sg[b].backward_weight(saved_for_weight)
    gm = multiplex(sg[a].forward, sg[b].backward_input, sg[b].backward_weight if with_weight else None)
    info = gm.meta["dpfx_multiplex"]
    f_out, b_out = info.split_results(gm(*_params(model, sg[a]), *fwd_inputs, *bwd_saved, *bwd_grads))
    assert len(f_out) == len(f_ref[0]) + len(f_ref[1])
    assert all(_same(x, y) for x, y in zip(f_out, f_ref[0] + f_ref[1]))
    expect = grad_inputs + (param_grads if with_weight else saved_for_weight)
    assert len(b_out) == len(expect) and all(_same(x, y) for x, y in zip(b_out, expect))
    if not with_weight:  # the deferred W on the pair's saved_for_weight gives the same grads
        rest = b_out[info.num_grad_inputs:]
        assert all(_same(x, y) for x, y in zip(sg[b].backward_weight(rest), param_grads))
    return gm


def _mlp(depth, width, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.GELU())])


# ----------------------------------------------------------------------------- plain stages
@settings(max_examples=4, deadline=None)
@given(depth=st.integers(2, 4), width=st.sampled_from([4, 8, 12]), with_weight=st.booleans())
def test_plain_pair_equals_f_then_b(depth, width, with_weight):
    model = _mlp(depth, width)
    x, y, x2 = torch.randn(4, width), torch.randn(4, width), torch.randn(4, width)
    sg = _stage_graphs(model, nn.functional.mse_loss, x, y, 2)
    outs, _ = sg[0].forward(_params(model, sg[0]), [x])
    _, saved1 = sg[1].forward(_params(model, sg[1]), list(outs) + [y])
    # DualPipeV-like pair: F of stage 0 (next micro-batch) & B of the last stage.
    _check_pair(model, sg, 0, 1, [x2], saved1, (torch.ones(()),), with_weight)


def test_inputs_untouched_and_sends_follow_their_values():
    model = _mlp(4, 8)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    sg = _stage_graphs(model, nn.functional.mse_loss, x, y, 2)
    before = [s.gm.code for st_ in sg for s in (st_.forward, st_.backward_input, st_.backward_weight)]
    outs, _ = sg[0].forward(_params(model, sg[0]), [x])
    _, saved1 = sg[1].forward(_params(model, sg[1]), list(outs) + [y])
    gm = _check_pair(model, sg, 0, 1, [x], saved1, (torch.ones(()),), True)
    assert before == [s.gm.code for st_ in sg for s in (st_.forward, st_.backward_input, st_.backward_weight)]
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    for i, node in enumerate(nodes):
        if node.op == "call_module" and node.target == "send_hook":
            value = node.args[2]
            assert value.op == "placeholder" or nodes[i - 1] is value, f"{node} not right after {value}"
    # The hook sees exactly the values the graph returns, each once.
    sent = {}
    gm.send_hook.callback = lambda kind, i, t: sent.setdefault((kind, i), t)
    info = gm.meta["dpfx_multiplex"]
    f_out, b_out = info.split_results(gm(*_params(model, sg[0]), x, *saved1, torch.ones(())))
    assert set(sent) == {("F", 0), ("B", 0)}
    assert sent[("F", 0)] is f_out[0] and sent[("B", 0)] is b_out[0]


def test_bad_arguments_name_the_fix():
    model = _mlp(2, 4)
    sg = _stage_graphs(model, nn.functional.mse_loss, torch.randn(2, 4), torch.randn(2, 4), 2)
    with pytest.raises(TypeError, match="forward is a function"):
        multiplex(lambda: None, sg[1].backward_input)
    with pytest.raises(ValueError, match="num_outputs"):
        multiplex(sg[0].forward.gm, sg[1].backward_input)


# ----------------------------------------------------------------------------- collectives
@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD.group_name
    dist.destroy_process_group()


def _a2a(x, name):
    import dualpipe_fx._compat as c  # registers the functional collectives' autograd

    return c.functional_wait_tensor(c.functional_all_to_all_single(x, [x.shape[0]], [x.shape[0]], name))


def test_other_chunk_computes_between_issue_and_wait(world_of_one):
    name = world_of_one
    w = torch.randn(8, 8)

    def fwd(x):  # compute, all_to_all, compute
        return ((_a2a(x @ w, name) @ w).relu(),)

    def bwd(g):  # compute, all_to_all, compute, compute
        return (_a2a(g.tanh() @ w, name) @ w @ w,)

    f_gm, b_gm = make_fx(fwd)(torch.randn(4, 8)), make_fx(bwd)(torch.randn(4, 8))
    gm = multiplex(f_gm, b_gm, num_outputs=1, num_grad_inputs=1)
    x, g = torch.randn(4, 8), torch.randn(4, 8)
    assert all(torch.equal(a, b) for a, b in zip(gm(x, g), fwd(x) + bwd(g)))
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    for wait in filter(is_functional_wait, nodes):
        issue = wait.args[0]
        assert is_functional_collective(issue)
        between = nodes[nodes.index(issue) + 1:nodes.index(wait)]
        other = [n for n in between if n.meta["dpfx_chunk"] != issue.meta["dpfx_chunk"]
                 and "mm" in str(n.target)]
        assert other, f"nothing of the other chunk hides {issue}: {[str(n) for n in between]}"


# ----------------------------------------------------------------------------- MoE, 2 ranks
def _moe_pair_rank(rank, world):
    from dualpipe_fx.examples.moe import MoEConfig, MoEDecoder, moe_batch, moe_loss

    cfg = MoEConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, n_experts=4, top_k=2, expert_hidden=24)
    model = MoEDecoder(cfg, seed=0, group=dist.group.WORLD)
    x, y = moe_batch(cfg, 2, 6, seed=rank)
    x2, _ = moe_batch(cfg, 2, 6, seed=10 + rank)
    sg = _stage_graphs(model, lambda out, t: moe_loss(out, t), x, y, 2)
    outs, saved0 = sg[0].forward(_params(model, sg[0]), [x])
    _, saved1 = sg[1].forward(_params(model, sg[1]), list(outs) + [y])
    # Stage 1's forward and backward both hold two all_to_alls each.
    gm = _check_pair(model, sg, 0, 1, [x2], saved1, (torch.ones(()),), True)
    grads_out = tuple(torch.randn(o.shape) for o in outs)
    gm2 = _check_pair(model, sg, 1, 0, list(outs) + [y], saved0, grads_out, True)
    return [[(name, chunk) for name, chunk in g.meta["dpfx_multiplex"].order
             if "all_to_all" in name or "wait" in name] for g in (gm, gm2)]


def test_moe_pair_with_all_to_all_over_gloo_equals_f_then_b():
    orders = run_ranks(_moe_pair_rank, 2, timeout=400)
    assert orders[0] == orders[1], "ranks must issue collectives in the same order"
    for order in orders[0]:
        chunks = [c for _, c in order]
        assert chunks.count("F") == 4 and chunks.count("B") == 4, order
        # both chunks' collectives are in flight together at least once
        assert any(a != b for a, b in zip(chunks, chunks[1:])), order
