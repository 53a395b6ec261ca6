"""``dualpipe-fx run``: the README's main job follows single-process training step by step."""
import os
import subprocess
import sys

import pytest


# the README's main job in the main tier; another example and schedule in the long tier
@pytest.mark.parametrize("example,schedule", [("llama", "dualpipev"),
                                              pytest.param("mlp", "1f1b", marks=pytest.mark.long)])
def test_run_follows_single_process_training(example, schedule, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    png = ["--png", str(tmp_path / "measured.png"), "--profile-steps", "3"] if example == "llama" else []
    done = subprocess.run([sys.executable, "-m", "dualpipe_fx.ui.cli", "run", "--example", example,
                           "--ranks", "2", "--schedule", schedule, "--steps", "2", *png],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"], done.stdout
    for _, pipelined, single, diff in rows:
        assert abs(float(pipelined) - float(single)) <= 1e-5 * abs(float(single)), done.stdout
        assert float(diff) < 1e-5, done.stdout
    if png:  # the bubble as a median over several profiled steps, and the picture of the last
        assert "measured bubble ratio, median of 3 profiled steps: rank 0 " in done.stdout, done.stdout
        assert (tmp_path / "measured.png").read_bytes()[:4] == b"\x89PNG"


def test_run_rejects_too_few_microbatches_before_spawning():
    done = subprocess.run([sys.executable, "-m", "dualpipe_fx.ui.cli", "run", "--ranks", "2",
                           "--microbatches", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "micro" in done.stderr and "2" in done.stderr, done.stderr
