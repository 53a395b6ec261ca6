"""The ``[dualpipe_fx]`` section of a torchtitan 0.2.2 job config, and its validation.

Load it from a job TOML with::

    [job]
    custom_config_module = "titan_integration.config"

    [dualpipe_fx]
    enable = true
    schedule = "dualpipev"

torchtitan's ``ConfigManager`` imports this module and merges :class:`JobConfig` (one
extra field, ``dualpipe_fx``) into its own. Micro-batches come from torchtitan's keys:
``C = training.local_batch_size / parallelism.pipeline_parallel_microbatch_size``.
:func:`validate_job_config` runs at config validation time (``titan_integration.train``
calls it right after parsing) and raises ``ValueError`` naming the offending key.
"""
# No `from __future__ import annotations`: torchtitan merges these dataclasses by their
# real field types (dataclasses.is_dataclass(field.type)), which strings would hide.
import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

BALANCE_MODES = ("flops", "measured")


@dataclass
class DualPipeFx:
    """Automatic pipeline parallelism with dualpipe_fx instead of torchtitan's module split."""

    enable: bool = False
    """Replace torchtitan's FQN-based pipeline split with ``dualpipe_fx.compile``.
    Needs ``parallelism.pipeline_parallel_degree >= 2``."""

    schedule: str = "dualpipev"
    """A ``dualpipe_fx.SCHEDULES`` name (``dualpipev``, ``dualpipe``, ``zbv``, ``1f1b``,
    ``gpipe``, ...). ``parallelism.pipeline_parallel_schedule`` is ignored when enabled."""

    balance: Literal["flops", "measured"] = "flops"
    """How stages are balanced: by counted FLOPs, or by op times measured on rank 0 (and
    broadcast, so every rank cuts the model at the same places)."""

    split_points: list[str] = field(default_factory=list)
    """Optional stage boundaries (module FQNs such as ``layers.3``); empty = automatic.
    When given, exactly ``num_stages - 1`` of them."""

    compile_stages: bool = False
    """``torch.compile`` every stage graph (use this instead of ``compile.enable``)."""

    overlap: bool = True
    """Run each overlapped forward&backward (FB) pair of the schedule as one multiplexed
    graph (``passes.multiplex``); ``false`` runs F then B."""


@dataclass
class JobConfig:
    """What torchtitan merges into its own JobConfig (see ``ConfigManager._merge_configs``)."""

    dualpipe_fx: DualPipeFx = field(default_factory=DualPipeFx)


def num_microbatches(job_config) -> int:
    """``C = training.local_batch_size // parallelism.pipeline_parallel_microbatch_size``.

    Raises:
        ValueError: when the local batch is not a whole number of micro-batches.
    """
    batch = job_config.training.local_batch_size
    mb_size = job_config.parallelism.pipeline_parallel_microbatch_size
    if mb_size < 1 or batch % mb_size != 0:
        raise ValueError(
            f"parallelism.pipeline_parallel_microbatch_size = {mb_size} must be >= 1 and divide "
            f"training.local_batch_size = {batch}; pick a micro-batch size that divides the batch")
    return batch // mb_size


def compile_kwargs(section) -> dict[str, Any]:
    """The ``[dualpipe_fx]`` keys as ``dualpipe_fx.compile`` keyword arguments."""
    return {"schedule": section.schedule, "compile_stages": section.compile_stages,
            "cost": section.balance, "split_points": list(section.split_points) or None,
            "overlap": section.overlap}


def _check_enable(job_config) -> None:
    pp = job_config.parallelism.pipeline_parallel_degree
    if pp < 2:
        raise ValueError(
            f"dualpipe_fx.enable = true needs parallelism.pipeline_parallel_degree >= 2, got {pp}; "
            f"set parallelism.pipeline_parallel_degree to the number of pipeline ranks, "
            f"or pass --dualpipe_fx.no-enable")


def _check_schedule(job_config):
    from dualpipe_fx.schedules import get_schedule

    section = job_config.dualpipe_fx
    try:
        spec = get_schedule(section.schedule)
    except ValueError as err:
        raise ValueError(f"dualpipe_fx.schedule = {section.schedule!r}: {err}") from err
    if section.balance not in BALANCE_MODES:
        raise ValueError(f"dualpipe_fx.balance = {section.balance!r} is not one of {BALANCE_MODES}; "
                         f"use \"flops\" (counted) or \"measured\" (timed on this machine)")
    return spec


def _check_microbatches(job_config, spec):
    """The micro-batch count must fit the schedule; returns the schedule's program."""
    pp = job_config.parallelism.pipeline_parallel_degree
    count = num_microbatches(job_config)
    batch = job_config.training.local_batch_size
    mb_size = job_config.parallelism.pipeline_parallel_microbatch_size
    try:
        if count < spec.min_microbatches(pp):
            raise ValueError(f"needs {spec.min_microbatches_rule}")
        return spec.generator(pp, count)
    except ValueError as err:
        raise ValueError(
            f"parallelism.pipeline_parallel_microbatch_size = {mb_size} gives C = "
            f"training.local_batch_size / microbatch size = {batch} / {mb_size} = {count} "
            f"micro-batches, which does not fit dualpipe_fx.schedule = {spec.name!r} on N = {pp} "
            f"ranks ({err}); raise training.local_batch_size or lower "
            f"parallelism.pipeline_parallel_microbatch_size so that C >= "
            f"{spec.min_microbatches(pp)}") from err


