"""split_backward: forward, then backward_input, then backward_weight rebuild torch.autograd's
loss, input grads and param grads; I does no weight-only work; nothing is saved twice."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch.utils.flop_counter import FlopCounterMode

from dualpipe_fx.examples import LinearGeluStack, linear_gelu_batch, mse_loss
from passes.capture import capture
from passes.split_backward import split_backward
from passes.split_stages import split_stages
from tests import models


def as_one_stage(c):
    """The captured graph as a 1-stage graph whose float model inputs are activations
    (so that backward_input returns their grads); the captured graph is not modified."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(c.gm.graph, {})
    graph.output(out)
    for n in graph.nodes:
        if n.op == "placeholder" and n.meta["dpfx_kind"] == "input" and n.meta["val"].is_floating_point():
            n.meta = dict(n.meta, dpfx_kind="activation")
    return torch.fx.GraphModule(c.gm, graph)


def run_stage(sg, model, inputs, target):
    """forward -> backward_input(grad_loss=1) -> backward_weight for a 1-stage StageGraphs."""
    params = dict(model.named_parameters())
    bufs = dict(model.named_buffers())
    acts = [x for x in inputs if x.is_floating_point()]
    ext = [x for x in inputs if not x.is_floating_point()] + ([target] if target is not None else [])
    outs, saved = sg.forward([params[n] for n in sg.param_names] + [bufs[n] for n in sg.buffer_names],
                             (*acts, *ext))
    grad_in, for_weight = sg.backward_input(saved, (torch.ones(()),))
    grad_params = sg.backward_weight(for_weight)
    return outs, grad_in, dict(zip(sg.param_names, grad_params)), saved, for_weight


def eager(case):
    model = case.model
    model.zero_grad()
    inputs = [x.detach().requires_grad_(x.is_floating_point()) for x in case.inputs]
    loss = case.loss_fn(model(*inputs), case.target)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), [x.grad for x in inputs if x.is_floating_point()], grads


def assert_rel_close(got, want, rtol=1e-5):
    scale = want.abs().max().clamp_min(1e-12)
    assert ((got - want).abs().max() / scale).item() <= rtol, (got, want)


def check_one_stage(case):
    c = capture(case.model, case.loss_fn, case.inputs, case.target)
    sg = split_backward(as_one_stage(c), is_last=True)
    outs, grad_in, grads, _, _ = run_stage(sg, case.model, case.inputs, case.target)
    loss, ref_in, ref_grads = eager(case)
    torch.testing.assert_close(outs[0], loss, rtol=1e-6, atol=0)
    assert len(grad_in) == len(ref_in)
    for got, want in zip(grad_in, ref_in):
        assert_rel_close(got, want)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_rel_close(grads[name], ref_grads[name])
    return sg


@pytest.mark.parametrize("case", [c for c in models.zoo() if c.name != "batchnorm"], ids=lambda c: c.name)
def test_zoo_one_stage_grads_match_autograd(case):
    check_one_stage(case)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models.random_cases())
def test_random_models_one_stage_grads_match_autograd(case):
    check_one_stage(case)


def _call_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def _outputs(gm):
    return list(next(n for n in gm.graph.nodes if n.op == "output").args[0])


def test_backward_input_does_only_input_grad_work():
    c = capture(*_lin_gelu(depth=3))
    sg = split_backward(as_one_stage(c), is_last=True)
    gm = sg.backward_input.gm
    grad_in = [o for o in _outputs(gm)[:1] if isinstance(o, torch.fx.Node)]
    needed = set()
    stack = list(grad_in)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    idle = [n for n in _call_nodes(gm) if n not in needed]
    assert not idle, f"backward_input computes {idle}, which no input grad needs"
    assert _call_nodes(sg.backward_weight.gm), "weight grads must be left to backward_weight"


def test_nothing_saved_twice_and_weight_reads_only_what_input_saved():
    case = models.tiny_lm(custom="scaled_mul")
    c = capture(case.model, case.loss_fn, case.inputs, case.target)
    sg = split_backward(as_one_stage(c), is_last=True)
    fwd_out = _outputs(sg.forward.gm)
    n_out = sg.forward.num_outputs
    saved_nodes = fwd_out[n_out:]
    assert len(saved_nodes) == len(set(saved_nodes))
    i_out = _outputs(sg.backward_input.gm)[sg.backward_input.num_grad_inputs:]
    assert len(i_out) == len(set(i_out))
    w_inputs = [n for n in sg.backward_weight.gm.graph.nodes if n.op == "placeholder"]
    assert len(w_inputs) == len(i_out)
    # every saved_for_weight tensor is a saved tensor, a grad output or made by backward_input
    _, _, _, saved, for_weight = run_stage(sg, case.model, case.inputs, case.target)
    saved_ids = {id(t) for t in saved}
    from_forward = [t for t in for_weight if id(t) in saved_ids]
    assert from_forward, "W should reuse forward activations through backward_input"


