"""Tensor parallelism beside the pipeline: a small decoder, its TP plan, and the rank functions
(top level, so spawned ranks can import them).

The decoder is llama-shaped (RMSNorm, attention with q/k/v/o, SwiGLU MLP), and its plan is
torchtitan's for llama3 (Megatron TP with sequence parallelism): the embedding rowwise over the
vocabulary with a sequence-sharded output, norms under ``SequenceParallel``, attention and MLP
inputs gathered by ``PrepareModuleInput``, q/k/v and w1/w3 colwise, o and w2 rowwise back to
sequence shards, the head colwise from sequence shards to replicated logits.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dualpipe_fx

VOCAB, DIM, HEADS, HIDDEN, LAYERS, SEQ = 32, 16, 4, 32, 4, 8
C = 4  # micro-batches per step


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:  # what a meta model's per-rank init calls
        nn.init.ones_(self.weight)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head_dim = DIM // HEADS
        self.wq, self.wk, self.wv = (nn.Linear(DIM, DIM, bias=False) for _ in range(3))
        self.wo = nn.Linear(DIM, DIM, bias=True)

    def forward(self, x):
        b, s, _ = x.shape
        # -1 heads: under TP each rank holds HEADS / tp of them (local tensors)
        q, k, v = (w(x).view(b, s, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(DIM, HIDDEN, bias=False), nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(DIM), Attention()
        self.ffn_norm, self.feed_forward = RMSNorm(DIM), FeedForward()

    def forward(self, h):
        h = h + self.attention(self.attention_norm(h))
        return h + self.feed_forward(self.ffn_norm(h))


class Decoder(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tok_embeddings = nn.Embedding(VOCAB, DIM)
            self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
            self.norm = RMSNorm(DIM)
            self.output = nn.Linear(DIM, VOCAB, bias=False)
            for p in self.parameters():  # norms away from ones: their grads must be right too
                if p.dim() == 1:
                    nn.init.normal_(p, 1.0, 0.1)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


class MixNet(nn.Module):
    """The other styles and placements, without the decoder's structure: a colwise embedding
    with a replicated output, a Megatron MLP (colwise with bias, rowwise to Replicate), a
    PrepareModuleOutput splitting the sequence, a SequenceParallel LayerNorm (weight and bias),
    a colwise layer with a DTensor output (use_local_output=False) through gelu into a rowwise
    one, and a plain (unparallelised) layer norm on replicated values."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.emb = nn.Embedding(VOCAB, DIM)
            self.fc1, self.fc2 = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)
            self.plain = nn.LayerNorm(DIM)
            self.split = nn.Identity()
            self.ln = nn.LayerNorm(DIM)
            self.fc3, self.fc4 = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)
            self.head = nn.Linear(DIM, VOCAB, bias=False)
            for m in (self.plain, self.ln):
                nn.init.normal_(m.weight, 1.0, 0.1)
                nn.init.normal_(m.bias, 0.0, 0.1)

    def forward(self, tokens):
        h = self.emb(tokens)
        h = self.plain(h + self.fc2(F.gelu(self.fc1(h))))
        h = self.ln(self.split(h))
        h = h + self.fc4(F.gelu(self.fc3(h)))
        return self.head(h)


def mix_plan() -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleOutput, RowwiseParallel,
                                                   SequenceParallel)

    return {"emb": ColwiseParallel(output_layouts=Replicate()), "fc1": ColwiseParallel(), "fc2": RowwiseParallel(),
            "split": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)),
            "ln": SequenceParallel(),
            "fc3": ColwiseParallel(input_layouts=Shard(1), use_local_output=False),
            "fc4": RowwiseParallel(output_layouts=Shard(1)),
            "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}


def loss_fn(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (2 * C, SEQ), generator=gen)
    return x, torch.randint(0, VOCAB, (2 * C, SEQ), generator=gen)


