"""End to end on CPU: ``torchrun -m titan_integration.train`` with the example job file.

Rebuilds: the 2-rank DualPipeV run trains exactly like torchtitan's own single-process
run without pipeline parallelism (same seed, same data): equal step-1 loss, later losses
following; a run resumed from the step-2 checkpoint gives the uninterrupted step-3 loss; and
torchtitan's [activation_checkpoint] modes (full, selective op, selective every 2nd block)
train exactly like no AC while every stage saves fewer bytes per micro-batch; and each
rank starts from bitwise the weights torchtitan's non-pipelined init gives its tensors,
although it never holds the whole model; the bidirectional DualPipe with grad clipping logs
DualPipeV's grad norms; torchtitan's MoE deepseek_v3 trains like its unpipelined run; and so
do the llama3 and deepseek_v3 flex-attention flavors (block-causal document masks); and
``compile.enable`` compiles the stage graphs (Inductor) with the losses of the run without it.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.runtime.dist_harness import free_port

pytest.importorskip("torchtitan", reason="torchtitan is the optional 'titan' extra")

# The first test to use a job's fixture waits for all of the job's trainings (setup counts).
pytestmark = [pytest.mark.long, pytest.mark.timeout(1800)]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOML = os.path.join(REPO, "titan_integration", "configs", "llama3_debug_dualpipe.toml")
TOKENIZER = os.path.join(REPO, "titan_integration", "assets", "tokenizer")
STEP_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*(-?[0-9.]+)")
RUN_TIMEOUT_S = 420
STEPS = 3



def run_train(nproc: int, dump_folder, *extra: str) -> tuple[dict[int, float], str]:
    """Run the entry point under torchrun; ``({step: loss}, full log)``.

    Every rank logs the step line (the loss is broadcast from the rank holding it), so
    each step must show one loss value.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "titan_integration.train", "--job.config_file", TOML,
           "--model.hf_assets_path", TOKENIZER, "--job.dump_folder", str(dump_folder),
           "--training.steps", str(STEPS), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    losses: dict[int, set[float]] = {}
    for step, loss in STEP_LINE.findall(log):
        losses.setdefault(int(step), set()).add(float(loss))
    assert all(len(v) == 1 for v in losses.values()), f"ranks disagree on the loss: {losses}"
    return {step: v.pop() for step, v in losses.items()}, log


