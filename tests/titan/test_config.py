"""The [dualpipe_fx] section: parsed from TOML/CLI by torchtitan, bad configs rejected at
validation time with an error that names the key."""
import json
import os

import pytest

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
    (["--activation_checkpoint.mode", "selective"],
     "activation_checkpoint.mode", "Trying to backward an extra time"),
    (["--activation_checkpoint.mode", "full"], "activation_checkpoint.mode", "not applied"),
    (["--dualpipe_fx.schedule", "zb-vv"], "dualpipe_fx.schedule", "known schedules"),
    (["--dualpipe_fx.split_points", "layers.3"], "dualpipe_fx.split_points", "exactly 3"),
    (["--parallelism.tensor_parallel_degree", "2"], "parallelism.tensor_parallel_degree", "= 1"),
    (["--compile.enable"], "compile.enable", "dualpipe_fx.compile_stages"),
    (["--validation.enable", "--validation.seq_len", "32"], "validation.seq_len", "= 64"),
    (["--dualpipe_fx.schedule", "dualpipe"], "training.max_norm", "twice"),
])
def test_bad_config_error_names_the_key(extra, key, words):
    with pytest.raises(ValueError) as info:
        parse(*extra)
    message = str(info.value)
    assert key in message and words in message, message


def test_microbatch_rule_follows_the_schedule():
    # 2 micro-batches on 2 ranks: too few for DualPipeV (C >= 2N) but fine for 1F1B (C >= N).
    with pytest.raises(ValueError, match="pipeline_parallel_microbatch_size"):
        parse("--parallelism.pipeline_parallel_microbatch_size", "2")
    cfg = parse("--parallelism.pipeline_parallel_microbatch_size", "2", "--dualpipe_fx.schedule", "1f1b")
    assert dpfx_config.num_microbatches(cfg) == 2


def test_selective_ac_without_split_backward_gets_the_general_message():
    cfg = parse("--dualpipe_fx.no-enable")  # disabled: nothing is checked
    cfg.dualpipe_fx.enable = True
    cfg.dualpipe_fx.schedule = "gpipe"
    cfg.activation_checkpoint.mode = "selective"
    with pytest.raises(ValueError) as info:
        dpfx_config.validate_job_config(cfg)
    assert "activation_checkpoint.mode" in str(info.value)
    assert "extra time" not in str(info.value)


def test_disabled_section_checks_nothing():
    cfg = parse("--dualpipe_fx.no-enable", "--parallelism.pipeline_parallel_degree", "1",
                "--activation_checkpoint.mode", "selective")
    assert cfg.dualpipe_fx.enable is False


def test_split_backward_detection_reads_the_program():
    from dualpipe_fx.schedules import generate

    assert dpfx_config.splits_backward(generate("dualpipev", 2, 4))
    assert not dpfx_config.splits_backward(generate("gpipe", 2, 4))


def test_committed_tokenizer_is_reproducible(tmp_path):
    build_tokenizer(out_dir=str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(tmp_path / name) as rebuilt, open(os.path.join(TOKENIZER_DIR, name)) as committed:
            assert json.load(rebuilt) == json.load(committed), name
