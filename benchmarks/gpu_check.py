"""One check of dualpipe_fx on one GPU: correctness, step times, profile, memory, kernels.

World size 1 (a process group of one, made in this process: gloo on CPU,
``cpu:gloo,cuda:nccl`` on CUDA, over a FileStore), DualPipeV with its 2 stages on the rank,
``dualpipe_fx.examples.LlamaDecoder`` (SDPA attention), bf16 parameters for compute through
``mixed_precision=MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``.
Sections, each guarded (one that raises is reported as such and the rest still run):

- ``equivalence``: an fp32 pipelined step against the unsplit fp32 model (loss, grads);
- ``mixed_precision``: the bf16 pipelined step against FSDP2's ``fully_shard`` of the unsplit
  model with the same policy (bf16 tolerance);
- ``memory``: ``torch.cuda.max_memory_allocated()`` of a step beside ``pipe.memory_plan()``
  (on CPU the plan only);
- ``step_times``: median step of the unsplit model (bf16 copy, same micro-batches), of the
  eager pipeline, of ``compile_stages=True`` and their ratio;
- ``torch_schedule``: torch's own ``ScheduleDualPipeV`` on 2 equal manual stages on the one
  rank (``benchmarks/step_time.torch_schedule``), bf16 parameters;
- ``profile``: ``pipe.profile()``'s bubble, busy and overhead (CUDA events on a GPU) beside
  the simulator's replay;
- ``sdpa_kernel``: the aten op a meta-built model's traced graph calls for attention with
  ``device=<device>``;
- ``flex``: a flex-attention decoder with document masks (``tests/flex_models.py``; on CUDA
  the real flex backward) against one process.

The device run (repo copied, torch installed, nothing outside reachable; under 8 minutes):

    .venv/bin/python benchmarks/gpu_check.py --device cuda --out $OUT

CI runs ``--device cpu --tiny`` (``tests/test_gpu_check.py``). Writes ``OUT/gpu_check.json``
and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dualpipe_fx  # noqa: E402
from dualpipe_fx import examples as ex  # noqa: E402

POLICY_DTYPES = (torch.bfloat16, torch.float32)  # param_dtype, reduce_dtype


@dataclass(frozen=True)
class Config:
    """The model and batch; the CUDA one takes >= 20 ms a step on an H100 (bf16)."""

    llama: ex.LlamaConfig
    batch: int
    seq: int
    microbatches: int
    warmup: int
    steps: int
    compile_stages: bool = True  # Inductor on CPU takes minutes under load: --tiny skips it


FULL = Config(ex.LlamaConfig(vocab_size=32000, dim=2048, n_layers=8, n_heads=16, ffn_hidden=5632,
                             max_seq_len=1024), batch=8, seq=1024, microbatches=8, warmup=2, steps=10)
TINY = Config(ex.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=16),
              batch=4, seq=8, microbatches=4, warmup=0, steps=2, compile_stages=False)
# max |a - b| / max |b| over each tensor, the worst one: fp32 (micro-batched vs whole batch) and bf16
TOLERANCE = {"fp32": 1e-4, "fp32 cuda": 1e-3, "bf16": 5e-2}


# -- helpers ----------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_step(fn, device: torch.device, warmup: int, steps: int) -> float:
    """Median wall time of ``fn()`` (device work included) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole, fp32, on the host: kept grads hold no device memory (the memory section
    measures the device's peak after them)."""
    from torch.distributed.tensor import DTensor
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu", torch.float32, copy=True)


def compare(loss, ref_loss, grads: dict, ref_grads: dict, tolerance: float) -> dict:
    """Loss and grads against a reference: abs/rel differences and whether they are within ``tolerance``."""
    worst_abs, worst_rel, worst = 0.0, 0.0, None
    for name, ref in ref_grads.items():
        got = grads.get(name)
        if got is None:
            return {"ok": False, "missing_grad": name}
        got, ref = _full(got), _full(ref)
        diff = (got - ref).abs().max().item()
        rel = diff / max(ref.abs().max().item(), 1e-12)
        worst_abs = max(worst_abs, diff)
        if rel >= worst_rel:
            worst_rel, worst = rel, name
    loss, ref_loss = float(loss), float(ref_loss)
    loss_rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
    return {"loss": loss, "ref_loss": ref_loss, "loss_rel_diff": loss_rel, "grads": len(ref_grads),
            "grad_max_abs_diff": worst_abs, "grad_max_rel_diff": worst_rel, "worst_grad": worst,
            "tolerance": tolerance, "ok": loss_rel <= tolerance and worst_rel <= tolerance}


def _pipe(model, cfg: Config, x, y, device, **kw):
    mb = cfg.batch // cfg.microbatches
    return dualpipe_fx.compile(model, ex.llama_loss, (x[:mb],), y[:mb], schedule="dualpipev",
                               num_microbatches=cfg.microbatches, device=device, **kw)


def _policy():
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=POLICY_DTYPES[0], reduce_dtype=POLICY_DTYPES[1])