def run_trainings(nproc: int, out, runs: dict[str, list[str]]) -> dict[int, dict]:
    """Several trainings, one after another, in ONE torchrun job (tests/titan/ac_runs.py): one
    interpreter start and one torchtitan import per rank serve them all. ``runs`` maps a name
    to its extra arguments (after the job file's). ``{rank: {name: record}}``, with each
    record's ``losses`` and ``grad_norms`` keyed by the int step."""
    ports = ",".join(str(free_port()) for _ in runs)
    specs = [f"{name}:{','.join(flags)}" for name, flags in runs.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           os.path.join(REPO, "tests", "titan", "ac_runs.py"), str(out), ports, *specs, "--",
           "--job.config_file", TOML, "--model.hf_assets_path", TOKENIZER,
           "--job.dump_folder", str(out / "dump"), "--training.steps", str(STEPS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S * len(runs))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    out_runs = {}
    for rank in range(nproc):
        records = json.loads((out / f"rank{rank}.json").read_text())
        for record in records.values():
            for key in ("losses", "grad_norms", "validation"):
                record[key] = {int(step): value for step, value in record[key].items()}
        out_runs[rank] = records
    return out_runs


def losses_of(records: dict[int, dict], name: str) -> dict[int, float]:
    """The run's {step: loss}; every rank must log the same (the loss is broadcast)."""
    per_rank = [records[rank][name]["losses"] for rank in sorted(records)]
    assert all(r == pytest.approx(per_rank[0], rel=1e-6) for r in per_rank), f"ranks disagree on {name}: {per_rank}"
    return per_rank[0]


NO_PP = ["--dualpipe_fx.no-enable", "--parallelism.pipeline_parallel_degree", "1"]
# torchtitan's validator after the last step at another seq_len and batch than training's (64, 4):
# the pipeline builds a second program for it (Pipeline.step, a forward-only step)
VALIDATION = ["--validation.enable", "--validation.freq", str(STEPS), "--validation.steps", "1",
              "--validation.seq_len", "32", "--validation.local_batch_size", "8"]
# qwen3's MoE code (grouped-GEMM experts) on a smaller flavor than debugmodel_moe (ac_runs.py)
QWEN3_MOE = ["--model.name", "qwen3", "--model.flavor", "debugmodel_moe_ci"]
# the flex-attention flavors (block-causal document masks built by the model's own
# get_attention_masks from the batch and the tokenizer's EOS, split per micro-batch)
FLEX = ["--model.flavor", "debugmodel_flex_attn"]
FLEX_RUNS = {"llama3_flex": FLEX, "deepseek_flex": ["--model.name", "deepseek_v3", *FLEX]}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """torchtitan's own single-process runs, no pipeline parallelism, in one job: llama3 (the
    job file's model), qwen3's MoE flavor and the flex flavors of llama3 and deepseek_v3."""
    runs = run_trainings(1, tmp_path_factory.mktemp("references"), {
        "llama3": NO_PP + VALIDATION, "qwen3_moe": NO_PP + QWEN3_MOE, **{name: NO_PP + flags for name, flags in FLEX_RUNS.items()}})
    references = {name: losses_of(runs, name) for name in ("llama3", "qwen3_moe")}
    references["validation"] = runs[0]["llama3"]["validation"]
    references["grad_norms"] = {name: runs[0][name]["grad_norms"] for name in FLEX_RUNS}
    references.update({name: losses_of(runs, name) for name in FLEX_RUNS})
    return references


@pytest.fixture(scope="module")
def baseline(references):
    return references["llama3"]


def test_baseline_logs_every_step(baseline):
    assert sorted(baseline) == list(range(1, STEPS + 1))


def test_step1_loss_equals_unpipelined_torchtitan(baseline, pipelined):
    losses = pipelined["losses"]
    assert sorted(losses) == list(range(1, STEPS + 1)), pipelined["log"][-4000:]
    assert losses[1] == pytest.approx(baseline[1], rel=1e-3)


def test_later_losses_follow_unpipelined_torchtitan(baseline, pipelined):
    losses = pipelined["losses"]
    for step in range(2, STEPS + 1):
        assert losses[step] == pytest.approx(baseline[step], rel=1e-3), (step, losses, baseline)
    # and training moves: a pipeline that dropped the gradients would repeat step 1's loss
    assert losses[STEPS] < losses[1]


def test_resume_from_step2_checkpoint_gives_the_same_step3_loss(pipelined, ac_runs):
    # the uninterrupted run kept both checkpoints; "resumed" started from a copy of step-2 alone
    assert sorted(p.name for p in (pipelined["dump"] / "checkpoint").iterdir()) == ["step-2", "step-3"]
    for rank, runs in ac_runs.items():
        resumed = runs["resumed"]
        assert any("Training starts at step 3" in m for m in resumed["log"]), (rank, resumed["log"][-40:])
        assert sorted(resumed["losses"]) == [STEPS]
        assert resumed["losses"][STEPS] == pytest.approx(pipelined["losses"][STEPS], rel=1e-5)


# One torchrun job trains these one after another (tests/titan/ac_runs.py): one interpreter
# start for all of them instead of one each.
# rank_balance = "time": one cut for every mode, so that their stages' saved bytes compare (the
# default memory-aware cut moves with what a mode saves)
_ONE_CUT = ["--dualpipe_fx.rank_balance", "time"]
AC_RUNS = {
    "none": _ONE_CUT + VALIDATION,
    "full": _ONE_CUT + ["--activation_checkpoint.mode", "full"],
    "op": _ONE_CUT + ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option",
                      "op"],
    "every2": _ONE_CUT + ["--activation_checkpoint.mode", "selective",
                          "--activation_checkpoint.selective_ac_option", "2"],
}
AC_NAMES = tuple(AC_RUNS)
# ... and in the same job: the bidirectional DualPipe with grad clipping (max_norm = 1.0 in the
# job file), torchtitan's MoE models deepseek_v3 (its flex flavor, FLEX_RUNS: debugmodel's MoE
# layers with flex attention; SDPA deepseek_v3 runs with EP in test_data_parallel.py) and qwen3
# (debugmodel_moe), and a run resumed from a copy of the entry point run's step-2 checkpoint alone
OTHER_RUNS = {
    "dualpipe": ["--dualpipe_fx.schedule", "dualpipe"],
    "qwen3_moe": QWEN3_MOE,
    # compile.enable -> compile_stages: real Inductor on CPU; F, I, W graphs (no-overlap: fewer
    # graphs to compile than the multiplexed F&B ones), with full AC (recompute="full": the
    # compiled I graphs recompute the forward)
    "compile": ["--compile.enable", "--dualpipe_fx.no-overlap", "--activation_checkpoint.mode", "full"],
    # schedule = "auto" with mode = "memory_budget": the planner picks the schedule and the least
    # recompute that keeps 0.5 of the activations
    "auto": ["--dualpipe_fx.schedule", "auto", "--activation_checkpoint.mode", "memory_budget",
             "--activation_checkpoint.memory_budget", "0.5"],
    **FLEX_RUNS,
}


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory):
    """2 ranks, DualPipeV, through the entry point (``torchrun -m titan_integration.train``)
    with the job file as it is; checkpoints at step 2 (interval) and step 3 (last)."""
    dump = tmp_path_factory.mktemp("dualpipev")
    losses, log = run_train(2, dump, "--checkpoint.enable", "--checkpoint.interval", "2")
    return {"losses": losses, "log": log, "dump": dump}


