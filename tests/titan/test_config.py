"""The [dualpipe_fx] section: parsed from TOML/CLI by torchtitan, bad configs rejected at
validation time with an error that names the key."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

pytest.importorskip("torchtitan", reason="torchtitan is the optional 'titan' extra")

from titan_integration import config as dpfx_config  # noqa: E402
from titan_integration.data import TOKENIZER_DIR, build_tokenizer  # noqa: E402
from titan_integration.train import parse_job_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOML = os.path.join(REPO, "titan_integration", "configs", "llama3_debug_dualpipe.toml")


def parse(*extra: str):
    return parse_job_config(["--job.config_file", TOML, *extra])


def test_example_config_parses_with_the_section():
    cfg = parse()
    assert cfg.dualpipe_fx.enable is True
    assert cfg.dualpipe_fx.schedule == "dualpipev"
    assert cfg.dualpipe_fx.balance == "flops"
    assert cfg.dualpipe_fx.split_points == []
    assert (cfg.dualpipe_fx.compile_stages, cfg.dualpipe_fx.overlap) == (False, True)
    assert dpfx_config.num_microbatches(cfg) == 4


def test_rank_balance_and_memory_budget_reach_compile():
    kwargs = dpfx_config.compile_kwargs(parse().dualpipe_fx)
    assert (kwargs["memory"].balance, kwargs["memory"].budget) == ("both", None)
    cfg = parse("--dualpipe_fx.rank_balance", "memory", "--dualpipe_fx.memory_budget_gib", "1.5")
    kwargs = dpfx_config.compile_kwargs(cfg.dualpipe_fx)
    assert (kwargs["memory"].balance, kwargs["memory"].budget) == ("memory", 3 * 2**29)
    cfg.dualpipe_fx.rank_balance = "speed"
    with pytest.raises(ValueError, match=r"dualpipe_fx.rank_balance = 'speed' is not one of"):
        dpfx_config._check_schedule(cfg)


def test_cli_overrides_and_baseline_flags():
    cfg = parse("--dualpipe_fx.no-enable", "--parallelism.pipeline_parallel_degree", "1",
                "--dualpipe_fx.split_points", "layers.1,layers.3,layers.5")
    assert cfg.dualpipe_fx.enable is False
    assert cfg.parallelism.pipeline_parallel_degree == 1
    assert cfg.dualpipe_fx.split_points == ["layers.1", "layers.3", "layers.5"]


def test_section_is_known_without_custom_config_module(tmp_path):
    # The entry point always merges the section, so --dualpipe_fx.* works on any job file.
    plain = tmp_path / "plain.toml"
    plain.write_text("[training]\nlocal_batch_size = 2\n")
    cfg = parse_job_config(["--job.config_file", str(plain), "--dualpipe_fx.schedule", "1f1b"])
    assert cfg.dualpipe_fx.schedule == "1f1b" and cfg.dualpipe_fx.enable is False


@pytest.mark.parametrize("extra, key, words", [
    (["--parallelism.pipeline_parallel_degree", "1"],
     "parallelism.pipeline_parallel_degree", ">= 2, got 1"),
    (["--parallelism.pipeline_parallel_microbatch_size", "2"],
     "parallelism.pipeline_parallel_microbatch_size", "C >= 4"),
    (["--parallelism.pipeline_parallel_microbatch_size", "3"],
     "parallelism.pipeline_parallel_microbatch_size", "divide"),
    (["--activation_checkpoint.mode", "memory_budget", "--activation_checkpoint.memory_budget", "1.5"],
     "activation_checkpoint.memory_budget", "fraction in [0, 1]"),
    (["--dualpipe_fx.schedule", "auto", "--dualpipe_fx.split_points", "layers.1,layers.2,layers.3"],
     "dualpipe_fx.split_points", "depends on the schedule"),
    (["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "-1"],
     "activation_checkpoint.selective_ac_option", "\"op\""),
    (["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "layer"],
     "activation_checkpoint.selective_ac_option", "integer"),
    (["--activation_checkpoint.mode", "full", "--activation_checkpoint.debug"],
     "activation_checkpoint.debug", "= false"),
    (["--activation_checkpoint.mode", "full", "--activation_checkpoint.determinism_check", "strict"],
     "activation_checkpoint.determinism_check", "\"default\""),
    (["--dualpipe_fx.schedule", "zb-vv"], "dualpipe_fx.schedule", "known schedules"),
    (["--dualpipe_fx.split_points", "layers.3"], "dualpipe_fx.split_points", "exactly 3"),
    (["--parallelism.context_parallel_degree", "2"], "parallelism.context_parallel_degree", "= 1"),
    # tensor parallelism takes torchtitan's TP plan (titan_integration.tensor_parallel), but not these
    (["--parallelism.tensor_parallel_degree", "2", "--parallelism.enable_async_tensor_parallel"],
     "parallelism.enable_async_tensor_parallel", "= false"),
    (["--parallelism.tensor_parallel_degree", "2", "--model.converters", "float8"], "model.converters", "float8"),
    (["--parallelism.tensor_parallel_degree", "3"], "training.seq_len", "multiple of 3"),
    (["--parallelism.tensor_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "2"],
     "parallelism.data_parallel_shard_degree", "data_parallel_replicate_degree"),
    (["--parallelism.tensor_parallel_degree", "2", "--validation.enable", "--validation.seq_len", "32"],
     "validation.seq_len", "traced at only"),
    (["--parallelism.expert_parallel_degree", "2", "--parallelism.expert_parallel_comm_backend", "deepep"],
     "parallelism.expert_parallel_comm_backend", "\"standard\""),
    (["--compile.enable", "--compile.backend", "aot_eager"], "compile.backend", "\"inductor\""),
    # a validation batch of another shape is a second program: its micro-batch count must fit
    (["--validation.enable", "--validation.local_batch_size", "6"], "validation.local_batch_size", "C >= 2N"),
    (["--validation.enable", "--validation.seq_len", "32", "--model.flavor", "debugmodel_flex_attn"],
     "validation.seq_len", "flex attention"),
    (["--model.flavor", "debugmodel_varlen_attn"], "model.flavor", "attn_mask_type = \"block_causal\""),
])
def test_bad_config_error_names_the_key(extra, key, words):
    with pytest.raises(ValueError) as info:
        parse(*extra)
    message = str(info.value)
    assert key in message and words in message, message


def test_auto_schedule_and_memory_budget_reach_compile():
    """``schedule = "auto"`` is compile()'s; ``activation_checkpoint.mode = "memory_budget"`` is an
    ``ActivationBudget`` of its ``memory_budget`` (the planner picks the least recompute within it)."""
    from dualpipe_fx import ActivationBudget

    cfg = parse("--dualpipe_fx.schedule", "auto", "--activation_checkpoint.mode", "memory_budget",
                "--activation_checkpoint.memory_budget", "0.4")
    assert dpfx_config.compile_kwargs(cfg.dualpipe_fx)["schedule"] == "auto"
    assert dpfx_config.recompute_arg(cfg.activation_checkpoint, None) == ActivationBudget(0.4)


def test_validation_at_another_seq_len_and_batch_is_accepted():
    cfg = parse("--validation.enable", "--validation.seq_len", "32", "--validation.local_batch_size", "8")
    assert (cfg.validation.seq_len, cfg.validation.local_batch_size) == (32, 8)


def test_dualpipe_accepts_grad_clipping():
    # the mirror copies count once in the grad norm (titan_integration/clipping.py)
    cfg = parse("--dualpipe_fx.schedule", "dualpipe", "--training.max_norm", "1.0")
    assert cfg.training.max_norm == 1.0


def test_microbatch_rule_follows_the_schedule():
    # 2 micro-batches on 2 ranks: too few for DualPipeV (C >= 2N) but fine for 1F1B (C >= N).
    with pytest.raises(ValueError, match="pipeline_parallel_microbatch_size"):
        parse("--parallelism.pipeline_parallel_microbatch_size", "2")
    cfg = parse("--parallelism.pipeline_parallel_microbatch_size", "2", "--dualpipe_fx.schedule", "1f1b")
    assert dpfx_config.num_microbatches(cfg) == 2


@pytest.mark.parametrize("extra, recompute", [
    ([], None),
    (["--activation_checkpoint.mode", "full"], "full"),
    (["--activation_checkpoint.mode", "full", "--activation_checkpoint.early_stop",
      "--activation_checkpoint.no-preserve_rng_state"], "full"),
    (["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"],
     "selective"),
])
def test_activation_checkpoint_modes_are_accepted(extra, recompute):
    from torchtitan.protocols.train_spec import get_train_spec

    cfg = parse(*extra)  # validates
    spec = get_train_spec("llama3")
    with torch.device("meta"):
        model = spec.model_cls(spec.model_args["debugmodel"])
    # torchtitan's default per_op_sac_force_recompute_mm_shapes_by_fqns (moe.router.gate)
    # matches nothing in llama3, so op-level SAC maps cleanly
    assert dpfx_config.recompute_arg(cfg.activation_checkpoint, model) == recompute


class _Blocks(nn.Module):
    def __init__(self, n=5):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): nn.Linear(2, 2) for i in range(n)})


@pytest.mark.parametrize("option", ["1", "2", "3", "0", "9"])
def test_layer_sac_picks_torchtitans_blocks(monkeypatch, option):
    """The blocks BlockRecompute recomputes are those torchtitan's apply_ac wraps."""
    from torchtitan.distributed import activation_checkpoint as titan_ac

    cfg = parse("--activation_checkpoint.mode", "selective",
                "--activation_checkpoint.selective_ac_option", option)
    policy = dpfx_config.recompute_arg(cfg.activation_checkpoint, _Blocks())
    assert isinstance(policy, dpfx_config.BlockRecompute)
    monkeypatch.setattr(titan_ac, "_layer_sac_count", 0)  # its count of blocks seen so far
    monkeypatch.setattr(torch._C._dynamo.eval_frame, "_set_lru_cache", lambda flag: None)
    wrapped = _Blocks()
    titan_ac.apply_ac(wrapped, cfg.activation_checkpoint)
    want = [f"layers.{name}" for name, block in wrapped.layers.named_children()
            if isinstance(block, CheckpointWrapper)]
    assert list(policy.blocks) == want


