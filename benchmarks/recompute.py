"""Activation recomputation: bytes saved, measured peak activation memory and step time.

2 gloo ranks with 1 thread each, DualPipeV, the 8-layer ``LlamaDecoder`` with a small
width and a long sequence, so that activations dominate (dim 128, 4 heads, SwiGLU 344,
vocab 256, seq 512; batch 8 in 8 micro-batches of 1). For ``recompute`` None,
``"selective"`` and ``"full"`` (and, with ``--policies``, the candidate policies defined
below, passed as ``recompute=callable``) it reports:

- **saved bytes** per stage per micro-batch: ``passes.split_backward.saved_bytes`` (what
  F keeps for I, from the graph's metadata), and the ratio of the sums to None's; beside
  it the same MEASURED as the distinct storages of the tensors F really keeps
  (``GraphStage._saved``, views sharing a storage counted once, parameters' storages not
  at all), and what I keeps for W (``saved_for_weight``);
- **peak live activation bytes** per rank, MEASURED by the CPU allocator: one step runs
  under ``torch.profiler.profile(profile_memory=True)``, which records every allocation
  and free of the rank's CPU allocator with its size and time (``[memory]`` entries of
  ``kineto_results.events()``). Their running sum in time order is the bytes allocated
  during the step and still alive; its maximum is the peak. Before that step the
  parameters' ``.grad`` are zeroed in place (not set to None), so W sums into them and
  the step allocates no grads: the peak is what the step itself holds at once -- saved
  activations and ``saved_for_weight``, received and sent boundary tensors, activation
  grads in flight, each op's outputs and temporaries. The profiler does not report frees
  of blocks allocated before it started (it does not know their size), which could only
  raise the figure. Checks that the count is whole: the bytes still live at the end of
  the step (``end`` in the JSON) are what the step keeps (the last stage's logits per
  micro-batch, the losses), and the peak is close to ``bookkeeping`` (the kept storages
  summed over the micro-batches a rank holds between F and I and between I and W, along
  its program) plus the largest rise of one action (each I and W is annotated with
  ``record_function``; its rise is the peak inside it minus the live bytes at its
  start: what it recomputes, computes and drops);
- **step time**: median over ``--steps`` rounds after ``--warmup``; each round runs
  every variant in turn (a load change on the shared machine hits all of them) and
  times the second of two back-to-back steps (as ``benchmarks/step_time.py``), the
  slower rank's time. Ratio to None: of the medians, and the median (and quartiles) of
  each round's ratio, which cancels what a round's load does to both (the targets are
  checked on it). Where it goes: rank 0's F / I / W action costs
  (``Pipeline.profile``), the ops the recomputing I graphs run in addition (graph
  counts), and per ATen op the self time in a step over None's (median of profiled
  steps, variants in turn);
- **grads**: every variant's loss and grads equal None's (asserted: numerics only).

It checks the load average first and writes ``--json``.

    python benchmarks/recompute.py --json /tmp/recompute.json
    python benchmarks/recompute.py --policies   # also the candidate selective policies
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualpipe_fx import examples as ex  # noqa: E402
from dualpipe_fx.planning.memory import allocator_events, peak_live_bytes  # noqa: E402
from passes.recompute import SELECTIVE_SAVE  # noqa: E402
from tests.runtime.dist_harness import run_ranks  # noqa: E402

RANKS = 2
TARGETS = {"full": {"saved": 0.25, "step": 1.45}, "selective": {"saved": 0.6, "step": 1.15}}

_aten = torch.ops.aten


@dataclass(frozen=True)
class Config:
    dim: int = 128
    n_heads: int = 4
    ffn_hidden: int = 344
    n_layers: int = 8
    vocab_size: int = 256
    seq: int = 512
    microbatches: int = 8
    mb_size: int = 1

    def llama(self) -> ex.LlamaConfig:
        return ex.LlamaConfig(vocab_size=self.vocab_size, dim=self.dim, n_layers=self.n_layers,
                              n_heads=self.n_heads, ffn_hidden=self.ffn_hidden, max_seq_len=self.seq)


TINY = Config(dim=16, n_heads=2, ffn_hidden=24, n_layers=4, vocab_size=32, seq=8, microbatches=4)


# -- candidate policies (``recompute=callable``), to compare with the built-in ones -------
# Each answers for a node of a stage's ATen joint graph; see passes/recompute.py.

_ATTENTION = frozenset(op for op in SELECTIVE_SAVE if "attention" in str(op))


def selective_save_attention_inputs(node) -> str:
    """selective + save attention's inputs (q and k after RoPE): its backward reads them,
    so selective recomputes RoPE (strided pointwise ops, slow on CPU) from the saved
    wq/wk outputs; saved instead, those outputs are no longer needed: same bytes."""
    if node.target in SELECTIVE_SAVE or any(u.target in _ATTENTION for u in node.users):
        return "save"
    return "recompute"


def selective_save_attention_inputs_norm(node) -> str:
    """the above + save each RMSNorm's output (the next matmuls' input, read by their weight grads)."""
    if selective_save_attention_inputs(node) == "save" or _is_norm_output(node):
        return "save"
    return "recompute"


def selective_save_norm(node) -> str:
    """selective + save each RMSNorm's output (the next matmuls' input)."""
    return "save" if node.target in SELECTIVE_SAVE or _is_norm_output(node) else "recompute"


def _is_norm_output(node) -> bool:
    """The last op of an RMSNorm: ``mul(x * rms, weight)`` in a ``*norm`` module, used outside it."""
    module = node.meta.get("dpfx_module") or ""
    if not module.rsplit(".", 1)[-1].endswith("norm") or node.target is not _aten.mul.Tensor:
        return False
    return not any(u.target is _aten.mul.Tensor and u.meta.get("dpfx_module") == module for u in node.users)


POLICIES = {"sel+attn_in": selective_save_attention_inputs, "sel+attn_in+norm": selective_save_attention_inputs_norm,
            "sel+norm": selective_save_norm}


def _variants(policies) -> dict:
    """None, selective, full, then ``policies`` (names in POLICIES; [] for all of them, None for none)."""
    base = {"none": None, "selective": "selective", "full": "full"}
    if policies is None:
        return base
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise ValueError(f"--policies {unknown}: expected names from {sorted(POLICIES)}")
    return base | {k: v for k, v in POLICIES.items() if not policies or k in policies}


# -- measuring -----------------------------------------------------------------------

def _transients(prof) -> dict[str, int]:
    """Per ``dpfx.*`` annotated action kind (``_watch``): the most that one action raised the
    live bytes above those at its start (what it computes, recomputes and drops inside)."""
    events = sorted(allocator_events(prof))
    times = [t for t, _ in events]
    live, running = [], 0
    for _, nbytes in events:
        running += nbytes
        live.append(running)
    out: dict[str, int] = {}
    for e in prof.profiler.kineto_results.events():
        if not e.name().startswith("dpfx."):
            continue
        i0, i1 = bisect.bisect_left(times, e.start_ns()), bisect.bisect_right(times, e.end_ns())
        before = live[i0 - 1] if i0 else 0
        rise = max(live[i0:i1], default=before) - before
        out[e.name()] = max(out.get(e.name(), 0), rise)
    return dict(sorted(out.items()))


def _op_times(prof) -> dict[str, float]:
    """Self CPU seconds per ATen op over the profiled step."""
    return {e.key: e.self_cpu_time_total * 1e-6 for e in prof.key_averages() if e.key.startswith("aten::")}


def _op_profile(steps: dict, rounds: int) -> dict[str, dict[str, float]]:
    """Per variant, each ATen op's self time in one step: the median over ``rounds``
    profiled steps, the variants in turn."""
    from torch.profiler import ProfilerActivity, profile
    seen: dict[str, list[dict[str, float]]] = {k: [] for k in steps}
    for _ in range(rounds):
        for label, fn in steps.items():
            fn()
            dist.barrier()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            seen[label].append(_op_times(prof))
    return {label: {op: statistics.median(r.get(op, 0.0) for r in runs) for op in set().union(*runs)}
            for label, runs in seen.items()}


def _profiled_step(pipe, x, y) -> dict:
    from torch.profiler import ProfilerActivity, profile
    kept = _watch(pipe)
    pipe.step(x, target=y)  # grads exist, and the watch records what each stage keeps ...
    pipe.zero_grad(set_to_none=False)  # ... and the grads stay: W sums into them, the step allocates none
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        pipe.step(x, target=y)
    dist.barrier()
    _unwatch(pipe)
    return {"memory": peak_live_bytes(allocator_events(prof)), "transients": _transients(prof), "kept": kept}


def _storage_bytes(values, exclude: set[int]) -> int:
    """Bytes of the distinct storages behind ``values``' tensors, but those in ``exclude``."""
    seen = {}
    for t in values:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen.setdefault(st.data_ptr(), st.nbytes())
    return sum(n for ptr, n in seen.items() if ptr not in exclude)