@pytest.fixture(scope="module")
def ac_runs(tmp_path_factory, pipelined):
    """``{rank: {run: {losses, grad_norms, saved, recompute, checkpoint_wrappers, ...}}}``."""
    out = tmp_path_factory.mktemp("ac_runs")
    step2, resumed = pipelined["dump"] / "checkpoint" / "step-2", out / "resumed"
    return run_trainings(2, out, {
        "resumed": [f"@copy={step2}={resumed / 'checkpoint' / 'step-2'}", "--job.dump_folder", str(resumed),
                    "--checkpoint.enable", "--checkpoint.interval", "2"],
        **AC_RUNS, **OTHER_RUNS})


def test_activation_checkpoint_modes_train_like_no_ac(baseline, ac_runs):
    for rank, runs in ac_runs.items():
        plain = runs["none"]
        assert sorted(map(int, plain["losses"])) == list(range(1, STEPS + 1)), (rank, plain)
        for step, loss in plain["losses"].items():
            assert loss == pytest.approx(baseline[int(step)], rel=1e-3), (rank, step, loss, baseline)
        for name in ("full", "op", "every2"):
            # recomputation reruns the same ops on the same values: the same numbers
            assert runs[name]["losses"] == pytest.approx(plain["losses"], rel=1e-6), (rank, name)
            assert runs[name]["grad_norms"] == pytest.approx(plain["grad_norms"], rel=1e-6), (rank, name)