def _grads(named) -> dict:
    return {n: _full(p.grad) for n, p in named if p.grad is not None}


def _train_step(pipe, x, y):
    def step():
        pipe.zero_grad()
        pipe.step(x, target=y)
    return step


# -- sections -----------------------------------------------------------------------------

def equivalence(state: dict) -> dict:
    """An fp32 pipelined step equals the unsplit fp32 model's on the whole batch."""
    cfg, device, x, y = state["cfg"], state["device"], state["x"], state["y"]
    ref = ex.LlamaDecoder(cfg.llama, seed=0).to(device)
    ref_loss = ex.llama_loss(ref(x), y)
    ref_loss.backward()
    pipe = _pipe(ex.LlamaDecoder(cfg.llama, seed=0).to(device), cfg, x, y, device)
    loss = pipe.step(x, target=y)
    tol = TOLERANCE["fp32 cuda" if device.type == "cuda" else "fp32"]
    return compare(loss, ref_loss.detach(), _grads(pipe.named_parameters()), _grads(ref.named_parameters()), tol)


def mixed_precision_and_memory(state: dict) -> tuple[dict, dict]:
    """The bf16 pipeline (kept in ``state`` for the timings and the profile): a step's peak
    memory beside the plan, then its loss and grads beside FSDP2's with the same policy."""
    cfg, device, x, y = state["cfg"], state["device"], state["x"], state["y"]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
    pipe = _pipe(ex.LlamaDecoder(cfg.llama, seed=0).to(device), cfg, x, y, device, mixed_precision=_policy())
    state["pipe"] = pipe
    pipe.zero_grad()
    loss = pipe.step(x, target=y)
    grads = _grads(pipe.named_parameters())
    dtypes = sorted({str(p.grad.dtype) for _, p in pipe.named_parameters() if p.grad is not None})
    memory = _memory(pipe, x, y, device, base if device.type == "cuda" else None)
    ref_loss, ref_grads = _fsdp2_reference(state)
    result = compare(loss, ref_loss, grads, ref_grads, TOLERANCE["bf16"])
    result["grad_dtypes"] = dtypes  # .grad stays in the parameters' dtype (fp32)
    return result, memory


def _memory(pipe, x, y, device, base) -> dict:
    """The plan (no optimizer) and, on CUDA, a step's peak above what was allocated before the
    pipeline (its parameters, the grads of the step before, the step's own peak)."""
    plan = pipe.memory_plan(optimizer=0).rank(pipe.rank)
    out = {"plan_total_bytes": plan.total, "plan_params": plan.params, "plan_grads": plan.grads,
           "plan_step_peak": plan.step_peak}
    if base is None:
        out["measured"] = "none on CPU (the plan only)"
        return out
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    pipe.step(x, target=y)  # grads of the step before are still held, as the plan counts them
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    out |= {"max_memory_allocated_bytes": peak, "plan_over_measured": plan.total / peak,
            "within_10_percent": abs(plan.total - peak) <= 0.1 * peak}
    return out