def splits_backward(program) -> bool:
    """Whether a schedule's program runs separate input-grad (I) and weight-grad (W) actions."""
    return any(part.kind in ("I", "W") for rank in program for part in program.iter_parts(rank))


def _check_activation_checkpoint(job_config, spec, program) -> None:
    mode = job_config.activation_checkpoint.mode
    if mode == "none":
        return
    if mode == "selective" and splits_backward(program):
        raise ValueError(
            f"activation_checkpoint.mode = \"selective\" cannot be combined with the split "
            f"backward (I then W) of dualpipe_fx.schedule = {spec.name!r}: recomputation would run "
            f"once for I and again for W (torchtitan fails deep in the step with \"Trying to "
            f"backward an extra time\"); set activation_checkpoint.mode = \"none\"")
    raise ValueError(
        f"activation_checkpoint.mode = {mode!r} is not applied by dualpipe_fx (its stages are FX "
        f"graphs, not the model's modules, so torchtitan's checkpoint wrappers have nothing to "
        f"wrap); set activation_checkpoint.mode = \"none\"")


def _check_other_parallelisms(job_config) -> None:
    par = job_config.parallelism
    degrees = {
        "parallelism.tensor_parallel_degree": par.tensor_parallel_degree,
        "parallelism.context_parallel_degree": par.context_parallel_degree,
        "parallelism.data_parallel_replicate_degree": par.data_parallel_replicate_degree,
        "parallelism.expert_parallel_degree": par.expert_parallel_degree,
    }
    if par.data_parallel_shard_degree != -1:
        degrees["parallelism.data_parallel_shard_degree"] = par.data_parallel_shard_degree
    for key, degree in degrees.items():
        if degree > 1:
            raise ValueError(f"{key} = {degree} is not supported together with dualpipe_fx.enable "
                             f"(pipeline parallelism only, for now); set {key} = 1")
    if job_config.compile.enable and "model" in job_config.compile.components:
        raise ValueError("compile.enable = true with \"model\" in compile.components compiles "
                         "torchtitan's module parts, which dualpipe_fx replaces; set "
                         "compile.enable = false and dualpipe_fx.compile_stages = true instead")


def _check_split_points(job_config, spec) -> None:
    points = job_config.dualpipe_fx.split_points
    stages = spec.num_stages(job_config.parallelism.pipeline_parallel_degree)
    if points and len(points) != stages - 1:
        raise ValueError(
            f"dualpipe_fx.split_points has {len(points)} entries {points}; schedule "
            f"{spec.name!r} on {job_config.parallelism.pipeline_parallel_degree} ranks has "
            f"{stages} stages, so give exactly {stages - 1} boundaries or none (automatic)")


def _check_replicated_params(job_config, spec) -> None:
    """Bidirectional DualPipe holds every model part on two ranks; torchtitan's clipping
    sums squared grad norms over the pipeline group and would count those twice."""
    max_norm = job_config.training.max_norm
    if spec.bidirectional and max_norm > 0:
        raise ValueError(
            f"training.max_norm = {max_norm} with dualpipe_fx.schedule = {spec.name!r}: DualPipe "
            f"keeps a mirror copy of each model part on a second rank, and torchtitan's grad-norm "
            f"all-reduce over the pipeline group would count those parameters twice (clipping too "
            f"hard); use dualpipe_fx.schedule = \"dualpipev\" or set training.max_norm = 0")


def _check_validation(job_config) -> None:
    """The validator runs the same pipeline forward-only: same batch shape as training."""
    val, train = job_config.validation, job_config.training
    if not val.enable:
        return
    for key, got, want in (("local_batch_size", val.local_batch_size, train.local_batch_size),
                           ("seq_len", val.seq_len, train.seq_len)):
        if got != want:
            raise ValueError(f"validation.{key} = {got} differs from training.{key} = {want}; the "
                             f"pipeline validates with the training batch shape, so set "
                             f"validation.{key} = {want}")


def validate_job_config(job_config) -> None:
    """Check a parsed torchtitan JobConfig's ``[dualpipe_fx]`` section against the rest.

    **Contract**: ``JobConfig -> None``; a no-op when ``dualpipe_fx.enable`` is false.

    **Pseudocode**::

        if not enable: return
        pipeline_parallel_degree >= 2
        schedule known, balance in (flops, measured)
        C = local_batch_size / microbatch_size fits the schedule (e.g. C >= 2N)
        no activation checkpointing (selective + split backward named explicitly)
        no TP/CP/DP/EP, no torch.compile of model parts, split_points count, no clipping with DualPipe
        validation batch shape == training's; keys map onto dualpipe_fx.compile arguments

    Args:
        job_config: torchtitan's JobConfig merged with :class:`JobConfig`.

    Raises:
        ValueError: naming the offending key, its value, the rule and the fix.
    """
    if not job_config.dualpipe_fx.enable:
        return
    _check_enable(job_config)
    spec = _check_schedule(job_config)
    program = _check_microbatches(job_config, spec)
    _check_activation_checkpoint(job_config, spec, program)
    _check_other_parallelisms(job_config)
    _check_split_points(job_config, spec)
    _check_replicated_params(job_config, spec)
    _check_validation(job_config)
