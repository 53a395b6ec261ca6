"""dualpipe_fx on torchtitan 0.3's Python config registry (0.2.x keeps its TOML section).

torchtitan 0.3 dropped TOML job files: a run names a module and a function that returns a
``Trainer.Config`` dataclass (``--module M --config fn``), and command-line flags override
its fields. This module is such a registry. :class:`DualPipeFxTrainer` extends 0.3's
``Trainer`` with a ``dualpipe_fx`` field of the same :class:`~titan_integration.config.DualPipeFx`
dataclass as the 0.2 ``[dualpipe_fx]`` section, so the option names (``enable``,
``schedule``, ``balance``, ``rank_balance``, ``memory_budget_gib``, ``split_points``,
``compile_stages``, ``overlap``) are the same: ``--dualpipe_fx.schedule zbv``,
``--dualpipe_fx.no-enable``. Run (2 CPU ranks, gloo)::

    PYTHONPATH=<torchtitan 0.3> torchrun --nproc_per_node 2 -m titan_integration.titan03 \\
        --module titan_integration.titan03 --config llama3_debug_dualpipe

The glue: 0.3 calls ``model_spec.pipelining_fn(model, parallel_dims=, training=,
parallelism=, compile_config=, ac_config=, dump_folder=, device=, model_config=,
parallelize_fn=, loss_fn=)`` with no job config. The trainer binds its config to
:func:`pipeline_dualpipe_fx_03`, which presents 0.3's pieces under the 0.2 names
(:func:`job_config_view`) and calls :func:`titan_integration.pipelining.pipeline_dualpipe_fx`,
with the dataloader's RoPE ``positions`` as a traced keyword input. 0.3's losses return ``(loss, metrics)`` and take ``global_valid_tokens``; the
traced loss is the token sum (``global_valid_tokens=None``), and the step scales it as
the 0.2 adapter does (:meth:`DualPipeFxSchedule.step_normalized`).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torchtitan.trainer import Trainer

from titan_integration import config as dpfx_config
from titan_integration.config import DualPipeFx

# 0.3's modules that did `from torchtitan.tools.utils import device_type, device_module`
_DEVICE_IMPORTERS_03 = ("torchtitan.tools.utils", "torchtitan.distributed.utils",
                        "torchtitan.distributed.parallel_dims", "torchtitan.components.metrics",
                        "torchtitan.tools.profiler", "torchtitan.models.common.token_dispatcher")


def use_cpu_when_no_gpu_03() -> bool:
    """titan_integration.cpu's items 1-5 and 9 for 0.3's module layout; False with a GPU."""
    from titan_integration import cpu

    if torch.cuda.is_available():
        return False
    device_module = cpu.CpuDeviceModule()
    for name in _DEVICE_IMPORTERS_03:
        module = importlib.import_module(name)
        module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = device_module
    cpu._fsdp_sums_on_gloo()
    return True


def keep_timeouts_without_set_timeout() -> None:
    """0.3 shortens every group's timeout after step 1 with ``torch.distributed.set_timeout``,
    which torch 2.13 lacks (0.3 targets a later torch): there, keep the barrier and the
    groups' ``comm.init_timeout_seconds`` instead of failing after the first step."""
    import torch.distributed as dist
    from torchtitan.distributed import utils as dist_utils

    if hasattr(dist, "set_timeout") or getattr(dist_utils.set_pg_timeouts, "dualpipe_fx", False):
        return

    def set_pg_timeouts(timeout, parallel_dims) -> None:
        dist.barrier()

    set_pg_timeouts.dualpipe_fx = True
    dist_utils.set_pg_timeouts = set_pg_timeouts