def _fsdp2_reference(state: dict) -> tuple[torch.Tensor, dict]:
    """FSDP2 (``fully_shard`` on the one-rank group) of the unsplit model, the same policy."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    cfg, device, x, y = state["cfg"], state["device"], state["x"], state["y"]
    model = ex.LlamaDecoder(cfg.llama, seed=0).to(device)
    fully_shard(model, mesh=DeviceMesh.from_group(dist.group.WORLD, device.type), mp_policy=_policy())
    loss = ex.llama_loss(model(x), y)
    loss.backward()
    return loss.detach(), {n: _full(p.grad) for n, p in model.named_parameters()}


def step_times(state: dict) -> dict:
    """Median steps: the unsplit bf16 model over the same micro-batches, the bf16 pipeline
    eager and with ``compile_stages=True``."""
    cfg, device, x, y = state["cfg"], state["device"], state["x"], state["y"]
    out = {}
    unsplit = ex.LlamaDecoder(cfg.llama, seed=0).to(device, torch.bfloat16)

    def accumulate():
        unsplit.zero_grad(set_to_none=True)
        for xm, ym in zip(x.chunk(cfg.microbatches), y.chunk(cfg.microbatches)):
            (ex.llama_loss(unsplit(xm), ym) / cfg.microbatches).backward()
    out["unsplit_bf16_s"] = _median_step(accumulate, device, cfg.warmup, cfg.steps)
    del unsplit
    out["eager_s"] = _median_step(_train_step(state["pipe"], x, y), device, cfg.warmup, cfg.steps)
    out["eager_at_least_20ms"] = out["eager_s"] >= 0.020
    if not cfg.compile_stages:
        out["compiled_s"] = "skipped: --tiny (Inductor's compile of the stage graphs takes minutes on a CPU)"
        return out
    t0 = time.perf_counter()
    compiled = _pipe(ex.LlamaDecoder(cfg.llama, seed=0).to(device), cfg, x, y, device,
                     mixed_precision=_policy(), compile_stages=True)
    compiled.step(x, target=y)  # the first step compiles
    _sync(device)
    out["compile_s"] = time.perf_counter() - t0
    out["compiled_s"] = _median_step(_train_step(compiled, x, y), device, cfg.warmup, cfg.steps)
    out["compiled_over_eager"] = out["compiled_s"] / out["eager_s"]
    out["compiled_at_most_0.85x"] = out["compiled_over_eager"] <= 0.85
    compiled.zero_grad()
    out["compiled_loss_vs_eager_rel_diff"] = _loss_diff(compiled.step(x, target=y), state["pipe"], x, y)
    return out


def _loss_diff(loss, pipe, x, y) -> float:
    """The compiled pipeline's loss against the eager one's on the same batch (same weights)."""
    pipe.zero_grad()
    ref = float(pipe.step(x, target=y))
    return abs(float(loss) - ref) / max(abs(ref), 1e-12)


class _LlamaPart(nn.Module):
    """Layers ``lo:hi`` of a ``LlamaDecoder`` (the embedding first, the norm and head last),
    a manual stage for torch's own schedules: one tensor in, one out."""

    def __init__(self, model: ex.LlamaDecoder, lo: int, hi: int) -> None:
        super().__init__()
        n = len(model.layers)
        self.embed = model.tok_embeddings if lo == 0 else None
        self.layers = nn.ModuleList(model.layers[lo:hi])
        self.norm, self.output = (model.norm, model.output) if hi == n else (None, None)
        self.register_buffer("cos", model.rope_cos, persistent=False)
        self.register_buffer("sin", model.rope_sin, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            h = self.embed(h)
        for layer in self.layers:
            h = layer(h, self.cos, self.sin)
        return self.output(self.norm(h)) if self.output is not None else h


def torch_schedule(state: dict) -> dict:
    """torch's ``ScheduleDualPipeV`` on the two halves of the model, both stages on this rank."""
    from benchmarks.step_time import torch_schedule as build

    cfg, device, x, y = state["cfg"], state["device"], state["x"], state["y"]
    model = ex.LlamaDecoder(cfg.llama, seed=0).to(device, torch.bfloat16)
    half = cfg.llama.n_layers // 2
    parts = [_LlamaPart(model, 0, half), _LlamaPart(model, half, cfg.llama.n_layers)]
    step = build("torch DualPipeV", parts, 0, 1, cfg.microbatches, ex.llama_loss, x, y, device,
                 zero_grad=lambda: model.zero_grad(set_to_none=True))
    out = {"schedule": "torch ScheduleDualPipeV, 2 stages on 1 rank, bf16 parameters",
           "step_s": _median_step(step, device, cfg.warmup, cfg.steps)}
    eager = state.get("eager_s")
    if eager:
        out["dualpipe_fx_eager_over_torch"] = eager / out["step_s"]
    return out


def profile(state: dict) -> dict:
    """``pipe.profile()`` of the bf16 eager pipeline beside the simulator's replay."""
    cfg, x, y = state["cfg"], state["x"], state["y"]
    pipe = state["pipe"]
    pipe.zero_grad()
    prof = pipe.profile(x, target=y, steps=max(2, cfg.steps // 2))
    measured, simulated = prof.bubble_ratio_per_rank[0], prof.simulated_bubble_ratio_per_rank[0]
    return {"clock": prof.clock, "makespan_s": prof.makespan, "busy_s": prof.busy[0],
            "overhead_s": prof.overhead[0], "bubble_ratio": measured, "simulated_bubble_ratio": simulated,
            "simulated_makespan_s": prof.simulated.makespan,
            "bubble_within_20_percent": abs(measured - simulated) <= 0.2 * max(simulated, 1e-9),
            "costs_ms": {k: getattr(prof.costs, k) * 1e3 for k in ("F", "B", "W", "comm")},
            "table": prof.table()}


def sdpa_kernel(state: dict) -> dict:
    """A model built on meta, compiled with ``device=``: the attention ops its stage graphs call."""
    cfg, device, x, y = state["cfg"], state["device"], state["x"], state["y"]
    with torch.device("meta"):
        model = ex.LlamaDecoder(cfg.llama, seed=0)
    pipe = _pipe(model, cfg, x, y, device, mixed_precision=_policy())
    ops = set()
    for stage in pipe.stages.values():
        ops |= {str(n.target) for n in stage.graphs.forward.gm.graph.nodes
                if n.op == "call_function" and "attention" in str(n.target)}
    return {"attention_ops": sorted(ops), "flash": any("flash" in op for op in ops)}


def flex(state: dict) -> dict:
    """A flex-attention decoder with document masks: the pipelined step equals one process."""
    from tests import flex_models as fm

    cfg, device = state["cfg"], state["device"]
    c, seq = cfg.microbatches, 16
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, fm.VOCAB, (c, seq), generator=gen).to(device)
    target = torch.randint(0, fm.VOCAB, (c, seq), generator=gen).to(device)
    docs = fm.doc_ids([[5, 11] if i % 2 else [8, 8] for i in range(c)]).to(device)
    ref_loss, ref_grads = fm.reference(fm.FlexDecoder(depth=2).to(device), tokens, target, docs, c)
    with fm.flex_on_cpu():
        pipe = dualpipe_fx.compile(fm.FlexDecoder(depth=2).to(device), fm.lm_loss, (tokens[:1],), target[:1],
                                   schedule="dualpipev", num_microbatches=c, device=device,
                                   example_kwargs={"block_mask": fm.document_mask(docs[:1])})
        loss = pipe.step(tokens, target=target, block_mask=fm.document_mask(docs))
    tol = TOLERANCE["fp32 cuda" if device.type == "cuda" else "fp32"]
    return compare(loss, ref_loss, _grads(pipe.named_parameters()), ref_grads, tol)


# -- driver -------------------------------------------------------------------------------

def _guarded(name: str, fn, state: dict, results: dict) -> None:
    t0 = time.perf_counter()
    try:
        out = fn(state)
    except Exception as err:  # noqa: BLE001 - reported; the other sections still run
        results[name] = {"status": "error", "error": f"{type(err).__name__}: {err}"[:2000],
                         "traceback": traceback.format_exc()[-4000:]}
    else:
        if isinstance(out, tuple):  # a section that measures two things at once
            for key, part in zip(name.split("+"), out):
                results[key] = {"status": "ok", **part}
        else:
            results[name] = {"status": "ok", **out}
    for key in name.split("+"):
        results.setdefault(key, {})["seconds"] = round(time.perf_counter() - t0, 2)


def _environment(device: torch.device, cfg: Config) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "date_utc": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                         time.gmtime()),
           "config": {k: v for k, v in asdict(cfg).items() if k != "llama"} | {"llama": asdict(cfg.llama)},
           "schedule": "dualpipev, 2 stages on 1 rank", "world_size": 1}
    if device.type == "cuda":
        env |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    return env