def _watch(pipe) -> dict[str, dict[int, int]]:
    """Wrap each stage's F, I and W: record the storage bytes of what a stage keeps per
    micro-batch, ``saved`` (F -> I) and ``saved_for_weight`` (I -> W; from I actions that run
    the stage's own graph: an F&B pair's full B hands over param grads instead), and
    annotate each I (``dpfx.I<stage>``, ``dpfx.I<stage>.pair`` inside an F&B pair) and W
    for the profiler."""
    kept: dict[str, dict[int, int]] = {"F": {}, "I": {}}
    for s, stage in pipe.stages.items():
        params = {p.untyped_storage().data_ptr() for p in stage.params}
        own_input = stage.graphs.backward_input

        def forward(mb, keep_saved=True, stage=stage, s=s, params=params, real=stage.run_forward):
            out = real(mb, keep_saved)
            if mb in stage._saved:
                kept["F"][s] = max(kept["F"].get(s, 0), _storage_bytes(stage._saved[mb], params))
            return out

        def backward_input(mb, stage=stage, s=s, params=params, real=stage.run_backward_input, own=own_input):
            mine = stage.graphs.backward_input is own
            with torch.profiler.record_function(f"dpfx.I{s}" + ("" if mine else ".pair")):
                out = real(mb)
            if mine:
                kept["I"][s] = max(kept["I"].get(s, 0), _storage_bytes(stage._saved_w[mb], params))
            return out

        def backward_weight(mb, s=s, real=stage.run_backward_weight):
            with torch.profiler.record_function(f"dpfx.W{s}"):
                real(mb)
        stage.run_forward, stage.run_backward_input, stage.run_backward_weight = forward, backward_input, backward_weight
    return kept


