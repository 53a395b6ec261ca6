"""torchtitan 0.3 (Python config registry) with dualpipe_fx: ``titan_integration.titan03``.

Rebuilds: on 0.3's own trainer (``torchtitan.train.main`` via ``--module/--config``), the
2-rank DualPipeV run trains exactly like 0.3's single-process run without pipeline
parallelism on the same config (same seed, data): equal losses and grad norms at every
step; and the 0.2 ``[dualpipe_fx]`` option names parse as 0.3 flags into the same dataclass.

torchtitan 0.3 is installed with pip into a temporary folder beside this environment's
torch (``--no-deps`` for each package, so torch and 0.2.2 stay as they are) and put on
``PYTHONPATH`` of the subprocesses only. The test skips only when that install cannot
reach the package index.
"""
import json
import os
import re
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# torchtitan 0.3.0 and the requirements this environment lacks (its datasets, tokenizers,
# torchdata, safetensors and docstring_parser serve 0.2.2 and 0.3 alike)
PACKAGES = ("torchtitan==0.3.0", "torch_checkpointing==0.1.1", "spmd_types==0.2.3", "tyro==1.0.17")
NETWORK_ERRORS = ("NewConnectionError", "Failed to establish a new connection", "Network is unreachable",
                  "Temporary failure in name resolution", "Name or service not known",
                  "ConnectTimeoutError", "ProxyError", "Could not fetch URL")
STEP_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*(-?[0-9.]+)\s+grad_norm:\s*([0-9.]+)")
STEPS = 3
CONFIG = ("--module", "titan_integration.titan03", "--config", "llama3_debug_dualpipe")


@pytest.fixture(scope="module")
def titan03_path(tmp_path_factory):
    """A folder holding torchtitan 0.3 and its extra requirements (each ``--no-deps``)."""
    target = tmp_path_factory.mktemp("torchtitan03")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
           "--target", str(target), *PACKAGES]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if any(marker in log for marker in NETWORK_ERRORS):
            pytest.skip(f"pip cannot reach the package index to install torchtitan 0.3: {log[-400:]}")
        pytest.fail(f"pip install {' '.join(PACKAGES)} failed:\n{log[-4000:]}")
    return str(target)


def _env(titan03_path: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([titan03_path, REPO])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_titan03(titan03_path: str, nproc: int, dump_folder, *extra: str) -> dict[int, tuple[float, float]]:
    """0.3's trainer under torchrun; ``{step: (loss, grad_norm)}``, one value over the ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "titan_integration.titan03", *CONFIG, "--dump_folder", str(dump_folder),
           "--training.steps", str(STEPS), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(titan03_path), capture_output=True, text=True,
                          timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "torchtitan version: 0.3.0" in log, log[-3000:]
    steps: dict[int, set] = {}
    for step, loss, norm in STEP_LINE.findall(log):
        steps.setdefault(int(step), set()).add((float(loss), float(norm)))
    assert all(len(v) == 1 for v in steps.values()), f"ranks disagree: {steps}"
    return {step: v.pop() for step, v in steps.items()}


def test_option_names_parse_as_0_3_flags(titan03_path):
    """The 0.2 ``[dualpipe_fx]`` keys, as 0.3 command-line flags, land in ``config.dualpipe_fx``."""
    code = (
        "import dataclasses, json, sys\n"
        "from torchtitan.config import ConfigManager\n"
        "config = ConfigManager().parse_args(sys.argv[1:])\n"
        "print(json.dumps({'type': type(config).__qualname__,"
        " 'dualpipe_fx': dataclasses.asdict(config.dualpipe_fx)}))\n")
    flags = ["--dualpipe_fx.schedule", "zbv", "--dualpipe_fx.balance", "measured",
             "--dualpipe_fx.rank_balance", "memory", "--dualpipe_fx.memory_budget_gib", "1.5",
             "--dualpipe_fx.split_points", "layers.2", "--dualpipe_fx.compile_stages",
             "--dualpipe_fx.no-overlap", "--dualpipe_fx.no-enable"]
    proc = subprocess.run([sys.executable, "-c", code, *CONFIG, *flags], cwd=REPO,
                          env=_env(titan03_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert parsed["type"] == "DualPipeFxTrainer.Config"
    assert parsed["dualpipe_fx"] == {
        "enable": False, "schedule": "zbv", "balance": "measured", "rank_balance": "memory",
        "memory_budget_gib": 1.5, "split_points": ["layers.2"], "compile_stages": True, "overlap": False}


def test_dualpipev_on_0_3_trainer_equals_no_pp(titan03_path, tmp_path):
    """2 gloo ranks, DualPipeV, vs 0.3 without PP: the same loss and grad norm every step."""
    baseline = run_titan03(titan03_path, 1, tmp_path / "baseline", "--dualpipe_fx.no-enable",
                           "--parallelism.pipeline_parallel_degree", "1")
    pipelined = run_titan03(titan03_path, 2, tmp_path / "dualpipev")
    assert sorted(baseline) == sorted(pipelined) == list(range(1, STEPS + 1))
    for step in baseline:
        assert pipelined[step] == pytest.approx(baseline[step], rel=1e-5, abs=1e-5), \
            f"step {step}: dualpipe_fx {pipelined[step]} vs no PP {baseline[step]}"