def test_validation_at_another_seq_len_and_batch_equals_unpipelined_torchtitan(references, ac_runs):
    """torchtitan's validator at seq_len 32 and batch 8 after training at 64 and 4: the pipeline's
    forward-only step builds a program for that shape, and the validation loss is that of
    torchtitan's own run without PP."""
    want = references["validation"]
    assert sorted(want) == [1, STEPS], want  # torchtitan validates after step 1 and every freq steps
    for rank, runs in ac_runs.items():
        got = runs["none"]["validation"]
        assert sorted(got) == [1, STEPS], (rank, got)
        for step in got:
            assert got[step] == pytest.approx(want[step], rel=1e-5), (rank, step, got, want)
        # built once, after step 1; step 3's validation runs the cached program
        built = [m for m in runs["none"]["log"] if "traced, cut and built a program" in m]
        assert len(built) == 1 and "[2, 32]" in built[0], (rank, built)


def test_activation_checkpoint_modes_map_onto_recompute(ac_runs):
    for runs in ac_runs.values():
        assert {name: runs[name]["recompute"] for name in AC_NAMES} == {
            "none": "None", "full": "'full'", "op": "'selective'",
            "every2": "BlockRecompute(['layers.1', 'layers.3', 'layers.5'])"}
        # torchtitan's own checkpoint wrappers never reach the model on the pipelining path
        assert all(run["checkpoint_wrappers"] == 0 for run in runs.values())


def test_activation_checkpoint_modes_save_fewer_bytes(ac_runs):
    for rank, runs in ac_runs.items():
        plain, full, op, every2 = (runs[n]["saved"] for n in ("none", "full", "op", "every2"))
        assert len(plain) == 2, plain  # DualPipeV: two stages per rank
        for stage, none_bytes in plain.items():
            assert full[stage] < op[stage] < none_bytes, (rank, stage, runs)
            assert every2[stage] <= none_bytes, (rank, stage, runs)
        assert sum(every2.values()) < sum(plain.values()), (rank, runs)


def test_each_rank_starts_from_torchtitans_unpipelined_init_bitwise(ac_runs):
    """The pipelined ranks build the model on meta and initialise only their own tensors;
    their values are those of torchtitan's own init of the whole model (debug.seed = 42)."""
    from tests.titan.ac_runs import digest
    from tests.titan.unsplit import build

    reference = {k: digest(v) for k, v in build("llama3", seed=42).state_dict().items()}
    held = {}
    for rank, runs in ac_runs.items():
        for name in AC_NAMES + ("dualpipe",):
            got = runs[name]["init_digest"]
            assert got == {k: reference.get(k) for k in got}, (rank, name)
        held[rank] = set(runs["none"]["init_digest"])
    assert held[0] | held[1] == set(reference)
    assert not held[0] & held[1]  # DualPipeV on llama3: no tensor on both ranks


def test_dualpipe_with_clipping_logs_dualpipev_grad_norms(ac_runs):
    """DualPipe holds every model part on two ranks; each mirrored parameter counts once in
    the grad norm, so the logged norms (and the clipped updates: the losses) are DualPipeV's."""
    for rank, runs in ac_runs.items():
        bidirectional, v = runs["dualpipe"], runs["none"]
        assert bidirectional["grad_norms"] == pytest.approx(v["grad_norms"], rel=1e-5), rank
        assert bidirectional["losses"] == pytest.approx(v["losses"], rel=1e-5), rank
        assert v["replicas_marked"] == 0, rank  # DualPipeV: no parameter on two ranks
    # rank 1 holds rank 0's mirrors (and rank 0 counts its own): they are left out on rank 1
    assert ac_runs[0]["dualpipe"]["replicas_marked"] == 0
    assert ac_runs[1]["dualpipe"]["replicas_marked"] > 0


def test_deepseek_v3_trains_like_unpipelined_torchtitan(references, ac_runs):
    """MoE with data-dependent expert sizes (the CPU experts loop over .tolist() counts) and
    auxiliary-loss-free load balancing: the forward graphs count tokens per expert into the
    live buffer and torchtitan's hook moves expert_bias on the pipelined ranks too (the flex
    flavor's run: debugmodel's MoE layers)."""
    baseline = references["deepseek_flex"]
    assert sorted(baseline) == list(range(1, STEPS + 1))
    for rank, runs in ac_runs.items():
        run = runs["deepseek_flex"]
        for step, loss in run["losses"].items():
            assert loss == pytest.approx(baseline[int(step)], rel=1e-5), (rank, step, baseline)
    assert any(runs["deepseek_flex"]["expert_bias_moved"] for runs in ac_runs.values())


