"""The traceable stand-in for torchtitan's ``generate_permute_indices`` equals its CPU reference.

qwen3's MoE flavor, which pads its experts' tokens with it, trains like torchtitan without PP
in tests/titan/test_train.py (its runs share that module's torchrun jobs)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("torchtitan", reason="torchtitan is the optional 'titan' extra")

from titan_integration.moe import permute_indices  # noqa: E402


@st.composite
def layouts(draw):
    ranks = draw(st.integers(1, 4))
    experts = draw(st.integers(1, 4))
    counts = draw(st.lists(st.integers(0, 11), min_size=ranks * experts, max_size=ranks * experts))
    alignment = draw(st.sampled_from([1, 2, 8, 16]))
    rows = sum(counts)
    # torchtitan's own bound (moe/utils.py::_permute; its reference cannot truncate), or more
    full = -(-(rows + experts * alignment) // alignment) * alignment
    max_len = draw(st.sampled_from([full, full + alignment]))
    return torch.tensor(counts, dtype=torch.int64), experts, ranks, max_len, alignment


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_permute_indices_equal_torchtitans(layout):
    from torchtitan.models.moe.kernels import generate_permute_indices

    counts, experts, ranks, max_len, alignment = layout
    want = generate_permute_indices(counts, experts, ranks, max_len, alignment, use_cpu=True)
    got = permute_indices(counts, experts, ranks, max_len, alignment)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), (layout, got, want)


def test_permute_indices_trace_with_data_dependent_counts():
    """Counts known only at run time (unbacked): the indices still have the static length."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def fn(counts, x):
        permuted, sizes, _ = permute_indices(counts, 2, 2, 24, 8)
        return torch.vstack((x, x.new_zeros(x.shape[-1])))[permuted], sizes

    gm = make_fx(fn, tracing_mode="symbolic")(torch.tensor([1, 2, 3, 0]), torch.randn(6, 3))
    counts, x = torch.tensor([0, 5, 2, 1]), torch.randn(8, 3)
    out, sizes = gm(counts, x)
    ref, ref_sizes = fn(counts, x)
    assert out.shape == (24, 3) and torch.equal(out, ref) and torch.equal(sizes, ref_sizes)
    assert not any(n.target is torch.ops.aten._local_scalar_dense.default for n in gm.graph.nodes)
