"""dualpipe_fx.split: Split.run (every forward, then I last stage first, then W) gives the
single-process loss and a grad per original parameter FQN; errors name what is wrong."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dualpipe_fx
from tests import models, shared_models


def eager(case):
    model = case.model
    model.zero_grad()
    loss = case.loss_fn(model(*case.inputs), case.target)
    loss.backward()
    # a param that reaches the loss only under no_grad has no autograd grad; split gives zeros
    return loss.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                           for n, p in model.named_parameters(remove_duplicate=False)}


def check_split(case, num_stages, **kw):
    case.model.zero_grad(set_to_none=True)
    sp = dualpipe_fx.split(case.model, case.loss_fn, case.inputs, case.target, num_stages=num_stages, **kw)
    assert len(sp.stages) == num_stages
    loss, grads = sp.run(case.inputs, case.target)
    ref_loss, ref = eager(case)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref.keys()
    for name, want in ref.items():
        rel = ((grads[name] - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        assert rel <= 1e-5, (name, rel)
    return sp


@pytest.mark.parametrize("case", [models.residual_mlp(), models.tiny_llama(), models.transformer_encoder(),
                                  models.buffers(), models.custom_function(kind="ste"), models.no_grad_part()],
                         ids=lambda c: c.name)
def test_split_run_matches_autograd(case):
    check_split(case, 2)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models.random_cases(), st.integers(1, 4))
def test_random_models_split_run_matches_autograd(case, num_stages):
    check_split(case, num_stages)  # a tied head with odd S: stages 0 and S-1 on two ranks


def test_tied_weights_on_one_rank_sum_grads_and_report_aliases():
    case = models.tiny_lm(tied=True, depth=2)
    sp = check_split(case, 4)  # DualPipeV: stages 0 and 3 on rank 0
    assert sp.partition.param_stages["embed.weight"] == (0, 3)
    _, grads = sp.run(case.inputs, case.target)
    assert grads["head.weight"] is grads["embed.weight"]


def test_shared_param_across_ranks_is_allowed_and_sums_grads():
    case = models.tiny_lm(tied=True, depth=2)
    one_rank_each = {0: 0, 1: 1, 2: 2, 3: 3}  # 1F1B: the embedding and head on ranks 0 and 3
    sp = check_split(case, 4, placement=one_rank_each)
    assert sp.partition.param_stages["embed.weight"] == (0, 3) and dict(sp.placement) == one_rank_each
    v_shaped = dualpipe_fx.split(case.model, case.loss_fn, case.inputs, case.target, num_stages=4)
    assert sp.partition.costs == v_shaped.partition.costs  # the cut depends on cost alone


def test_shared_embedding_seq2seq_is_balanced_across_ranks():
    """Encoder input, decoder input and tied head share one embedding; under DualPipeV its
    stages sit on ranks 0 and 1. Keeping them on one rank cost a 1.51 max/mean imbalance."""
    case = shared_models.seq2seq()
    sp = check_split(case, 4)
    assert sp.rank_balance["time"] < 1.05 and sp.rank_balance["memory"] < 1.05, sp.describe()
    stages = sp.partition.param_stages["embed.weight"]
    assert len({sp.placement[s] for s in stages}) == 2, stages


def test_describe_lists_every_stage():
    case = models.tiny_llama(n_layers=2)
    sp = dualpipe_fx.split(case.model, case.loss_fn, case.inputs, case.target, num_stages=4)
    text = sp.describe()
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["stage", "rank", "params"] and "FLOPs" in lines[0]
    assert [ln.split()[0] for ln in lines[1:5]] == ["0", "1", "2", "3"]
    assert [ln.split()[1] for ln in lines[1:5]] == ["0", "1", "1", "0"]
    total = sum(int(ln.split()[2].replace(",", "")) for ln in lines[1:5])
    assert total == sum(p.numel() for p in case.model.parameters())
    assert f"{sp.balance:.3f}" in lines[5] and sp.balance == sp.partition.balance >= 1.0
    assert lines[6].split()[:2] == ["rank", "stages"] and [ln.split()[1] for ln in lines[7:9]] == ["0,3", "1,2"]
    assert lines[-1].startswith("per rank, max/mean: cost") and sp.rank_balance["time"] >= 1.0


def test_untraceable_model_error_reaches_the_public_api():
    case = models.data_dependent()
    with pytest.raises(ValueError, match=r"models\.py:\d+.*torch\.where"):
        dualpipe_fx.split(case.model, case.loss_fn, case.inputs, case.target, num_stages=2)


def test_run_accepts_a_bare_tensor_and_new_batches():
    case = models.residual_mlp()
    sp = dualpipe_fx.split(case.model, case.loss_fn, case.inputs, case.target, num_stages=2)
    x2, t2 = torch.randn(4, 16), torch.randn(4, 16)
    loss, grads = sp.run(x2, t2)
    case.model.zero_grad()
    ref = case.loss_fn(case.model(x2), t2)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grads["head.weight"], case.model.head.weight.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"input:0 is \(5, 16\).*expected \(4, 16\)"):
        sp.run(torch.randn(5, 16), t2)
    with pytest.raises(ValueError, match=r"target is None"):
        sp.run(x2)


class _SteFirst(torch.nn.Module):
    """Each block starts with a custom Function, so a cut at a block feeds it an activation."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_SteBlock() for _ in range(3))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


