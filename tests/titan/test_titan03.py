"""torchtitan 0.3 (Python config registry) with dualpipe_fx: ``titan_integration.titan03``.

Rebuilds: on 0.3's own trainer, 0.3's own configs as they are (flex attention with document
masks, ``ChunkedLossWrapper``, selective AC), llama3 and qwen3 (tied embedding), train on 2
ranks with DualPipeV exactly like 0.3's 1-rank run without pipeline parallelism: equal
losses and grad norms at every step. The pipelined checkpoint has 0.3's keys (``wq``/``wk``/
``wv``), resumes bitwise, and a pipelined run resumes from 0.3's checkpoint without PP. The
pipeline's document masks equal 0.3's and split per sample; the 0.2 ``[dualpipe_fx]``
option names parse as 0.3 flags into the same dataclass.

torchtitan 0.3 is installed with pip into a temporary folder beside this environment's
torch (``--no-deps`` for each package, so torch and 0.2.2 stay as they are) and put on
``PYTHONPATH`` of the subprocesses only. The test skips only when that install cannot
reach the package index.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.runtime.dist_harness import free_port

# two torchrun jobs of several trainings each (the pipelined one traces four times): above the
# suite's 300 s default on a loaded 2-core machine
pytestmark = [pytest.mark.long, pytest.mark.timeout(900)]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# torchtitan 0.3.0 and the requirements this environment lacks (its datasets, tokenizers,
# torchdata, safetensors and docstring_parser serve 0.2.2 and 0.3 alike)
PACKAGES = ("torchtitan==0.3.0", "torch_checkpointing==0.1.1", "spmd_types==0.2.3", "tyro==1.0.17")
NETWORK_ERRORS = ("NewConnectionError", "Failed to establish a new connection", "Network is unreachable",
                  "Temporary failure in name resolution", "Name or service not known",
                  "ConnectTimeoutError", "ProxyError", "Could not fetch URL")
STEPS = 3
CONFIG_MODULE = ("--module", "titan_integration.titan03")
# every config of 0.3's registries that titan03 offers under its 0.3 name
CONFIGS = ("llama3_debugmodel", "qwen3_debugmodel")
NO_PP = ("--dualpipe_fx.no-enable", "--parallelism.pipeline_parallel_degree", "1")
CKPT = ("--checkpoint.enable", "--checkpoint.interval", "2")
MOE = "deepseek_v3_debugmodel"
# expert parallelism borrows the data-parallel shard ranks (0.3's EP x FSDP layout, efsdp = 1)
EP = ("--config", MOE, "--parallelism.data_parallel_shard_degree", "2", "--parallelism.expert_parallel_degree", "2")
SEED = ("--config", MOE, *NO_PP, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint")
RUN_TIMEOUT_S = 600


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



def run_jobs(titan03_path: str, nproc: int, out, runs: dict[str, list[str]]) -> dict[str, dict]:
    """``runs`` one after another in one torchrun job (tests/titan/runs03.py); ``{run: {losses,
    grad_norms, ranks}}`` with int steps, losses and grad norms checked equal over the ranks;
    ``ranks``: each rank's whole record (expert-parallel runs add what the rank holds)."""
    ports = ",".join(str(free_port()) for _ in runs)
    specs = [f"{name}:{','.join(flags)}" for name, flags in runs.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           os.path.join(REPO, "tests", "titan", "runs03.py"), str(out), ports, *specs, "--",
           *CONFIG_MODULE, "--training.steps", str(STEPS)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(titan03_path), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    metrics = [{name: {key: run[key] for key in ("losses", "grad_norms")} for name, run in rank.items()}
               for rank in ranks]
    assert all(m == metrics[0] for m in metrics), f"ranks disagree: {metrics}"
    return {name: {**{key: {int(k): v for k, v in run[key].items()} for key in ("losses", "grad_norms")},
                   "ranks": [rank[name] for rank in ranks]}
            for name, run in ranks[0].items()}


@pytest.fixture(scope="module")
def no_pp(titan03_path, tmp_path_factory):
    """0.3's own runs without PP (1 rank): every config; llama3 saves checkpoints at steps 2 and 3;
    deepseek_v3's seed checkpoint (0.3's ``create_seed_checkpoint``: the unsplit init)."""
    out = tmp_path_factory.mktemp("no_pp")
    runs = {name: ["--config", name, *NO_PP] for name in CONFIGS}
    runs["llama3_debugmodel"] += CKPT
    runs["seed"] = list(SEED)
    return out, run_jobs(titan03_path, 1, out, runs)


@pytest.fixture(scope="module")
def pipelined(titan03_path, no_pp, tmp_path_factory):
    """2 ranks, DualPipeV: every config; llama3 saving checkpoints, resumed from its own step 2,
    and resumed from 0.3's step 2 without PP. First, 0.3's own EP=2 run of deepseek_v3 without PP
    (FSDP x EP, from the seed checkpoint: 0.3's sharded init draws other values on CPU) -- first,
    so that it runs before any dualpipe_fx trainer installs its clipping in these processes."""
    out = tmp_path_factory.mktemp("dualpipev")
    seed = no_pp[0] / "seed" / "checkpoint" / "step-0"
    runs = {"ep_no_pp": [*EP, *NO_PP, "--checkpoint.enable", "--checkpoint.load_only",
                         "--checkpoint.initial_load_path", str(seed)]}
    runs.update({name: ["--config", name] for name in CONFIGS})
    llama = ["--config", "llama3_debugmodel", *CKPT]
    runs["llama3_debugmodel"] = llama
    runs["resumed"] = [*llama, "--resume-from", str(out / "llama3_debugmodel" / "checkpoint" / "step-2")]
    runs["from_no_pp"] = [*llama, "--resume-from", str(no_pp[0] / "llama3_debugmodel" / "checkpoint" / "step-2")]
    return out, run_jobs(titan03_path, 2, out, runs)


@pytest.fixture(scope="module")
def pp_ep(titan03_path, tmp_path_factory):
    """4 ranks: deepseek_v3 under DualPipeV with PP=2 x EP=2, from its own init (each rank keeps
    its expert rows of the unsplit init, which the seed checkpoint holds)."""
    out = tmp_path_factory.mktemp("pp_ep")
    return run_jobs(titan03_path, 4, out, {"pp_ep": list(EP)})["pp_ep"]


def _model_state(checkpoint) -> dict:
    """A DCP checkpoint folder's tensors (model and optimizer), read without a process group."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = str(checkpoint) + ".pt"
    dcp_to_torch_save(str(checkpoint), path)
    state = torch.load(path, weights_only=False)
    return {k: v for k, v in _flatten(state) if isinstance(v, torch.Tensor)}


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


# One interpreter with 0.3 on its path answers both in-process checks below.
_PROBE = """
import dataclasses, json, sys
import torch
from torch.nn.attention.flex_attention import and_masks, create_mask
from torchtitan.config import ConfigManager
from torchtitan.models.common.attention import get_causal_mask_mod
from torchtitan.models.common.attention import get_efficient_causal_mask_mod_for_packed_document as theirs
from titan_integration.titan03 import _packed_document_mask_mod as ours

config = ConfigManager().parse_args(sys.argv[1:])
gen, same, per_sample = torch.Generator().manual_seed(0), [], []
for batch in (1, 2, 3) * 10:  # random document layouts; positions restart at 0 per document
    starts = torch.rand(batch, 64, generator=gen) < 0.08
    starts[:, 0] = True
    idx = torch.arange(64).expand(batch, 64)
    positions = idx - torch.cummax(torch.where(starts, idx, 0), dim=1).values
    mask = lambda mod, n: create_mask(and_masks(get_causal_mask_mod(), mod), n, None, 64, 64, device="cpu")
    dense = mask(ours(positions), batch)
    same.append(torch.equal(dense, mask(theirs(positions), batch)))
    per_sample += [torch.equal(dense[b:b + 1], mask(ours(positions[b:b + 1]), 1)) for b in range(batch)]
from titan_integration import titan03
from torchtitan.models.deepseek_v3 import config_registry
refusals = []
for moe in (titan03.deepseek_v3_debugmodel(), titan03.with_dualpipe_fx(config_registry.deepseek_v3_debugmodel_hybridep())):
    moe.parallelism.expert_parallel_degree = 2
    moe.parallelism.data_parallel_shard_degree = 2
    try:
        titan03.validate(moe)
        refusals.append(None)
    except ValueError as err:
        refusals.append(str(err))
print(json.dumps({"type": type(config).__qualname__, "dualpipe_fx": dataclasses.asdict(config.dualpipe_fx),
                  "masks_equal_0_3": all(same), "masks_per_sample": all(per_sample), "ep_refusals": refusals}))
"""


@pytest.fixture(scope="module")
def probe(titan03_path):
    flags = ["--dualpipe_fx.schedule", "zbv", "--dualpipe_fx.balance", "measured",
             "--dualpipe_fx.rank_balance", "memory", "--dualpipe_fx.memory_budget_gib", "1.5",
             "--dualpipe_fx.split_points", "layers.2", "--dualpipe_fx.compile_stages",
             "--dualpipe_fx.no-overlap", "--dualpipe_fx.no-enable"]
    proc = subprocess.run([sys.executable, "-c", _PROBE, *CONFIG_MODULE, "--config", "llama3_debugmodel", *flags],
                          cwd=REPO, env=_env(titan03_path), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_option_names_parse_as_0_3_flags(probe):
    """The 0.2 ``[dualpipe_fx]`` keys, as 0.3 command-line flags, land in ``config.dualpipe_fx``."""
    assert probe["type"] == "DualPipeFxTrainer.Config"
    assert probe["dualpipe_fx"] == {
        "enable": False, "schedule": "zbv", "balance": "measured", "rank_balance": "memory",
        "memory_budget_gib": 1.5, "split_points": ["layers.2"], "compile_stages": True, "overlap": False}


def test_document_masks_are_0_3s_and_split_per_sample(probe):
    """The pipeline's same-document mask equals 0.3's (dense, on random document layouts, for
    a batch of one too, where 0.3 builds another closure), and sample b of a batch's mask is
    the mask built on sample b alone: what the per-micro-batch split relies on."""
    assert probe["masks_equal_0_3"] and probe["masks_per_sample"], probe


def test_expert_parallelism_validates_with_the_standard_dispatcher_only(probe):
    """0.3's deepseek_v3 with expert_parallel_degree = 2 passes validation (its standard all_to_all
    dispatcher); the HybridEP dispatcher's config is refused before the trainer starts, naming it."""
    standard, hybridep = probe["ep_refusals"]
    assert standard is None, standard
    assert hybridep and "HybridEPTokenDispatcher" in hybridep and 'moe_comm_backend="standard"' in hybridep, hybridep


