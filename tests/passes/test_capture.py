"""capture: the captured graph rebuilds the model's loss and outputs, with the annotations
the later passes rely on, and refuses what it cannot express with a useful error."""
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from passes.capture import Captured, TraceError, capture
from passes.inplace import mutated_base
from tests import models

PLACEHOLDER_ORDER = {"param": 0, "buffer": 1, "input": 2, "target": 3}


def _capture(case) -> Captured:
    return capture(case.model, case.loss_fn, case.inputs, case.target)


def run_captured(c: Captured, model, inputs, target):
    params = dict(model.named_parameters(remove_duplicate=False))
    bufs = dict(model.named_buffers(remove_duplicate=False))
    args = [params[n] for n in c.param_names] + [bufs[n] for n in c.buffer_names] + list(inputs)
    if c.has_target:
        args.append(target)
    with torch.no_grad():
        return c.gm(*args)


def _check_rebuilds(case) -> Captured:
    c = _capture(case)
    loss, *outs = run_captured(c, case.model, case.inputs, case.target)
    with torch.no_grad():
        ref_out = case.model(*case.inputs)
        ref_loss = case.loss_fn(ref_out, case.target)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    ref_leaves = torch.utils._pytree.tree_leaves(ref_out)
    assert len(outs) == len(ref_leaves) == c.num_model_outputs
    for got, want in zip(outs, ref_leaves):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    return c


def _check_annotations(c: Captured, model) -> None:
    phs = [n for n in c.gm.graph.nodes if n.op == "placeholder"]
    kinds = [n.meta["dpfx_kind"] for n in phs]
    assert kinds == sorted(kinds, key=PLACEHOLDER_ORDER.__getitem__), kinds
    assert tuple(n.meta["dpfx_name"] for n in phs if n.meta["dpfx_kind"] == "param") == c.param_names
    assert tuple(n.meta["dpfx_name"] for n in phs if n.meta["dpfx_kind"] == "buffer") == c.buffer_names
    inputs = [n.meta["dpfx_name"] for n in phs if n.meta["dpfx_kind"] == "input"]
    assert inputs == [f"input:{i}" for i in range(c.num_inputs)]
    assert [n.meta["dpfx_name"] for n in phs if n.meta["dpfx_kind"] == "target"] == (["target"] if c.has_target else [])
    assert set(c.param_names) == {n for n, _ in model.named_parameters()}
    assert set(c.buffer_names) == {n for n, _ in model.named_buffers()}
    modules = {n for n, _ in model.named_modules()}
    for node in c.gm.graph.nodes:
        assert "val" in node.meta or node.op == "output", node
        if node.op == "call_function":
            assert node.meta["dpfx_module"] in modules, (node, node.meta["dpfx_module"])


@pytest.mark.parametrize("case", models.zoo(), ids=lambda c: c.name)
def test_zoo_graph_rebuilds_loss_and_outputs(case):
    c = _check_rebuilds(case)
    _check_annotations(c, case.model)


def test_graph_output_is_loss_then_model_output_leaves():
    case = models.residual_mlp()
    c = _capture(case)
    out = next(n for n in c.gm.graph.nodes if n.op == "output")
    loss, model_out = out.args[0]
    assert loss.meta["val"].shape == () and loss.meta["dpfx_module"] == ""
    assert tuple(model_out.meta["val"].shape) == (4, 16)
    assert c.num_model_outputs == 1 and c.output_spec.num_leaves == 1