def _ac_view(ac_config) -> SimpleNamespace:
    """0.3's activation-checkpoint config class as 0.2's ``[activation_checkpoint]`` keys."""
    from torchtitan.distributed.activation_checkpoint import FullAC, MemoryBudgetAC, SelectiveAC

    view = SimpleNamespace(mode="none", selective_ac_option="op", debug=False, determinism_check="default",
                           memory_budget=0.0, per_op_sac_force_recompute_mm_shapes_by_fqns=[])
    if ac_config is None:
        return view
    view.debug, view.determinism_check = ac_config.debug, ac_config.determinism_check
    if isinstance(ac_config, MemoryBudgetAC.Config):
        view.mode, view.memory_budget = "memory_budget", ac_config.memory_budget
    elif isinstance(ac_config, FullAC.Config):
        view.mode = "full"
    elif isinstance(ac_config, SelectiveAC.Config):  # 0.3's selective AC is op-level only
        view.mode = "selective"
        view.per_op_sac_force_recompute_mm_shapes_by_fqns = list(ac_config.force_recompute_mm_shapes_by_fqns)
    else:
        raise ValueError(f"activation_checkpoint = {type(ac_config).__qualname__} is not known to "
                         f"dualpipe_fx; use none, full or selective")
    return view


def job_config_view(config, *, training, parallelism, ac_config) -> SimpleNamespace:
    """0.3's config pieces under the 0.2 JobConfig names that titan_integration reads."""
    spec = config.model_spec
    return SimpleNamespace(training=training, parallelism=parallelism, dualpipe_fx=config.dualpipe_fx,
                           comm=config.comm, debug=config.debug, compile=config.compile,
                           # 0.3's validator runs with training's batch shape (no keys of its own)
                           validation=SimpleNamespace(enable=False),
                           model=SimpleNamespace(name=spec.name, flavor=spec.flavor),
                           activation_checkpoint=_ac_view(ac_config))


# what 0.3's text dataloader gives beside "input": per-document RoPE positions [B, S]
TOKEN_KWARGS = ("positions",)


def _summed_loss(loss_fn):
    """0.3's ``loss_fn(pred, labels, global_valid_tokens) -> (loss, metrics)`` as 0.2's token sum."""
    def loss(pred, labels):
        return loss_fn(pred, labels)[0]
    return loss


def pipeline_dualpipe_fx_03(model, *, config, parallel_dims, training, parallelism, ac_config,
                            device, loss_fn, **unused):
    """0.3's pipelining call onto :func:`titan_integration.pipelining.pipeline_dualpipe_fx`.

    **Contract**: 0.3's ``PipeliningFunction`` keywords (``compile_config``, ``dump_folder``,
    ``model_config``, ``parallelize_fn`` unused: as in 0.2, dualpipe_fx neither wraps nor
    compiles the model itself) plus ``config`` bound by the trainer -> ``(schedule, [part],
    True, True)``.
    """
    from titan_integration.pipelining import pipeline_dualpipe_fx

    view = job_config_view(config, training=training, parallelism=parallelism, ac_config=ac_config)
    schedule, parts, first, last = pipeline_dualpipe_fx(model, parallel_dims, view, device, None, None,
                                                        _summed_loss(loss_fn), token_kwargs=TOKEN_KWARGS)
    schedule.loss_fn = lambda pred, labels: loss_fn(pred, labels)[0]
    return schedule, parts, first, last


def validate(config) -> None:
    """0.2's checks on the 0.3 config (the ``dualpipe_fx`` keys, micro-batches, parallelism)."""
    view = job_config_view(config, training=config.training, parallelism=config.parallelism,
                           ac_config=config.activation_checkpoint)
    dpfx_config.validate_job_config(view)


