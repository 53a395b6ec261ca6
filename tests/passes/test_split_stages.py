"""split_stages: the stages run in sequence rebuild the captured graph, and the cut is optimal.

What these tests rebuild: stages in sequence == the captured graph (loss and model outputs,
bit for bit); the stage node lists concatenate to the captured node list (contiguity); the
chosen cut equals a brute-force search (least max stage cost, then fewest crossing bytes);
every error a user can cause.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dualpipe_fx.examples import LlamaConfig, LlamaDecoder, llama_batch, llama_loss
from passes.capture import capture
from passes.cost_model import activation_bytes, scalar_costs
from passes.split_stages import split_stages

# --------------------------------------------------------------------------------------
# Generated models


class HalfSquare(torch.autograd.Function):
    """``x*x/2 + x`` with a hand-written backward: a region split_stages must keep whole."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x * 0.5 + x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x + 1.0)


class RMS(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class GenMLP(nn.Module):
    """depth x (Linear, optional norm, GELU or custom Function, optional residual), a head.

    ``tied``: the head reuses the first Linear's weight (one parameter, two far-apart uses).
    ``skip``: the input is added to the output, so the input is forwarded to the end.
    """

    def __init__(self, depth, width, residual, norm, tied, custom, skip, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.residual, self.custom, self.skip = residual, custom, skip
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        make_norm = {"layer": lambda: nn.LayerNorm(width), "rms": lambda: RMS(width), None: nn.Identity}[norm]
        self.norms = nn.ModuleList(make_norm() for _ in range(depth))
        self.head = nn.Linear(width, width)
        if tied:
            self.head.weight = self.layers[0].weight

    def forward(self, x):
        h = x
        for i, (lin, norm) in enumerate(zip(self.layers, self.norms)):
            y = norm(lin(h))
            y = HalfSquare.apply(y) if self.custom and i % 2 else F.gelu(y)
            h = h + y if self.residual else y
        out = self.head(h)
        return out + x if self.skip else out


def mse(out, target):
    return F.mse_loss(out, target)


def tiny_llama(n_layers, tied, seed=0):
    cfg = LlamaConfig(vocab_size=32, dim=16, n_layers=n_layers, n_heads=2, ffn_hidden=24, max_seq_len=8)
    model = LlamaDecoder(cfg, seed=seed)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    return model, llama_batch(cfg, batch=2, seq=8, seed=seed)


# --------------------------------------------------------------------------------------
# Running stages and checking the layout


def _values(model, inputs, target):
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    return {"param": params, "buffer": buffers, "target": {"target": target},
            "input": {f"input:{i}": x for i, x in enumerate(inputs)}}


def _placeholders(gm):
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def run_captured(cap, model, inputs, target):
    vals = _values(model, inputs, target)
    return cap.gm(*[vals[p.meta["dpfx_kind"]][p.meta["dpfx_name"]] for p in _placeholders(cap.gm)])


def run_stages(part, model, inputs, target):
    """Run the stages in sequence; the activations travel by name, checked against order."""
    vals = _values(model, inputs, target)
    sent, sent_names = (), ()
    for gm in part.stages:
        args = []
        acts = [p.meta["dpfx_name"] for p in _placeholders(gm) if p.meta["dpfx_kind"] == "activation"]
        assert tuple(acts) == sent_names, "activation placeholders == sender's outputs, in order"
        by_name = dict(zip(sent_names, sent))
        for p in _placeholders(gm):
            kind, name = p.meta["dpfx_kind"], p.meta["dpfx_name"]
            args.append(by_name[name] if kind == "activation" else vals[kind][name])
        sent = gm(*args)
        sent_names = gm.graph.find_nodes(op="output")[0].meta["dpfx_output_names"]
    return sent


def _compute_names(gm):
    return [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


def check_layout(part, cap):
    """Contiguity, placeholder order, external inputs, parameter ownership."""
    stages = part.stages
    assert sum((_compute_names(g) for g in stages), []) == _compute_names(cap.gm)
    order = {"param": 0, "buffer": 1, "activation": 2, "input": 3, "target": 3}
    for s, gm in enumerate(stages):
        kinds = [p.meta["dpfx_kind"] for p in _placeholders(gm)]
        assert kinds == sorted(kinds, key=order.__getitem__), kinds
        assert ("input" in kinds) == (s == 0 and cap.num_inputs > 0)
        assert ("target" in kinds) == (s == len(stages) - 1 and cap.has_target)
        assert s > 0 or "activation" not in kinds
        for node in gm.graph.nodes:
            assert "val" in node.meta or node.op in ("output", "get_attr")
    owners: dict[str, list[int]] = {}
    for s, gm in enumerate(stages):
        for p in _placeholders(gm):
            if p.meta["dpfx_kind"] == "param":
                owners.setdefault(p.meta["dpfx_name"], []).append(s)
    assert {k: tuple(v) for k, v in owners.items()} == dict(part.param_stages)


def check_equal(part, cap, model, inputs, target):
    ref = run_captured(cap, model, inputs, target)
    got = run_stages(part, model, inputs, target)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# Brute-force reference for the choice of cuts


def _reference_cut_table(gm):
    """For every cut k: (allowed, crossing bytes), rebuilt from the definitions."""
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    pos = {n: i for i, n in enumerate(nodes)}
    N = len(nodes)
    values = [n for n in gm.graph.nodes if n.meta.get("dpfx_kind") == "input"] + nodes
    produced = {v: pos.get(v, -1) for v in values}
    last = {v: max((pos.get(u, N) for u in v.users), default=-1) for v in values}
    regions = {}
    for n in nodes:
        if "dpfx_region" in n.meta:
            regions.setdefault(n.meta["dpfx_region"], []).append(pos[n])
    target_uses = [pos[u] for p in gm.graph.nodes if p.meta.get("dpfx_kind") == "target" for u in p.users]
    table = {}
    for k in range(1, N):
        cross = [v for v in values if produced[v] < k <= last[v]]
        ok = all(isinstance(v.meta.get("val"), torch.Tensor) for v in cross)
        ok &= not any(min(r) < k <= max(r) for r in regions.values())
        ok &= all(t >= k for t in target_uses)
        table[k] = (ok, sum(activation_bytes(v) for v in cross))
    return nodes, table


def brute_force_best(gm, num_stages, costs):
    nodes, table = _reference_cut_table(gm)
    c = [costs.get(n.name, 0.0) for n in nodes]
    if sum(c) == 0:
        c = [1.0] * len(c)
    prefix = list(itertools.accumulate(c, initial=0.0))
    best = None
    allowed = [k for k, (ok, _) in table.items() if ok]
    for cuts in itertools.combinations(allowed, num_stages - 1):
        bounds = list(zip((0, *cuts), (*cuts, len(nodes))))
        worst = max(prefix[b] - prefix[a] for a, b in bounds)
        key = (worst, sum(table[k][1] for k in cuts))
        if best is None or key[0] < best[0] * (1 - 1e-9) or (key[0] <= best[0] * (1 + 1e-9) and key[1] < best[1]):
            best = key
    return best


# --------------------------------------------------------------------------------------
# Property tests


mlp_configs = st.fixed_dictionaries({
    "depth": st.integers(1, 4), "width": st.sampled_from([4, 8]), "residual": st.booleans(),
    "norm": st.sampled_from([None, "layer", "rms"]), "tied": st.booleans(),
    "custom": st.booleans(), "skip": st.booleans(),
})


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=mlp_configs, num_stages=st.integers(1, 4), seed=st.integers(0, 3))
def test_generated_mlps_rebuild_the_graph_and_cut_optimally(cfg, num_stages, seed):
    model = GenMLP(**cfg, seed=seed)
    x = torch.randn(3, cfg["width"], generator=torch.Generator().manual_seed(seed))
    y = torch.randn(3, cfg["width"])
    cap = capture(model, mse, (x,), y)
    before = str(cap.gm.graph)
    part = split_stages(cap, num_stages)  # a tied head with odd S: stages 0 and S-1 on two ranks
    assert str(cap.gm.graph) == before, "split_stages must not mutate the captured graph"
    assert len(part.stages) == num_stages and len(part.cut_bytes) == num_stages - 1
    check_layout(part, cap)
    check_equal(part, cap, model, (x,), y)
    if num_stages <= 3:  # shared parameters do not constrain the cut
        worst, nbytes = brute_force_best(cap.gm, num_stages, scalar_costs(cap.gm, "flops"))
        assert max(part.costs) == pytest.approx(worst, rel=1e-9)
        assert sum(part.cut_bytes) == nbytes


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_layers=st.integers(1, 3), tied=st.booleans(), num_stages=st.sampled_from([2, 4]))
def test_generated_transformers_rebuild_the_graph(n_layers, tied, num_stages):
    model, (tokens, target) = tiny_llama(n_layers, tied)
    cap = capture(model, llama_loss, (tokens,), target)
    part = split_stages(cap, num_stages)
    check_layout(part, cap)
    check_equal(part, cap, model, (tokens,), target)
    if tied:  # the tied embedding and head: stage 0 and the last stage
        assert part.param_stages["tok_embeddings.weight"] == (0, num_stages - 1)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_split_points_start_stages(data):
    depth = data.draw(st.integers(2, 5))
    num_stages = data.draw(st.integers(2, 4))
    points = data.draw(st.lists(st.integers(1, depth - 1), unique=True, max_size=num_stages - 1))
    model, inputs, y, cap = _mlp_capture(depth=depth, residual=data.draw(st.booleans()))
    part = split_stages(cap, num_stages, split_points=[f"layers.{i}" for i in points])
    firsts = [next(n for n in g.graph.nodes if n.op == "call_function") for g in part.stages]
    starts = {f.meta["dpfx_module"] for f in firsts}
    assert {f"layers.{i}" for i in points} <= starts
    check_layout(part, cap)
    check_equal(part, cap, model, inputs, y)


def test_transformer_encoder_splits():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    cap = capture(model, mse, (x,), y)
    part = split_stages(cap, 3)
    check_layout(part, cap)
    check_equal(part, cap, model, (x,), y)


# --------------------------------------------------------------------------------------
# Specific behaviours


class OddOps(nn.Module):
    """A multi-output op (chunk), a no_grad block (a higher-order op with a submodule),
    a buffer, a tensor made in forward, and an early value reused at the end."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(8, 8), nn.Linear(8, 8)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        u, v = self.a(x).chunk(2, dim=-1)
        with torch.no_grad():
            z = (u * 0 + 1).sum()
        h = self.b(F.silu(u) * v) * self.scale + torch.ones(8) * z
        return self.c(h) + u


@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_odd_ops_split(num_stages):
    model, x, y = OddOps(), torch.randn(3, 8), torch.randn(3, 8)
    cap = capture(model, mse, (x,), y)
    part = split_stages(cap, num_stages)
    check_layout(part, cap)
    check_equal(part, cap, model, (x,), y)


def _mlp_capture(**kw):
    cfg = dict(depth=4, width=8, residual=False, norm=None, tied=False, custom=False, skip=False)
    cfg.update(kw)
    model = GenMLP(**cfg)
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    return model, (x,), y, capture(model, mse, (x,), y)


def test_input_needed_late_is_forwarded_through_middle_stages():
    model, inputs, y, cap = _mlp_capture(depth=3, skip=True)
    # four equal linears, four stages: one linear each, the skip-add after the last one
    part = split_stages(cap, 4, cost=lambda n: 1.0 if "linear" in n.name else 0.0)
    assert part.costs == (1.0, 1.0, 1.0, 1.0)
    for gm in part.stages[1:]:
        acts = [p.meta["dpfx_name"] for p in _placeholders(gm) if p.meta["dpfx_kind"] == "activation"]
        assert "input:0" in acts
    for gm in part.stages[1:-1]:
        assert "input:0" in gm.graph.find_nodes(op="output")[0].meta["dpfx_output_names"]
    check_equal(part, cap, model, inputs, y)


def test_forwarded_values_count_in_every_cut_they_cross():
    _, _, _, plain = _mlp_capture(depth=3)
    _, _, _, skip = _mlp_capture(depth=3, skip=True)
    x_bytes = 3 * 8 * 4
    linears = lambda n: 1.0 if "linear" in n.name else 0.0  # noqa: E731
    a, b = split_stages(plain, 4, cost=linears), split_stages(skip, 4, cost=linears)
    assert [bb - aa for aa, bb in zip(a.cut_bytes, b.cut_bytes)] == [x_bytes] * 3


def test_never_cuts_inside_a_custom_function_region():
    model, inputs, y, cap = _mlp_capture(depth=2, custom=True)
    region_nodes = [n.name for n in cap.gm.graph.nodes if "dpfx_region" in n.meta]
    assert len(region_nodes) >= 3
    middle = region_nodes[len(region_nodes) // 2]
    # all cost sits in the region's middle node: the best unconstrained cut would split it
    part = split_stages(cap, 2, cost=lambda n: 100.0 if n.name == middle else 0.0)
    for gm in part.stages:
        names = set(_compute_names(gm))
        assert names.isdisjoint(region_nodes) or names.issuperset(region_nodes)
    check_equal(part, cap, model, inputs, y)


def test_custom_cost_callable_drives_the_cut():
    model, inputs, y, cap = _mlp_capture(depth=4)
    linears = [n.name for n in cap.gm.graph.nodes if "linear" in n.name]
    # the last linear (the head) costs as much as all others together: it gets a stage alone
    part = split_stages(cap, 2, cost=lambda n: 4.0 if n.name == linears[-1] else (1.0 if n.name in linears else 0.0))
    assert part.costs == (4.0, 4.0) and part.balance == 1.0
    assert linears[-1] in _compute_names(part.stages[1]) and linears[-2] in _compute_names(part.stages[0])


def test_ties_go_to_fewest_crossing_bytes():
    model, inputs, y, cap = _mlp_capture(depth=2, residual=True)
    part = split_stages(cap, 2, cost=lambda n: 1.0 if "linear" in n.name else 0.0)
    _, table = _reference_cut_table(cap.gm)
    assert part.cut_bytes[0] == 3 * 8 * 4  # one [3, 8] fp32 tensor: the residual stream only
    assert part.cut_bytes[0] == min(b for ok, b in table.values() if ok)


def test_repeated_layer_may_span_stages_on_two_ranks():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.shared, self.b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(self.shared(torch.tanh(self.shared(self.a(x)))))

    model, x, y = Reuse(), torch.randn(3, 8), torch.randn(3, 8)
    cap = capture(model, mse, (x,), y)
    # one rank per stage; the balanced 3-way cut separates the two uses of `shared`
    part = split_stages(cap, 3, placement={0: 0, 1: 1, 2: 2})
    assert len(part.param_stages["shared.weight"]) == 2
    worst, nbytes = brute_force_best(cap.gm, 3, scalar_costs(cap.gm, "flops"))
    assert max(part.costs) == pytest.approx(worst, rel=1e-9) and sum(part.cut_bytes) == nbytes
    check_equal(part, cap, model, (x,), y)


def test_tied_embedding_and_head_in_first_and_last_stage():
    model, (tokens, target) = tiny_llama(2, tied=True)
    cap = capture(model, llama_loss, (tokens,), target)
    part = split_stages(cap, 4)
    assert part.param_stages["tok_embeddings.weight"] == (0, 3)
    for s in (0, 3):
        names = [p.meta["dpfx_name"] for p in _placeholders(part.stages[s])]
        assert "tok_embeddings.weight" in names


@pytest.fixture(scope="module")
def llama8():
    model = LlamaDecoder(LlamaConfig(n_layers=8))
    tokens, target = llama_batch(model.cfg, batch=2, seq=16)
    return model, tokens, target, capture(model, llama_loss, (tokens,), target)


@pytest.mark.parametrize("num_stages", [4, 8])
def test_llama_decoder_flop_balance(llama8, num_stages):
    model, tokens, target, cap = llama8
    part = split_stages(cap, num_stages)
    assert part.balance <= 1.05, part.costs
    assert part.balance == pytest.approx(max(part.costs) * num_stages / sum(part.costs))
    check_layout(part, cap)
    check_equal(part, cap, model, (tokens,), target)


def test_split_points_are_honoured(llama8):
    model, tokens, target, cap = llama8
    part = split_stages(cap, 4, split_points=["layers.2", "layers.6"])
    firsts = [next(n for n in g.graph.nodes if n.op == "call_function") for g in part.stages]
    assert firsts[0].meta["dpfx_module"] == "tok_embeddings"
    modules = [f.meta["dpfx_module"] for f in firsts[1:]]
    assert sum(m.startswith("layers.2.") for m in modules) == 1
    assert sum(m.startswith("layers.6.") for m in modules) == 1
    for gm, stop in zip(part.stages, ("layers.2.", "layers.6.")):
        assert not any(n.meta.get("dpfx_module", "").startswith(stop) for n in gm.graph.nodes)
    check_equal(part, cap, model, (tokens,), target)


def test_measured_cost_splits():
    model, (tokens, target) = tiny_llama(1, tied=False)
    cap = capture(model, llama_loss, (tokens,), target)
    part = split_stages(cap, 2, cost="measured")
    assert all(c > 0 for c in part.costs)
    check_equal(part, cap, model, (tokens,), target)


# --------------------------------------------------------------------------------------
# Errors


def test_unknown_split_point_lists_close_matches(llama8):
    cap = llama8[3]
    with pytest.raises(ValueError, match=r"no module named 'layers\.44'.*layers\.4"):
        split_stages(cap, 4, split_points=["layers.44"])


def test_too_many_split_points(llama8):
    with pytest.raises(ValueError, match="split_points gives 3 cuts but num_stages=3"):
        split_stages(llama8[3], 3, split_points=["layers.1", "layers.2", "layers.3"])


def test_split_point_at_graph_start(llama8):
    with pytest.raises(ValueError, match="starts the graph"):
        split_stages(llama8[3], 2, split_points=["tok_embeddings"])


def test_split_points_must_be_a_list(llama8):
    with pytest.raises(TypeError, match="list of module names"):
        split_stages(llama8[3], 2, split_points="layers.4")


def test_split_point_inside_region():
    class Inner(nn.Module):
        def forward(self, x):
            return x * 2.0

    class Wrap(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return inner(torch.sin(x)) + 1.0

        @staticmethod
        def backward(ctx, g):
            return g

    inner = Inner()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.inner = nn.Linear(4, 4), inner

        def forward(self, x):
            return Wrap.apply(self.lin(x))

    model, x, y = M(), torch.randn(2, 4), torch.randn(2, 4)
    cap = capture(model, mse, (x,), y)
    if not any(n.meta.get("dpfx_module") == "inner" for n in cap.gm.graph.nodes):
        pytest.skip("export attributes no node to a module called inside a Function")
    with pytest.raises(ValueError, match="inside custom autograd.Function region"):
        split_stages(cap, 2, split_points=["inner"])


def test_too_many_stages():
    _, _, _, cap = _mlp_capture(depth=1)
    with pytest.raises(ValueError, match=r"num_stages=100 needs 99 cuts .* use num_stages <= \d+"):
        split_stages(cap, 100)


@pytest.mark.parametrize("bad, err", [(0, ValueError), (-1, ValueError), ("2", TypeError), (2.0, TypeError)])
def test_bad_num_stages(bad, err):
    _, _, _, cap = _mlp_capture(depth=1)
    with pytest.raises(err, match="num_stages"):
        split_stages(cap, bad)


def test_not_a_captured_graph():
    with pytest.raises(TypeError, match="expected the Captured"):
        split_stages(nn.Linear(2, 2), 2)


def test_placement_must_cover_every_stage():
    _, _, _, cap = _mlp_capture()
    with pytest.raises(ValueError, match=r"placement covers stages \[0, 1\]"):
        split_stages(cap, 3, placement={0: 0, 1: 1})


def test_shared_param_on_two_ranks_is_cut_by_cost_alone():
    model, (tokens, target) = tiny_llama(2, tied=True)
    cap = capture(model, llama_loss, (tokens,), target)
    part = split_stages(cap, 3)  # odd S: one rank per stage, so the embedding's on ranks 0 and 2
    assert part.param_stages["tok_embeddings.weight"] == (0, 2)
    check_equal(part, cap, model, (tokens,), target)
    one_rank_each = split_stages(cap, 4, placement={0: 0, 1: 1, 2: 2, 3: 3})
    v_shaped = split_stages(cap, 4)
    assert one_rank_each.param_stages["tok_embeddings.weight"] == (0, 3)
    assert one_rank_each.costs == v_shaped.costs and one_rank_each.cut_bytes == v_shaped.cut_bytes


@pytest.mark.parametrize("cost, err, msg", [
    ("bytes", ValueError, "expected 'flops', 'measured'"),
    (3, TypeError, "expected 'flops', 'measured'"),
    (lambda n: -1.0, ValueError, "expected a finite number >= 0"),
])
def test_bad_cost(cost, err, msg):
    _, _, _, cap = _mlp_capture(depth=1)
    with pytest.raises(err, match=msg):
        split_stages(cap, 2, cost=cost)


# --------------------------------------------------------------------------------------
# A kept cut: the same model traced at other input shapes, cut at the same places


def _drawn_cost(seed):
    weights = torch.rand(10_000, generator=torch.Generator().manual_seed(seed)).tolist()
    return lambda node: weights[hash(node.name) % len(weights)] + 0.01  # an arbitrary cut to keep


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=mlp_configs, num_stages=st.integers(2, 4), seed=st.integers(0, 3),
       batches=st.lists(st.integers(1, 5), min_size=2, max_size=2, unique=True))
def test_a_kept_cut_cuts_another_shape_at_the_same_ops(cfg, num_stages, seed, batches):
    """Traced at batch b1 and cut by a drawn cost; traced at b2 and cut with ``keep``: the
    same positions, every parameter in the same stages, and the stages rebuild the b2 graph."""
    model = GenMLP(**cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    (x1, y1), (x2, y2) = [(torch.randn(b, cfg["width"], generator=gen), torch.randn(b, cfg["width"], generator=gen))
                          for b in batches]
    first = split_stages(capture(model, mse, (x1,), y1), num_stages, cost=_drawn_cost(seed))
    cap = capture(model, mse, (x2,), y2)
    kept = split_stages(cap, num_stages, keep=first.kept)
    assert kept.kept == first.kept
    assert dict(kept.param_stages) == dict(first.param_stages)
    check_layout(kept, cap)
    check_equal(kept, cap, model, (x2,), y2)


class _Double(nn.Module):
    def forward(self, h):
        return h * 2.0


class _ExtraWhenWide(nn.Module):
    """Two Linear layers with a module between them that runs only for batches wider than 2
    (the traces of two batch sizes differ by its op)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.extra, self.b = nn.Linear(4, 4), _Double(), nn.Linear(4, 4)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if x.shape[0] > 2:
            h = self.extra(h)
        return self.b(h)


def test_a_kept_cut_maps_through_ops_that_one_trace_lacks():
    model = _ExtraWhenWide()
    x1, y1, x2, y2 = torch.randn(4, 4), torch.randn(4, 4), torch.randn(2, 4), torch.randn(2, 4)
    first = split_stages(capture(model, mse, (x1,), y1), 2, split_points=["b"])
    cap = capture(model, mse, (x2,), y2)
    kept = split_stages(cap, 2, keep=first.kept)
    assert len(kept.kept.ops) == len(first.kept.ops) - 1  # extra's mul is not in the batch-2 trace
    assert dict(kept.param_stages) == dict(first.param_stages) == {"a.weight": (0,), "a.bias": (0,),
                                                                   "b.weight": (1,), "b.bias": (1,)}
    check_equal(kept, cap, model, (x2,), y2)


def test_a_kept_cut_at_an_op_the_other_trace_lacks_is_refused():
    model = _ExtraWhenWide()
    first = split_stages(capture(model, mse, (torch.randn(4, 4),), torch.randn(4, 4)), 2, split_points=["extra"])
    with pytest.raises(ValueError, match="no op matching .*mul.*extra.*cannot keep their parameters"):
        split_stages(capture(model, mse, (torch.randn(2, 4),), torch.randn(2, 4)), 2, keep=first.kept)
