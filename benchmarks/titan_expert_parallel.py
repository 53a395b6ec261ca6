"""torchtitan MoE training with expert parallelism: dualpipe_fx's PP x EP vs torchtitan's own.

torchtitan 0.2.2's trainer (``titan_integration.train``) on CPU with gloo, the deepseek_v3
debug model (8 experts, top-3), batch 4 x seq 64 per data-parallel rank in micro-batches of
1, ``--steps`` steps, every run from ONE seed checkpoint (torchtitan's
``create_seed_checkpoint``), so the losses are comparable. Runs, one after another:

- ``titan_ep``: torchtitan's EP=2 x FSDP=2 without pipeline parallelism, 2 ranks (the
  reference losses);
- ``dualpipe_fx``: 4 ranks, PP=2 x EP=2 (dp_shard=2), ``[dualpipe_fx] enable`` (DualPipeV,
  the experts' all_to_all inside the overlapped F&B graphs);
- ``titan_pp_<schedule>``: 4 ranks, torchtitan's own pipeline split with its EP
  (``--schedules``: ``1F1B``, ``DualPipeV``, ...). Its losses are close, not equal, and its
  grad norms are ``global_valid_tokens`` times larger (torchtitan issue 2972; README,
  "Loss scaling"), so its clipping differs.

From each run's log: losses and grad norms per step; ``tps`` (tokens per second per rank,
torchtitan's own figure) as the median over the steps after the first; ``memory`` (on CPU
the rank's peak RSS, ``titan_integration/cpu.py`` item 4) as the largest over ranks at the
last step. The table gives each 4-rank run against ``dualpipe_fx``. This machine has 2
cores for 4 ranks: times are contended and noisy; compare runs of one invocation only.
Nothing is asserted.

    python benchmarks/titan_expert_parallel.py --steps 6 --json /tmp/titan_ep.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOML = REPO / "titan_integration" / "configs" / "llama3_debug_dualpipe.toml"
TOKENIZER = REPO / "titan_integration" / "assets" / "tokenizer"
NO_PP = ["--dualpipe_fx.no-enable", "--parallelism.pipeline_parallel_degree", "1"]
EP = ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.expert_parallel_degree", "2"]
LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*(-?[0-9.]+)\s+grad_norm:\s*([0-9.]+)\s+memory:\s*([0-9.]+)GiB"
                  r".*?tps:\s*([0-9,]+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(nproc: int, dump: Path, steps: int, timeout: int, *extra: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "titan_integration.train",
           "--job.config_file", str(TOML), "--model.hf_assets_path", str(TOKENIZER), "--model.name", "deepseek_v3",
           "--job.dump_folder", str(dump), "--training.steps", str(steps), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {' '.join(extra)} failed:\n{log[-6000:]}")
    return log


def parse(log: str) -> dict:
    """Per step: loss, grad norm (one value: every rank logs it), peak memory and tps over ranks."""
    steps: dict[int, dict] = {}
    for step, loss, norm, mem, tps in LINE.findall(log):
        row = steps.setdefault(int(step), {"loss": set(), "grad_norm": set(), "memory_gib": [], "tps": []})
        if float(loss) >= 0:  # torchtitan's own PP logs -1 / -2 on ranks without the last stage
            row["loss"].add(float(loss))
        row["grad_norm"].add(float(norm))
        row["memory_gib"].append(float(mem))
        row["tps"].append(int(tps.replace(",", "")))
    last = max(steps)
    return {
        "losses": {s: sorted(r["loss"]) for s, r in sorted(steps.items())},
        "grad_norms": {s: sorted(r["grad_norm"]) for s, r in sorted(steps.items())},
        "tps_median": statistics.median(t for s, r in steps.items() if s > 1 for t in r["tps"]),
        "peak_memory_gib": max(steps[last]["memory_gib"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--schedules", nargs="*", default=["1F1B", "DualPipeV"],
                    help="torchtitan's own pipeline schedules to compare")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train(1, tmp / "seed", 1, args.timeout, *NO_PP, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint",
              "--parallelism.data_parallel_shard_degree", "1")

        def from_seed(name: str) -> tuple[Path, list[str]]:
            dump = tmp / name
            (dump / "checkpoint").mkdir(parents=True)
            shutil.copytree(tmp / "seed" / "checkpoint" / "step-0", dump / "checkpoint" / "step-0")
            return dump, ["--checkpoint.enable", "--checkpoint.interval", str(10 * args.steps)]

        runs = {"titan_ep": (2, NO_PP), "dualpipe_fx": (4, [])}
        for schedule in args.schedules:
            runs[f"titan_pp_{schedule}"] = (4, ["--dualpipe_fx.no-enable",
                                                "--parallelism.pipeline_parallel_schedule", schedule])
        results = {}
        for name, (nproc, extra) in runs.items():
            dump, seeded = from_seed(name)
            try:
                results[name] = parse(train(nproc, dump, args.steps, args.timeout, *EP, *extra, *seeded))
            except RuntimeError as err:
                results[name] = {"error": str(err)[-3000:]}
            print(name, json.dumps(results[name])[:400], flush=True)
    ref = results["titan_ep"].get("losses", {})
    ours = results["dualpipe_fx"]
    print(f"\n| run | ranks | losses == titan_ep | tps median (per rank) | vs dualpipe_fx | peak memory GiB | vs dualpipe_fx |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | {runs[name][0]} | failed: see JSON | - | - | - | - |")
            continue
        equal = all(len(r["losses"][s]) == 1 and abs(r["losses"][s][0] - ref[s][0]) <= 1e-5 * abs(ref[s][0]) + 1e-5
                    for s in ref) if ref else None
        tps_ratio = r["tps_median"] / ours["tps_median"] if "tps_median" in ours else float("nan")
        mem_ratio = r["peak_memory_gib"] / ours["peak_memory_gib"] if "peak_memory_gib" in ours else float("nan")
        print(f"| {name} | {runs[name][0]} | {equal} | {r['tps_median']:.0f} | {tps_ratio:.3f} | "
              f"{r['peak_memory_gib']:.2f} | {mem_ratio:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
