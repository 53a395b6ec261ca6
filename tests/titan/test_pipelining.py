"""The pipelining function's pieces, in one process: the stage-local model part, torchtitan's
loss scaling, the [dualpipe_fx] -> compile() argument mapping and the not-traceable error."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("torchtitan", reason="torchtitan is the optional 'titan' extra")

from titan_integration import config as dpfx_config  # noqa: E402
from titan_integration import pipelining  # noqa: E402
from titan_integration.train import parse_job_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOML = os.path.join(REPO, "titan_integration", "configs", "llama3_debug_dualpipe.toml")


@pytest.fixture(scope="module")
def world_of_one():
    """A 1-rank gloo group, for the loss broadcast in step_normalized."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.out = nn.Linear(8, 11, bias=False)
        self.register_buffer("scale", torch.ones(8))

    def forward(self, tokens):
        h = self.emb(tokens) * self.scale
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.out(h)


def _sum_ce(pred, labels):  # torchtitan's loss: a sum over tokens
    return nn.functional.cross_entropy(pred.flatten(0, 1), labels.flatten(0, 1), reduction="sum")


class _MeanPipeline:
    """Stands in for dualpipe_fx.Pipeline's documented rule: loss = mean over C micro-batches,
    grads of that mean accumulated into .grad."""

    def __init__(self, model, c):
        self.model, self.c = model, c

    def parameters(self):
        return self.model.parameters()

    def step(self, tokens, target=None):
        if not torch.is_grad_enabled():  # forward only: the model outputs, as Pipeline does
            return self.model(tokens)
        losses = [_sum_ce(self.model(x), y) for x, y in zip(tokens.tensor_split(self.c), target.tensor_split(self.c))]
        loss = sum(losses) / self.c
        loss.backward()
        return loss.detach()


def _schedule(model, c, group):
    return pipelining.DualPipeFxSchedule(_MeanPipeline(model, c), c, loss_owner=0, group=group,
                                         loss_fn=_sum_ce)


def test_stage_local_model_keeps_fqns_and_objects():
    model = _Tiny()
    keep = ["blocks.1.weight", "blocks.1.bias", "out.weight"]
    named = [(k, v) for k, v in model.state_dict(keep_vars=True).items() if k in keep or k == "scale"]
    part = pipelining.StageLocalModel(named)
    assert sorted(part.state_dict()) == sorted(keep + ["scale"])
    assert dict(part.named_parameters())["blocks.1.weight"] is model.blocks[1].weight
    assert dict(part.named_buffers())["scale"] is model.scale
    # the trainer's to_empty/init_weights must not replace the live tensors
    part.to_empty(device="meta")
    part.init_weights(buffer_device=None)
    assert dict(part.named_parameters())["out.weight"] is model.out.weight


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_step_normalized_matches_torchtitans_unpipelined_scaling(world_of_one, accumulation_steps):
    torch.manual_seed(0)
    model, reference = _Tiny(), _Tiny()
    reference.load_state_dict(model.state_dict())
    c = 4
    schedule = _schedule(model, c, world_of_one)
    batches = [(torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (4, 5)))
               for _ in range(accumulation_steps)]
    tokens = torch.tensor(float(sum(y.numel() for _, y in batches)))  # global_valid_tokens
    losses = [schedule.step_normalized(x, y, tokens) for x, y in batches]
    # torchtitan without PP: loss = loss_sum / global_valid_tokens per accumulation step
    ref_losses = []
    for x, y in batches:
        loss = _sum_ce(reference(x), y) / tokens
        loss.backward()
        ref_losses.append(loss.detach())
    for got, want in zip(losses, ref_losses):
        torch.testing.assert_close(got, want)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_step_appends_the_summed_loss_for_the_stock_trainer(world_of_one):
    model = _Tiny()
    schedule = _schedule(model, 2, world_of_one)
    x, y = torch.randint(0, 11, (2, 3)), torch.randint(0, 11, (2, 3))
    losses = []
    schedule.step(x, target=y, losses=losses, return_outputs=False)
    with torch.no_grad():
        want = _sum_ce(model(x[:1]), y[:1]) + _sum_ce(model(x[1:]), y[1:])
    torch.testing.assert_close(torch.sum(torch.stack(losses)), want)
    with pytest.raises(ValueError, match="attention_masks"):
        schedule.step(x, target=y, attention_masks=None)
    # the validator's forward-only call appends the same summed loss
    eval_losses = []
    schedule.eval(x, target=y, losses=eval_losses)
    torch.testing.assert_close(eval_losses[0], want)


