"""A rank killed mid-training: torchrun's elastic agent restarts the group, and the pipeline
resumes from its last ``torch.distributed.checkpoint`` with the losses of a run that was never
interrupted, bit for bit.

A ``torchrun --standalone --nproc-per-node 2 --max-restarts 1`` run of
``tests/faults/elastic_worker.py`` (gloo, CPU) whose rank 1 SIGKILLs itself at the start of
step ``KILL_STEP`` of its first attempt, against the same training uninterrupted (on 2 pooled
ranks: one torchrun start less). The torchrun run gets its own session, and every process it
started (torchrun, and each worker by the pid it wrote) is killed if it is still there at the
end, so none is left behind.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.elastic_worker import uninterrupted
from tests.runtime.dist_harness import run_ranks

REPO = Path(__file__).resolve().parents[2]
STEPS, KILL_STEP = 5, 2
RUN_TIMEOUT_S = 120.0


def _alive(pid: int) -> bool:
    """``pid`` runs (not a zombie) and is one of our workers (not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and b"elastic_worker" in cmdline


def _worker_pids(out: Path) -> dict[str, int]:
    return {f.name: int(f.read_text()) for f in sorted((out / "pids").glob("*"))} if (out / "pids").exists() else {}


def _end(proc: subprocess.Popen, out: Path) -> None:
    """Stop torchrun (its agent stops its workers), then kill any worker still there: torchrun
    starts each worker in a session of its own, so they are found by the pids they wrote."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for pid in _worker_pids(out).values():
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _torchrun(out: Path, kill_step: int) -> tuple[int, str, float]:
    """One torchrun of the worker: (exit status, its output, seconds)."""
    out.mkdir()
    env = {**os.environ, "DPFX_OUT": str(out), "DPFX_STEPS": str(STEPS), "DPFX_KILL_STEP": str(kill_step),
           "DPFX_KILL_RANK": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.2", "-m", "tests.faults.elastic_worker"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        output = f"(killed after {RUN_TIMEOUT_S:g} s)"
    finally:
        _end(proc, out)
    return proc.returncode, output, time.monotonic() - start


def _losses(out: Path, attempt: int) -> list[tuple[int, str]]:
    path = out / f"losses.{attempt}"
    return [(int(step), loss) for step, loss in (line.split() for line in path.read_text().splitlines())] \
        if path.exists() else []


@pytest.mark.long  # a torchrun job killed and restarted: the long tier (docs/contributing.md)
def test_a_killed_rank_is_restarted_by_torchrun_and_resumes_from_its_checkpoint(tmp_path):
    (tmp_path / "uninterrupted").mkdir()
    start = time.monotonic()
    run_ranks(uninterrupted, 2, (str(tmp_path / "uninterrupted"), STEPS), timeout=RUN_TIMEOUT_S)
    ref_s = time.monotonic() - start
    reference = _losses(tmp_path / "uninterrupted", 0)
    assert [s for s, _ in reference] == list(range(STEPS)), reference

    out = tmp_path / "killed"
    rc, output, killed_s = _torchrun(out, kill_step=KILL_STEP)
    if rc != 0 and not _worker_pids(out):
        pytest.skip("torchrun's elastic agent could not start workers here (--standalone rendezvous on "
                    f"localhost): {output.strip().splitlines()[-1:] or rc}")
    assert rc == 0, output[-4000:]  # the restarted group finished
    pids = _worker_pids(out)
    assert sorted(pids) == ["0.0", "0.1", "1.0", "1.1"], pids  # both ranks, in both attempts
    assert not set(pids[f"0.{r}"] for r in (0, 1)) & set(pids[f"1.{r}"] for r in (0, 1)), pids
    # the survivor of the kill raised the closed-connection PeerTimeoutError, not a hang
    assert "PeerTimeoutError: rank 0: a peer rank closed the connection" in output, output[-4000:]
    first, second = _losses(out, 0), _losses(out, 1)
    assert [s for s, _ in first] == list(range(KILL_STEP)), first
    assert [s for s, _ in second] == list(range(KILL_STEP, STEPS)), second  # resumed at the checkpoint
    assert first + second == reference  # float.hex: bitwise the uninterrupted losses
    assert not [p for p in pids.values() if _alive(p)], "a worker was left behind"
    print(f"uninterrupted run {ref_s:.1f} s, killed and resumed run {killed_s:.1f} s")
