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

torchtitan's ``[activation_checkpoint]`` section is honoured as dualpipe_fx's activation
recomputation (:func:`recompute_arg`): ``mode = "full"`` -> ``recompute="full"``,
``"selective"`` with ``selective_ac_option = "op"`` -> ``recompute="selective"`` (or
:class:`SelectiveRecompute` where ``per_op_sac_force_recompute_mm_shapes_by_fqns`` matches
Linear modules), with an
integer N -> :class:`BlockRecompute` over every N-th transformer block (the blocks
torchtitan's ``apply_ac`` picks); ``"memory_budget"`` -> ``ActivationBudget(memory_budget)``
(compile picks the least recompute within that share of the activations).
"""
# No `from __future__ import annotations`: torchtitan merges these dataclasses by their
# real field types (dataclasses.is_dataclass(field.type)), which strings would hide.
import inspect
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

AUTO = "auto"  # compile(schedule="auto"): the planner picks the schedule
BALANCE_MODES = ("flops", "measured")
RANK_BALANCE_MODES = ("time", "memory", "both")


@dataclass
class DualPipeFx:
    """Automatic pipeline parallelism with dualpipe_fx instead of torchtitan's module split."""

    enable: bool = False
    """Replace torchtitan's FQN-based pipeline split with ``dualpipe_fx.compile``.
    Needs ``parallelism.pipeline_parallel_degree >= 2``."""

    schedule: str = "dualpipev"
    """A ``dualpipe_fx.SCHEDULES`` name (``dualpipev``, ``dualpipe``, ``zbv``, ``1f1b``,
    ``gpipe``, ...), or ``"auto"``: the fastest that fits ``memory_budget_gib`` for these
    micro-batches (``compile(schedule="auto")``; with ``activation_checkpoint.mode = "none"``
    the planner may still recompute where the budget needs it, as it chooses the recompute
    policy too unless a mode names one). ``parallelism.pipeline_parallel_schedule`` is ignored
    when enabled."""

    balance: Literal["flops", "measured"] = "flops"
    """How stages are balanced: by counted FLOPs, or by op times measured on rank 0 (and
    broadcast, so every rank cuts the model at the same places)."""

    rank_balance: Literal["time", "memory", "both"] = "both"
    """What the cut evens out per rank (``compile(memory=MemoryPolicy(balance=...))``): its time, its memory
    (parameters, grads, AdamW state and the schedule's activations in flight), or the larger
    of the two over their means."""

    memory_budget_gib: float = 0.0
    """GiB per rank that no rank's memory estimate may exceed (``MemoryPolicy(budget=...)``;
    with ``rank_balance = "both"``: the fastest cut within it); 0: no budget."""

    split_points: list[str] = field(default_factory=list)
    """Optional stage boundaries (module FQNs such as ``layers.3``); empty = automatic.
    When given, exactly ``num_stages - 1`` of them."""

    compile_stages: bool = False
    """``torch.compile`` every stage graph (``compile.enable`` with ``"model"`` sets it too)."""

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


def compiles_model(compile_config) -> bool:
    """torchtitan's ``[compile]`` asks for the model compiled: ``enable`` with ``"model"`` in
    ``components``. Under dualpipe_fx that is ``compile(compile_stages=True)``: each stage
    graph through Inductor, as torchtitan's graph trainer compiles its traced graphs."""
    return bool(compile_config is not None and compile_config.enable and "model" in compile_config.components)


def compile_kwargs(section, compile_config=None) -> dict[str, Any]:
    """The ``[dualpipe_fx]`` keys (and ``[compile]``: :func:`compiles_model`) as
    ``dualpipe_fx.compile`` keyword arguments (``memory``'s ``recompute`` comes from
    ``[activation_checkpoint]``, which needs the model: :func:`recompute_arg`)."""
    from dualpipe_fx import MemoryPolicy

    budget = int(section.memory_budget_gib * 2**30) or None
    return {"schedule": section.schedule,
            "compile_stages": section.compile_stages or compiles_model(compile_config),
            "cost": section.balance, "split_points": list(section.split_points) or None,
            "overlap": section.overlap, "memory": MemoryPolicy(balance=section.rank_balance, budget=budget)}


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
        spec = None if section.schedule == AUTO else get_schedule(section.schedule)
    except ValueError as err:
        raise ValueError(f"dualpipe_fx.schedule = {section.schedule!r}: {err} (or \"{AUTO}\": the planner "
                         f"picks one)") from err
    if section.balance not in BALANCE_MODES:
        raise ValueError(f"dualpipe_fx.balance = {section.balance!r} is not one of {BALANCE_MODES}; "
                         f"use \"flops\" (counted) or \"measured\" (timed on this machine)")
    if section.rank_balance not in RANK_BALANCE_MODES:
        raise ValueError(f"dualpipe_fx.rank_balance = {section.rank_balance!r} is not one of "
                         f"{RANK_BALANCE_MODES}; use \"both\" (default), \"time\" or \"memory\"")
    if not section.memory_budget_gib >= 0:
        raise ValueError(f"dualpipe_fx.memory_budget_gib = {section.memory_budget_gib!r}; expected GiB per "
                         "rank >= 0 (0: no budget)")
    return spec


def _check_microbatches(job_config, spec):
    """The micro-batch count must fit the schedule (under ``"auto"``: the planner leaves out the
    schedules it does not fit, and fails naming each if none does)."""
    pp = job_config.parallelism.pipeline_parallel_degree
    count = num_microbatches(job_config)
    if spec is None:
        return
    batch = job_config.training.local_batch_size
    mb_size = job_config.parallelism.pipeline_parallel_microbatch_size
    try:
        if count < spec.min_microbatches(pp):
            raise ValueError(f"needs {spec.min_microbatches_rule}")
        spec.generator(pp, count)
    except ValueError as err:
        raise ValueError(
            f"parallelism.pipeline_parallel_microbatch_size = {mb_size} gives C = "
            f"training.local_batch_size / microbatch size = {batch} / {mb_size} = {count} "
            f"micro-batches, which does not fit dualpipe_fx.schedule = {spec.name!r} on N = {pp} "
            f"ranks ({err}); raise training.local_batch_size or lower "
            f"parallelism.pipeline_parallel_microbatch_size so that C >= "
            f"{spec.min_microbatches(pp)}") from err


# torchtitan's [activation_checkpoint] on dualpipe_fx. torchtitan wraps transformer blocks in
# torch.utils.checkpoint from its parallelize_fn, which the pipelining path never calls
# (pipeline_dualpipe_fx drops it), so nothing is wrapped twice; instead the mode becomes
# dualpipe_fx.compile(recompute=...), applied to the stage graphs by passes/recompute:
#   mode "none"                                  -> recompute=None
#   mode "full"                                  -> recompute="full"
#   mode "selective", selective_ac_option "op"   -> recompute="selective" (or SelectiveRecompute)
#   mode "selective", selective_ac_option "N"    -> BlockRecompute(every N-th layers.<i>)
#   mode "memory_budget"                         -> ActivationBudget(memory_budget): the least of
#       None / "selective" / "full" whose saved activations stay within memory_budget x those
#       without recompute on every rank, from the memory plan (torch.compile's partitioner reads
#       the same fraction of its own graph; dualpipe_fx splits the backward itself)
# The other keys: early_stop, preserve_rng_state and determinism_check hold by construction
# (accepted); debug = true is refused; memory_budget is read by "memory_budget" mode only and
# visualize_memory_budget_pareto not at all (ignored, as torchtitan does without compile);
# per_op_sac_force_recompute_mm_shapes_by_fqns that names modules of the model ->
# SelectiveRecompute (those mms recompute too; checked with the model, in recompute_arg).
AC_MODES = ("none", "full", "selective", "memory_budget")
_AC = "activation_checkpoint"


def _selective_every(ac) -> Optional[int]:
    """``selective_ac_option`` as torchtitan reads it: ``None`` for ``"op"``, else the
    block frequency N (digits only; ``0`` means every block, as in torchtitan)."""
    option = ac.selective_ac_option
    if option == "op":
        return None
    if not option.isdigit():
        raise ValueError(
            f"{_AC}.selective_ac_option = {option!r} is not valid with {_AC}.mode = "
            f"\"selective\"; use \"op\" (op-level: save matmul and attention outputs, "
            f"recompute the rest) or a non-negative integer N (recompute every N-th "
            f"transformer block), as torchtitan accepts")
    return int(option)


def _check_activation_checkpoint(ac) -> None:
    if ac.mode == "memory_budget" and not 0 <= ac.memory_budget <= 1:
        raise ValueError(f"{_AC}.memory_budget = {ac.memory_budget} with {_AC}.mode = \"memory_budget\"; "
                         f"expected a fraction in [0, 1] of the activations saved without recompute (0: "
                         f"recompute the most, 1: none), as torchtitan reads it")
    if ac.mode not in AC_MODES:
        raise ValueError(f"{_AC}.mode = {ac.mode!r} is not one of {AC_MODES} with "
                         f"dualpipe_fx.enable; set {_AC}.mode = \"full\", \"selective\" or \"none\"")
    if ac.mode in ("none", "memory_budget"):
        return
    if ac.mode == "selective":
        _selective_every(ac)
    if ac.debug:
        raise ValueError(
            f"{_AC}.debug = true asks torch.utils.checkpoint for recompute debug traces, but "
            f"dualpipe_fx recomputes inside its traced backward graphs (no checkpoint runs); "
            f"set {_AC}.debug = false (dualpipe_fx.split(...).describe() lists the bytes each "
            f"stage saves)")
    if ac.determinism_check not in ("default", "none"):
        raise ValueError(f"{_AC}.determinism_check = {ac.determinism_check!r} is not one of "
                         f"(\"default\", \"none\"); torch.utils.checkpoint accepts only those")


class BlockRecompute:
    """A ``recompute`` policy: recompute the forward of some transformer blocks, save the rest.

    torchtitan's layer-level selective AC (``selective_ac_option = N``) checkpoints whole
    blocks; here the nodes of those blocks (``node.meta["dpfx_module"]`` is ``layers.<i>`` or
    below) are recomputed in the backward, every other node is saved. Nodes with no module
    (the tracer's detaches of parameters) recompute: that costs nothing and saves no bytes.
    """

    def __init__(self, blocks) -> None:
        self.blocks = tuple(blocks)  # FQNs, e.g. ("layers.1", "layers.3", "layers.5")

    def __call__(self, node) -> str:
        module = node.meta.get("dpfx_module")
        if module is None:
            return "recompute"
        inside = any(module == b or module.startswith(b + ".") for b in self.blocks)
        return "recompute" if inside else "save"

    def __repr__(self) -> str:
        return f"BlockRecompute({list(self.blocks)})"


def ac_blocks(model, every: int) -> list[str]:
    """The ``layers.<i>`` FQNs torchtitan 0.2.2's ``apply_ac`` checkpoints for
    ``selective_ac_option = every``: it counts ``model.layers``' children from 1 and wraps
    block k when ``k % every == 0`` (so layers.1, layers.3, ... for 2), every block for 0."""
    try:
        layers = model.get_submodule("layers")
    except AttributeError as err:
        raise ValueError(
            f"{_AC}.selective_ac_option = \"{every}\" recomputes every {every}-th module of "
            f"model.layers, but {type(model).__name__} has no `layers`; use {_AC}.selective_ac_option "
            f"= \"op\" or {_AC}.mode = \"full\"") from err
    names = [name for name, _ in layers.named_children()]
    return [f"layers.{name}" for k, name in enumerate(names, start=1) if every == 0 or k % every == 0]


class SelectiveRecompute:
    """``recompute="selective"`` with torchtitan's forced recomputes, as a ``recompute`` policy.

    torchtitan's op-level SAC recomputes every ``mm`` whose weight operand has the shape of an
    ``nn.Linear`` that ``per_op_sac_force_recompute_mm_shapes_by_fqns`` matches (its default,
    ``moe.router.gate``: the MoE router); every other node follows dualpipe_fx's
    ``"selective"`` rule (save matmul and attention outputs, recompute the rest).
    """

    def __init__(self, shapes) -> None:
        self.shapes = frozenset(tuple(s) for s in shapes)  # (in_features, out_features): mm's operand

    def __call__(self, node) -> str:
        import torch

        from passes.recompute import selective

        if node.target is torch.ops.aten.mm.default:
            weight = node.args[1].meta.get("val") if hasattr(node.args[1], "meta") else None
            if weight is not None and tuple(weight.shape) in self.shapes:
                return "recompute"
        return selective(node)

    def __repr__(self) -> str:
        return f"SelectiveRecompute({sorted(self.shapes)})"


def _forced_mm_shapes(ac, model) -> list[tuple[int, int]]:
    """torchtitan's op-level SAC force-recomputes mms shaped like the ``nn.Linear`` modules
    inside ``model.layers`` whose FQN contains one of these substrings: their ``(in, out)``."""
    from torch import nn

    key = f"{_AC}.per_op_sac_force_recompute_mm_shapes_by_fqns"
    patterns = list(ac.per_op_sac_force_recompute_mm_shapes_by_fqns)
    try:
        root, prefix = model.get_submodule("layers"), "layers."  # where apply_ac looks
    except AttributeError:
        root, prefix = model, ""
    shapes = []
    for fqn, module in root.named_modules():
        if not fqn or not any(p in prefix + fqn for p in patterns):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{key} = {patterns} matches {prefix + fqn}, a {type(module).__name__}; "
                             f"torchtitan expects each match to be an nn.Linear; name Linear modules only")
        out_f, in_f = module.weight.shape
        shapes.append((in_f, out_f))
    return shapes