@pytest.mark.parametrize("name", CONFIGS)
def test_dualpipev_equals_0_3_without_pp(no_pp, pipelined, name):
    """0.3's config as it is (flex attention, ChunkedLossWrapper, selective AC), 2 gloo ranks,
    DualPipeV, vs 0.3 without PP: the same loss and grad norm at every step."""
    baseline, ours = no_pp[1][name], pipelined[1][name]
    assert sorted(baseline["losses"]) == sorted(ours["losses"]) == list(range(1, STEPS + 1)), (baseline, ours)
    for key in ("losses", "grad_norms"):
        for step, value in baseline[key].items():
            assert ours[key][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key, step, ours, baseline)


def test_checkpoint_resumes_bitwise_and_cross_loads_with_0_3(no_pp, pipelined):
    """Resumed from its own step-2 checkpoint, the pipelined run's step 3 and its step-3
    checkpoint equal the uninterrupted run's bitwise; the checkpoint has 0.3's own keys
    (``wq``/``wk``/``wv``, not the fused ``wqkv``), the same as 0.3 without PP saves; and a
    pipelined run resumed from 0.3's step-2 checkpoint without PP gives 0.3's step 3."""
    (base_out, base), (out, runs) = no_pp, pipelined
    full, resumed, crossed = runs["llama3_debugmodel"], runs["resumed"], runs["from_no_pp"]
    assert sorted(resumed["losses"]) == sorted(crossed["losses"]) == [STEPS]
    assert resumed["losses"][STEPS] == full["losses"][STEPS]
    assert resumed["grad_norms"][STEPS] == full["grad_norms"][STEPS]
    ours = _model_state(out / "llama3_debugmodel" / "checkpoint" / f"step-{STEPS}")
    again = _model_state(out / "resumed" / "checkpoint" / f"step-{STEPS}")
    theirs = _model_state(base_out / "llama3_debugmodel" / "checkpoint" / f"step-{STEPS}")
    assert sorted(ours) == sorted(again) == sorted(theirs)
    model_keys = [k for k in ours if k.startswith("layers.0.attention.")]
    assert any(k.endswith(".wq.weight") for k in model_keys) and not any(".wqkv." in k for k in model_keys), model_keys
    import torch
    assert all(torch.equal(ours[k], again[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], again[k])]
    for key in ("losses", "grad_norms"):
        assert crossed[key][STEPS] == pytest.approx(base["llama3_debugmodel"][key][STEPS], rel=1e-5, abs=1e-6)


