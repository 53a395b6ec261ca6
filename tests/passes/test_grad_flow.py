"""passes.grad_flow: which captured values carry a gradient; a cut that carries one that does
not (an MoE router's float histc counts) splits and matches eager autograd."""
from __future__ import annotations

import torch
from torch import nn

import dualpipe_fx
from passes.capture import capture
from passes.grad_flow import grad_carrying


class _Router(nn.Module):
    """Float counts from histc (no gradient reaches them) cross the cut into an int cumsum."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 4)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)                                    # [n, 4]
        counts = torch.histc(logits.argmax(-1).float(), bins=4, min=0, max=3)
        h = self.proj(x)
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)     # refused on a grad-requiring input
        return h * logits.softmax(-1).sum(-1, keepdim=True) + offsets[-1].float() * 0.0


def _mse(out, y):
    return ((out - y) ** 2).mean()


def test_histc_counts_carry_no_grad_and_params_paths_do():
    torch.manual_seed(0)
    model, x, y = _Router(), torch.randn(6, 8), torch.randn(6, 8)
    cap = capture(model, _mse, (x,), y)
    names = grad_carrying(cap.gm)
    nodes = {n.name: n for n in cap.gm.graph.nodes}
    histc = [n for n in nodes.values() if getattr(n.target, "__name__", "").startswith("histc")]
    assert histc and all(n.name not in names for n in histc)
    assert any(n.name in names for n in nodes.values() if "linear" in str(n.target))


def test_a_cut_carrying_a_gradless_float_matches_eager():
    torch.manual_seed(0)
    model, x, y = _Router(), torch.randn(6, 8), torch.randn(6, 8)
    sp = dualpipe_fx.split(model, _mse, (x,), y, num_stages=2, split_points=["proj"],
                           memory=dualpipe_fx.MemoryPolicy(balance="time"))
    loss, grads = sp.run(x, target=y)
    model.zero_grad()
    ref = _mse(model(x), y)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