class _SteBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        y, _ = models.ScaledMul.apply(x, self.fc.bias, 3.0)
        return torch.tanh(self.fc(y))


def test_custom_function_fed_by_an_activation_across_a_cut():
    torch.manual_seed(0)
    case = models.Case("ste-first", _SteFirst(), models.mse, (torch.randn(4, 8),), torch.randn(4, 8))
    sp = check_split(case, 3, split_points=["blocks.1", "blocks.2"])
    for sg, gm in zip(sp.stages[1:], sp.partition.stages[1:]):
        entry = next(n for n in gm.graph.nodes if n.meta.get("dpfx_region_input") == 0)
        assert entry.args[0].meta["dpfx_kind"] == "activation"


class _GradScale(torch.autograd.Function):
    """forward returns its input itself; backward scales the grad (a gradient-scaling layer)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class _Outer(torch.autograd.Function):
    """Calls another custom Function inside its forward: one region, the outer backward runs."""

    @staticmethod
    def forward(ctx, x):
        return models.StraightThroughRound.apply(x, 4.0) * 2

    @staticmethod
    def backward(ctx, g):
        return g * 5


class _IdentityAndNested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        h = _GradScale.apply(self.fc1(x), 0.5)
        return self.fc2(_Outer.apply(torch.tanh(h)))


def test_identity_and_nested_custom_functions():
    torch.manual_seed(0)
    case = models.Case("id-nested", _IdentityAndNested(), models.mse, (torch.randn(4, 8),), torch.randn(4, 8))
    sp = check_split(case, 2)
    assert sorted(r.fn.__name__ for r in sp.partition.captured.regions.values()) == ["_GradScale", "_Outer"]


def test_mixed_precision_split_runs_the_bf16_model_and_halves_the_cut():
    """split(mixed_precision=bf16 policy): Split.run equals the model cast to bf16 in one process
    (loss and grads, bitwise; grads returned in fp32), and the bytes on each cut halve."""
    import copy

    from torch.distributed.fsdp import MixedPrecisionPolicy

    from passes.cost_model import stage_io_bytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                                      torch.nn.Linear(32, 16)) for _ in range(4)])
    x, y = torch.randn(8, 16), torch.randn(8, 16)

    def loss_fn(out, target):
        return ((out.float() - target) ** 2).mean()

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    bf16 = dualpipe_fx.split(model, loss_fn, (x,), y, 4, mixed_precision=policy)
    loss, grads = bf16.run((x,), y)
    ref = copy.deepcopy(model).to(torch.bfloat16)
    ref_loss = loss_fn(ref(x.bfloat16()), y)  # cast_forward_inputs: the float input in bf16
    ref_loss.backward()
    assert torch.equal(loss, ref_loss.detach())
    for name, p in ref.named_parameters():
        assert grads[name].dtype == torch.float32 and torch.equal(grads[name], p.grad.float()), name
    fp32 = dualpipe_fx.split(model, loss_fn, (x,), y, 4)
    for a, b in zip(fp32.partition.stages[:-1], bf16.partition.stages[:-1]):
        assert stage_io_bytes(b)[1] * 2 == stage_io_bytes(a)[1]
    with pytest.raises(TypeError, match="MixedPrecisionPolicy"):
        dualpipe_fx.split(model, loss_fn, (x,), y, 4, mixed_precision="bf16")
