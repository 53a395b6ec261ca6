"""``python -m titan_integration.train``: torchtitan 0.2.2's trainer with dualpipe_fx.

A thin entry point (under torchrun, or plain ``python -m`` for one rank) that takes
torchtitan's normal arguments (``--job.config_file x.toml``,
``--training.steps 4``, ...) plus the ``[dualpipe_fx]`` section, e.g.::

    torchrun --nproc_per_node 2 -m titan_integration.train \\
        --job.config_file titan_integration/configs/llama3_debug_dualpipe.toml

What it adds to ``torchtitan.train.main``:

- the ``[dualpipe_fx]`` section is always known (``--dualpipe_fx.no-enable`` works even
  when the TOML does not name ``titan_integration.config``), and is validated right after
  parsing (:func:`titan_integration.config.validate_job_config`);
- with ``dualpipe_fx.enable``, the model's registered TrainSpec is re-registered with
  :func:`~titan_integration.pipelining.pipeline_dualpipe_fx` as its ``pipelining_fn``;
- :class:`DualPipeFxTrainer` runs the pipelined step with torchtitan's non-pipelined
  loss scaling and logs the real loss on every rank;
- without a GPU, torchtitan runs on CPU with gloo (:mod:`titan_integration.cpu`);
- the project's tiny dataset ``dualpipe_fx_tiny`` is registered (:mod:`titan_integration.data`).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import torch
import torchtitan.train
from torchtitan.config import ConfigManager, JobConfig
from torchtitan.protocols import train_spec as train_spec_module
from torchtitan.tools.logging import init_logger, logger
from torchtitan.train import Trainer

from titan_integration import config as dpfx_config
from titan_integration.clipping import use_replica_aware_clipping
from titan_integration.cpu import check_cpu_config, disable_cpu_autocast, single_process_env, use_cpu_when_no_gpu
from titan_integration.data import register_tiny_dataset
from titan_integration.pipelining import pipeline_dualpipe_fx


class DualPipeFxConfigManager(ConfigManager):
    """torchtitan's ConfigManager with ``[dualpipe_fx]`` always merged in, and validated."""

    def __init__(self) -> None:
        super().__init__(ConfigManager._merge_configs(JobConfig, dpfx_config.JobConfig))

    def _validate_config(self) -> None:
        super()._validate_config()
        dpfx_config.validate_job_config(self.config)
        if not torch.cuda.is_available():
            check_cpu_config(self.config)


def parse_job_config(args: Optional[list[str]] = None):
    """Parse torchtitan arguments (and the TOML they name) into a validated JobConfig.

    Raises:
        ValueError: from :func:`titan_integration.config.validate_job_config`, naming the key.
    """
    return DualPipeFxConfigManager().parse_args(sys.argv[1:] if args is None else args)


class DualPipeFxTrainer(Trainer):
    """torchtitan's Trainer whose pipelined step is dualpipe_fx's, scaled like non-PP."""

    def __init__(self, job_config) -> None:
        super().__init__(job_config)
        if self.device.type == "cpu":
            disable_cpu_autocast(self)

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
        if not self.job_config.dualpipe_fx.enable:
            return super().forward_backward_step(
                input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens)
        # flex attention: extra_kwargs["attention_masks"] is the whole batch's BlockMask, built
        # by the model's get_attention_masks from the batch and the tokenizer's EOS
        inputs, labels, extra_inputs, extra_kwargs = self.post_dataloading_process(input_dict, labels)
        if extra_inputs:
            raise ValueError(
                f"dualpipe_fx pipelines take the token batch (and the model's attention masks); this "
                f"dataloader also passes {sorted(extra_inputs)}; use a plain text dataset")
        with self.train_context():
            return self.pp_schedule.step_normalized(inputs, labels, global_valid_tokens, **extra_kwargs)


def register_dualpipe_fx(model_name: str) -> None:
    """Re-register ``model_name``'s TrainSpec with dualpipe_fx as its pipelining function.

    torchtitan looks user-registered specs up before its built-in ones, so the trainer
    picks this one up; everything but ``pipelining_fn`` stays the model's own.
    """
    spec = train_spec_module.get_train_spec(model_name)
    if spec.pipelining_fn is pipeline_dualpipe_fx:
        return
    patched = dataclasses.replace(spec, pipelining_fn=pipeline_dualpipe_fx)
    train_spec_module._extra_train_specs.pop(model_name, None)  # replace, not duplicate
    train_spec_module.register_train_spec(model_name, patched)


def _prepare(job_config) -> None:
    if job_config.dualpipe_fx.enable:
        register_dualpipe_fx(job_config.model.name)
        # a parameter on several pipeline ranks (DualPipe's mirrors) counts once in the grad norm
        use_replica_aware_clipping()
        # torchtitan warns that PP loss shows on the last rank only; DualPipeFxTrainer
        # broadcasts it to every rank, so that warning would be wrong here.
        torchtitan.train.ensure_pp_loss_visible = lambda *args, **kwargs: None


def main(args: Optional[list[str]] = None) -> None:
    """Parse, build :class:`DualPipeFxTrainer`, train, clean up (as ``torchtitan.train.main``)."""
    init_logger()
    single_process_env()
    on_cpu = use_cpu_when_no_gpu()
    register_tiny_dataset()
    job_config = parse_job_config(args)
    _prepare(job_config)
    logger.info(f"dualpipe_fx: enable={job_config.dualpipe_fx.enable} "
                f"schedule={job_config.dualpipe_fx.schedule} device={'cpu' if on_cpu else 'cuda'}")
    trainer = None
    try:
        trainer = DualPipeFxTrainer(job_config)
        if job_config.checkpoint.create_seed_checkpoint:
            trainer.checkpointer.save(curr_step=0, last_step=True)
        else:
            trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