def test_pp2_x_ep2_equals_0_3s_own_ep2_without_pp(pipelined, pp_ep):
    """deepseek_v3 (MoE, load balancing, flex, chunked loss, selective AC) on 4 gloo ranks,
    DualPipeV with PP=2 x EP=2, vs 0.3's own EP=2 run without PP (FSDP x EP on 2 ranks) from the
    seed checkpoint: the same loss and grad norm at every step. Each rank holds its half of every
    routed expert it has (the EP rows), and the dispatch/combine all_to_all are in its stage
    graphs (forward, and their reverse in the input backward)."""
    reference = pipelined[1]["ep_no_pp"]
    print(f"PP=2 x EP=2 losses {pp_ep['losses']} grad norms {pp_ep['grad_norms']}; 0.3 EP=2 without PP "
          f"losses {reference['losses']} grad norms {reference['grad_norms']}")
    assert sorted(reference["losses"]) == sorted(pp_ep["losses"]) == list(range(1, STEPS + 1)), (reference, pp_ep)
    for key in ("losses", "grad_norms"):
        for step, value in reference[key].items():
            assert pp_ep[key][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, step, pp_ep, reference)
    full = {fqn: shape for rank in reference["ranks"] for fqn, shape in rank["experts"].items()}
    for rank in pp_ep["ranks"]:
        assert rank["experts"], rank  # DualPipeV: every rank holds MoE layers
        for fqn, shape in rank["experts"].items():
            assert shape == full[fqn], (fqn, shape, full[fqn])  # 0.3's own EP shard: E / 2 rows
        assert rank["all_to_all"]["forward"] > 0 and rank["all_to_all"]["backward_input"] > 0, rank