def _unwatch(pipe) -> None:
    for stage in pipe.stages.values():
        del stage.run_forward, stage.run_backward_input, stage.run_backward_weight


def _bookkeeping_peak(pipe, saved: dict[int, int], for_weight: dict[int, int]) -> int:
    """Peak over this rank's program of the bytes held between actions: ``saved[s]`` from F to
    I (or B), ``for_weight[s]`` from I to W."""
    held = peak = 0
    for action in pipe.program[dist.get_rank()]:
        for part in action.parts():
            if part.kind == "F":
                held += saved[part.stage]
            elif part.kind == "I":
                held += for_weight[part.stage] - saved[part.stage]
            elif part.kind == "B":
                held -= saved[part.stage]
            else:
                held -= for_weight[part.stage]
            peak = max(peak, held)
    return peak


def _recomputed_ops(pipe, plain) -> dict[str, int]:
    """Ops that the recomputing I graphs run more often than the plain ones (all stages)."""
    def counts(p):
        return collections.Counter(str(n.target) for s in p.stages.values()
                                   for n in s.flat_graphs.backward_input.gm.graph.nodes if n.op == "call_function")
    extra = counts(pipe) - counts(plain)
    return dict(extra.most_common())


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _grads(pipe) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}


def _compile(cfg: Config, policy, x, y):
    import dualpipe_fx
    return dualpipe_fx.compile(ex.LlamaDecoder(cfg.llama()), ex.llama_loss, (x[:cfg.mb_size],), y[:cfg.mb_size],
                               schedule="dualpipev", num_microbatches=cfg.microbatches,
                               # one cut for every policy, so their stages compare
                               memory=dualpipe_fx.MemoryPolicy(recompute=policy, balance="time"))


