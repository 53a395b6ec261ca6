"""torchtitan with dualpipe_fx and data parallelism on 4 CPU ranks (PP=2 x DP=2) trains
exactly like torchtitan without pipeline parallelism at the same global batch.

- ``data_parallel_replicate_degree = 2`` -> ``compile(dp_mode="replicate")``; reference:
  torchtitan's DDP on 2 ranks (each DP rank reads the same data shard in both runs).
- ``data_parallel_shard_degree = 2`` -> ``compile(dp_mode="shard")`` (DTensor shards);
  reference: torchtitan's FSDP on 2 ranks. torchtitan's FSDP initialises DTensors with
  another RNG layout than an unsharded init, so both runs start from one seed checkpoint
  (torchtitan's ``create_seed_checkpoint``, loaded by DCP into each run's shards).
- ``expert_parallel_degree = 2`` (borrowing ``data_parallel_shard_degree = 2``) with the MoE
  model deepseek_v3 -> ``compile(expert_parallel=)``, the experts' all_to_all inside the stage
  graphs; reference: torchtitan's own EP x FSDP on 2 ranks from a seed checkpoint. Ours runs
  twice: DualPipeV from its own init (each rank keeps its rows of the unsplit init, which is
  what the seed checkpoint holds), and the bidirectional DualPipe (mirrored experts) loading
  the seed checkpoint's expert slices by DCP. Losses and logged grad norms (clipping with
  EP) equal the reference. The flex-attention flavor (debugmodel_flex_attn) likewise, against
  torchtitan's EP run of that flavor.
- mixed precision: ``training.mixed_precision_param = "bfloat16"`` with ``dp_shard = 2`` ->
  ``compile(mixed_precision=MixedPrecisionPolicy(bf16, fp32))``; reference: torchtitan's FSDP
  (its ``fully_shard`` with that policy) on 2 ranks. The fp32 and bf16 runs share each torchrun
  job (tests/titan/ac_runs.py), each from the seed checkpoint in a dump folder of its own.
  Losses within 1e-3 relative of torchtitan's bf16 run, and after the first step closer to it
  than to its fp32 run.
"""
import re
import shutil

import pytest

pytest.importorskip("torchtitan", reason="torchtitan is the optional 'titan' extra")
# each module fixture runs several torchrun jobs; the first test that uses one waits for them all
pytestmark = pytest.mark.timeout(900)

from tests.titan.test_train import FLEX, run_many, run_train  # noqa: E402

NO_PP = ("--dualpipe_fx.no-enable", "--parallelism.pipeline_parallel_degree", "1")
REPLICATE = ("--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1")
SHARD = ("--parallelism.data_parallel_shard_degree", "2")
FROM_SEED = ("--checkpoint.enable", "--checkpoint.interval", "100")
BF16 = ("--training.mixed_precision_param", "bfloat16")


def _from_seed(seed_dir, dump):
    (dump / "checkpoint").mkdir(parents=True)
    shutil.copytree(seed_dir / "checkpoint" / "step-0", dump / "checkpoint" / "step-0")
    return dump


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    seed = tmp_path_factory.mktemp("seed")
    run_train(1, seed, *NO_PP, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint",
              "--parallelism.data_parallel_shard_degree", "1")
    out = {"ddp": run_train(2, tmp_path_factory.mktemp("ddp"), *NO_PP, *REPLICATE)[0],
           "pp x replicate": run_train(4, tmp_path_factory.mktemp("pp_rep"), *REPLICATE)[0]}
    for name, nproc, flags in (("fsdp", 2, (*NO_PP, *SHARD, *FROM_SEED)), ("pp x shard", 4, (*SHARD, *FROM_SEED))):
        job = tmp_path_factory.mktemp(name.replace(" ", "_"))
        # fp32 and bf16 in one torchrun job, each from the seed checkpoint in its own dump folder
        runs = {precision: [*flags, *extra, "--job.dump_folder", str(_from_seed(seed, job / precision))]
                for precision, extra in (("fp32", ()), ("bf16", BF16))}
        records, log = run_many(nproc, job, runs)
        for precision in runs:
            suffix = "" if precision == "fp32" else " bf16"
            out[name + suffix] = {int(step): loss for step, loss in records[0][precision]["losses"].items()}
        out[name + " log"] = log
    return out


