"""Models larger than one rank: built on meta, each rank allocates, initialises and loads
only its own stages, and trains like one process.

What it rebuilds: a meta-built model compiled for 2-rank DualPipeV, loaded from a full
``torch.load(mmap=True)`` checkpoint of a real model, gives the real model's loss and grads;
each rank holds the other rank's parameters on meta; a module without ``reset_parameters``
blocks ``step()`` (naming it) until a checkpoint fills it; ``param_init_fn`` runs for exactly
this rank's modules and gives the values a one-process ``materialize`` gives; a DCP checkpoint
of ``pipe.state_dict()`` loads into the unsplit model and back into a pipeline.
"""
from __future__ import annotations

import gc
import os
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dualpipe_fx
from dualpipe_fx import examples as ex
from dualpipe_fx.runtime.materialize import materialize
from tests.runtime.dist_harness import run_ranks

C = 4
LLAMA = ex.LlamaConfig(vocab_size=32, dim=16, n_layers=4, n_heads=2, ffn_hidden=24, max_seq_len=8)


class Scale(nn.Module):
    """A learned per-channel scale with no ``reset_parameters`` (values come from a checkpoint)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class ScaledStack(nn.Module):
    def __init__(self, width: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.scales = nn.ModuleList(Scale(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, scale in zip(self.layers, self.scales):
            x = scale(torch.tanh(layer(x)))
        return x


class TinyAttention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)


def llama_init(module: nn.Module) -> None:
    """Every tensor of the module it is called for: LlamaDecoder's RoPE tables (non-persistent,
    in no checkpoint) computed, RMSNorm's scale set to one, reset_parameters() elsewhere."""
    if isinstance(module, ex.LlamaDecoder):
        head_dim = module.cfg.dim // module.cfg.n_heads
        module.rope_cos, module.rope_sin = ex._rope_tables(head_dim, module.cfg.max_seq_len, module.cfg.rope_theta)
    elif isinstance(module, ex.RMSNorm):
        nn.init.ones_(module.weight)
    else:
        module.reset_parameters()


def _scaled_batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2 * C, 8, generator=gen), torch.randn(2 * C, 8, generator=gen)


def _grads(pipe) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}


def _placement(model: nn.Module, pipe) -> dict[str, bool]:
    """Per model parameter: held by this rank (on cpu) or not (on meta)."""
    mine = dict(pipe.named_parameters())
    return {n: (n in mine, p.device.type) for n, p in model.named_parameters()}


def _llama_from_checkpoint(rank, path, dcp_dir):
    with torch.device("meta"):
        model = ex.LlamaDecoder(LLAMA)
    x, y = ex.llama_batch(LLAMA, batch=C, seq=4, seed=1)
    pipe = dualpipe_fx.compile(model, ex.llama_loss, (x[:1].to("meta"),), y[:1].to("meta"), num_microbatches=C,
                               device="cpu", param_init_fn=llama_init)
    pipe.load_state_dict(torch.load(path, mmap=True))
    loss = pipe.step(x, target=y)
    out = {"loss": None if loss is None else loss.item(), "grads": _grads(pipe), "where": _placement(model, pipe)}
    torch.optim.SGD(pipe.parameters(), lr=0.1).step()  # trained values, unlike the checkpoint's
    import torch.distributed.checkpoint as dcp
    out["state"] = pipe.state_dict()
    dcp.save(out["state"], checkpoint_id=dcp_dir)
    with torch.device("meta"):
        other = ex.LlamaDecoder(LLAMA)
    pipe2 = dualpipe_fx.compile(other, ex.llama_loss, (x[:1],), y[:1], num_microbatches=C, device="cpu",
                                param_init_fn=llama_init)
    state2 = pipe2.state_dict()
    dcp.load(state2, checkpoint_id=dcp_dir)
    pipe2.load_state_dict(state2)
    out["reloaded"] = pipe2.state_dict()
    return out


