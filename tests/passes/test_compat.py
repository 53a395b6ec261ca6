"""Each private torch API that ``passes/_compat.py`` re-exports still behaves as the passes expect."""
import pytest
import torch
from torch import nn

from passes import _compat


def test_tracer_graph_and_node_outside_tracing_are_none():
    assert _compat.current_tracer_graph() is None
    assert _compat.current_fx_node(torch.ones(2)) is None


def test_tracer_graph_and_node_inside_make_fx():
    seen = {}

    def fn(x):
        y = torch.sin(x)
        seen["graph"] = _compat.current_tracer_graph()
        seen["node"] = _compat.current_fx_node(y)
        return y

    gm = _compat.make_fx(fn, tracing_mode="fake")(torch.ones(3))
    assert isinstance(seen["graph"], torch.fx.Graph) and seen["node"].graph is seen["graph"]
    assert seen["node"].target is torch.ops.aten.sin.default
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.ops.aten.sin.default]


def test_make_fx_traces_autograd_grad():
    def fn(x, w):
        w = w.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad((x @ w).sum(), [w])
        return g

    gm = _compat.make_fx(fn, tracing_mode="fake")(torch.randn(2, 3), torch.randn(3, 4))
    x, w = torch.randn(2, 3), torch.randn(3, 4)
    torch.testing.assert_close(gm(x, w), x.sum(0)[:, None].expand(3, 4))


def test_fake_tensor_mode_makes_fake_tensors():
    with _compat.FakeTensorMode():
        t = torch.empty(4, 5)
    assert type(t).__name__ == "FakeTensor" and t.shape == (4, 5)


def test_data_dependent_errors_are_what_export_raises():
    class M(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(_compat.DATA_DEPENDENT_ERRORS):
        torch.export.export(M(), (torch.randn(3),), strict=False)


def test_pytree_round_trip():
    tree = ((torch.ones(1), 2.0), {"k": torch.zeros(2)})
    leaves, spec = _compat.tree_flatten(tree)
    assert len(leaves) == 3 and isinstance(spec, _compat.TreeSpec)
    again = _compat.tree_unflatten(leaves, spec)
    assert again[0][1] == 2.0 and again[1]["k"].shape == (2,)


@pytest.mark.skipif(not hasattr(_compat, "decomposes_implicitly"), reason="cost-model entry not present")
def test_decomposes_implicitly():
    assert _compat.decomposes_implicitly(torch.ops.aten.linear.default)
    assert not _compat.decomposes_implicitly(torch.ops.aten.mm.default)


def test_functional_collective_and_wait_are_recognised():
    import torch.distributed as dist

    from dualpipe_fx import _compat as dcompat

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        name = dist.group.WORLD.group_name
        gm = _compat.make_fx(lambda t: dcompat.functional_wait_tensor(
            dcompat.functional_all_to_all_single(t * 2, [2], [2], name)))(torch.ones(2, 3))
    finally:
        dist.destroy_process_group()
    kinds = [(_compat.is_functional_collective(n), _compat.is_functional_wait(n))
             for n in gm.graph.nodes if n.op == "call_function"]
    assert kinds == [(False, False), (True, False), (False, True)]


def test_make_functional_fx_traces_writes_as_fresh_values():
    def fn(x, w):
        w = w.detach().requires_grad_(True)
        with torch.enable_grad():
            v = x @ w
            v.mul_(w[0])           # autograd keeps the pre-write v for d/dw[0]
            (g,) = torch.autograd.grad(v.sum(), [w])
        return v, g

    x, w = torch.randn(2, 3), torch.randn(3, 3)
    gm = _compat.make_functional_fx(fn)(*(torch.empty(2, 3), torch.empty(3, 3)))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert not any(t._schema.name.endswith("_") for t in targets if hasattr(t, "_schema")), targets
    v, g = gm(x, w)
    wr = w.clone().requires_grad_(True)
    ref = (x @ wr) * wr[0]
    ref.sum().backward()
    torch.testing.assert_close(v, ref.detach())
    torch.testing.assert_close(g, wr.grad)


def test_non_persistent_buffers_names_the_buffers_state_dict_leaves_out():
    module = nn.Module()
    module.register_buffer("kept", torch.ones(2))
    module.register_buffer("table", torch.ones(2), persistent=False)
    assert _compat.non_persistent_buffers(module) == {"table"}
    assert set(module.state_dict()) == {"kept"}


def test_quiet_fake_kernel_errors_silences_torchs_fake_tensor_log_and_restores_it():
    import logging

    from passes import _compat

    logger = logging.getLogger("torch._subclasses.fake_tensor")
    before = logger.level
    with _compat.quiet_fake_kernel_errors():
        assert not logger.isEnabledFor(logging.ERROR)
    assert logger.level == before
    import torch._subclasses.fake_tensor as fake_tensor  # the module logs under that name
    assert fake_tensor.log.name == "torch._subclasses.fake_tensor"


def test_block_mask_fields_copy_and_the_cpu_flex_backward_check():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, q, kv: q >= kv, 2, None, 16, 16, device="cpu", BLOCK_SIZE=8)
    fields = _compat.block_mask_tensor_fields(mask)
    assert fields[:2] == ("kv_num_blocks", "kv_indices")
    assert dict(_compat.block_mask_constants(mask))["seq_lengths"] == (16, 16)
    zeros = {f: torch.zeros_like(getattr(mask, f)) for f in fields}
    copy = _compat.block_mask_with(mask, zeros, mask.mask_mod)
    assert copy.kv_num_blocks.sum() == 0 and mask.kv_num_blocks.sum() > 0  # the original is left as it was
    q = torch.randn(2, 1, 16, 4, dtype=torch.float64, requires_grad=True)
    with _compat.flex_backward_on_cpu():
        out = flex_attention(q, q, q, block_mask=mask)
        out.sum().backward()
    ref = nn.functional.scaled_dot_product_attention(q.detach(), q.detach(), q.detach(), is_causal=True)
    torch.testing.assert_close(out.detach(), ref)
    with pytest.raises(NotImplementedError, match="backward on CPU"):  # restored on exit
        flex_attention(q, q, q, block_mask=mask)
    traced = torch.fx.experimental.proxy_tensor.make_fx(
        lambda x: flex_attention(x, x, x, block_mask=mask))(q.detach())
    assert any(n.target is _compat.FLEX_ATTENTION for n in traced.graph.nodes)