def _lin_gelu(depth=4, width=64):
    model = LinearGeluStack(depth=depth, width=width)
    x, y = linear_gelu_batch(width)
    return model, mse_loss, (x,), y


def test_linear_stage_input_grad_is_half_the_backward_flops():
    model, loss_fn, inputs, target = _lin_gelu()
    part = split_stages(capture(model, loss_fn, inputs, target), 2)
    sgs = [split_backward(g, index=i, is_last=i == 1) for i, g in enumerate(part.stages)]
    params = dict(model.named_parameters())
    a, saved = sgs[0].forward([params[n] for n in sgs[0].param_names], inputs)
    outs, saved1 = sgs[1].forward([params[n] for n in sgs[1].param_names], (*a, target))
    # Detached: torch 2.14's FlopCounterMode tracks modules by grad hooks and cannot find the
    # AccumulateGrad of a leaf parameter passed to a GraphModule under its own dispatch mode.
    saved1 = [t.detach() if isinstance(t, torch.Tensor) else t for t in saved1]
    with FlopCounterMode(display=False) as fi:
        _, for_weight = sgs[1].backward_input(saved1, (torch.ones(()),))
    with FlopCounterMode(display=False) as fw:
        sgs[1].backward_weight(for_weight)
    ratio = fi.get_total_flops() / (fi.get_total_flops() + fw.get_total_flops())
    assert 0.45 <= ratio <= 0.55, ratio


def test_layer_norm_backward_is_split_by_output_mask():
    sg = check_one_stage(models.norm_blocks(norm="layer"))
    masks_i = [n.args[-1] for n in _call_nodes(sg.backward_input.gm)
               if n.target is torch.ops.aten.native_layer_norm_backward.default]
    masks_w = [n.args[-1] for n in _call_nodes(sg.backward_weight.gm)
               if n.target is torch.ops.aten.native_layer_norm_backward.default]
    assert masks_i and all(list(m) == [True, False, False] for m in masks_i)
    assert masks_w and all(list(m) == [False, True, True] for m in masks_w)


def test_user_backward_of_custom_function_is_what_runs():
    case = models.custom_function(kind="scaled_mul")
    check_one_stage(case)  # equals eager, which runs ScaledMul.backward (d/dx doubled)
    c = capture(case.model, case.loss_fn, case.inputs, case.target)
    sg = split_backward(as_one_stage(c), is_last=True)
    _, _, grads, _, _ = run_stage(sg, case.model, case.inputs, case.target)
    # the autograd of ScaledMul's forward would give different fc1 grads
    for blk in case.model.blocks:
        blk.custom = "plain"
    original_forward = models.MLPBlock.forward

    def plain_forward(self, x):
        h = torch.nn.functional.gelu(self.fc1(self.norm(x)))
        h = h * self.gate + 0.1 * (h + self.gate)
        return x + self.fc2(h) if self.residual else self.fc2(h)

    models.MLPBlock.forward = plain_forward
    try:
        _, _, naive = eager(case)
    finally:
        models.MLPBlock.forward = original_forward
    assert not torch.allclose(grads["blocks.0.fc1.weight"], naive["blocks.0.fc1.weight"], rtol=1e-3)
    torch.testing.assert_close(grads["blocks.1.fc2.weight"], naive["blocks.1.fc2.weight"])


def test_straight_through_estimator_passes_grads():
    case = models.custom_function(kind="ste")
    sg = check_one_stage(case)
    _, _, grads, _, _ = run_stage(sg, case.model, case.inputs, case.target)
    assert grads["blocks.0.fc1.weight"].abs().sum() > 0  # round()'s own grad would be 0


def test_stage_without_params_and_int_inputs():
    case = models.tiny_lm()
    c = capture(case.model, case.loss_fn, case.inputs, case.target)
    part = split_stages(c, 2)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta.update(val=part.stages[1].graph.find_nodes(op="placeholder")[0].meta["val"], dpfx_kind="activation",
                  dpfx_name="x")
    ids = graph.placeholder("ids")
    ids.meta.update(val=case.inputs[0], dpfx_kind="activation", dpfx_name="ids")
    unused = graph.placeholder("unused")
    unused.meta.update(val=x.meta["val"], dpfx_kind="activation", dpfx_name="unused")
    y = graph.call_function(torch.ops.aten.mul.Tensor, (x, 2.0))
    y.meta["val"] = x.meta["val"]
    graph.output((y, ids))
    sg = split_backward(torch.fx.GraphModule({}, graph), is_last=False)
    val = x.meta["val"]
    xt = torch.randn(val.shape)
    (out, ids_out), saved = sg.forward((), (xt, case.inputs[0], torch.randn(val.shape)))
    torch.testing.assert_close(out, xt * 2)
    assert saved == ()  # y = 2x needs nothing from forward, and zero grads need no input
    grad_in, for_weight = sg.backward_input(saved, (torch.ones_like(xt), None))
    torch.testing.assert_close(grad_in[0], torch.full_like(xt, 2.0))
    assert grad_in[1] is None  # int input
    torch.testing.assert_close(grad_in[2], torch.zeros_like(xt))  # unused float input
    assert sg.backward_weight(for_weight) == ()


