"""cost_model: FLOPs against the closed forms, bytes against the tensor sizes, purity."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from passes.capture import capture
from passes.cost_model import NodeCost, activation_bytes, edge_bytes, node_costs, scalar_costs


def _linear_graph(m, k, n, bias=True):
    torch.manual_seed(0)
    model = nn.Linear(k, n, bias=bias)
    x = torch.randn(m, k)
    cap = capture(model, lambda out: out.sum(), (x,))
    node = next(nd for nd in cap.gm.graph.nodes if nd.op == "call_function" and "linear" in nd.name)
    return cap.gm, node


@pytest.mark.parametrize("m, k, n, bias", [(3, 5, 7, True), (16, 32, 8, False), (1, 1, 1, True)])
def test_linear_flops_are_2mnk(m, k, n, bias):
    gm, node = _linear_graph(m, k, n, bias)
    cost = node_costs(gm)[node.name]
    assert cost.flops == 2 * m * n * k
    in_bytes = 4 * (m * k + n * k + (n if bias else 0))
    assert cost.out_bytes == 4 * m * n
    assert cost.bytes == in_bytes + 4 * m * n


def test_batched_linear_and_matmul_flops():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 10, bias=False)

        def forward(self, x):  # x: [2, 3, 6]
            h = self.lin(x)  # [2, 3, 10]
            return h @ h.transpose(1, 2)  # [2, 3, 3]

    cap = capture(M(), lambda out: out.sum(), (torch.randn(2, 3, 6),))
    costs = node_costs(cap.gm)
    # linear: (2*3 rows) x 6 -> 10; bmm: 2 batches of [3, 10] @ [10, 3]
    assert sum(c.flops for c in costs.values()) == 2 * (2 * 3) * 6 * 10 + 2 * 2 * 3 * 10 * 3


def test_sdpa_flops_counted_on_cpu():
    b, h, s, d = 2, 3, 5, 4

    class M(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    cap = capture(M(), lambda out: out.sum(), (torch.randn(b, h, s, d),))
    sdpa = next(n for n in cap.gm.graph.nodes if "scaled_dot_product" in n.name)
    # two matmuls: q @ k^T and p @ v (torch's convention ignores the causal mask)
    assert node_costs(cap.gm)[sdpa.name].flops == 4 * b * h * s * s * d


def test_elementwise_ops_have_no_flops_but_bytes():
    cap = capture(nn.GELU(), lambda out: out.sum(), (torch.randn(4, 8),))
    gelu = next(n for n in cap.gm.graph.nodes if "gelu" in n.name)
    cost = node_costs(cap.gm)[gelu.name]
    assert cost == NodeCost(flops=0.0, bytes=2 * 4 * 8 * 4, out_bytes=4 * 8 * 4, time=0.0)


def test_measured_mode_returns_positive_times():
    gm, node = _linear_graph(8, 16, 16)
    costs = node_costs(gm, measured=True, repeats=2)
    assert costs[node.name].time > 0.0
    assert scalar_costs(gm, "measured")[node.name] > 0.0
    with pytest.raises(ValueError, match="repeats=0"):
        node_costs(gm, repeats=0)


def test_custom_callable_cost():
    gm, node = _linear_graph(2, 3, 4)
    table = scalar_costs(gm, lambda n: 7.0 if n is node else 1.0)
    assert table[node.name] == 7.0
    assert set(table) == set(node_costs(gm))
    assert all(v == 1.0 for name, v in table.items() if name != node.name)


@pytest.mark.parametrize("cost, err", [("time", ValueError), (None, TypeError), (lambda n: float("nan"), ValueError)])
def test_bad_cost_spec(cost, err):
    gm, _ = _linear_graph(2, 3, 4)
    with pytest.raises(err, match="expected"):
        scalar_costs(gm, cost)


def test_edge_bytes_and_activation_bytes():
    gm, node = _linear_graph(3, 5, 7)
    edges = edge_bytes(gm)
    x = next(n for n in gm.graph.nodes if n.meta.get("dpfx_kind") == "input")
    assert edges[(x.name, node.name)] == 4 * 3 * 5 == activation_bytes(x)
    assert all(edges[(node.name, user.name)] == 4 * 3 * 7 for user in node.users if user.op != "output")


def test_node_costs_do_not_touch_the_graph():
    gm, _ = _linear_graph(3, 5, 7)
    before = str(gm.graph), [dict(n.meta) for n in gm.graph.nodes]
    node_costs(gm, measured=True, repeats=1)
    assert (str(gm.graph), [dict(n.meta) for n in gm.graph.nodes]) == before
    with pytest.raises(TypeError):
        node_costs(gm)["x"] = NodeCost(0.0, 0, 0)  # frozen mapping