class DualPipeFxTrainer(Trainer):
    """0.3's Trainer with a ``dualpipe_fx`` config field; its pipelined step is dualpipe_fx's."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        dualpipe_fx: DualPipeFx = field(default_factory=DualPipeFx)

    def __init__(self, config: Config) -> None:
        if config.dualpipe_fx.enable:
            validate(config)
            fn = functools.partial(pipeline_dualpipe_fx_03, config=config)
            config.model_spec = dataclasses.replace(config.model_spec, pipelining_fn=fn)
            # DualPipeFxSchedule broadcasts the loss to every rank: no "last rank only" warning
            importlib.import_module("torchtitan.trainer").ensure_pp_loss_visible = lambda **kwargs: None
        super().__init__(config)

    def pp_forward_backward_step(self, *, input_dict_mbs, label_mbs, global_valid_tokens):
        if not self.config.dualpipe_fx.enable:
            return super().pp_forward_backward_step(input_dict_mbs=input_dict_mbs, label_mbs=label_mbs,
                                                    global_valid_tokens=global_valid_tokens)
        # the dataloader gives micro-batches; dualpipe_fx's step takes the local batch
        inputs, labels, kwargs = [], [], {name: [] for name in TOKEN_KWARGS}
        for input_dict, mb_labels in zip(input_dict_mbs, label_mbs, strict=True):
            mb_inputs, mb_labels, extra = self.post_dataloading_process(input_dict, mb_labels)
            self.pp_schedule._token_batch_only({k: v for k, v in extra.items() if k not in kwargs})
            inputs.append(mb_inputs)
            labels.append(mb_labels)
            for name in TOKEN_KWARGS:
                if extra.get(name) is None:
                    raise ValueError(f"the dataloader gave no {name!r} with \"input\"; dualpipe_fx "
                                     f"traced the model with {name}= (0.3's text dataloaders give it)")
                kwargs[name].append(extra[name])
        kwargs = {name: torch.cat(values) for name, values in kwargs.items()}
        with self.train_context():
            return self.pp_schedule.step_normalized(torch.cat(inputs), torch.cat(labels),
                                                    global_valid_tokens, **kwargs)


def _with_sdpa(spec):
    """``spec`` with causal SDPA for every inner attention (0.3's registry offers flex/varlen only).

    flex and varlen attend within documents through masks built outside the model from the
    batch's ``positions`` (``Trainer.post_dataloading_process``); causal SDPA needs none,
    and the model still takes ``positions`` for RoPE (passed to the pipeline as a keyword).
    """
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention

    for _, _, parent, attr in list(spec.model.traverse(FlexAttention.Config)):
        setattr(parent, attr, ScaledDotProductAttention.Config())
    return spec


def llama3_debug_dualpipe() -> DualPipeFxTrainer.Config:
    """torchtitan's ``llama3_debugmodel`` on CPU-sized data, pipelined by dualpipe_fx (DualPipeV, 2 ranks).

    sdpa attention (dualpipe_fx takes the token batch only: no flex masks), the plain
    token-sum cross entropy (0.3's default chunked loss applies ``lm_head`` itself, outside
    the model), no activation checkpointing, fp32, the project's tiny corpus and tokenizer.
    The baseline without PP: ``--dualpipe_fx.no-enable --parallelism.pipeline_parallel_degree 1``.
    """
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.config import ParallelismConfig, TrainingConfig
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
    from torchtitan.models.common.config_utils import decoder_vocab_size
    from torchtitan.models.llama3 import config_registry as llama3_registry
    from torchtitan.models.llama3 import model_registry

    from titan_integration.data import DATASET_NAME, TOKENIZER_DIR

    base = llama3_registry.llama3_debugmodel()
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Trainer.Config)}
    config = DualPipeFxTrainer.Config(**fields)
    config.model_spec = _with_sdpa(model_registry("debugmodel"))
    config.loss = CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(config.model_spec))
    config.hf_assets_path = TOKENIZER_DIR
    config.dump_folder = "/tmp/dualpipe_fx_titan03/outputs"
    config.dataloader = HuggingFaceTextDataLoader.Config(dataset=DATASET_NAME)
    config.training = TrainingConfig(local_batch_size=4, seq_len=64, steps=10, max_norm=1.0,
                                     dtype="float32", mixed_precision_param="float32",
                                     disable_cuda_graphs=True)  # CUDA graphs refuse PP
    config.parallelism = ParallelismConfig(pipeline_parallel_degree=2, pipeline_parallel_microbatch_size=1)
    config.activation_checkpoint = None
    config.checkpoint.enable = False
    config.validator.enable = False
    config.metrics.disable_color_printing = True
    config.debug.seed = 42
    config.dualpipe_fx = DualPipeFx(enable=True, schedule="dualpipev")
    return config


def main() -> None:
    """torchtitan 0.3's ``torchtitan.train.main`` on CPU (gloo) when no GPU is present."""
    from titan_integration.cpu import single_process_env
    from titan_integration.data import register_tiny_dataset

    single_process_env()
    use_cpu_when_no_gpu_03()
    keep_timeouts_without_set_timeout()
    register_tiny_dataset()
    import torchtitan.train

    torchtitan.train.main()


if __name__ == "__main__":
    main()