def test_stages_in_sequence_match_autograd():
    case = models.tiny_llama(n_layers=2)
    c = capture(case.model, case.loss_fn, case.inputs, case.target)
    part = split_stages(c, 3)
    sgs = [split_backward(g, index=i, is_last=i == 2) for i, g in enumerate(part.stages)]
    params = dict(case.model.named_parameters())
    bufs = dict(case.model.named_buffers())
    ext = {"input:0": case.inputs[0], "target": case.target}
    acts, saved = (), []
    for sg in sgs:
        assert sg.input_names == tuple(n for n in ([] if sg.index == 0 else sgs[sg.index - 1].output_names))
        acts, s = sg.forward([params[n] for n in sg.param_names] + [bufs[n] for n in sg.buffer_names],
                             (*acts, *(ext[n] for n in sg.external_inputs)))
        saved.append(s)
    grad, fw = (torch.ones(()),), {}
    for sg in reversed(sgs):
        grad, fw[sg.index] = sg.backward_input(saved[sg.index], grad)
    grads = {}
    for sg in sgs:
        grads.update(zip(sg.param_names, sg.backward_weight(fw[sg.index])))
    loss, _, ref = eager(case)
    torch.testing.assert_close(acts[0], loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref.keys()
    for name in ref:
        assert_rel_close(grads[name], ref[name])


def test_input_graph_is_not_modified():
    case = models.custom_function(kind="ste")
    c = capture(case.model, case.loss_fn, case.inputs, case.target)
    before = c.gm.code
    split_backward(c.gm, is_last=True)
    assert c.gm.code == before


def test_forwarded_activation_gets_its_grad_passed_through():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta.update(val=torch.empty(3, 4), dpfx_kind="activation", dpfx_name="x")
    y = graph.call_function(torch.ops.aten.mul.Tensor, (x, x))
    y.meta["val"] = torch.empty(3, 4)
    graph.output((y, x))  # x is forwarded unchanged to a later stage
    sg = split_backward(torch.fx.GraphModule({}, graph), is_last=False)
    xt, g_y, g_x = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    (out_y, out_x), saved = sg.forward((), (xt,))
    torch.testing.assert_close(out_x, xt)
    (grad_x,), _ = sg.backward_input(saved, (g_y, g_x))
    torch.testing.assert_close(grad_x, 2 * xt * g_y + g_x)


def test_conv_and_group_norm_backward_split_by_output_mask():
    model = models._seeded(0, lambda: torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(64, 2)))
    case = models.Case("conv", model, models.mse, (torch.randn(2, 3, 4, 4),), torch.randn(2, 2))
    sg = check_one_stage(case)
    ops = (torch.ops.aten.convolution_backward.default, torch.ops.aten.native_group_norm_backward.default)
    masks_i = [list(n.args[-1]) for n in _call_nodes(sg.backward_input.gm) if n.target in ops]
    masks_w = [list(n.args[-1]) for n in _call_nodes(sg.backward_weight.gm) if n.target in ops]
    assert masks_i == [[True, False, False]] * 3  # conv 2, group norm, conv 1 (its input is a model input)
    assert masks_w == [[False, True, True]] * 3


def test_backward_collectives_go_to_input_grad_even_without_input_grads():
    """A stage reading token ids has no input grad, yet its backward's collectives (here EP's
    reverse all_to_all, in TP a gather's reduce_scatter) go to I: W stays local; grads exact."""
    import torch.distributed as dist

    from dualpipe_fx import _compat
    from passes._compat import is_functional_collective

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        name = dist.group.WORLD.group_name

        class Exchange(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.emb, self.lin = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3)

            def forward(self, ids):
                h = self.emb(ids).flatten(0, 1)  # [tokens, 4], exchanged with the (one) peer
                h = _compat.functional_wait_tensor(_compat.functional_all_to_all_single(h, [6], [6], name))
                return self.lin(torch.tanh(h))

        torch.manual_seed(0)
        model = Exchange()
        ids, target = torch.randint(0, 10, (2, 3)), torch.randn(6, 3)
        loss_fn = torch.nn.functional.mse_loss
        c = capture(model, loss_fn, (ids,), target)
        sg = split_backward(as_one_stage(c), is_last=True)
        collectives = {k: [n for n in g.gm.graph.nodes if is_functional_collective(n)]
                       for k, g in (("I", sg.backward_input), ("W", sg.backward_weight))}
        assert collectives["W"] == [] and len(collectives["I"]) == 1, collectives
        _, grad_in, grads, _, _ = run_stage(sg, model, (ids,), target)
        assert grad_in == ()
        model.zero_grad()
        loss_fn(model(ids), target).backward()
        for n, p in model.named_parameters():
            assert_rel_close(grads[n], p.grad)
    finally:
        dist.destroy_process_group()