def plan() -> dict:
    """torchtitan's llama3 TP plan (with sequence parallelism), module FQN -> style."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    out = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
           "norm": SequenceParallel(),
           "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}
    for i in range(LAYERS):
        out.update({
            f"layers.{i}.attention_norm": SequenceParallel(),
            f"layers.{i}.attention": PrepareModuleInput(input_layouts=(Shard(1),),
                                                        desired_input_layouts=(Replicate(),)),
            f"layers.{i}.attention.wq": ColwiseParallel(),
            f"layers.{i}.attention.wk": ColwiseParallel(),
            f"layers.{i}.attention.wv": ColwiseParallel(),
            f"layers.{i}.attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            f"layers.{i}.ffn_norm": SequenceParallel(),
            f"layers.{i}.feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                                           desired_input_layouts=(Replicate(),)),
            f"layers.{i}.feed_forward.w1": ColwiseParallel(),
            f"layers.{i}.feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            f"layers.{i}.feed_forward.w3": ColwiseParallel(),
        })
    return out


def reference(steps: int = 3, lr: float = 0.1, model_cls=None):
    """One process, the unsplit model: per step the loss and the grads, SGD between steps."""
    model = (model_cls or Decoder)()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = batch()
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        out.append({"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}})
        opt.step()
    return out, {n: t.clone() for n, t in model.state_dict().items()}





def _meshes():
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    return mesh["pp"].get_group(), mesh["tp"]


def _collectives(gm) -> list[str]:
    """The collective ops a graph calls, in order (``wait_tensor`` left out)."""
    from passes._compat import is_functional_collective
    return [str(n.target).split(".")[1] for n in gm.graph.nodes if is_functional_collective(n)]


def _build(schedule: str, on_meta: bool, pp_group, tp_mesh, x, y, ckpt: str):
    """The pipeline of the parallelised decoder. From the full model's weights (distributed by
    parallelize_module), saving its state_dict() (DTensors) to ``ckpt`` with DCP; or built and
    parallelised on meta, each rank allocating and initialising its stages' local shards on
    the CPU, then loading that checkpoint with DCP (resharded to this pipeline's layout)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor.parallel import parallelize_module

    if not on_meta:
        pipe = dualpipe_fx.compile(parallelize_module(Decoder(), tp_mesh, plan()), loss_fn, (x[:2],), y[:2],
                                   schedule=schedule, num_microbatches=C, group=pp_group)
        dcp.save(pipe.state_dict(), checkpoint_id=ckpt)
        return pipe
    with torch.device("meta"):
        model = Decoder()
    pipe = dualpipe_fx.compile(parallelize_module(model, tp_mesh, plan()), loss_fn, (x[:2],), y[:2],
                               schedule=schedule, num_microbatches=C, group=pp_group, device="cpu")
    state = pipe.state_dict()
    dcp.load(state, checkpoint_id=ckpt)
    pipe.load_state_dict(state)
    return pipe


def _train(pipe, x, y, steps: int, lr: float) -> list[dict]:
    from torch.distributed.tensor import DTensor

    opt = torch.optim.SGD(pipe.parameters(), lr=lr)
    params = dict(pipe.named_parameters())
    trace = []
    for _ in range(steps):
        opt.zero_grad()
        loss = pipe.step(x, target=y)
        grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in params.items()}
        norm = None
        if all(isinstance(p, DTensor) for p in params.values()):  # torch's own norm of DTensor grads
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 1e9).full_tensor().item()
        trace.append({"loss": None if loss is None else loss.item(), "grads": grads, "norm": norm,
                      "grad_types": {n: type(p.grad).__name__ for n, p in params.items()}})
        opt.step()
    return trace