def _check_grads(pipes: dict, x, y) -> dict:
    """Each variant's loss and grads after one step from zero; asserted equal to None's."""
    out = {}
    for label, pipe in pipes.items():
        pipe.zero_grad()
        loss = pipe.step(x, target=y)
        out[label] = (None if loss is None else loss.item(), _grads(pipe))
    ref_loss, ref = out["none"]
    diffs = {}
    for label, (loss, grads) in out.items():
        assert (loss is None) == (ref_loss is None) and (loss is None or abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)), \
            (label, loss, ref_loss)
        assert grads.keys() == ref.keys(), label
        for name, g in grads.items():
            torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{label} {name}: {m}")
        diffs[label] = max(((g - ref[n]).abs().max().item() for n, g in grads.items()), default=0.0)
    return diffs


def _round_robin(steps: dict, warmup: int, rounds: int, world: int) -> dict[str, list[float]]:
    """Per variant, each round's step time (the slower rank's)."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for label, fn in steps.items():
            fn()  # back to back, as in training: the allocator already holds this step's buffers
            dist.barrier()
            times[label].append(_timed(fn))
        dist.barrier()
    gathered = [None] * world
    dist.all_gather_object(gathered, times)
    return {label: [max(g[label][i] for g in gathered) for i in range(rounds)] for label in steps}


def _action_costs(pipe, x, y) -> dict | None:
    prof = pipe.profile(x, target=y, steps=3)
    pipe.zero_grad()
    if prof is None:
        return None
    return {"F": prof.costs.F * 1e3, "I": prof.costs.B * 1e3, "W": prof.costs.W * 1e3,
            "FB": prof.costs.overlapped * 1e3}


def distributed(rank: int, world: int, cfg: Config, variants: dict, warmup: int, rounds: int,
                op_rounds: int, costs: bool) -> dict:
    """One rank: build every variant, check grads, measure memory, then time round-robin."""
    from passes.split_backward import saved_bytes
    x, y = ex.llama_batch(cfg.llama(), batch=cfg.mb_size * cfg.microbatches, seq=cfg.seq)
    pipes = {label: _compile(cfg, policy, x, y) for label, policy in variants.items()}
    out = {"grad_max_abs_diff": _check_grads(pipes, x, y), "saved": {}, "bookkeeping": {},
           "measured": {}, "op_s": {}, "recomputed_ops": {}, "costs_ms": {},
           "kept": {}, "transients": {}}
    for label, pipe in pipes.items():
        out["saved"][label] = {s: saved_bytes(stage.flat_graphs) for s, stage in pipe.stages.items()}
        out["recomputed_ops"][label] = _recomputed_ops(pipe, pipes["none"])
    for label, pipe in pipes.items():
        prof = _profiled_step(pipe, x, y)
        out["measured"][label], out["transients"][label] = prof["memory"], prof["transients"]
        out["kept"][label] = prof["kept"]
        out["bookkeeping"][label] = _bookkeeping_peak(pipe, prof["kept"]["F"], prof["kept"]["I"])

    def step(pipe):
        return lambda: (pipe.zero_grad(), pipe.step(x, target=y))
    steps = {label: step(p) for label, p in pipes.items()}
    out["step_s"] = _round_robin(steps, warmup, rounds, world)
    out["op_s"] = _op_profile(steps, op_rounds)
    if costs:
        out["costs_ms"] = {label: _action_costs(pipe, x, y) for label, pipe in pipes.items()}
    return out


def measure(cfg: Config, variants: dict, warmup: int, rounds: int, op_rounds: int = 3, costs: bool = True,
            timeout: float = 3600) -> list[dict]:
    """Every rank's figures (``distributed``), on ``RANKS`` spawned gloo ranks."""
    return run_ranks(distributed, RANKS, (cfg, variants, warmup, rounds, op_rounds, costs), timeout=timeout)


# -- reporting -----------------------------------------------------------------------

def _load() -> tuple[float, float]:
    one = os.getloadavg()[0]
    per_core = one / (os.cpu_count() or 1)
    if per_core > 0.5:
        print(f"!!! WARNING: load average {one:.2f} on {os.cpu_count()} cores ({per_core:.2f} per core > 0.5): "
              "other processes share the CPUs, the step times are noisy !!!")
    return one, per_core


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f}"