def recompute_arg(ac, model):
    """``[activation_checkpoint]`` as ``dualpipe_fx.compile(recompute=...)`` for ``model``.

    **Contract**: ``(ActivationCheckpoint, model) -> None | "full" | "selective" |
    SelectiveRecompute | BlockRecompute | ActivationBudget``; see the mapping above ``AC_MODES``.

    Raises:
        ValueError: a mode or key dualpipe_fx does not apply (as ``validate_job_config``),
            an integer option on a model without ``layers``, or
            ``per_op_sac_force_recompute_mm_shapes_by_fqns`` matching a module that is not
            an ``nn.Linear``.
    """
    _check_activation_checkpoint(ac)
    if ac.mode in ("none", "full"):
        return None if ac.mode == "none" else "full"
    if ac.mode == "memory_budget":
        from dualpipe_fx import ActivationBudget

        return ActivationBudget(ac.memory_budget)
    every = _selective_every(ac)
    if every is None:
        shapes = _forced_mm_shapes(ac, model)
        return SelectiveRecompute(shapes) if shapes else "selective"
    return BlockRecompute(ac_blocks(model, every))


def _check_tensor_parallel(job_config) -> None:
    """``parallelism.tensor_parallel_degree > 1``: torchtitan's sequence-length rule, and no async TP,
    Float8 or batch shapes other than training's (each new shape would need the TP layouts
    traced again). ``disable_loss_parallel`` is accepted either way: the head's output is
    replicated (``titan_integration.tensor_parallel``), the same loss."""
    par, train = job_config.parallelism, job_config.training
    tp = par.tensor_parallel_degree
    key = f"parallelism.tensor_parallel_degree = {tp}"
    if par.enable_async_tensor_parallel:
        raise ValueError(f"parallelism.enable_async_tensor_parallel = true with {key} and dualpipe_fx.enable: "
                         f"async TP is Inductor's micro-pipelining of torchtitan's compiled TP regions, which "
                         f"dualpipe_fx's traced stage graphs do not run (their F&B pairs overlap the TP "
                         f"collectives instead); set parallelism.enable_async_tensor_parallel = false")
    if "float8" in job_config.model.converters:
        raise ValueError(f"model.converters = {job_config.model.converters} with {key} and dualpipe_fx.enable: "
                         f"Float8 linears and their Float8 TP styles are not traced by dualpipe_fx; remove "
                         f"\"float8\" from model.converters or set parallelism.tensor_parallel_degree = 1")
    for other, degree in (("data_parallel_shard_degree", par.data_parallel_shard_degree),
                          ("expert_parallel_degree", par.expert_parallel_degree)):
        if degree > 1:  # -1 (the rest of the world) is resolved later: titan_integration.pipelining checks it
            raise ValueError(f"parallelism.{other} = {degree} with {key} and dualpipe_fx.enable: dualpipe_fx "
                             f"composes tensor parallelism with replicated data parallelism only (sharded DP and "
                             f"EP beside TP are not composed yet). Fix: parallelism.{other} = 1 and "
                             f"parallelism.data_parallel_replicate_degree for the data-parallel ranks")
    if train.seq_len % tp:
        raise ValueError(f"training.seq_len = {train.seq_len} with {key}: torchtitan needs the sequence length "
                         f"divisible by the TP degree (sequence parallelism shards it, seq_len_divisor); set "
                         f"training.seq_len to a multiple of {tp}")
    val = job_config.validation
    if val.enable and (val.local_batch_size, val.seq_len) != (train.local_batch_size, train.seq_len):
        raise ValueError(f"validation.seq_len = {val.seq_len} and validation.local_batch_size = "
                         f"{val.local_batch_size} differ from training's ({train.seq_len}, {train.local_batch_size}) "
                         f"with {key}: a tensor-parallel pipeline runs the shapes it was traced at only. Fix: "
                         f"validation.seq_len = {train.seq_len} and validation.local_batch_size = "
                         f"{train.local_batch_size}")


