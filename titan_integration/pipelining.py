"""torchtitan pipelining function: ``dualpipe_fx.compile`` instead of the FQN module split.

torchtitan 0.2.2's trainer calls ``train_spec.pipelining_fn(model, parallel_dims,
job_config, device, model_args, parallelize_fn, loss_fn)`` and expects
``(schedule, model_parts, has_first_stage, has_last_stage)``. Its own ``pipeline_llm``
deep-copies the model per stage and deletes modules by FQN; :func:`pipeline_dualpipe_fx`
instead traces the whole model (still on meta) with its loss, lets dualpipe_fx cut and
balance the stages, split every backward into I and W, and build the rank's DualPipeV
program. A rank allocates only its own stages' tensors and runs the model's own
``init_weights`` on them, with the values a non-pipelined run under the same ``debug.seed``
gives them (:mod:`titan_integration.init`); it never holds the whole model.

What the trainer gets back:

- ``schedule``: a :class:`DualPipeFxSchedule`, whose ``step(*inputs, target=, losses=,
  return_outputs=)`` has the signature the trainer calls;
- ``model_parts``: one :class:`StageLocalModel` per rank holding exactly this rank's
  parameters under the model's own FQNs (optimizer, grad clipping and DCP checkpoints
  work on it unchanged). The weights are already initialised: ``to_empty`` and
  ``init_weights`` are no-ops on it;
- flex attention (``attn_type = "flex"``): the trainer asks ``model_parts[0]`` for the
  batch's masks; the part answers with the model's own ``get_attention_masks`` (a BlockMask
  from the batch and the tokenizer's EOS), which ``step`` splits per micro-batch
  (``passes.block_masks``); compile traced it on :func:`example_attention_masks`;
- ``has_first_stage = has_last_stage = True`` on every rank: dualpipe_fx's ``step()`` takes
  the full batch and target on every rank (it uses them where its stages need them), and
  the adapter broadcasts the loss from the rank holding it (rank 0 for DualPipeV), so every
  rank logs the real loss instead of torchtitan's ``-1``.

**Loss scaling** (torchtitan issues 1733, 2972). torchtitan's loss is a *sum* over tokens
and a non-pipelined step back-propagates ``sum_mb loss_sum(mb) / global_valid_tokens``.
Its own PP path back-propagates the raw sums and divides only the logged value, so PP
gradients come out ``global_valid_tokens`` times larger (2972); rescaling *all* gradients
after every step would turn gradient accumulation into a moving average (1733). dualpipe_fx
returns the *mean*
over the ``C`` micro-batches and its gradients are those of that mean, so
:meth:`DualPipeFxSchedule.step_normalized` multiplies *this step's* gradient contribution by
``C / global_valid_tokens`` on every rank (every rank knows ``global_valid_tokens``:
torchtitan counts it before the step) and returns ``mean * C / global_valid_tokens``:
the same loss and gradients as the non-pipelined step.
"""
from __future__ import annotations

import contextlib
import dataclasses
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from passes._compat import non_persistent_buffers
from titan_integration.clipping import mark_replicas
from titan_integration.config import compile_kwargs, num_microbatches, recompute_arg
from titan_integration.expert_parallel import full_experts, shard_experts
from titan_integration.init import init_like_unsplit
from titan_integration.moe import expose_moe_load_balancing, use_traceable_permute_indices
from titan_integration.tensor_parallel import apply_titan_tp