def figures(results: list[dict], cfg: Config, load: tuple[float, float]) -> dict:
    """The JSON figures from every rank's results."""
    labels = list(results[0]["saved"])
    rows = {}
    for label in labels:
        saved = {s: b for r in results for s, b in r["saved"][label].items()}
        rank_saved = [sum(r["saved"][label].values()) for r in results]
        rank_saved_none = [sum(r["saved"]["none"].values()) for r in results]
        peak = [r["measured"][label]["peak"] for r in results]
        peak_none = [r["measured"]["none"]["peak"] for r in results]
        rounds, rounds_none = results[0]["step_s"][label], results[0]["step_s"]["none"]
        paired = sorted(a / b for a, b in zip(rounds, rounds_none))  # same round: same load
        step = statistics.median(rounds)
        kept = {s: b for r in results for s, b in r["kept"][label]["F"].items()}
        kept_none = {s: b for r in results for s, b in r["kept"]["none"]["F"].items()}
        rows[label] = {
            "saved_bytes_per_stage": dict(sorted(saved.items())),
            "saved_storage_bytes_per_stage": dict(sorted(kept.items())),
            "saved_storage_ratio": sum(kept.values()) / sum(kept_none.values()),
            "saved_for_weight_storage_bytes_per_stage":
                dict(sorted((s, b) for r in results for s, b in r["kept"][label]["I"].items())),
            "saved_ratio": sum(saved.values()) / sum({s: b for r in results for s, b in r["saved"]["none"].items()}
                                                     .values()),
            "saved_ratio_per_rank": [a / b for a, b in zip(rank_saved, rank_saved_none)],
            "peak_live_bytes_per_rank": peak,
            "end_live_bytes_per_rank": [r["measured"][label]["end"] for r in results],
            "action_rise_bytes_per_rank": [r["transients"][label] for r in results],
            "peak_ratio_per_rank": [a / b for a, b in zip(peak, peak_none)],
            "bookkeeping_peak_bytes_per_rank": [r["bookkeeping"][label] for r in results],
            "step_s": step, "step_ratio": step / statistics.median(rounds_none),
            "step_ratio_paired": statistics.median(paired),
            "step_ratio_paired_quartiles": [paired[len(paired) // 4], paired[(3 * len(paired)) // 4]],
            "step_s_rounds": rounds,
            "grad_max_abs_diff": max(r["grad_max_abs_diff"][label] for r in results),
            "costs_ms_rank0": results[0]["costs_ms"].get(label),
            "recomputed_ops": dict(sum((collections.Counter(r["recomputed_ops"][label]) for r in results),
                                       collections.Counter()).most_common()),
            "extra_op_s_per_rank": [_extra_ops(r["op_s"][label], r["op_s"]["none"]) for r in results],
        }
        if label in TARGETS:
            t = TARGETS[label]
            rows[label]["targets"] = {"saved_ratio<=": t["saved"], "step_ratio<=": t["step"],
                                      "saved_met": rows[label]["saved_ratio"] <= t["saved"],
                                      "step_met": rows[label]["step_ratio_paired"] <= t["step"]}
    return {"config": asdict(cfg) | {"ranks": RANKS, "threads_per_rank": 1, "schedule": "dualpipev"},
            "load_average_1min": load[0], "load_per_core": load[1], "variants": rows}


def _extra_ops(op_s: dict, none_s: dict, top: int = 8) -> dict[str, float]:
    """The ops whose self time grew most over None's, in ms."""
    delta = {k: (op_s.get(k, 0.0) - none_s.get(k, 0.0)) * 1e3 for k in set(op_s) | set(none_s)}
    return dict(sorted(((k, round(v, 2)) for k, v in delta.items() if v > 0), key=lambda kv: -kv[1])[:top])


def report(fig: dict) -> None:
    rows = fig["variants"]
    print(f"load average {fig['load_average_1min']:.2f} ({fig['load_per_core']:.2f} per core); "
          f"config {fig['config']}")
    stages = list(rows["none"]["saved_bytes_per_stage"])
    print("\nsaved bytes per micro-batch (MiB) by stage, and the ratio to none")
    print(f"{'variant':<18}" + "".join(f"{'stage ' + str(s):>10}" for s in stages) + f"{'ratio':>8}")
    for label, r in rows.items():
        print(f"{label:<18}" + "".join(f"{_mb(r['saved_bytes_per_stage'][s]):>10}" for s in stages)
              + f"{r['saved_ratio']:8.3f}")
    print("\nthe same measured: distinct storages F keeps per micro-batch (MiB; views of parameters and "
          "of other saved values count once or not at all), ratio to none; and what I keeps for W")
    for label, r in rows.items():
        print(f"{label:<18}" + "".join(f"{_mb(r['saved_storage_bytes_per_stage'][s]):>10}" for s in stages)
              + f"{r['saved_storage_ratio']:8.3f}   for W: "
              + " ".join(_mb(r["saved_for_weight_storage_bytes_per_stage"][s]) for s in stages))
    print("\npeak live bytes in a step (MiB, measured: CPU allocator via the profiler), bookkeeping "
          "(the kept storages over the micro-batches held between actions), ratio to none; step time")
    print(f"{'variant':<18}{'rank 0':>9}{'rank 1':>9}{'ratio 0':>9}{'ratio 1':>9}{'book 0':>9}{'book 1':>9}"
          f"{'step ms':>9}{'ratio':>7}{'paired (quartiles)':>22}{'grad diff':>11}")
    for label, r in rows.items():
        p, q, b = r["peak_live_bytes_per_rank"], r["peak_ratio_per_rank"], r["bookkeeping_peak_bytes_per_rank"]
        print(f"{label:<18}{_mb(p[0]):>9}{_mb(p[-1]):>9}{q[0]:9.3f}{q[-1]:9.3f}{_mb(b[0]):>9}{_mb(b[-1]):>9}"
              f"{r['step_s'] * 1e3:9.1f}{r['step_ratio']:7.3f}{r['step_ratio_paired']:8.3f} "
              f"({r['step_ratio_paired_quartiles'][0]:.3f}-{r['step_ratio_paired_quartiles'][1]:.3f})"
              f"{r['grad_max_abs_diff']:11.1e}")
    print("\nthe most one action raised the live bytes above those at its start (MiB): I alone, I inside "
          "an F&B pair (with that F), W; per stage")
    for label, r in rows.items():
        print(f"{label:<18}" + "   ".join(
            " ".join(f"{k[5:]} {_mb(v)}" for k, v in sorted(rise.items())) for rise in r["action_rise_bytes_per_rank"]))
    print("\ntargets (issue 11): saved bytes and step time as ratios to none")
    for label, r in rows.items():
        if "targets" in r:
            t = r["targets"]
            print(f"{label:<18}saved {r['saved_ratio']:.3f} <= {t['saved_ratio<=']}: "
                  f"{'met' if t['saved_met'] else 'MISSED'}; step (paired) {r['step_ratio_paired']:.3f} <= {t['step_ratio<=']}: "
                  f"{'met' if t['step_met'] else 'MISSED'}")
    print("\nwhere the time goes: rank 0's action costs (ms), and the ops whose self time in a step grew "
          "most over none (ms, median of the profiled steps; rank 0 / rank 1)")
    for label, r in rows.items():
        c = r["costs_ms_rank0"]
        if c:
            print(f"{label:<18}F {c['F']:.1f}  I {c['I']:.1f}  W {c['W']:.1f}  F&B {c['FB']:.1f}")
        if label != "none":
            for rank, extra in enumerate(r["extra_op_s_per_rank"]):
                print(f"{'':<18}rank {rank}: " + ", ".join(f"{k[6:]} +{v:.1f}" for k, v in extra.items()))
            print(f"{'':<18}recomputed in I (op: extra count, all stages): "
                  + ", ".join(f"{k.replace('aten.', '')} {v}" for k, v in r["recomputed_ops"].items()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--policies", nargs="*", metavar="NAME",
                        help=f"also these candidate policies (all without a name): {', '.join(POLICIES)}")
    parser.add_argument("--no-costs", action="store_true", help="skip the per-action cost profile")
    args = parser.parse_args(argv)
    if args.steps < 5:
        parser.error(f"--steps {args.steps}: take the median of at least 5 steps")
    try:
        variants = _variants(args.policies)
    except ValueError as err:
        parser.error(str(err))
    cfg = Config()
    load = _load()
    results = measure(cfg, variants, args.warmup, args.steps, costs=not args.no_costs)
    fig = figures(results, cfg, load)
    report(fig)
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