def _check_other_parallelisms(job_config) -> None:
    par = job_config.parallelism
    degrees = {"parallelism.context_parallel_degree": par.context_parallel_degree}
    # tensor_parallel_degree applies torchtitan's own TP plan before the trace
    # (titan_integration.tensor_parallel); what it cannot take is refused here
    if par.tensor_parallel_degree > 1:
        _check_tensor_parallel(job_config)
    # data_parallel_replicate_degree / data_parallel_shard_degree map onto compile(dp_group=,
    # dp_mode=) (titan_integration.pipelining.data_parallel_args)
    # expert_parallel_degree maps onto compile(expert_parallel=) (pipelining.expert_parallel_args)
    # (0.3 has no such key: its backend is the model's token dispatcher, checked by titan03.validate)
    backend = getattr(par, "expert_parallel_comm_backend", "standard")
    if par.expert_parallel_degree > 1 and backend != "standard":
        raise ValueError(f"parallelism.expert_parallel_comm_backend = {backend!r} "
                         f"is not supported together with dualpipe_fx.enable: its dispatch/combine are "
                         f"DeepEP kernels outside the traced forward; set it to \"standard\" (the experts' "
                         f"all_to_all then runs inside the stage graphs)")
    for key, degree in degrees.items():
        if degree > 1:
            raise ValueError(f"{key} = {degree} is not supported together with dualpipe_fx.enable "
                             f"(pipeline, data, tensor and expert parallelism only, for now); set {key} = 1")
    # compile.enable with "model" maps onto compile(compile_stages=True) (compiles_model)
    if compiles_model(job_config.compile) and job_config.compile.backend != "inductor":
        raise ValueError(f"compile.backend = {job_config.compile.backend!r} with dualpipe_fx.enable: "
                         f"dualpipe_fx compiles each stage graph with Inductor (compile.enable -> "
                         f"compile_stages); set compile.backend = \"inductor\"")


