"""Values of any layout cross stage boundaries: stride 0 (expanded masks), overlapping
windows (unfold), transposed and sliced views. The receiver rebuilds the layout its stage
graph was traced with from the dense buffer the sender sends (``TensorMeta.restride``);
a same-rank hand-over passes the tensor itself. Pipelined training == single-process training.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dualpipe_fx.runtime.stage import TensorMeta
from tests.runtime.dist_harness import run_ranks

S, D, C = 6, 8, 4  # sequence, width, micro-batches
SPLIT = ["layers.0", "layers.1", "layers.2"]  # embed | layer | layer | layer + head: every view crosses every cut


def _layouts() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, S, D, generator=g)
    return {
        "expand_leading": torch.randn(S, S, generator=g).expand(2, 1, S, S),     # strides (0, 36, 6, 1)
        "mask_expand": (h[..., 0] > 0)[:, None, :, None].expand(2, 1, S, S),     # bool, (6, 6, 1, 0)
        "int_expand": torch.arange(S)[None, :, None].expand(3, S, 2),            # int64, (0, 1, 0)
        "mean_expand": h.mean(1, keepdim=True).expand(2, S, D),                  # (8, 0, 1)
        "size_one_stride_zero": torch.randn(4, generator=g)[None].expand(1, 4),  # nothing to expand
        "transpose": h.transpose(1, 2),
        "slice_with_offset": h[:, 1:, D // 2:],                                  # gaps and a storage offset
        "step_slice": h[:, ::2],
        "unfold": h.unfold(1, 3, 1),                                             # windows overlap: (48, 8, 1, 8)
        "as_strided_overlap": h.flatten()[3:].as_strided((4, 3), (1, 1)),
        "interleaved": torch.randn(8, generator=g).as_strided((3, 2), (2, 3)),  # no overlap, yet not nested
        "expanded_windows": h[0].unfold(0, 3, 2)[None].expand(2, -1, -1, -1),    # stride 0 and overlap
        "zero_size": torch.randn(2, 0, 4, generator=g).transpose(0, 2),
        "zero_size_expand": torch.randn(3, 1, generator=g).expand(3, 0),
    }


@pytest.mark.parametrize("name", list(_layouts()))
def test_restride_rebuilds_the_traced_layout_from_a_dense_buffer(name):
    view = _layouts()[name]
    meta = TensorMeta(tuple(view.shape), view.dtype, tuple(view.stride()))
    got = meta.restride(view.contiguous())  # what a receive buffer holds
    assert got.stride() == view.stride(), name
    assert torch.equal(got, view), name
    assert meta.restride(view) is view  # a same-rank hand-over in the traced layout is not copied


def test_restride_keeps_one_copy_of_an_expanded_value():
    view = torch.randn(S, S).expand(16, 1, S, S)
    got = TensorMeta(tuple(view.shape), view.dtype, tuple(view.stride())).restride(view.contiguous())
    assert got.untyped_storage().nbytes() == S * S * view.element_size()


# -- pipelined: a model whose every layer reads views made once, before the first cut -----


class _Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.pos = nn.Parameter(torch.randn(S, D))

    def forward(self, x):  # x: [b, s, d]
        b, s, d = x.shape
        h = self.proj(x)
        causal = torch.ones(s, s, device=x.device).tril().bool().expand(b, 1, s, s)  # stride 0 on b
        keep = (x[..., 0] > -1)[:, None, :, None].expand(b, 1, s, s)               # stride 0 on the last dim
        pos = self.pos[None].expand(b, s, d)                  # a parameter, stride 0 on b: grads go back
        scale = h.mean(1, keepdim=True).sigmoid().expand(b, s, d)  # an activation, stride 0 on s
        ht = h.transpose(1, 2)                                # [b, d, s]
        hs = h[:, 1:, d // 2:]                                # [b, s-1, d/2], storage offset
        win = h.unfold(1, 3, 1)                               # [b, s-2, d, 3], overlapping windows
        return h, causal, keep, pos, scale, ht, hs, win


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(D, D)
        self.mix = nn.Linear(D, D)

    def forward(self, h, causal, keep, pos, scale, ht, hs, win):
        q = self.q(h + pos) * scale
        scores = ((q @ ht) / D ** 0.5)[:, None].masked_fill(~(causal & keep), -1e4)  # [b, 1, s, s]
        attn = scores.softmax(-1)[:, 0] @ h
        local = F.pad(win.mean(-1), (0, 0, 1, 1))             # [b, s, d]
        tail = hs.mean((1, 2))[:, None, None]
        return h + self.mix(attn + local + tail)


class Views(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = _Embed()
        self.layers = nn.ModuleList(_Layer() for _ in range(3))
        self.head = nn.Linear(D, D)

    def forward(self, x):
        h, *views = self.embed(x)
        for layer in self.layers:
            h = layer(h, *views)
        return self.head(h)


def _loss(out, y):
    return F.mse_loss(out, y)


def _batch(b: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, S, D, generator=g), torch.randn(b, S, D, generator=g)


CASES = {"overlapped": True, "sequential": False}  # F&B pairs as merged graphs, or F then B


def _pipelined(rank, world):
    import dualpipe_fx

    x, y = _batch(2 * C)
    out = {}
    for name, overlap in CASES.items():
        model = Views()
        pipe = dualpipe_fx.compile(model, _loss, (x[:2],), y[:2], schedule="dualpipev", num_microbatches=C,
                                   split_points=SPLIT, overlap=overlap)
        loss = pipe.step(x, target=y)
        out[name] = (None if loss is None else loss.item(),
                     {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None})
    return out


def test_every_cut_carries_a_view_of_each_kind():
    from passes.capture import capture
    from passes.split_stages import split_stages

    x, y = _batch(2)
    part = split_stages(capture(Views(), _loss, (x,), y), 4, split_points=SPLIT)
    for k in (1, 2, 3):  # the receivers of the P2P cuts (0->1, 2->3) and of the same-rank one (1->2)
        strides = [n.meta["val"].stride() for n in part.stages[k].graph.nodes
                   if n.meta.get("dpfx_kind") == "activation"]
        assert any(0 in st for st in strides), (k, strides)                      # expanded
        assert any(list(st) != sorted(st, reverse=True) for st in strides), (k, strides)  # transposed


@pytest.mark.timeout(300)
def test_views_cross_cuts_and_dualpipev_trains_like_one_process():
    results = run_ranks(_pipelined, 2)
    model = Views()
    x, y = _batch(2 * C)
    ref = _loss(model(x), y)
    ref.backward()
    for name in CASES:
        losses = [r[name][0] for r in results if r[name][0] is not None]
        assert losses and all(loss == pytest.approx(ref.item(), rel=1e-6) for loss in losses), name
        grads = {**results[0][name][1], **results[1][name][1]}
        assert set(grads) == {n for n, _ in model.named_parameters()}, name
        for pname, p in model.named_parameters():
            torch.testing.assert_close(grads[pname], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {pname}: {m}")