def test_block_recompute_policy_reads_the_module_fqn():
    policy = dpfx_config.BlockRecompute(["layers.1", "layers.3"])
    node = lambda module: SimpleNamespace(meta={} if module is None else {"dpfx_module": module})  # noqa: E731
    answers = {m: policy(node(m)) for m in ("layers.1", "layers.1.attention.wq", "layers.3.feed_forward",
                                             "layers.10", "layers.0.attention", "norm", "", None)}
    assert answers == {"layers.1": "recompute", "layers.1.attention.wq": "recompute",
                       "layers.3.feed_forward": "recompute", "layers.10": "save",
                       "layers.0.attention": "save", "norm": "save", "": "save",
                       None: "recompute"}  # no module: the tracer's detach of a parameter


def test_activation_checkpoint_errors_that_need_the_model():
    cfg = parse("--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "2")
    with pytest.raises(ValueError, match="activation_checkpoint.selective_ac_option.*no `layers`"):
        dpfx_config.recompute_arg(cfg.activation_checkpoint, nn.Linear(2, 2))
    cfg = parse("--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op",
                "--activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns", "layers")
    with pytest.raises(ValueError) as info:  # matches the ModuleDict itself, as in torchtitan
        dpfx_config.recompute_arg(cfg.activation_checkpoint, nn.Sequential(_Blocks()))
    message = str(info.value)
    assert "activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns" in message
    assert "ModuleDict" in message and "nn.Linear" in message, message


def test_forced_mm_recompute_follows_torchtitans_shapes():
    """``per_op_sac_force_recompute_mm_shapes_by_fqns`` matching Linears: mms whose weight
    operand has their shape recompute, the rest follows "selective"."""
    import torch.fx

    cfg = parse("--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op",
                "--activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns", "layers.1")
    blocks = _Blocks()
    blocks.layers["1"] = nn.Linear(2, 3)
    policy = dpfx_config.recompute_arg(cfg.activation_checkpoint, blocks)
    assert isinstance(policy, dpfx_config.SelectiveRecompute) and policy.shapes == {(2, 3)}
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    nodes = {}
    for shape in ((2, 3), (2, 2)):
        w = graph.placeholder(f"w{shape}")
        w.meta["val"] = torch.empty(shape, device="meta")
        nodes[shape] = graph.call_function(torch.ops.aten.mm.default, (x, w))
    relu = graph.call_function(torch.ops.aten.relu.default, (nodes[(2, 2)],))
    assert [policy(nodes[(2, 3)]), policy(nodes[(2, 2)]), policy(relu)] == ["recompute", "save", "recompute"]


def test_disabled_section_checks_nothing():
    cfg = parse("--dualpipe_fx.no-enable", "--parallelism.pipeline_parallel_degree", "1",
                "--activation_checkpoint.mode", "memory_budget")
    assert cfg.dualpipe_fx.enable is False


def test_committed_tokenizer_is_reproducible(tmp_path):
    build_tokenizer(out_dir=str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(tmp_path / name) as rebuilt, open(os.path.join(TOKENIZER_DIR, name)) as committed:
            assert json.load(rebuilt) == json.load(committed), name


def test_fsdp_mixed_precision_is_torchtitans_apply_fsdp_policy():
    """training.mixed_precision_param/_reduce -> compile(mixed_precision=) where torchtitan's
    fully_shard applies them (dp_shard > 1; data_parallel_args); fp32/fp32 casts nothing."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from titan_integration.pipelining import fsdp_mixed_precision

    assert fsdp_mixed_precision(parse()) is None  # the example job: mixed_precision_param = "float32"
    policy = fsdp_mixed_precision(parse("--training.mixed_precision_param", "bfloat16"))
    assert policy == MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


@pytest.mark.parametrize("degrees, key", [
    (dict(dp_replicate=1, dp_shard=2, ep=1, world_size=8), "parallelism.data_parallel_shard_degree = 2"),
    (dict(dp_replicate=1, dp_shard=1, ep=2, world_size=4), "parallelism.expert_parallel_degree = 2"),
])
def test_tensor_parallel_beside_sharded_dp_or_ep_is_refused_naming_the_keys(degrees, key):
    """The core API composes TP with replicated data parallelism only; the resolved degrees
    (``data_parallel_shard_degree = -1`` fills the world) are checked before anything is built."""
    from torchtitan.distributed import ParallelDims

    from titan_integration.pipelining import _check_parallel_dims

    dims = ParallelDims(cp=1, tp=2, pp=2, etp=1, **degrees)
    with pytest.raises(ValueError) as info:
        _check_parallel_dims(dims)
    message = str(info.value)
    assert key in message and "parallelism.tensor_parallel_degree = 2" in message, message
    assert "data_parallel_replicate_degree" in message, message  # the composable layout


def test_tensor_parallel_plan_is_the_models_own_and_unknown_models_are_refused():
    from torchtitan.models.llama3.infra import parallelize as llama3
    from torchtitan.models.qwen3.infra import parallelize as qwen3

    from titan_integration.tensor_parallel import titan_tp_function

    assert titan_tp_function(llama3.parallelize_llama, "llama3") is llama3.apply_tp
    assert titan_tp_function(qwen3.parallelize_qwen3, "qwen3") is qwen3.apply_non_moe_tp
    with pytest.raises(ValueError, match="model.name = 'mine'.*tensor_parallel_degree = 1"):
        titan_tp_function(_parallelize_without_tp, "mine")


def _parallelize_without_tp(*args):
    """A parallelize_fn whose module has no TP function."""