def test_module_fqns_of_linear_nodes():
    c = _capture(models.residual_mlp(depth=2))
    linears = [n.meta["dpfx_module"] for n in c.gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert linears == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"]


def test_llama_keeps_sdpa_and_attention_module_names():
    c = _check_rebuilds(models.tiny_llama())
    sdpa = [n for n in c.gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert [n.meta["dpfx_module"] for n in sdpa] == ["layers.0.attention", "layers.1.attention"]
    assert "layers.1.attention.wq.weight" in c.param_names


def test_tied_weight_is_one_placeholder_with_aliases():
    case = models.tiny_lm(tied=True)
    c = _check_rebuilds(case)
    assert "embed.weight" in c.param_names and "head.weight" not in c.param_names
    assert dict(c.param_aliases) == {"embed.weight": ("head.weight",)}
    ph = next(n for n in c.gm.graph.nodes if n.meta.get("dpfx_name") == "embed.weight")
    targets = sorted(str(u.target) for u in ph.users)
    assert targets == ["aten.embedding.default", "aten.linear.default"]


def test_buffers_persistent_and_not_are_lifted():
    c = _check_rebuilds(models.buffers())
    assert c.buffer_names == ("scale", "offset")


def test_custom_function_becomes_regions():
    case = models.custom_function(kind="scaled_mul")
    c = _check_rebuilds(case)
    assert len(c.regions) == 2
    for rid, region in c.regions.items():
        assert region.fn is models.ScaledMul
        assert len(region.inputs) == 2 and len(region.outputs) == 2
        assert all(n.meta["dpfx_region"] == rid for n in region.nodes)
        assert region.input_values[1].meta["dpfx_name"] == f"blocks.{rid}.gate"
        assert region.input_values[0].meta["dpfx_module"] == f"blocks.{rid}"  # gelu(fc1(x))
        assert region.spec.arg_leaves[2] == 2.0  # the non-tensor argument is kept
    tagged = [n for n in c.gm.graph.nodes if "dpfx_region" in n.meta]
    assert set(tagged) == {n for r in c.regions.values() for n in r.nodes}


def test_data_dependent_control_flow_names_the_source_line():
    case = models.data_dependent()
    line = next(i for i, text in enumerate(open(models.__file__), 1) if "DATA-DEPENDENT-LINE" in text
                and "if " in text)
    with pytest.raises(TraceError) as info:
        _capture(case)
    msg = str(info.value)
    assert re.search(rf"tests/models\.py:{line}\b", msg), msg
    assert "torch.where" in msg and "torch.cond" in msg
    assert isinstance(info.value, ValueError)


def test_batchnorm_in_train_mode_keeps_its_buffer_writes_and_input_writes_are_refused():
    captured = _capture(models.batchnorm(train=True))
    written = {mutated_base(n).meta["dpfx_name"] for n in captured.gm.graph.nodes if mutated_base(n) is not None}
    assert written == {"bn.num_batches_tracked"}  # running stats: inside aten.batch_norm, traced by split_backward
    _check_rebuilds(models.batchnorm(train=True))
    _check_rebuilds(models.batchnorm(train=False))

    class WritesItsInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            x.mul_(2)
            return self.lin(x)

    with pytest.raises(TraceError, match=r"input .* is written in place by aten\.mul_\.Tensor.*Fix: clone"):
        capture(WritesItsInput(), lambda out, y: ((out - y) ** 2).mean(), (torch.randn(2, 4),), torch.randn(2, 4))
    cumulative = models.batchnorm(train=True)
    cumulative.model.bn.momentum = None
    with pytest.raises(TraceError, match=r"BatchNorm 'bn' in train mode with momentum=None.*Fix: set momentum"):
        _capture(cumulative)


def test_non_scalar_loss_is_a_type_error():
    case = models.residual_mlp()
    with pytest.raises(TypeError, match=r"scalar.*shape \(4, 16\)"):
        capture(case.model, lambda o, t: (o - t) ** 2, case.inputs, case.target)


def test_loss_without_target():
    case = models.residual_mlp()
    c = capture(case.model, lambda o: o.square().mean(), case.inputs)
    assert not c.has_target
    loss, _ = run_captured(c, case.model, case.inputs, None)
    torch.testing.assert_close(loss, case.model(*case.inputs).square().mean().detach())


def test_capture_does_not_change_the_model():
    case = models.tiny_lm(tied=True, custom="ste")
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    apply_before = torch.autograd.Function.__dict__["apply"]
    _capture(case)
    after = case.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert case.model.head.weight is case.model.embed.weight
    assert torch.autograd.Function.__dict__["apply"] is apply_before


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models.random_cases())
def test_random_models_rebuild_loss_and_outputs(case):
    c = _check_rebuilds(case)
    _check_annotations(c, case.model)


def test_dict_of_example_inputs_points_to_example_kwargs():
    case = models.residual_mlp()
    with pytest.raises(TypeError, match=r"example_inputs is a dict with keys \['x'\]; example_inputs is "
                                        r"positional.*example_kwargs"):
        capture(case.model, case.loss_fn, {"x": case.inputs[0]}, case.target)