def pp_x_tp(rank, world, ckpt: str, runs=(("dualpipev", False), ("1f1b", True)), steps: int = 3,
            lr: float = 0.1):
    """PP=2 x TP=2, rank = 2 * pp + tp. Per (schedule, on_meta) run: each SGD step's loss (None off
    the loss rank), gathered grads and grad norm; the parameters' types, placements and global
    shapes; per local stage the collectives of F, I and W; the F&B pairs run merged; the
    gathered state_dict() after the steps; the memory plan's parameter bytes and the local ones."""
    from torch.distributed.tensor import DTensor

    pp_group, tp_mesh = _meshes()
    x, y = batch()
    out = {}
    for schedule, on_meta in runs:
        pipe = _build(schedule, on_meta, pp_group, tp_mesh, x, y, ckpt)
        kinds = {n: (type(p).__name__, tuple(map(repr, p.placements)) if isinstance(p, DTensor) else None,
                     tuple(p.shape)) for n, p in pipe.named_parameters()}
        graphs = {s: {k: _collectives(getattr(st.flat_graphs, g).gm) for k, g in
                      (("F", "forward"), ("I", "backward_input"), ("W", "backward_weight"))}
                  for s, st in pipe.stages.items()}
        trace = _train(pipe, x, y, steps, lr)
        runner = pipe._executor.overlap
        state = pipe.state_dict()
        out[(schedule, on_meta)] = {
            "steps": trace, "kinds": kinds, "graphs": graphs,
            "multiplexed": sum(gm is not None for gm in runner._graphs.values()),
            "state": {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()},
            "plan_params": pipe.memory_plan().ranks[0].params,
            "local_param_bytes": sum(p.to_local().nbytes if isinstance(p, DTensor) else p.nbytes
                                     for p in pipe.parameters())}
    return out


def pp_dp_tp(rank, world, pp: int = 1, dp: int = 2, tp: int = 2, schedule: str = "dualpipev", steps: int = 3,
             lr: float = 0.1, mixed: bool = False) -> dict:
    """PP x DP x TP on a (pp, dp, tp) mesh, ``dp_mode="replicate"``: replica ``d`` steps on its
    half of the batch (the reference takes the whole). Each step's loss (None off the loss
    ranks) with this rank's replica index, and the gathered grads. ``mixed``: MixNet under
    mix_plan instead of the decoder."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
    x, y = batch()
    index, rows = mesh["dp"].get_local_rank(), x.shape[0] // dp
    x, y = x[index * rows:(index + 1) * rows], y[index * rows:(index + 1) * rows]
    mb = rows // C
    model = parallelize_module(MixNet(), mesh["tp"], mix_plan()) if mixed else \
        parallelize_module(Decoder(), mesh["tp"], plan())
    pipe = dualpipe_fx.compile(model, loss_fn, (x[:mb],), y[:mb],
                               schedule=schedule, num_microbatches=C, group=mesh["pp"].get_group(),
                               parallelism=dualpipe_fx.Parallelism(mesh["dp"].get_group(), "replicate"))
    return {"replica": index, "steps": _train(pipe, x, y, steps, lr)}


def mixed_styles(rank, world, schedule: str = "1f1b", steps: int = 3, lr: float = 0.1) -> list[dict]:
    """MixNet under mix_plan, PP=2 x TP=2: each SGD step's loss and gathered grads."""
    from torch.distributed.tensor.parallel import parallelize_module

    pp_group, tp_mesh = _meshes()
    x, y = batch()
    pipe = dualpipe_fx.compile(parallelize_module(MixNet(), tp_mesh, mix_plan()), loss_fn, (x[:2],), y[:2],
                               schedule=schedule, num_microbatches=C, group=pp_group)
    return _train(pipe, x, y, steps, lr)


def refused(rank, world) -> dict[str, str]:
    """compile()'s messages: a ParallelStyle of the user's own on one module (refused on every
    rank before any communication, naming the module and the style); a sharded DTensor model
    output (loss parallel's head; refused when the trace meets it)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel
    from torch.distributed.tensor import distribute_module
    from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

    class ScaledInput(ParallelStyle):
        def _apply(self, module, mesh):
            return distribute_module(module, mesh, input_fn=lambda mod, inputs, mesh: inputs)

    pp_group, tp_mesh = _meshes()
    x, y = batch()
    out = {}
    for case, change in (("style", {"layers.1.feed_forward.w2": ScaledInput()}),
                         ("output", {"output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                                               use_local_output=False)})):
        try:
            dualpipe_fx.compile(parallelize_module(Decoder(), tp_mesh, {**plan(), **change}), loss_fn, (x[:2],),
                                y[:2], num_microbatches=C, group=pp_group)
            out[case] = "not refused"
        except Exception as err:  # noqa: BLE001 - the test reads the type and the message
            out[case] = f"{type(err).__name__}: {err}"
    return out


_PLACEMENTS = ("R", "S0", "S1", "S-1", "P")


def _placement(code: str):
    from torch.distributed.tensor import Partial, Replicate, Shard
    return Replicate() if code == "R" else Partial() if code == "P" else Shard(int(code[1:]))


def _local(full: torch.Tensor, code: str, size: int, index: int) -> torch.Tensor:
    """This rank's local tensor of ``full`` placed ``code`` (Partial: unequal parts summing to it)."""
    if code == "R":
        return full.clone()
    if code == "P":
        return full * (0.25 if index == 0 else 0.75 / (size - 1))
    return full.chunk(size, dim=int(code[1:]))[index].clone()