def _check_split_points(job_config, spec) -> None:
    points = job_config.dualpipe_fx.split_points
    if points and spec is None:
        raise ValueError(f"dualpipe_fx.split_points = {points} with dualpipe_fx.schedule = \"{AUTO}\": how many "
                         f"stages there are depends on the schedule the planner picks; name a schedule or "
                         f"leave split_points empty")
    if spec is None:
        return
    stages = spec.num_stages(job_config.parallelism.pipeline_parallel_degree)
    if points and len(points) != stages - 1:
        raise ValueError(
            f"dualpipe_fx.split_points has {len(points)} entries {points}; schedule "
            f"{spec.name!r} on {job_config.parallelism.pipeline_parallel_degree} ranks has "
            f"{stages} stages, so give exactly {stages - 1} boundaries or none (automatic)")


def _check_validation(job_config, spec) -> None:
    """The validator runs the pipeline forward-only. A batch shape other than training's is
    another program (``Pipeline.step`` builds and caches it at the first validation step), so
    its micro-batch count must fit the schedule, and its attention must not be a flex
    BlockMask (not traced again at new shapes yet)."""
    val, train = job_config.validation, job_config.training
    if not val.enable or (val.local_batch_size, val.seq_len) == (train.local_batch_size, train.seq_len):
        return
    from dualpipe_fx.runtime.programs import microbatch_count

    pp = job_config.parallelism.pipeline_parallel_degree
    try:
        microbatch_count(val.local_batch_size, num_microbatches(job_config), spec.name, pp)
    except ValueError as err:
        raise ValueError(f"validation.local_batch_size = {val.local_batch_size}: {err}. Fix: set "
                         f"validation.local_batch_size to a multiple of C = {num_microbatches(job_config)}") from err
    if getattr(_model_args(job_config), "attn_type", "sdpa") == "flex":
        raise ValueError(
            f"validation.seq_len = {val.seq_len} and validation.local_batch_size = {val.local_batch_size} differ "
            f"from training's ({train.seq_len}, {train.local_batch_size}), and model.flavor = "
            f"{job_config.model.flavor!r} uses flex attention: dualpipe_fx does not trace a BlockMask at new shapes "
            f"yet. Fix: set validation.seq_len = {train.seq_len} and validation.local_batch_size = "
            f"{train.local_batch_size}")