SECTIONS = [("equivalence", equivalence), ("mixed_precision+memory", mixed_precision_and_memory),
            ("step_times", step_times), ("torch_schedule", torch_schedule), ("profile", profile),
            ("sdpa_kernel", sdpa_kernel), ("flex", flex)]


BUDGET_S = 420  # a section that would start later is skipped: the device run has one try of 10 minutes


def run(device: torch.device, cfg: Config, out: Path) -> dict:
    """Every section in turn; ``out`` (the JSON) is rewritten after each, so a run stopped
    part-way leaves what it measured."""
    t0 = time.perf_counter()
    x, y = ex.llama_batch(cfg.llama, batch=cfg.batch, seq=cfg.seq, seed=1)
    state = {"cfg": cfg, "device": device, "x": x.to(device), "y": y.to(device)}
    results = {"environment": _environment(device, cfg)}
    for name, fn in SECTIONS:
        if time.perf_counter() - t0 > BUDGET_S:
            for key in name.split("+"):
                results[key] = {"status": "skipped", "error": f"over the {BUDGET_S} s budget"}
            continue
        _guarded(name, fn, state, results)
        out.write_text(json.dumps(results, indent=2, default=str))
        print(f"[gpu_check] {name}: {results[name.split('+')[0]].get('status')} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if name == "step_times" and results[name].get("status") == "ok":
            state["eager_s"] = results[name]["eager_s"]
    results["summary"] = summary(results)
    return results


def summary(results: dict) -> dict:
    """The issue's done-when figures, each None where its section did not run."""
    def get(section, key):
        res = results.get(section, {})
        return res.get(key) if res.get("status") == "ok" else None
    return {"fp32_loss_and_grads_equal": get("equivalence", "ok"),
            "bf16_loss_and_grads_within_tolerance": get("mixed_precision", "ok"),
            "compiled_over_eager": get("step_times", "compiled_over_eager"),
            "compiled_at_most_0.85x_eager": get("step_times", "compiled_at_most_0.85x"),
            "bubble_within_20_percent_of_simulator": get("profile", "bubble_within_20_percent"),
            "memory_plan_within_10_percent": get("memory", "within_10_percent"),
            "sdpa_ops": get("sdpa_kernel", "attention_ops"),
            "flex_equal": get("flex", "ok")}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(results: dict) -> str:
    lines = [f"dualpipe_fx gpu_check on {results['environment'].get('gpu', results['environment']['device'])}, "
             f"torch {results['environment']['torch']}, {results['environment']['date_utc']}"]
    for name, res in results.items():
        if name in ("environment", "summary"):
            continue
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in res.items()
                            if k not in ("status", "traceback", "table", "error", "seconds"))
        status = res.get("status", "?")
        lines.append(f"{name:<16} {status:<6} {res.get('seconds', 0):7.1f}s  "
                     + (res.get("error", "") if status == "error" else figures))
    prof = results.get("profile", {})
    if prof.get("table"):
        lines += ["", f"profile ({prof.get('clock')}), one rank: no peer to wait for, so the bubble is "
                  "the schedule's own (none when both stages are local)", prof["table"]]
    lines += ["", "summary: " + ", ".join(f"{k}={_fmt(v)}" for k, v in results.get("summary", {}).items())]
    return "\n".join(lines)


@contextlib.contextmanager
def group_of_one(device: torch.device):
    """A process group of this one process (FileStore): gloo on CPU, gloo + NCCL on CUDA (the
    votes' flags are CPU tensors, P2P and collectives of CUDA tensors go to NCCL)."""
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the small model (CI, on CPU: seconds); "
                        "skips compile_stages=True unless --compile")
    parser.add_argument("--compile", action="store_true", help="with --tiny: time compile_stages=True too")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False here; use --device cpu --tiny")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    cfg = TINY if args.tiny else FULL
    if args.compile:
        cfg = dataclasses.replace(cfg, compile_stages=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    with group_of_one(device):
        results = run(device, cfg, args.out / "gpu_check.json")
    results["environment"]["total_s"] = round(time.perf_counter() - t0, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print(table(results))
    print(f"total {results['environment']['total_s']} s; wrote {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