def test_section_keys_map_onto_compile_arguments():
    import dataclasses
    import inspect

    import dualpipe_fx

    cfg = parse_job_config(["--job.config_file", TOML, "--dualpipe_fx.balance", "measured",
                            "--dualpipe_fx.no-overlap",
                            "--dualpipe_fx.split_points", "layers.1,layers.3,layers.5"])
    kwargs = dpfx_config.compile_kwargs(cfg.dualpipe_fx)
    assert kwargs == {"schedule": "dualpipev", "compile_stages": False, "cost": "measured",
                      "split_points": ["layers.1", "layers.3", "layers.5"], "overlap": False,
                      "memory": dualpipe_fx.MemoryPolicy(balance="both", budget=None)}
    assert set(kwargs) <= set(inspect.signature(dualpipe_fx.compile).parameters)
    # [activation_checkpoint] travels separately (it needs the model): recompute_arg
    assert "recompute" in {f.name for f in dataclasses.fields(dualpipe_fx.MemoryPolicy)}


def test_model_that_does_not_trace_is_named(monkeypatch):
    """A model whose forward does not capture: the error names model.name and flavor.
    compile() is cut down to a TraceError, so that no process group is needed."""
    import dualpipe_fx

    cfg = parse_job_config(["--job.config_file", TOML, "--training.seq_len", "16"])

    def fails_to_trace(*args, **kwargs):
        raise dualpipe_fx.TraceError("forward calls torch.nonzero on a value (data-dependent)")

    monkeypatch.setattr(dualpipe_fx, "compile", fails_to_trace)
    with pytest.raises(ValueError) as info:
        pipelining._compile(_Tiny(), _sum_ce, cfg, torch.device("cpu"), None, 4)
    message = str(info.value)
    assert "model.name = 'llama3'" in message and "debugmodel" in message, message
    assert "does not trace" in message and "torch.nonzero" in message


@pytest.mark.long  # a torchtitan model built whole on CPU, ~10 s: the long tier (docs/contributing.md)
def test_deepseek_v3_captures_and_cuts_on_cpu(monkeypatch):
    """deepseek_v3's MoE (histc on int64 counts with the CPU stand-in, experts looping over
    .tolist() sizes) captures and is cut into stages without error; compile() is cut down
    to capture + split_stages, so that no process group is needed."""
    import dualpipe_fx
    from passes.capture import capture
    from passes.split_stages import split_stages
    from titan_integration.cpu import use_int_histc_on_cpu
    from tests.titan.unsplit import build

    use_int_histc_on_cpu()
    cfg = parse_job_config(["--job.config_file", TOML, "--model.name", "deepseek_v3",
                            "--training.seq_len", "16"])
    model = build("deepseek_v3", on_meta=True)  # as the trainer hands it over: on meta

    def capture_and_cut(model, loss_fn, inputs, target=None, *, device=None, **kwargs):
        return split_stages(capture(model, loss_fn, inputs, target, device=device), 4)

    monkeypatch.setattr(dualpipe_fx, "compile", capture_and_cut)
    partition = pipelining._compile(model, _sum_ce, cfg, torch.device("cpu"), None, 4)
    assert len(partition.stages) == 4