def _model_args(job_config):
    """The flavor's model args, or None (torchtitan 0.3, or an unknown model: its own error names it)."""
    try:
        from torchtitan.protocols.train_spec import get_train_spec
        return get_train_spec(job_config.model.name).model_args[job_config.model.flavor]
    except (ImportError, KeyError, ValueError):
        return None


def _check_attention(job_config) -> None:
    """varlen attention is refused; flex (any mask type) and sdpa run."""
    try:
        from torchtitan.protocols.train_spec import get_train_spec
    except ImportError:  # torchtitan 0.3: titan03.document_masks refuses varlen by name
        return

    name, flavor = job_config.model.name, job_config.model.flavor
    try:
        args = get_train_spec(name).model_args[flavor]
    except (KeyError, ValueError):
        return  # an unknown model or flavor: torchtitan's own error names it
    if getattr(args, "attn_type", "sdpa") == "varlen":
        raise ValueError(
            f"model.flavor = {flavor!r} of {name} sets attn_type = \"varlen\", which dualpipe_fx does not "
            "pipeline: its metadata (cumulative document lengths over the packed batch, and their max "
            "as a Python number) cannot be split into micro-batches of a fixed trace. Fix: use the flavor "
            "with attn_type = \"flex\" and attn_mask_type = \"block_causal\" (e.g. debugmodel_flex_attn): "
            "the same document masking, as a BlockMask that dualpipe_fx splits per micro-batch")