class StageLocalModel(nn.Module):
    """This rank's parameters (and persistent buffers) under the original model's FQNs.

    A skeleton module tree built from ``named_parameters()`` of the pipeline, so that
    ``state_dict()`` keys, optimizer FQNs and DCP checkpoints match the unsplit model's.
    The tensors are the pipeline's own objects: optimizer updates and checkpoint loads
    act on what the stage graphs read.
    """

    def __init__(self, named_tensors, attention_masks=None) -> None:
        super().__init__()
        # the model's own get_attention_masks (it reads model_args only), or None for sdpa models
        object.__setattr__(self, "_attention_masks", attention_masks)
        for fqn, tensor in named_tensors:
            owner, leaf = self._owner(fqn)
            if isinstance(tensor, nn.Parameter):
                owner.register_parameter(leaf, tensor)  # a tied weight may appear twice, as in the model
            else:
                owner.register_buffer(leaf, tensor)

    def _owner(self, fqn: str) -> tuple[nn.Module, str]:
        *path, leaf = fqn.split(".")
        module: nn.Module = self
        for name in path:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        return module, leaf

    def to_empty(self, *, device=None, recurse: bool = True) -> "StageLocalModel":
        # This rank's weights were allocated by compile() and initialised by _init_weights;
        # replacing them would cut them off from the stage graphs.
        return self

    def init_weights(self, *args, **kwargs) -> None:
        return None

    def get_attention_masks(self, *args, **kwargs):
        """The model's own masks (flex: a BlockMask from the batch and the tokenizer's EOS), as
        torchtitan's trainer and validator ask the first model part for them."""
        if self._attention_masks is None:
            # what torchtitan's sdpa models raise; its validator skips masks on TypeError
            raise TypeError("this model takes no attention masks (sdpa attention)")
        return self._attention_masks(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise RuntimeError("StageLocalModel holds parameters only; run the step through "
                           "the DualPipeFxSchedule returned with it")


class DualPipeFxSchedule:
    """A ``dualpipe_fx.Pipeline`` with the ``step``/``eval`` signatures torchtitan calls.

    dualpipe_fx's ``step()`` takes the full batch (and target) on every rank, and this
    adapter broadcasts the loss from the rank that holds it, so every rank is both a
    "first stage" (feeds the batch) and a "last stage" (reports the loss) to torchtitan.
    """

    def __init__(self, pipeline, num_microbatches: int, *, loss_owner: int, group, loss_fn) -> None:
        self.pipeline = pipeline
        self.num_microbatches = num_microbatches
        self.loss_owner = loss_owner  # global rank that holds the loss
        self.group = group
        self.loss_fn = loss_fn  # torchtitan's (sum-reduced) loss, for eval()
        self.device = getattr(pipeline, "device", torch.device("cpu"))
        self.recompute = None  # the recompute policy the stage graphs were split with
        self.grad_sum = 1  # data-parallel size whose grads torchtitan sums (FSDP), else 1

    def _traced_keywords(self, kwargs) -> dict:
        """The model keywords of this call (torchtitan's ``attention_masks``), which must be
        the ones compile() traced; the pipeline splits them with the batch."""
        traced = set(getattr(self.pipeline, "example_kwargs", {}) or {})
        if set(kwargs) - traced:
            raise ValueError(f"this dualpipe_fx pipeline was traced with the model keywords {sorted(traced)}; "
                             f"got {sorted(kwargs)}. Fix: a dataloader whose batches hold the tokens only "
                             f"(and the model's own attention masks)")
        return kwargs

    def _shared(self, value: Optional[torch.Tensor]) -> torch.Tensor:
        """``value`` from the loss rank, on every rank of the group (a 0-d fp32 tensor)."""
        shared = torch.zeros((), dtype=torch.float32, device=self.device) if value is None \
            else value.detach().float().reshape(()).to(self.device).clone()
        dist.broadcast(shared, src=self.loss_owner, group=self.group)
        return shared

    def step(self, *inputs, target=None, losses: Optional[list] = None,
             return_outputs: bool = False, **kwargs) -> None:
        """torchtitan's call: one pipelined step; append the summed loss to ``losses``.

        Gradients are those of the mean over micro-batches (dualpipe_fx's convention); the
        trainer in ``titan_integration.train`` uses :meth:`step_normalized` instead, which
        rescales them to torchtitan's ``sum / global_valid_tokens``.
        """
        loss = self.pipeline.step(*inputs, target=target, **self._traced_keywords(kwargs))
        # One entry = the sum of the micro-batch losses, which is what torchtitan's
        # torch.sum(torch.stack(losses)) expects.
        summed = self._shared(None if loss is None else loss * self.num_microbatches)
        if losses is not None:
            losses.append(summed)

    def eval(self, *inputs, target=None, losses: Optional[list] = None, **kwargs) -> None:
        """torchtitan's validator call: forward only; append the summed loss to ``losses``."""
        kwargs = self._traced_keywords(kwargs)
        with torch.no_grad():  # the target sizes a program for a validation batch of other shapes
            outputs = self.pipeline.step(*inputs, target=target, **kwargs)  # model outputs on the loss rank
            summed = None if outputs is None or target is None else self.loss_fn(outputs, target)
            summed = self._shared(summed)
        if losses is not None:
            losses.append(summed)

    def step_normalized(self, inputs: torch.Tensor, labels: torch.Tensor,
                        global_valid_tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """One step whose loss and gradients equal torchtitan's non-pipelined step.

        **Contract**: ``(tokens [B, S], labels [B, S], G) -> loss`` (a 0-d tensor, the same
        on every rank of the pipeline group); gradients accumulated into ``.grad`` are those
        of ``sum_mb loss_sum(mb) / G``, on top of earlier accumulation steps.

        **Pseudocode**::

            factor = C / G
            existing grads *= 1 / factor     # into dualpipe_fx's mean convention
            loss = pipeline.step(inputs, target=labels)
            all grads *= factor; loss *= factor
            broadcast loss from the rank holding it
        """
        count = getattr(self.pipeline, "microbatches", lambda batch: self.num_microbatches)(inputs.shape[0])
        factor = count / float(global_valid_tokens)  # a smaller last batch may run fewer micro-batches
        grad_factor = factor * self.grad_sum  # torchtitan's FSDP sums over the replicas; we average
        self._scale_grads(1.0 / grad_factor)
        loss = self.pipeline.step(inputs, target=labels, **kwargs)  # kwargs: compile's example_kwargs
        self._scale_grads(grad_factor)
        return self._shared(None if loss is None else loss * factor)

    @torch.no_grad()
    def _scale_grads(self, factor: float) -> None:
        grads = [p.grad for p in self.pipeline.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)


def _zeros_until_init_weights(module: nn.Module) -> None:
    """compile()'s ``param_init_fn``: this rank's tensors of ``module`` hold zeros for now.

    The values come from the model's own ``init_weights`` right after compile
    (:func:`_init_weights`), which walks the whole model in one RNG stream; a per-module
    init here would draw other values only to be overwritten. Zeros rather than whatever
    the allocation held, so that compile's check that the ranks sharing a tensor hold the
    same values compares alike placeholders (the real values agree by construction: every
    rank draws the same stream).
    """
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        tensor.zero_()


def _init_weights(model: nn.Module, job_config, device: torch.device) -> None:
    """torchtitan's ``init_weights`` on the rank's part of the compiled model: unsplit values.

    The trainer's calls for an unsplit model (``to_empty`` on ``init_device``,
    ``init_weights(buffer_device=...)``, under ``debug.seed``), except that only this rank's
    tensors exist: the others stand in as views of one scratch buffer, so every RNG draw
    happens as in the unsplit run (:func:`titan_integration.init.init_like_unsplit`). With
    ``training.enable_cpu_offload`` torchtitan initialises on the CPU (CPU generator) and
    computes buffers on the device; so does this, then copies the values to ``device``
    (dualpipe_fx does not offload: the parameters live on ``device``).
    """
    init_device, buffer_device = device, None
    if job_config.training.enable_cpu_offload:
        init_device, buffer_device = torch.device("cpu"), device
    init_like_unsplit(model, lambda: model.init_weights(buffer_device=buffer_device),
                      seed=job_config.debug.seed, device=device, init_device=init_device)
    model.train()


class _ExampleTokenizer:
    """What ``get_attention_masks`` reads of a tokenizer, for the example micro-batch's mask:
    its layout (shapes, mask_mod code) is what compile() traces; the step's masks come from
    the trainer's own tokenizer."""

    eos_id = 0


def example_attention_masks(model: nn.Module, tokens: torch.Tensor) -> dict:
    """``{"attention_masks": mask}`` for a flex-attention model (as torchtitan's trainer builds
    it, here for the example micro-batch ``tokens``), ``{}`` for others. The one place that
    turns a torchtitan model's masks into ``compile(example_kwargs=)``."""
    args = getattr(model, "model_args", None)
    if getattr(args, "attn_type", "sdpa") != "flex" or not hasattr(model, "get_attention_masks"):
        return {}
    return {"attention_masks": model.get_attention_masks(input_batch=tokens, tokenizer=_ExampleTokenizer(),
                                                         extra_inputs=None)}


def _compile(model, loss_fn, job_config, device, group, num_mb: int, recompute=None, dp=None,
             token_kwargs=(), example_masks=None):
    """``dualpipe_fx.compile`` on one example micro-batch; trace failures name the model."""
    import dualpipe_fx

    mb_size = job_config.parallelism.pipeline_parallel_microbatch_size
    seq_len = job_config.training.seq_len
    tokens = torch.zeros(mb_size, seq_len, dtype=torch.long, device=device)
    labels = torch.zeros(mb_size, seq_len, dtype=torch.long, device=device)
    kwargs = compile_kwargs(job_config.dualpipe_fx, job_config.compile)
    kwargs["memory"] = dataclasses.replace(kwargs["memory"], recompute=recompute)
    kwargs["timeout"] = timedelta(seconds=job_config.comm.init_timeout_seconds)
    dp = dp or {}
    kwargs["parallelism"] = dualpipe_fx.Parallelism(**{k: v for k, v in dp.items()
                                                       if k in ("dp_group", "dp_mode", "expert_parallel")})
    kwargs["mixed_precision"] = dp.get("mixed_precision")
    # model keywords shaped like the tokens (torchtitan 0.3's RoPE `positions`)
    # and the model's attention masks for the example micro-batch: 0.3's through its own builder
    # (example_masks), 0.2.2's from the model's get_attention_masks
    masks = example_masks(tokens) if example_masks is not None else example_attention_masks(model, tokens)
    kwargs["example_kwargs"] = {**{name: torch.zeros_like(tokens) for name in token_kwargs}, **masks} or None
    try:
        return dualpipe_fx.compile(model, loss_fn, (tokens,), labels, num_microbatches=num_mb,
                                   group=group, device=device, param_init_fn=_zeros_until_init_weights,
                                   **kwargs)
    except dualpipe_fx.TraceError as err:
        name, flavor = job_config.model.name, job_config.model.flavor
        raise ValueError(f"model.name = {name!r} (flavor {flavor!r}) does not trace with "
                         f"dualpipe_fx: {str(err).rstrip('.')}. Run {name} {flavor} with "
                         f"--dualpipe_fx.no-enable (torchtitan's own pipeline split) or make "
                         f"its forward traceable") from err


def _loss_owner(program, group) -> int:
    """Global rank holding the (first) last stage, read off the pipeline's program (under
    ``schedule = "auto"``: the schedule the planner picked)."""
    return dist.get_global_rank(group, program.stage_to_rank()[program.chains[0][-1]])


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by FQN, as ``state_dict(keep_vars=True)`` without hooks."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, buf in module.named_buffers(recurse=False):
            # non-persistent buffers (llama's freqs_cis) are not state
            if buf is not None and name not in non_persistent_buffers(module):
                tensors[f"{prefix}.{name}" if prefix else name] = buf
    return tensors


def _local_tensors(model: nn.Module, pipeline) -> list[tuple[str, torch.Tensor]]:
    """This rank's params and persistent buffers: the model's own tensors, state_dict FQNs.

    The tensors the rank's stage graphs read, under the FQNs ``model.state_dict()`` gives
    without its hooks (tied weights under every FQN); they are the live objects. Not
    ``state_dict()`` itself: a post-hook may rename or rebuild tensors (torchtitan 0.3's fused
    ``wqkv`` saves as new ``wq``/``wk``/``wv`` tensors, which no stage reads). Not
    ``pipeline.state_dict()``: it returns clones, a transient copy of the rank's whole share.
    """
    local = {id(t) for stage in pipeline.stages.values() for t in stage.params}
    tensors = {k: v for k, v in _state_tensors(model).items() if id(v) in local}
    dp = getattr(pipeline, "_data_parallel", None)  # sharded data parallelism: the DTensor shards
    tensors = dp.public(tensors) if dp is not None else tensors
    tp = getattr(pipeline, "_tensor_parallel", None)  # TP: DTensor parameters around the local shards
    return sorted((tp.public(tensors) if tp is not None else tensors).items())


def _check_parallel_dims(parallel_dims) -> None:
    for name in ("cp", "etp"):
        degree = getattr(parallel_dims, name, 1)
        if degree > 1:
            raise ValueError(f"dualpipe_fx.enable runs pipeline, data, tensor and expert parallelism only, but the "
                             f"resolved {name} degree is {degree}; set the matching parallelism.* "
                             f"degree to 1 (world size = pipeline_parallel_degree x data-parallel degrees x "
                             f"tensor_parallel_degree)")
    if parallel_dims.tp > 1 and (parallel_dims.dp_shard > 1 or parallel_dims.ep > 1):
        key, degree = (("data_parallel_shard_degree", parallel_dims.dp_shard) if parallel_dims.dp_shard > 1
                       else ("expert_parallel_degree", parallel_dims.ep))
        raise ValueError(f"parallelism.tensor_parallel_degree = {parallel_dims.tp} with the resolved parallelism.{key} "
                         f"= {degree} and dualpipe_fx.enable: dualpipe_fx composes tensor parallelism with replicated "
                         f"data parallelism only (sharded DP and EP beside TP are not composed yet). Fix: "
                         f"parallelism.{key} = 1 and parallelism.data_parallel_replicate_degree for the data-parallel "
                         f"ranks (world size = pipeline_parallel_degree x data_parallel_replicate_degree x "
                         f"tensor_parallel_degree)")


def expert_replica_rows(parallel_dims) -> list[list[int]]:
    """Every expert data-parallel group of the world: torchtitan's ``dp_replicate x efsdp`` mesh,
    the rows of its ``(pp, dp_replicate, efsdp, ep, etp)`` rank layout that vary the first two
    (0.3 has no expert TP: its sparse mesh is ``(pp, dp_replicate, efsdp, ep)``, etp = 1)."""
    pp, dpr, ep = parallel_dims.pp, parallel_dims.dp_replicate, parallel_dims.ep
    etp = getattr(parallel_dims, "etp", 1)
    efsdp = parallel_dims.dp_shard * parallel_dims.cp * parallel_dims.tp // (etp * ep)
    layout = torch.arange(parallel_dims.world_size).view(pp, dpr, efsdp, ep, etp)
    return layout.permute(0, 3, 4, 1, 2).reshape(-1, dpr * efsdp).tolist()


def _expert_replica_group(parallel_dims) -> Optional[dist.ProcessGroup]:
    """This rank's group of :func:`expert_replica_rows`, or None when that is this rank alone.
    Collective: every rank builds every group."""
    rows = expert_replica_rows(parallel_dims)
    if len(rows[0]) == 1:
        return None
    mine, _ = dist.new_subgroups_by_enumeration(rows)
    return mine


def data_parallel_args(parallel_dims, job_config) -> dict:
    """``compile(dp_group=, dp_mode=)`` from torchtitan's device mesh, and how grads sum over it.

    The data-parallel group is torchtitan's ``batch`` mesh (``dp_replicate x dp_shard``: the
    ranks that read different data and hold the same pipeline stages). ``dp_shard > 1``
    (FSDP, or HSDP with ``dp_replicate``) -> ``"shard"`` (ZeRO-3), or ``"shard_grad_op"``
    (ZeRO-2) with ``parallelism.fsdp_reshard_after_forward = "never"``; ``dp_replicate > 1``
    alone (DDP) -> ``"replicate"``. ``grad_sum``: torchtitan's FSDP sums grads over the
    batch mesh (its gradient divide factor is 1; the loss is already divided by the global
    token count), its DDP averages them; dualpipe_fx averages, so a sharded run multiplies
    by the data-parallel size to give torchtitan's grads.

    ``mixed_precision``: where torchtitan applies ``training.mixed_precision_param`` /
    ``mixed_precision_reduce`` itself, through ``fully_shard`` (``dp_shard > 1``), they become
    ``compile(mixed_precision=MixedPrecisionPolicy(...))``. Without FSDP torchtitan runs a
    pipeline in ``training.dtype`` (its ``maybe_enable_amp``: "Mixed precision training with TP
    or PP is only supported when FSDP/HSDP/CP is enabled"), and so does this one.
    """
    if not (parallel_dims.dp_replicate > 1 or parallel_dims.dp_shard > 1):
        return {}
    group = parallel_dims.get_mesh("batch").get_group()
    if parallel_dims.dp_shard > 1:
        never = job_config.parallelism.fsdp_reshard_after_forward == "never"
        return {"dp_group": group, "dp_mode": "shard_grad_op" if never else "shard",
                "grad_sum": dist.get_world_size(group), "mixed_precision": fsdp_mixed_precision(job_config)}
    return {"dp_group": group, "dp_mode": "replicate", "grad_sum": 1}


def fsdp_mixed_precision(job_config):
    """torchtitan's ``apply_fsdp`` policy: ``MixedPrecisionPolicy(param_dtype=training.mixed_precision_param,
    reduce_dtype=training.mixed_precision_reduce)``; None when both are float32 (nothing to cast)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torchtitan.config import TORCH_DTYPE_MAP

    param = TORCH_DTYPE_MAP[job_config.training.mixed_precision_param]
    reduce = TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce]
    if param == reduce == torch.float32:
        return None
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)


def expert_parallel_args(parallel_dims, model: nn.Module) -> dict:
    """With ``expert_parallel_degree > 1``: this EP rank's experts in ``model`` (meta), each
    ``GroupedExperts`` exchanging tokens in its own forward (:mod:`titan_integration.expert_parallel`),
    and ``compile(expert_parallel=)`` over torchtitan's ``ep`` mesh, reduced over its expert
    data-parallel ranks (``dp_replicate x efsdp``). EP borrows from ``dp_shard``: the EP ranks
    are data-parallel ranks of the ``batch`` mesh, which ``data_parallel_args`` already uses."""
    import dualpipe_fx

    if parallel_dims.ep <= 1:
        return {}
    ep_group = parallel_dims.get_mesh("ep").get_group()
    names = frozenset(shard_experts(model, ep_group))
    return {"expert_parallel": dualpipe_fx.ExpertParallel(ep_group, names,
                                                          _expert_replica_group(parallel_dims))}


def pipeline_dualpipe_fx(model: nn.Module, parallel_dims, job_config, device: torch.device,
                         model_args, parallelize_fn, loss_fn, *, token_kwargs=(), example_masks=None):
    """torchtitan ``pipelining_fn`` that pipelines ``model`` with ``dualpipe_fx.compile``.

    **Contract**: torchtitan's ``PipeliningFunction``: ``(meta model, parallel_dims,
    job_config, device, model_args, parallelize_fn, loss_fn) -> (schedule, [part],
    has_first_stage, has_last_stage)``; ``token_kwargs``: names of model keywords shaped like
    the token batch (0.3's ``positions``), traced as compile's ``example_kwargs`` and given
    to ``step_normalized``; ``example_masks``: ``tokens -> {name: mask}``, the model's
    attention-mask keywords for the example micro-batch (0.3's flex ``attention_masks``). ``parallelize_fn`` is not applied as a whole: its FSDP/DDP become
    ``compile(dp_group=, dp_mode=)`` over torchtitan's ``batch`` mesh (:func:`data_parallel_args`),
    its EP becomes ``compile(expert_parallel=)`` with the experts' all_to_all inside the traced
    forward (:func:`expert_parallel_args`); its TP part (``apply_tp`` / ``apply_non_moe_tp``) IS
    applied, to the meta model on torchtitan's ``tp`` mesh, before compile traces it
    (:mod:`titan_integration.tensor_parallel`; loss parallel becomes a replicated head output);
    CP is refused (``validate_job_config``, ``_check_parallel_dims``); its activation
    checkpoint wrappers are replaced by ``compile(recompute=...)`` from
    ``[activation_checkpoint]``, so nothing is recomputed twice).

    **Pseudocode**::

        C = local_batch_size / pipeline_parallel_microbatch_size
        if tp > 1: parallelize_fn's TP function(meta model, tp mesh, loss_parallel=False)
        recompute = [activation_checkpoint] as None | "full" | "selective" | BlockRecompute
        masks = example_attention_masks(model, one micro-batch)  # flex: {"attention_masks": BlockMask}
        pipeline = dualpipe_fx.compile(meta model, loss_fn, one micro-batch, recompute, example_kwargs=masks,
                                       group=pp group, device=device)  # allocates this rank's share
        model.init_weights under debug.seed, other ranks' tensors as scratch: unsplit values
        part = StageLocalModel(pipeline.named_parameters(), model.get_attention_masks)
        return DualPipeFxSchedule(pipeline), [part], True, True  # every rank feeds data, sees loss

    Raises:
        ValueError: the model does not trace (naming ``model.name``), or the resolved
            parallel degrees use something other than pipeline parallelism.
    """
    del model_args
    _check_parallel_dims(parallel_dims)
    if parallel_dims.tp > 1:  # torchtitan's own TP plan, on meta, before compile traces it
        apply_titan_tp(model, parallelize_fn, parallel_dims.get_mesh("tp"), job_config.model.name)
    group = parallel_dims.get_mesh("pp").get_group()
    if device.type == "cpu":
        device = torch.device("cpu")  # the trainer's "cpu:<LOCAL_RANK>" is the one CPU device
    num_mb = num_microbatches(job_config)
    # torchtitan's [activation_checkpoint], applied to the stage graphs (its own wrappers are
    # never applied here: parallelize_fn is not called); read off the whole model
    recompute = recompute_arg(job_config.activation_checkpoint, model)
    # the model is on meta: compile traces it for `device` and allocates this rank's tensors
    use_traceable_permute_indices()  # grouped-GEMM MoE experts pad their tokens in traceable ops
    dp = {**data_parallel_args(parallel_dims, job_config), **expert_parallel_args(parallel_dims, model)}
    pipeline = _compile(model, loss_fn, job_config, device, group, num_mb, recompute, dp, token_kwargs,
                        example_masks)
    # sharded data parallelism, expert parallelism: each rank keeps its rows of the unsplit init
    with pipeline.full_parameters(), full_experts(model):
        _init_weights(model, job_config, device)
    part = StageLocalModel(_local_tensors(model, pipeline), getattr(model, "get_attention_masks", None))
    # MoE: torchtitan's load-balancing hook reads part.layers[i].moe (titan_integration.moe)
    expose_moe_load_balancing(part, model, {id(t) for s in pipeline.stages.values() for t in s.params})
    mark_replicas(part, group)  # DualPipe's mirror copies count once in the grad norm (clipping.py)
    owner = _loss_owner(pipeline.program, group)
    schedule = DualPipeFxSchedule(pipeline, num_mb, loss_owner=owner, group=group, loss_fn=loss_fn)
    schedule.recompute = pipeline.recompute  # what the stage graphs were split with (ActivationBudget: chosen)
    # a step at new shapes (validation at another seq_len) traces the model again, and the pipeline
    # holds it weakly: the schedule, which the trainer keeps, holds it (meta but this rank's tensors)
    schedule.model = model
    schedule.grad_sum = dp.get("grad_sum", 1)
    # Every rank feeds the full batch and sees the (broadcast) loss; see DualPipeFxSchedule.
    return schedule, [part], True, True
