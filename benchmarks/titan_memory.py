"""Per-rank peak RSS of torchtitan llama3 training: dualpipe_fx vs torchtitan's own PP.

torchtitan 0.2.2's trainer (``titan_integration.train``) on CPU with gloo, llama3 with a
width of ``--dim`` and ``--layers`` blocks (16 heads, the repo's 384-id tokenizer as the
vocabulary, registered as an extra flavor), ``--steps`` steps of batch 4 x seq 64 in
micro-batches of 1 (C = 4). For each layer count it runs, one after another (each a fresh
torchrun job, so each peak is its own):

- ``baseline``: torchtitan without pipeline parallelism, 1 rank: the reference losses;
- ``dualpipe_fx``: 2 ranks, ``[dualpipe_fx] enable`` (DualPipeV);
- ``titan_pp``: 2 ranks, torchtitan's own pipeline split and ``Schedule1F1B``.

Each rank reads its ``VmHWM`` (peak resident set size, ``/proc/self/status``) at three
points: before the pipelining function (imports, tokenizer, data loader, the model on
meta), after it (for dualpipe_fx: the stages compiled and this rank's weights allocated and
initialised; torchtitan allocates and initialises its parts right after), once the trainer
is built, and after the last step (optimizer states, gradients, activations). The table
gives the final peak per rank, dualpipe_fx over torchtitan's PP, and whether dualpipe_fx's
losses equal the unpipelined ones (torchtitan's own PP draws other initial weights, so its
losses differ). ``--before FILE`` adds a column from an earlier run's JSON (e.g. measured
at an older commit). Figures depend on the allocator and the machine; nothing is asserted.

    python benchmarks/titan_memory.py --layers 16 32 --json /tmp/titan_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOML = REPO / "titan_integration" / "configs" / "llama3_debug_dualpipe.toml"
TOKENIZER = REPO / "titan_integration" / "assets" / "tokenizer"
VOCAB = 384  # the tiny tokenizer's ids
GIB = 1 << 30
LOSS_RTOL = 1e-5  # fp32, the same weights and batches; the micro-batch sum's order differs

RUNS = {
    "baseline": (1, ["--dualpipe_fx.no-enable", "--parallelism.pipeline_parallel_degree", "1"]),
    "dualpipe_fx": (2, []),
    "titan_pp": (2, ["--dualpipe_fx.no-enable", "--parallelism.pipeline_parallel_schedule", "1F1B"]),
}


def _flavor(dim: int, layers: int) -> str:
    return f"bench_d{dim}_l{layers}"


def _status(key: str) -> int:
    """``VmHWM`` (peak resident set size) or ``VmRSS`` of this process in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def _mark(record: dict, point: str) -> None:
    record["hwm"][point] = _status("VmHWM")
    record["rss"][point] = _status("VmRSS")


# --------------------------------------------------------------------------------------
# Worker: one rank of one torchrun job


def _register_flavor(dim: int, layers: int) -> None:
    from torchtitan.models.llama3 import TransformerModelArgs
    from torchtitan.protocols.train_spec import get_train_spec

    args = TransformerModelArgs(dim=dim, n_layers=layers, n_heads=16, vocab_size=VOCAB, rope_theta=500000)
    get_train_spec("llama3").model_args[_flavor(dim, layers)] = args


def _watch_pipelining(record: dict) -> None:
    """Wrap the TrainSpec's pipelining_fn (dualpipe_fx's or torchtitan's) to read VmHWM around it."""
    import dataclasses

    from torchtitan.protocols import train_spec as ts

    spec = ts.get_train_spec("llama3")
    inner = spec.pipelining_fn

    def watched(*args, **kwargs):
        _mark(record, "before_pipelining")
        out = inner(*args, **kwargs)
        _mark(record, "after_pipelining")
        return out

    ts._extra_train_specs.pop("llama3", None)
    ts.register_train_spec("llama3", dataclasses.replace(spec, pipelining_fn=watched))


def _watch_dualpipe_fx(record: dict) -> None:
    """dualpipe_fx's pipelining function in two parts: compile(), then init_weights."""
    from titan_integration import pipelining

    for name, point in (("_compile", "after_compile"), ("_init_weights", "after_init_weights")):
        inner = getattr(pipelining, name)

        def watched(*args, _inner=inner, _point=point, **kwargs):
            out = _inner(*args, **kwargs)
            _mark(record, _point)
            return out

        setattr(pipelining, name, watched)


def _record_losses(trainer, record: dict) -> None:
    log = trainer.metrics_processor.log

    def logged(step, global_avg_loss, *args, **kwargs):
        record["losses"][step] = float(global_avg_loss)
        return log(step, global_avg_loss, *args, **kwargs)

    trainer.metrics_processor.log = logged