def validate_job_config(job_config) -> None:
    """Check a parsed torchtitan JobConfig's ``[dualpipe_fx]`` section against the rest.

    **Contract**: ``JobConfig -> None``; a no-op when ``dualpipe_fx.enable`` is false.

    **Pseudocode**::

        if not enable: return
        pipeline_parallel_degree >= 2
        schedule known, balance in (flops, measured)
        C = local_batch_size / microbatch_size fits the schedule (e.g. C >= 2N)
        activation_checkpoint: mode none/full/selective ("op" or an int), no debug
        no CP (DP maps onto compile(dp_group=), EP onto expert_parallel=, TP onto torchtitan's own plan:
            seq_len % tp == 0, no async TP, no Float8), no torch.compile of model parts, split_points count
        a validation batch shape other than training's fits the schedule (a second program); keys map onto
            dualpipe_fx.compile arguments
        the flavor's attention is sdpa or flex (varlen refused: flex block_causal is its twin)

    Args:
        job_config: torchtitan's JobConfig merged with :class:`JobConfig`.

    Raises:
        ValueError: naming the offending key, its value, the rule and the fix.
    """
    if not job_config.dualpipe_fx.enable:
        return
    _check_enable(job_config)
    spec = _check_schedule(job_config)
    _check_microbatches(job_config, spec)
    _check_activation_checkpoint(job_config.activation_checkpoint)
    _check_other_parallelisms(job_config)
    _check_split_points(job_config, spec)
    _check_validation(job_config, spec)
    _check_attention(job_config)
