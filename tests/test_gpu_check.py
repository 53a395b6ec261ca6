"""benchmarks/gpu_check.py cannot rot: its ``--device cpu --tiny`` run (one process, a gloo
group of one) writes every section, and the pipelined steps equal the unsplit model's
(fp32, flex attention) and FSDP2's with the same mixed-precision policy (bf16 tolerance)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("equivalence", "mixed_precision", "memory", "step_times", "torch_schedule", "profile",
            "sdpa_kernel", "flex")


def test_gpu_check_runs_on_cpu_and_the_pipelined_steps_match(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                          "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(SECTIONS) | {"summary", "environment"} <= set(out), sorted(out)
    assert out["summary"]["fp32_loss_and_grads_equal"] and out["summary"]["flex_equal"], out["summary"]
    failed = {k: out[k].get("error") for k in SECTIONS if out[k].get("status") != "ok"}
    assert not failed, failed
    for section in ("equivalence", "mixed_precision", "flex"):
        assert out[section]["ok"], out[section]
    assert out["profile"]["clock"] == "HostClock"
    assert out["profile"]["busy_s"] > 0
    assert out["memory"]["plan_total_bytes"] > 0
    assert out["sdpa_kernel"]["attention_ops"] == ["aten._scaled_dot_product_flash_attention_for_cpu.default"]
    assert "equivalence" in run.stdout  # the printed table