def _scaled_from_checkpoint(rank, path):
    """Default init: Linear.reset_parameters; Scale has none, so step() waits for a checkpoint."""
    with torch.device("meta"):
        model = ScaledStack()
    x, y = _scaled_batch()
    pipe = dualpipe_fx.compile(model, ex.mse_loss, (x[:2],), y[:2], num_microbatches=C, device="cpu")
    try:
        pipe.step(x, target=y)
        blocked = "NO ERROR"
    except ValueError as err:
        blocked = str(err)
    pipe.load_state_dict(torch.load(path, mmap=True))
    loss = pipe.step(x, target=y)
    return {"blocked": blocked, "loss": None if loss is None else loss.item(), "grads": _grads(pipe),
            "where": _placement(model, pipe)}


def _init_per_rank(rank):
    """param_init_fn sees exactly this rank's modules; values do not depend on the layout."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = ex.LinearGeluStack(depth=8, width=8)
    names = {id(m): n for n, m in model.named_modules()}
    calls = []

    def init(module):
        calls.append(names[id(module)])
        module.reset_parameters()

    split_mod = sys.modules["dualpipe_fx.api.split"]
    split_backward, iw_splits = split_mod.split_backward, []

    def counting(gm, **kw):  # compile runs the I/W split for this rank's stages only
        iw_splits.append(kw["index"])
        return split_backward(gm, **kw)

    split_mod.split_backward = counting
    x, y = ex.linear_gelu_batch(8, batch=2 * C, seed=1)
    try:
        pipe = dualpipe_fx.compile(model, ex.mse_loss, (x[:2],), y[:2], num_microbatches=C, device="cpu",
                                   param_init_fn=init)
    finally:
        split_mod.split_backward = split_backward
    owners = sorted({n.rsplit(".", 1)[0] for n, _ in pipe.named_parameters()})
    return {"calls": calls, "owners": owners, "state": pipe.state_dict(), "stages": sorted(pipe.stages),
            "iw_splits": sorted(iw_splits)}


def _errors_and_references(rank):
    with torch.device("meta"):
        model = ex.LinearGeluStack(depth=8, width=8)
    x, y = ex.linear_gelu_batch(8, batch=2, seed=1)
    errors = {}
    for name, kw in {"no_device": {}, "meta_device": {"device": "meta"}, "bad_init": {"device": "cpu",
                                                                                      "param_init_fn": 3}}.items():
        try:
            dualpipe_fx.compile(model, ex.mse_loss, (x,), y, num_microbatches=C, **kw)
            errors[name] = "NO ERROR"
        except (ValueError, TypeError) as err:
            errors[name] = f"{type(err).__name__}: {err}"
    # a real model: once the caller drops it, the other rank's parameters are freed
    real = ex.LinearGeluStack(depth=8, width=8)
    pipe = dualpipe_fx.compile(real, ex.mse_loss, (x[:1],), y[:1], num_microbatches=C)
    mine = dict(pipe.named_parameters())
    theirs = [weakref.ref(p) for n, p in real.named_parameters() if n not in mine]
    del real
    gc.collect()
    return {"errors": errors, "freed": [r() is None for r in theirs], "has_model": hasattr(pipe, "model")}


def meta_cases(rank, world, llama_ckpt, scaled_ckpt, dcp_dir):
    return {"llama": _llama_from_checkpoint(rank, llama_ckpt, dcp_dir),
            "scaled": _scaled_from_checkpoint(rank, scaled_ckpt),
            "init": _init_per_rank(rank),
            "misc": _errors_and_references(rank)}


def _check_training(results, key, model, loss_fn, x, y):
    ref = loss_fn(model(x), y)
    ref.backward()
    grads = dict(model.named_parameters())
    losses = [r[key]["loss"] for r in results if r[key]["loss"] is not None]
    assert len(losses) == 1 and losses[0] == pytest.approx(ref.item(), rel=1e-6), (losses, ref.item())
    seen = set()
    for r in results:
        for name, grad in r[key]["grads"].items():
            torch.testing.assert_close(grad, grads[name].grad, rtol=1e-5, atol=1e-6)
            seen.add(name)
        for name, (mine, device) in r[key]["where"].items():
            assert device == ("cpu" if mine else "meta"), (key, name, mine, device)
    assert seen == set(grads), seen ^ set(grads)


@pytest.mark.timeout(600)
def test_meta_models_train_load_init_and_dcp_on_two_ranks(tmp_path):
    llama = ex.LlamaDecoder(LLAMA, seed=3)
    torch.save(llama.state_dict(), tmp_path / "llama.pt")
    torch.manual_seed(5)
    scaled = ScaledStack()
    with torch.no_grad():
        for s in scaled.scales:
            s.weight.uniform_(0.5, 1.5)
    torch.save(scaled.state_dict(), tmp_path / "scaled.pt")
    results = run_ranks(meta_cases, 2, (str(tmp_path / "llama.pt"), str(tmp_path / "scaled.pt"),
                                        str(tmp_path / "dcp")), timeout=500)

    # a meta llama loaded from a full mmap'd checkpoint == the real model
    x, y = ex.llama_batch(LLAMA, batch=C, seq=4, seed=1)
    _check_training(results, "llama", llama, ex.llama_loss, x, y)
    # a module without reset_parameters: step() names it until the checkpoint fills it
    for r in results:
        blocked = r["scaled"]["blocked"]
        assert "scales." in blocked and "(Scale)" in blocked and "load_state_dict" in blocked, blocked
        assert "reset_parameters" in blocked and "param_init_fn" in blocked, blocked
    _check_training(results, "scaled", scaled, ex.mse_loss, *_scaled_batch())

    # DCP: 2 pipeline ranks -> the unsplit model, and -> another 2-rank pipeline
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(tmp_path / "dcp", tmp_path / "from_dcp.pt")
    union = {k: v for r in results for k, v in r["llama"]["state"].items()}
    unsplit = ex.LlamaDecoder(LLAMA, seed=9)
    unsplit.load_state_dict(torch.load(tmp_path / "from_dcp.pt"))  # strict: every key, no extra
    for key, value in unsplit.state_dict().items():
        torch.testing.assert_close(value, union[key], rtol=0, atol=0)
    assert not torch.equal(unsplit.output.weight, llama.output.weight)  # the trained values
    for r in results:
        assert r["llama"]["reloaded"].keys() == r["llama"]["state"].keys()
        for key, value in r["llama"]["state"].items():
            torch.testing.assert_close(r["llama"]["reloaded"][key], value, rtol=0, atol=0)

    # param_init_fn: exactly this rank's modules, once each; values == a one-process materialize
    calls = [r["init"]["calls"] for r in results]
    for r in results:
        assert sorted(r["init"]["calls"]) == r["init"]["owners"], r["init"]
    assert not set(calls[0]) & set(calls[1]) and len(calls[0]) + len(calls[1]) == 8
    assert [r["init"]["iw_splits"] for r in results] == [[0, 3], [1, 2]] == [r["init"]["stages"] for r in results]
    torch.manual_seed(0)
    with torch.device("meta"):
        whole = ex.LinearGeluStack(depth=8, width=8)
    materialize(whole, {n for n, _ in whole.named_parameters()}, "cpu")
    for r in results:
        for key, value in r["init"]["state"].items():
            torch.testing.assert_close(value, whole.state_dict()[key], rtol=0, atol=0)

    for r in results:
        errors = r["misc"]["errors"]
        assert errors["no_device"].startswith("ValueError") and "device=" in errors["no_device"], errors
        assert errors["meta_device"].startswith("ValueError"), errors
        assert errors["bad_init"].startswith("TypeError") and "param_init_fn" in errors["bad_init"], errors
        assert r["misc"]["freed"] and all(r["misc"]["freed"]) and not r["misc"]["has_model"], r["misc"]


# --------------------------------------------------------------------------------------
# In one process: the trace, the I/W split of a subset, materialize


def _graph_ops(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def test_meta_model_traced_for_cpu_keeps_the_cpu_sdpa_kernel():
    with torch.device("meta"):
        model = TinyAttention()
    before = {n: p for n, p in model.named_parameters()}
    x = torch.randn(2, 4, 16, device="meta")

    def loss_fn(out):
        return out.pow(2).mean()

    on_cpu = dualpipe_fx.split(model, loss_fn, (x,), num_stages=1, device="cpu")
    ops = _graph_ops(on_cpu.stages[0].forward.gm)
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in ops, ops
    assert not any("bmm" in op or "softmax" in op for op in ops), ops
    on_meta = dualpipe_fx.split(model, loss_fn, (x,), num_stages=1, device="meta")  # what a meta trace runs
    assert any("bmm" in op for op in _graph_ops(on_meta.stages[0].forward.gm))
    assert {n: p for n, p in model.named_parameters()} == before and all(p.is_meta for p in before.values())
    vals = [n.meta["val"] for n in on_cpu.partition.stages[0].graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert vals and all(v.device.type == "cpu" for v in vals)


def test_meta_model_without_device_is_refused():
    with torch.device("meta"):
        model = TinyAttention()
    with pytest.raises(ValueError, match="device="):
        dualpipe_fx.split(model, lambda out: out.sum(), (torch.randn(2, 4, 16),), num_stages=1)


def test_only_stages_splits_those_and_equals_a_full_split():
    model, loss_fn = ex.LinearGeluStack(depth=8, width=8), ex.mse_loss
    x, y = ex.linear_gelu_batch(8, batch=2, seed=1)
    some = dualpipe_fx.split(model, loss_fn, (x,), y, num_stages=4, only_stages={0, 3})
    assert [sg is None for sg in some.stages] == [False, True, True, False]
    full = dualpipe_fx.split(model, loss_fn, (x,), y, num_stages=4)
    for s in (0, 3):
        assert str(some.stages[s].forward.gm.graph) == str(full.stages[s].forward.gm.graph)
        assert some.stages[s].param_names == full.stages[s].param_names
    assert "-" in some.describe()
    with pytest.raises(ValueError, match="only_stages"):
        some.run((x,), y)
    with pytest.raises(ValueError, match="only_stages"):
        dualpipe_fx.split(model, loss_fn, (x,), y, num_stages=4, only_stages={4})


def test_materialize_allocates_only_the_named_tensors_keeps_ties_and_refuses_lost_buffers():
    with torch.device("meta"):
        model = ex.LlamaDecoder(LLAMA)
        model.output.weight = model.tok_embeddings.weight  # tied: one tensor, two owners
    names = {"tok_embeddings.weight", "output.weight", "layers.0.attention.wq.weight", "rope_cos", "rope_sin"}
    pending = materialize(model, names, "cpu", param_init_fn=llama_init)
    assert not pending
    held = {n: t for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]}
    assert {n for n, t in held.items() if not t.is_meta} == names
    assert model.output.weight is model.tok_embeddings.weight
    with torch.device("meta"):
        model = _NoInit()
    with pytest.raises(ValueError, match=r"module '' \(_NoInit\) has non-persistent buffers \['table'\]"
                                         r".*reset_parameters.*param_init_fn"):
        materialize(model, {"table"}, "cpu")
    pending = materialize(model, {"scale.weight", "head.weight"}, "cpu")  # _Scale: no reset_parameters
    assert list(pending) == ["scale"] and pending["scale"].names == ("scale.weight",)
    assert not model.head.weight.is_meta and model.other.weight.is_meta


class _Scale(nn.Module):
    """A parameter and no initialiser: its values can only come from a checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))


