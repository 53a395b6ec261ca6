"""A cut on a non-contiguous value: stage graphs are traced with the producer's strides, and
the runtime restores that layout on values it receives as dense buffers."""
import torch
from torch import nn

import dualpipe_fx
from passes.capture import capture
from passes.split_stages import split_stages


class _Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):  # x: [b, s, 8] -> [b, 2, s, 4], a transposed view
        b, s, _ = x.shape
        return self.proj(x).view(b, s, 2, 4).transpose(1, 2)


class _Merge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(8, 8)

    def forward(self, h):  # view needs h's producer strides unless h arrives contiguous
        b, _, s, _ = h.shape
        return self.out(h.transpose(1, 2).contiguous().view(b, s, 8) + h.reshape(b, s, 8))


class StridedCut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = _Heads()
        self.merge = _Merge()

    def forward(self, x):
        return self.merge(self.heads(x))


def _loss(out, y):
    return torch.nn.functional.mse_loss(out, y)


def test_strided_value_crosses_contiguous_and_split_matches_autograd():
    model, x, y = StridedCut(), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    part = split_stages(capture(model, _loss, (x,), y), 2, split_points=["merge"])
    got = [n for n in part.stages[1].graph.nodes if n.meta.get("dpfx_kind") == "activation"]
    # the cut really falls on a transposed view: the receiver is traced with its strides
    assert got and not all(n.meta["val"].is_contiguous() for n in got)

    loss, grads = dualpipe_fx.split(model, _loss, (x,), y, num_stages=2, split_points=["merge"]).run((x,), y)
    ref = _loss(model(x), y)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7)


class TwoStrided(nn.Module):
    """Two cuts that fall on transposed views when split at every module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.merge, self.heads2, self.merge2 = _Heads(), _Merge(), _Heads(), _Merge()

    def forward(self, x):
        return self.merge2(self.heads2(self.merge(self.heads(x))))


def _pipelined(rank, world):
    model, x, y = TwoStrided(), torch.randn(8, 3, 8), torch.randn(8, 3, 8)
    pipe = dualpipe_fx.compile(model, _loss, (x[:2],), y[:2], schedule="dualpipev", num_microbatches=4,
                               split_points=["merge", "heads2", "merge2"])
    loss = pipe.step(x, target=y)
    return loss, {n: p.grad.clone() for n, p in pipe.named_parameters()}


def test_strided_cut_runs_pipelined_on_two_ranks():
    from tests.runtime.dist_harness import run_ranks
    results = run_ranks(_pipelined, 2)
    model, x, y = TwoStrided(), torch.randn(8, 3, 8), torch.randn(8, 3, 8)
    ref = _loss(model(x), y)
    ref.backward()
    torch.testing.assert_close(results[0][0], ref.detach(), rtol=1e-6, atol=0)
    grads = {**results[0][1], **results[1][1]}
    assert set(grads) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7)