@pytest.mark.parametrize("ours,reference", [("pp x replicate", "ddp"), ("pp x shard", "fsdp")])
def test_pp2_x_dp2_losses_equal_torchtitan_without_pp(runs, ours, reference):
    assert sorted(runs[ours]) == sorted(runs[reference]) == [1, 2, 3]
    for step, loss in runs[reference].items():
        assert runs[ours][step] == pytest.approx(loss, rel=1e-5, abs=1e-5), (step, runs[ours], runs[reference])


def test_shard_run_loaded_the_seed_checkpoint(runs):
    assert runs["pp x shard log"].count("Loading the checkpoint") >= 2  # fp32 and bf16


def test_pp2_x_shard2_bf16_losses_follow_torchtitans_bf16_fsdp(runs):
    """Mixed precision where torchtitan applies it (FSDP): the pipelined bf16 run is torchtitan's
    bf16 run, not its fp32 run."""
    ours, bf16, fp32 = runs["pp x shard bf16"], runs["fsdp bf16"], runs["fsdp"]
    print(f"losses per step: dualpipe_fx bf16 {ours}, torchtitan bf16 {bf16}, torchtitan fp32 {fp32}")
    assert sorted(ours) == sorted(bf16) == [1, 2, 3]
    for step in (1, 2, 3):
        assert ours[step] == pytest.approx(bf16[step], rel=1e-3), (step, ours, bf16, fp32)
        if step > 1:
            assert abs(ours[step] - bf16[step]) < abs(ours[step] - fp32[step]), (step, ours, bf16, fp32)


DEEPSEEK = ("--model.name", "deepseek_v3")
EP = ("--parallelism.data_parallel_shard_degree", "2", "--parallelism.expert_parallel_degree", "2")
GRAD_NORM = re.compile(r"step:\s*(\d+)\s+loss:\s*\S+\s+grad_norm:\s*([0-9.]+)")


def _grad_norms(log):
    norms = {}
    for step, norm in GRAD_NORM.findall(log):
        norms.setdefault(int(step), set()).add(float(norm))
    assert all(len(v) == 1 for v in norms.values()), f"ranks disagree on the grad norm: {norms}"
    return {step: v.pop() for step, v in norms.items()}


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory):
    seed = tmp_path_factory.mktemp("ep_seed")
    run_train(1, seed, *NO_PP, *DEEPSEEK, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint",
              "--parallelism.data_parallel_shard_degree", "1")
    runs = {
        "torchtitan ep": run_train(2, _from_seed(seed, tmp_path_factory.mktemp("ep")), *NO_PP, *DEEPSEEK, *EP,
                                   *FROM_SEED),
        "pp x ep": run_train(4, tmp_path_factory.mktemp("pp_ep"), *DEEPSEEK, *EP),
        "pp x ep dualpipe from seed": run_train(4, _from_seed(seed, tmp_path_factory.mktemp("pp_ep_seed")),
                                                *DEEPSEEK, *EP, *FROM_SEED, "--dualpipe_fx.schedule", "dualpipe"),
        # the flex-attention flavor (block-causal masks; its parameters are debugmodel's: one seed)
        "torchtitan ep flex": run_train(2, _from_seed(seed, tmp_path_factory.mktemp("ep_flex")), *NO_PP, *DEEPSEEK,
                                        *EP, *FROM_SEED, *FLEX),
        "pp x ep flex": run_train(4, tmp_path_factory.mktemp("pp_ep_flex"), *DEEPSEEK, *EP, *FLEX),
    }
    return {name: {"losses": losses, "grad_norms": _grad_norms(log), "log": log}
            for name, (losses, log) in runs.items()}


@pytest.mark.parametrize("ours, reference", [("pp x ep", "torchtitan ep"), ("pp x ep dualpipe from seed", "torchtitan ep"),
                                             ("pp x ep flex", "torchtitan ep flex")])
def test_pp2_x_ep2_losses_and_grad_norms_equal_torchtitan_ep_without_pp(ep_runs, ours, reference):
    ref, got = ep_runs[reference], ep_runs[ours]
    assert sorted(got["losses"]) == sorted(ref["losses"]) == [1, 2, 3]
    for step in (1, 2, 3):
        assert got["losses"][step] == pytest.approx(ref["losses"][step], rel=1e-5, abs=1e-5), (step, got, ref)
        assert got["grad_norms"][step] == pytest.approx(ref["grad_norms"][step], rel=1e-4), (step, got, ref)
    assert "Loading the checkpoint" in ep_runs["pp x ep dualpipe from seed"]["log"]