class _NoInit(nn.Module):
    """A non-persistent buffer on a root without reset_parameters (lost on meta), a module
    without one (pending), and Linears that reset themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.arange(4.0), persistent=False)
        self.scale, self.head, self.other = _Scale(), nn.Linear(4, 4), nn.Linear(4, 4)


# --------------------------------------------------------------------------------------
# Memory: a 1 GiB model on 2 ranks costs each rank its share, loaded from a full mmap'd file

WIDE, DEPTH = 8192, 4  # 4 x 8192 x 8192 fp32 = 1 GiB; DualPipeV: 2 layers per rank


class WideStack(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":"))


def _reset_peak() -> int:
    """Restart VmHWM at the current RSS (Linux: clear_refs 5); the baseline in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:  # no reset: measure from the peak so far, which only overstates the increase
        return _status_kib("VmHWM") * 1024


def wide_rss(rank, world, path):
    x = torch.randn(C, 8)  # warm-up: export/make_fx imports and first calls, not this model's bytes
    dualpipe_fx.compile(ex.LinearGeluStack(depth=4, width=8), ex.mse_loss, (x[:1],), x[:1], num_microbatches=C)
    gc.collect()
    base = _reset_peak()
    peak = {}
    with torch.device("meta"):
        model = WideStack(WIDE, DEPTH)
    x, y = torch.randn(C, WIDE), torch.randn(C, WIDE)
    pipe = dualpipe_fx.compile(model, ex.mse_loss, (x[:1],), y[:1], num_microbatches=C, device="cpu")
    peak["compile"] = _status_kib("VmHWM") * 1024 - base
    pipe.load_state_dict(torch.load(path, mmap=True))
    peak["load"] = _status_kib("VmHWM") * 1024 - base
    with torch.no_grad():
        pipe.step(x)
    peak["forward step"] = _status_kib("VmHWM") * 1024 - base
    pipe.step(x, target=y)
    peak["training step"] = _status_kib("VmHWM") * 1024 - base
    local = sum(p.numel() * p.element_size() for p in pipe.parameters())
    return {"peak": peak, "local": local, "sample": {n: p[:2, :4].clone() for n, p in pipe.named_parameters()}}