def test_qwen3_moe_grouped_experts_train_like_unpipelined_torchtitan(references, ac_runs):
    """qwen3's MoE flavor keeps ``use_grouped_mm`` on CPU too: its experts pad their tokens with
    ``generate_permute_indices``, which traces only through the stand-in
    (tests/titan/test_moe_permute.py). 2 ranks, DualPipeV, 3 steps: the losses of torchtitan
    without PP."""
    pipelined, baseline = losses_of(ac_runs, "qwen3_moe"), references["qwen3_moe"]
    assert sorted(pipelined) == sorted(baseline) == [1, 2, 3]
    for step, loss in baseline.items():
        assert pipelined[step] == pytest.approx(loss, rel=1e-5), (step, pipelined, baseline)


def test_compile_enable_compiles_the_stages_with_equal_losses(ac_runs):
    """``compile.enable = true`` maps onto ``compile_stages``: each rank's stage graphs go
    through torch.compile (Inductor), here with full AC (``recompute="full"``), and the losses
    and grad norms are those of the run with neither."""
    for rank, runs in ac_runs.items():
        compiled, plain = runs["compile"], runs["none"]
        assert compiled["compiled_graphs"] > 0 and plain["compiled_graphs"] == 0, (rank, compiled, plain)
        assert compiled["recompute"] == "'full'", compiled["recompute"]
        assert compiled["losses"] == pytest.approx(plain["losses"], rel=1e-5), (rank, compiled, plain)
        assert compiled["grad_norms"] == pytest.approx(plain["grad_norms"], rel=1e-5), (rank, compiled, plain)


def test_auto_schedule_with_an_activation_budget_trains_like_no_ac(ac_runs):
    """``schedule = "auto"``, ``activation_checkpoint.mode = "memory_budget"`` (0.5): every rank
    picks the same schedule and a recompute policy (``"full"`` or ``"selective"``: None keeps all
    the activations), and the losses and grad norms are those of DualPipeV without AC."""
    from dualpipe_fx.api.autoplan import DEFAULT_SCHEDULES

    picked = {(runs["auto"]["schedule"], runs["auto"]["recompute"]) for runs in ac_runs.values()}
    assert len(picked) == 1, picked
    ((schedule, recompute),) = picked
    assert schedule in DEFAULT_SCHEDULES and recompute in ("'selective'", "'full'"), picked
    for rank, runs in ac_runs.items():
        auto, plain = runs["auto"], runs["none"]
        assert auto["losses"] == pytest.approx(plain["losses"], rel=1e-5), (rank, auto, plain)
        assert auto["grad_norms"] == pytest.approx(plain["grad_norms"], rel=1e-5), (rank, auto, plain)


@pytest.mark.parametrize("name", sorted(FLEX_RUNS))
def test_flex_attention_flavors_train_like_unpipelined_torchtitan(name, references, ac_runs):
    """llama3 and deepseek_v3 debugmodel_flex_attn on 2 ranks, DualPipeV: the losses and grad
    norms of torchtitan's own run without PP (block-causal masks, documents split by EOS)."""
    losses, norms = references[name], references["grad_norms"][name]
    assert sorted(losses) == list(range(1, STEPS + 1))
    for rank, runs in ac_runs.items():
        run = runs[name]
        assert sorted(run["losses"]) == list(range(1, STEPS + 1)), (rank, name, run)
        for step, loss in run["losses"].items():
            assert loss == pytest.approx(losses[step], rel=1e-5), (rank, name, step, losses)
            assert run["grad_norms"][step] == pytest.approx(norms[step], rel=1e-4), (rank, name, step, norms)
