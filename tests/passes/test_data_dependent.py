"""Data-dependent (unbacked) sizes: an MoE whose experts loop over ``counts.tolist()``, as
torchtitan's CPU experts do, captures, is costed with the documented guess (tokens x k /
experts per routed size), cut without carrying a data-dependent value across stages, and
split into F/I/W whose run equals eager autograd; its no_grad buffer update (torchtitan's
``tokens_per_expert`` count) is written by F as eager writes it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dualpipe_fx
from passes.capture import capture
from passes.cost_model import UNBACKED_FALLBACK, concrete_size, node_costs

TOKENS, EXPERTS, TOP_K, DIM = 12, 4, 2, 8


class LoopMoE(nn.Module):
    """Top-k routing, tokens sorted by expert, one matmul per expert over its token run."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(DIM, EXPERTS, bias=False)
        self.w = nn.Parameter(torch.randn(EXPERTS, DIM, DIM) / DIM ** 0.5)
        self.register_buffer("tokens_per_expert", torch.zeros(EXPERTS), persistent=False)

    def forward(self, x):  # x: [T, D]
        scores, chosen = torch.topk(self.router(x).softmax(-1), TOP_K, dim=-1)
        counts = torch.bincount(chosen.view(-1), minlength=EXPERTS)
        with torch.no_grad():
            self.tokens_per_expert.add_(counts)
        order = torch.argsort(chosen.view(-1), stable=True)
        routed = x[order // TOP_K]
        runs = torch.split(routed, counts.tolist())  # sizes known only at run time
        out = torch.cat([r @ self.w[e] for e, r in enumerate(runs)])
        y = torch.zeros_like(out)
        y[order] = out * scores.view(-1, 1)[order]
        return y.view(-1, TOP_K, DIM).sum(1)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.moes = nn.ModuleList([LoopMoE(), LoopMoE()])
        self.out = nn.Linear(DIM, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for moe in self.moes:
            h = h + moe(h)
        return self.out(h)


def _loss(pred, y):
    return F.cross_entropy(pred, y)


@pytest.fixture()
def case():
    torch.manual_seed(0)
    return Model(), torch.randn(TOKENS, DIM), torch.randint(0, 3, (TOKENS,))


def test_routed_sizes_are_costed_as_tokens_over_experts(case):
    model, x, y = case
    gm = capture(model, _loss, (x,), y).gm
    sizes = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.SymInt)
             and n.meta["val"].node.hint is None and n.target is torch.ops.aten.item.default]
    assert len(sizes) == 2 * EXPERTS
    assert {concrete_size(s) for s in sizes} == {TOKENS * TOP_K // EXPERTS}
    costs = node_costs(gm)  # no crash; an expert's matmul is costed on its guessed share
    mm = [costs[n.name].flops for n in gm.graph.nodes if n.target in (torch.ops.aten.mm.default, torch.ops.aten.matmul.default)
          and not all(isinstance(d, int) for d in n.meta["val"].shape)]
    assert mm and set(mm) == {2.0 * (TOKENS * TOP_K // EXPERTS) * DIM * DIM}
    assert UNBACKED_FALLBACK >= 1


def test_split_run_equals_eager_and_writes_the_count_buffer(case):
    model, x, y = case
    reference = Model()
    reference.load_state_dict(model.state_dict())
    split = dualpipe_fx.split(model, _loss, x, y, num_stages=4)
    for stage in split.stages:  # no stage receives a value of data-dependent shape
        for n in stage.forward.gm.graph.nodes:
            if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor):
                assert all(isinstance(d, int) or d.node.hint is not None for d in n.meta["val"].shape), n
    loss, grads = split.run(x, y)
    want = _loss(reference(x), y)
    want.backward()
    torch.testing.assert_close(loss, want)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
    for mine, theirs in zip(model.moes, reference.moes):
        assert mine.tokens_per_expert.sum() == TOKENS * TOP_K
        torch.testing.assert_close(mine.tokens_per_expert, theirs.tokens_per_expert)