def _write_wide_checkpoint(path, scratch) -> dict[str, torch.Tensor]:
    """The full checkpoint, one layer in memory at a time: each layer is saved alone, then the
    full file is written from the mmap'd layers, and synced (clean pages, like any checkpoint
    on disk: dirty ones could not be paged out)."""
    gen = torch.Generator().manual_seed(0)
    layers = {}
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)  # 3x faster saves; the test reads what it wrote
    try:
        for i in range(DEPTH):
            w = torch.empty(WIDE, WIDE).uniform_(-WIDE ** -0.5, WIDE ** -0.5, generator=gen)
            torch.save({f"layers.{i}.weight": w}, scratch / f"layer{i}.pt")
            del w
            layers.update(torch.load(scratch / f"layer{i}.pt", mmap=True))
        torch.save(layers, path)
    finally:
        torch.serialization.set_crc32_options(crc)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    sample = {n: t[:2, :4].clone() for n, t in layers.items()}
    del layers
    for i in range(DEPTH):
        (scratch / f"layer{i}.pt").unlink()
    return sample


@pytest.mark.timeout(300)
def test_each_rank_of_a_1gib_meta_model_holds_its_share_loaded_from_a_full_mmap_checkpoint(tmp_path):
    sample = _write_wide_checkpoint(tmp_path / "wide.pt", tmp_path)
    full = DEPTH * WIDE * WIDE * 4
    results = run_ranks(wide_rss, 2, (str(tmp_path / "wide.pt"),), timeout=240)
    for rank, r in enumerate(results):
        peak, local = r["peak"], r["local"]
        print(f"rank {rank}: full model {full / 2**30:.2f} GiB, own params {local / 2**30:.2f} GiB, peak RSS "
              "increase " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in peak.items()))
        assert local == full // 2
        for stage in ("compile", "load", "forward step"):  # params: only this rank's share
            assert peak[stage] <= 0.6 * full, (rank, stage, peak)
        # + the share's grads (as many bytes as its params), summed in place: no second copy
        assert peak["training step"] - local <= 0.6 * full, (rank, peak)
        for name, values in r["sample"].items():
            torch.testing.assert_close(values, sample[name], rtol=0, atol=0)