def _one_op_case(case: dict, mesh, tp) -> list[str]:
    """Our local op and DTensor's on one drawn case: outputs and input grads; mismatches."""
    from torch.distributed.tensor import DTensor, Shard

    from dualpipe_fx.runtime.tp_ops import into_sharded_matmul, redistribute

    size, index = mesh.size(), mesh.get_local_rank()
    gen = torch.Generator().manual_seed(case["seed"])
    full = torch.randn([2 * d for d in case["shape"]], generator=gen)
    src = _placement(case["src"])
    ours_x = _local(full, case["src"], size, index).requires_grad_()
    theirs_x = ours_x.detach().clone().requires_grad_()
    theirs = DTensor.from_local(theirs_x, mesh, [src], run_check=False)
    if case["matmul"]:  # ColwiseParallel's input into a matmul with Shard(0) weights
        w = torch.randn(4, full.shape[-1], generator=gen)
        w_local = w.chunk(size, 0)[index]
        ours = torch.nn.functional.linear(into_sharded_matmul(ours_x, src, tp), w_local)
        theirs = torch.nn.functional.linear(theirs.redistribute(mesh, [_placement("R")]),
                                            DTensor.from_local(w_local, mesh, [Shard(0)], run_check=False))
        grad = torch.randn(*full.shape[:-1], 4, generator=gen).chunk(size, -1)[index]
    else:
        dst = _placement(case["dst"])
        ours = redistribute(ours_x, src, dst, tp)
        theirs = theirs.redistribute(mesh, [dst])
        grad = _local(torch.randn(full.shape, generator=gen), case["dst"], size, index)
    theirs = theirs.to_local()
    ours.backward(grad)
    theirs.backward(grad)
    bad = []
    if not torch.allclose(ours, theirs, atol=1e-5):
        bad.append(f"{case}: forward differs")
    if not torch.allclose(ours_x.grad, theirs_x.grad, atol=1e-5):
        bad.append(f"{case}: input grad differs")
    return bad


def ops_against_dtensor(rank, world, examples: int = 30) -> list[str]:
    """runtime.tp_ops' redistributions and sharded-matmul input on hypothesis-drawn shapes and
    placements against DTensor's own redistribute (and linear), forward and input grad, on
    each TP group of 2. Drawn alike on every rank (derandomized, no shrinking) and never
    raising inside the draw, so the ranks' collectives line up; returns the mismatches."""
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st

    from dualpipe_fx.runtime.tp_ops import TPGroup

    _, mesh = _meshes()
    tp = TPGroup(mesh.get_group().group_name, mesh.size(), mesh.get_local_rank())
    bad: list[str] = []

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(shape=st.lists(st.integers(1, 3), min_size=2, max_size=3), src=st.sampled_from(_PLACEMENTS),
           dst=st.sampled_from(("R", "S0", "S1", "S-1")), matmul=st.booleans(), seed=st.integers(0, 2 ** 16))
    def check(shape, src, dst, matmul, seed):
        s, d = _placement(src), _placement(dst)
        n = len(shape)
        if not matmul and s.is_shard() and d.is_shard() and s.dim % n != d.dim % n:
            return  # Shard(a) -> Shard(b): no TP style makes it (redistribute refuses it)
        bad.extend(_one_op_case({"shape": shape, "src": src, "dst": dst, "matmul": matmul, "seed": seed},
                                mesh, tp))

    check()
    return bad


def all_cases(rank, world, ckpt: str) -> dict:
    """Every TP case in one spawned 4-rank job (``ckpt``: a folder for the DCP checkpoint)."""
    return {"ops": ops_against_dtensor(rank, world), "refused": refused(rank, world),
            "train": pp_x_tp(rank, world, ckpt), "dp": pp_dp_tp(rank, world, mixed=True)}