def test_torchtitans_ep_token_permutation_runs_on_cpu():
    """cpu.py item 11: torchtitan's own EP (the reference run without PP) permutes the
    dispatched tokens through its CPU path instead of a Triton kernel: rows grouped by local
    expert, source rank by source rank, each group padded to the alignment."""
    from titan_integration.cpu import use_cpu_permute_indices
    from torchtitan.models.moe import utils

    use_cpu_permute_indices()
    x = torch.arange(6.0).view(6, 1)
    # counts per (source rank, local expert): rank 0 sends 1 and 2, rank 1 sends 3 and 0
    _, out, _, counts = utils._permute(x, torch.tensor([1, 2, 3, 0]), 2, 2)
    align = utils.TOKEN_GROUP_ALIGN_SIZE_M
    assert counts.tolist() == [align, align]
    assert out[:4].view(-1).tolist() == [0.0, 3.0, 4.0, 5.0]  # expert 0: rank 0's row, rank 1's rows
    assert out[align: align + 2].view(-1).tolist() == [1.0, 2.0]  # expert 1: rank 0's rows


def test_the_static_token_padding_indices_equal_torchtitans_loop():
    """cpu.py item 14: static_fill_indices (tensor ops of static shape, so that the planner
    traces grouped-GEMM experts on fake tensors) fills the indices torchtitan's CPU loop does,
    over drawn counts, ranks, experts and padded lengths."""
    from torchtitan.models.moe import kernels

    from titan_integration.cpu import static_fill_indices

    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        ranks, experts, align = (int(torch.randint(1, n, (1,), generator=gen)) for n in (4, 5, 9))
        counts = torch.randint(0, 6, (ranks * experts,), generator=gen)
        starts = torch.cumsum(counts, 0) - counts
        sizes = (torch.clamp_min(counts.view(ranks, -1).sum(0), align) + align - 1) // align * align
        writes = torch.cumsum(sizes, 0) - sizes
        max_len = int(sizes.sum()) + int(torch.randint(0, 8, (1,), generator=gen))  # as torchtitan pads it
        want = kernels.fill_indices_cpu(counts, starts, writes, experts, ranks, max_len)
        assert torch.equal(static_fill_indices(counts, starts, writes, experts, ranks, max_len), want)


_REPLICA_ROWS_CHECK = """
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torchtitan.distributed.parallel_dims import ParallelDims
from titan_integration.cpu import use_cpu_when_no_gpu
from titan_integration.pipelining import expert_replica_rows
use_cpu_when_no_gpu()
for dpr, shard, pp, ep in [(2, 2, 2, 2), (1, 4, 2, 2), (2, 4, 1, 2), (1, 4, 1, 4)]:
    world = dpr * shard * pp
    for rank in range(world):
        dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
        dims = ParallelDims(dp_replicate=dpr, dp_shard=shard, cp=1, tp=1, pp=pp, ep=ep, etp=1, world_size=world)
        dims.build_mesh()
        names = ["dp_replicate", "efsdp"] if dpr > 1 else ["efsdp"]
        theirs = sorted(dims.get_mesh(names).mesh.flatten().tolist())
        rows = expert_replica_rows(dims)
        assert sorted(r for row in rows for r in row) == list(range(world)), rows
        assert sorted(next(row for row in rows if rank in row)) == theirs, (dpr, shard, pp, ep, rank, rows, theirs)
        dist.destroy_process_group()
print("ok")
"""


@pytest.mark.long  # a torchtitan model built whole on CPU, ~10 s: the long tier (docs/contributing.md)
def test_expert_replica_rows_are_torchtitans_expert_data_parallel_mesh():
    """The ranks holding one expert slice (its grads reduced over them) are torchtitan's
    ``dp_replicate x efsdp`` mesh: checked for every rank of several layouts, on torch's fake
    process group (one process, no communication)."""
    import subprocess
    import sys

    from tests.titan.unsplit import REPO

    proc = subprocess.run([sys.executable, "-c", _REPLICA_ROWS_CHECK], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]