def worker(out: str, dim: int, layers: int, train_args: list[str]) -> None:
    import torch.distributed as dist
    from torchtitan.tools.logging import init_logger

    from titan_integration.cpu import use_cpu_when_no_gpu
    from titan_integration.data import register_tiny_dataset
    from titan_integration.train import DualPipeFxTrainer, _prepare, parse_job_config

    init_logger()
    use_cpu_when_no_gpu()
    register_tiny_dataset()
    _register_flavor(dim, layers)
    job_config = parse_job_config(train_args)
    _prepare(job_config)
    record: dict = {"hwm": {}, "rss": {}, "losses": {}}
    _mark(record, "start")
    _watch_pipelining(record)
    if job_config.dualpipe_fx.enable:
        _watch_dualpipe_fx(record)
    trainer = DualPipeFxTrainer(job_config)
    try:
        _mark(record, "trainer_built")
        record["params_local"] = sum(p.numel() for m in trainer.model_parts for p in m.parameters())
        _record_losses(trainer, record)
        trainer.train()
        _mark(record, "end")
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(record, f)


# --------------------------------------------------------------------------------------
# Driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(name: str, dim: int, layers: int, steps: int, timeout: int) -> dict[int, dict]:
    """``{rank: record}`` of one torchrun job."""
    nproc, extra = RUNS[name]
    with tempfile.TemporaryDirectory() as out:
        train_args = ["--job.config_file", str(TOML), "--model.hf_assets_path", str(TOKENIZER),
                      "--model.flavor", _flavor(dim, layers), "--job.dump_folder", os.path.join(out, "dump"),
                      "--training.steps", str(steps), "--training.seq_len", "64",
                      "--training.local_batch_size", "4", *extra]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(Path(__file__).resolve()), "--worker", out, "--dim", str(dim), "--layers", str(layers),
               "--", *train_args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} ({layers} layers) failed:\n{(proc.stdout + proc.stderr)[-6000:]}")
        return {r: json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(nproc)}


def figures(results: dict, before: dict | None) -> dict:
    """Per layer count: the per-rank peaks, ratios and the loss check."""
    table = {}
    for layers, runs in results.items():
        base = runs.get("baseline", {}).get(0, {}).get("losses")
        row = {}
        for rank in (0, 1):
            ours = runs["dualpipe_fx"][rank]["hwm"]["end"] if "dualpipe_fx" in runs else None
            theirs = runs["titan_pp"][rank]["hwm"]["end"] if "titan_pp" in runs else None
            old = None
            if before:
                old = before.get("runs", {}).get(str(layers), {}).get("dualpipe_fx", {}).get(str(rank), {})
                old = old.get("hwm", {}).get("end")
            row[rank] = {"dualpipe_fx": ours, "titan_pp": theirs, "before": old,
                         "ratio_vs_titan_pp": ours / theirs if ours and theirs else None,
                         "ratio_vs_before": ours / old if ours and old else None}
        if base and "dualpipe_fx" in runs:
            # the pipelined loss sums micro-batches in another order: equal to rounding
            ours = runs["dualpipe_fx"][0]["losses"]
            row["loss_max_rel_diff"] = max(abs(ours[k] - v) / abs(v) for k, v in base.items())
            row["losses_equal_baseline"] = sorted(ours) == sorted(base) and row["loss_max_rel_diff"] < LOSS_RTOL
        table[layers] = row
    return table


def _gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def report(table: dict, results: dict) -> None:
    print("\nper-rank peak RSS (VmHWM, GiB) at the end of training")
    print(f"{'layers':>6} {'rank':>4} {'before':>7} {'dualpipe_fx':>11} {'titan PP':>8} "
          f"{'dpfx/PP':>7} {'dpfx/before':>11}  losses == no PP")
    for layers, row in table.items():
        for rank in (0, 1):
            r = row[rank]
            print(f"{layers:>6} {rank:>4} {_gib(r['before']):>7} {_gib(r['dualpipe_fx']):>11} "
                  f"{_gib(r['titan_pp']):>8} {_ratio(r['ratio_vs_titan_pp']):>7} "
                  f"{_ratio(r['ratio_vs_before']):>11}  {row.get('losses_equal_baseline', '-')}")
    print("\nVmHWM / VmRSS (GiB) at each point, per run and rank")
    for layers, runs in results.items():
        for name, ranks in runs.items():
            for rank, rec in ranks.items():
                rss = rec.get("rss", {})
                points = " ".join(f"{k}={_gib(v)}/{_gib(rss.get(k))}" for k, v in rec["hwm"].items())
                print(f"  {layers:>3} layers {name:<12} rank {rank}: {points}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        split = argv.index("--")
        parser = argparse.ArgumentParser()
        parser.add_argument("--worker")
        parser.add_argument("--dim", type=int)
        parser.add_argument("--layers", type=int)
        ns = parser.parse_args(argv[:split])
        worker(ns.worker, ns.dim, ns.layers, argv[split + 1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per torchrun job")
    parser.add_argument("--before", type=Path, help="an earlier run's JSON: its dualpipe_fx peaks as 'before'")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    results: dict = {}
    for layers in args.layers:
        for name in args.runs:
            print(f"running {name}, {layers} layers ...", flush=True)
            results.setdefault(layers, {})[name] = run_one(name, args.dim, layers, args.steps, args.timeout)
    before = json.loads(args.before.read_text()) if args.before else None
    table = figures(results, before)
    report(table, results)
    if args.json:
        config = {"dim": args.dim, "layers": args.layers, "steps": args.steps, "seq_len": 64,
                  "local_batch_size": 4, "microbatches": 4, "vocab": VOCAB, "ranks": 2}
        args.json.write_text(json.dumps({"config": config, "table": table, "runs": results}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
