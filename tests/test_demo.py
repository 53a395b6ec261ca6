"""``dualpipe-fx run``: the README's main job follows single-process training step by step."""
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("example,schedule", [("llama", "dualpipev"), ("mlp", "1f1b")])
def test_run_follows_single_process_training(example, schedule):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "dualpipe_fx.cli", "run", "--example", example,
                           "--ranks", "2", "--schedule", schedule, "--steps", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"], done.stdout
    for _, pipelined, single, diff in rows:
        assert abs(float(pipelined) - float(single)) <= 1e-5 * abs(float(single)), done.stdout
        assert float(diff) < 1e-5, done.stdout


def test_run_rejects_too_few_microbatches_before_spawning():
    done = subprocess.run([sys.executable, "-m", "dualpipe_fx.cli", "run", "--ranks", "2",
                           "--microbatches", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "micro" in done.stderr and "2" in done.stderr, done.stderr
