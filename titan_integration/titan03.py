"""dualpipe_fx on torchtitan 0.3's Python config registry (0.2.x keeps its TOML section).

torchtitan 0.3 dropped TOML job files: a run names a module and a function that returns a
``Trainer.Config`` dataclass (``--module M --config fn``), and command-line flags override
its fields. This module is such a registry. :class:`DualPipeFxTrainer` extends 0.3's
``Trainer`` with a ``dualpipe_fx`` field of the same :class:`~titan_integration.config.DualPipeFx`
dataclass as the 0.2 ``[dualpipe_fx]`` section, so the option names (``enable``,
``schedule``, ``balance``, ``rank_balance``, ``memory_budget_gib``, ``split_points``,
``compile_stages``, ``overlap``) are the same: ``--dualpipe_fx.schedule zbv``,
``--dualpipe_fx.no-enable``. It offers 0.3's own configs under their 0.3 names
(``llama3_debugmodel``, ``qwen3_debugmodel``, ``qwen3_moe_debug``, ``deepseek_v3_debugmodel``:
:func:`with_dualpipe_fx`). Run (2 CPU ranks, gloo)::

    PYTHONPATH=<torchtitan 0.3> torchrun --nproc_per_node 2 -m titan_integration.titan03 \\
        --module titan_integration.titan03 --config llama3_debugmodel

The glue: 0.3 calls ``model_spec.pipelining_fn(model, parallel_dims=, training=,
parallelism=, compile_config=, ac_config=, dump_folder=, device=, model_config=,
parallelize_fn=, loss_fn=)`` with no job config. The trainer binds its config to
:func:`pipeline_dualpipe_fx_03`, which presents 0.3's pieces under the 0.2 names
(:func:`job_config_view`) and calls :func:`titan_integration.pipelining.pipeline_dualpipe_fx`,
with the dataloader's RoPE ``positions`` and a flex model's document masks
(:func:`document_masks`) as traced keyword inputs. 0.3's losses return ``(loss, metrics)``
and take ``global_valid_tokens``; the traced loss is the token sum, with ``lm_head`` inside
for ``ChunkedLossWrapper`` (:func:`traced_loss`), and the step scales it as the 0.2 adapter
does (:meth:`DualPipeFxSchedule.step_normalized`), called through 0.3's micro-batch
signature (:class:`MicroBatchSchedule`).
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
from titan_integration.clipping import use_replica_aware_clipping
from titan_integration.config import DualPipeFx

# 0.3's modules that did `from torchtitan.tools.utils import device_type, device_module`
_DEVICE_IMPORTERS_03 = ("torchtitan.tools.utils", "torchtitan.distributed.utils",
                        "torchtitan.distributed.parallel_dims", "torchtitan.components.metrics",
                        "torchtitan.tools.profiler", "torchtitan.models.common.token_dispatcher")


def use_cpu_when_no_gpu_03() -> bool:
    """titan_integration.cpu's items 1-5, 9 and 15 for 0.3's module layout, and flex attention on
    CPU; False with a GPU. CPU-only stand-ins, for 0.3 without PP and the pipeline alike:

    - flex's backward: torch refuses it in its Python wrapper although the op's dense
      backward is exact (``passes._compat.lift_flex_backward_check_on_cpu``);
    - 0.3's ``FlexAttention`` calls ``torch.compile(flex_attention)``, whose Inductor CPU
      lowering fails (``IndexError`` in the backward, torch 2.14.1): the eager
      ``flex_attention`` (the op's dense reference, the same mask) runs instead. dualpipe_fx
      traces the op itself either way.
    """
    from torch.nn.attention.flex_attention import flex_attention
    from torchtitan.models.common.attention import FlexAttention

    from passes._compat import lift_flex_backward_check_on_cpu
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
    cpu.use_uneven_all_to_all_on_gloo()  # 0.3's own EP (spmd_types' uneven all_to_all) on gloo
    lift_flex_backward_check_on_cpu()
    FlexAttention._compiled_flex_attn = flex_attention
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


class _ChunkedLinearCrossEntropyGrad(torch.autograd.Function):
    """Attaches the gradients of ``sum_chunks CE(h_chunk @ W.T, labels_chunk)`` to its value.

    0.3's ``ChunkedLossWrapper`` runs each chunk's ``lm_head`` and backward inside its
    forward (eager autograd calls, which no graph holds). Here the value is computed chunk
    by chunk on detached inputs (:func:`traced_loss`), and this Function's backward
    recomputes each chunk's logits and forms that chunk's gradients (cross entropy's
    ``softmax - onehot`` over the valid tokens, then ``lm_head``'s two matmuls). Neither
    pass holds more than one chunk of logits; only ``h`` and ``W`` are saved.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, loss, num_chunks):
        ctx.save_for_backward(hidden, weight, labels)
        ctx.num_chunks = num_chunks
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        from torchtitan.components.loss import IGNORE_INDEX

        hidden, weight, labels = ctx.saved_tensors
        grad_hidden, grad_weight = [], torch.zeros_like(weight)
        for h, y in zip(_chunks(hidden, ctx.num_chunks), _chunks(labels, ctx.num_chunks)):
            logits = torch.nn.functional.linear(h, weight)
            y = y.flatten()
            valid = y != IGNORE_INDEX
            grad = torch.log_softmax(logits.flatten(0, 1).float(), dim=-1).exp()
            grad = grad - torch.nn.functional.one_hot(torch.where(valid, y, 0), grad.shape[-1]).to(grad.dtype)
            grad = (grad * (valid.unsqueeze(-1) * grad_loss)).to(logits.dtype)
            grad_hidden.append((grad @ weight).view_as(h))
            grad_weight = grad_weight + grad.t() @ h.flatten(0, 1)
        return torch.cat(grad_hidden, dim=1), grad_weight, None, None, None


def _chunks(t: torch.Tensor, num_chunks: int) -> tuple[torch.Tensor, ...]:
    """``t`` in ``num_chunks`` equal parts along the sequence dim, as ``ChunkedLossWrapper`` cuts."""
    if t.shape[1] % num_chunks:
        raise ValueError(f"training.seq_len = {t.shape[1]} is not divisible by the chunked loss's "
                         f"num_chunks = {num_chunks}; pick a seq_len that is a multiple of it")
    return t.split(t.shape[1] // num_chunks, dim=1)


def traced_loss(model, loss_fn):
    """0.3's built loss as the ``(pred, labels) -> token-sum`` that dualpipe_fx traces with ``model``.

    A ``ChunkedLossWrapper`` applies ``lm_head`` itself: the model returns the final norm's
    hidden states (``_skip_lm_head``, as 0.3's trainer sets) and the loss applies
    ``model.lm_head.weight`` chunk by chunk with 0.3's inner loss, so the
    lm_head weight and the chunked cross entropy land in the last stage's graph
    (:class:`_ChunkedLinearCrossEntropyGrad`). Any other
    loss is called with ``global_valid_tokens=None`` (its token sum).
    """
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss

    if not isinstance(loss_fn, ChunkedLossWrapper):
        return lambda pred, labels: loss_fn(pred, labels)[0]
    inner, lm_head = loss_fn.loss_fn, model.lm_head
    if type(inner) is not CrossEntropyLoss:
        raise ValueError(f"loss = ChunkedLossWrapper with loss_fn = {type(inner).__qualname__} is not "
                         f"supported with dualpipe_fx.enable (its chunked backward is cross entropy's); "
                         f"use ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(...))")
    if type(lm_head).forward is not torch.nn.Linear.forward or lm_head.bias is not None:
        raise ValueError(f"ChunkedLossWrapper under dualpipe_fx applies lm_head as a bias-free linear, "
                         f"but lm_head is {type(lm_head).__qualname__} (bias={lm_head.bias is not None}); "
                         f"drop the lm_head converter or use CrossEntropyLoss.Config as the loss")
    model._skip_lm_head = True

    def chunked(hidden, labels):
        weight, num_chunks = lm_head.weight, loss_fn.num_chunks
        total = hidden.new_zeros((), dtype=torch.float32)
        for h, y in zip(_chunks(hidden.detach(), num_chunks), _chunks(labels, num_chunks)):
            total = total + inner(torch.nn.functional.linear(h, weight.detach()), y)[0]
        return _ChunkedLinearCrossEntropyGrad.apply(hidden, weight, labels, total, num_chunks)
    return chunked


def _keep_0_3_state_dict(part, model) -> None:
    """``part``'s state dict as 0.3's: a fused ``wqkv`` saves as ``wq``/``wk``/``wv`` and loads back.

    0.3's ``FusedQKVLinear`` registers those hooks on itself; the part is a skeleton of this
    rank's tensors, so each of its modules under a ``FusedQKVLinear``'s FQN gets the same
    hooks, reading the head layout off the meta model's module.
    """
    from torchtitan.models.common.attention import FusedQKVLinear

    for fqn, module in model.named_modules():
        if not isinstance(module, FusedQKVLinear):
            continue
        try:
            skeleton = part.get_submodule(fqn)
        except AttributeError:
            continue  # another rank's layer
        skeleton.register_state_dict_post_hook(
            lambda _, state, prefix, meta, module=module: module._split_qkv_on_save(module, state, prefix, meta))
        skeleton.register_load_state_dict_pre_hook(
            lambda _, state, prefix, *rest, module=module: module._merge_qkv_on_load(module, state, prefix, *rest))


def _packed_document_mask_mod(positions: torch.Tensor):
    """0.3's same-document mask (``get_efficient_causal_mask_mod_for_packed_document``) in its
    batched form for any batch, one as well.

    0.3 builds a batch of one with another closure (per-token document starts, no batch
    dim): the same mask, but a mask_mod whose tensors have no batch dim cannot be split into
    micro-batches. This is 0.3's ``batch_size > 1`` branch line for line: with the causal mask
    it allows ``kv <= q <= doc_end[b, kv]``, i.e. causal attention within each document.
    """
    batch_size, seq_len = positions.shape
    document_starts = positions == 0
    document_id = torch.cumsum(document_starts.int(), dim=1).to(torch.int32) - 1
    token_idx = torch.arange(seq_len, device=positions.device, dtype=torch.int32).expand_as(positions)
    next_doc_start = torch.full((batch_size, seq_len), seq_len, device=positions.device, dtype=torch.int32)
    next_doc = document_starts & (document_id > 0)
    next_doc_start.scatter_(1, torch.where(next_doc, document_id - 1,
                                           torch.full_like(document_id, seq_len - 1)).to(torch.int64),
                            torch.where(next_doc, token_idx, torch.full_like(token_idx, seq_len)))
    doc_end_by_token = next_doc_start.gather(1, document_id.to(torch.int64)) - 1

    def packed_document_mask(b, h, q_idx, kv_idx):
        return q_idx <= doc_end_by_token[b, kv_idx]

    return packed_document_mask


def document_masks(model):
    """``positions [B, S] -> BlockMask`` as 0.3's ``get_attention_masks`` builds it for a flex
    model (causal and same-document, 0.3's block size), through 0.3's own builder; None for
    a model without masked attention. varlen is refused: its metadata (cumulative document
    lengths of the packed batch, their max as a Python int) has no per-sample split."""
    from torchtitan.models.common.attention import FlexAttention, VarlenAttention, get_causal_mask_mod

    attention = getattr(model.config, "first_attention", None)
    inner = getattr(attention, "inner_attention", None)
    if isinstance(inner, VarlenAttention.Config):
        raise ValueError("the model's attention is varlen, which dualpipe_fx does not pipeline: its metadata "
                         "(cumulative document lengths over the packed batch, their max as a Python number) "
                         "cannot be split into micro-batches of one trace. Fix: the flex model of the same "
                         "config (0.3's default attn_backend=\"flex\"): the same document masking as a BlockMask")
    if not isinstance(inner, FlexAttention.Config):
        return None
    return lambda positions: model._create_flex_attention_mask(
        positions, attention, [get_causal_mask_mod(), _packed_document_mask_mod(positions)])


class MicroBatchSchedule:
    """0.3's schedule calls (micro-batch lists) on a :class:`~titan_integration.pipelining.DualPipeFxSchedule`.

    0.3's trainer calls ``step(arg_mbs=, kwarg_mbs=, target_mbs=, losses=, loss_kwargs=,
    return_outputs=)`` and its validator ``eval(arg_mbs=, kwarg_mbs=, target_mbs=, losses=)``
    with one entry per micro-batch; dualpipe_fx's step takes the local batch and splits it
    alike (micro-batches are consecutive rows). Every rank is first and last stage to
    0.3, so every rank gives all lists. A flex model's per-micro-batch masks are replaced by
    the batch's mask built from the concatenated ``positions`` (:func:`document_masks`), which
    the pipeline splits back into exactly those micro-batch masks.
    """

    def __init__(self, schedule, masks=None) -> None:
        self.schedule = schedule
        self.masks = masks  # positions -> the batch's BlockMask (document_masks), None without masks

    def _batch(self, arg_mbs, kwarg_mbs, target_mbs):
        if arg_mbs is None or target_mbs is None:
            raise ValueError("dualpipe_fx's step takes the whole batch and target on every rank; "
                             "got arg_mbs or target_mbs = None (pp_has_first_stage/last_stage are True)")
        if any(len(args) != 1 for args in arg_mbs):
            raise ValueError(f"dualpipe_fx traced the model with one positional input (tokens); got "
                             f"{len(arg_mbs[0])} per micro-batch")
        kwargs = {}
        for name in kwarg_mbs[0] if kwarg_mbs else ():
            if name == "attention_masks" and self.masks is not None:
                continue  # the batch's mask is built below: dualpipe_fx splits it per micro-batch
            if name not in TOKEN_KWARGS:
                raise ValueError(f"dualpipe_fx traced the model with keywords {list(TOKEN_KWARGS)}; the "
                                 f"trainer gave {name!r} as well")
            kwargs[name] = torch.cat([mb[name] for mb in kwarg_mbs])
        if self.masks is not None:
            kwargs["attention_masks"] = self.masks(kwargs["positions"])
        return torch.cat([args[0] for args in arg_mbs]), torch.cat(target_mbs), kwargs

    def step(self, *, arg_mbs=None, kwarg_mbs=None, target_mbs=None, losses=None, loss_kwargs=None,
             return_outputs=False) -> None:
        """One pipelined step; appends its loss (``sum_mb loss_sum(mb) / global_valid_tokens``)."""
        if return_outputs:
            raise ValueError("return_outputs=True: dualpipe_fx keeps the model outputs on the stage "
                             "ranks; call step with return_outputs=False")
        inputs, labels, kwargs = self._batch(arg_mbs, kwarg_mbs, target_mbs)
        loss = self.schedule.step_normalized(inputs, labels, (loss_kwargs or {})["global_valid_tokens"],
                                             **kwargs)
        if losses is not None:
            losses.append(loss)

    def eval(self, *, arg_mbs=None, kwarg_mbs=None, target_mbs=None, losses=None) -> None:
        """Forward only; appends the token-sum loss (0.3's validator divides it)."""
        inputs, labels, kwargs = self._batch(arg_mbs, kwarg_mbs, target_mbs)
        with torch.no_grad():
            outputs = self.schedule.pipeline.step(inputs, **kwargs)  # on the loss rank, else None
            summed = self.schedule._shared(None if outputs is None else self.schedule.loss_fn(outputs, labels))
        if losses is not None:
            losses.append(summed)


def pipeline_dualpipe_fx_03(model, *, config, parallel_dims, training, parallelism, ac_config,
                            device, loss_fn, **unused):
    """0.3's pipelining call onto :func:`titan_integration.pipelining.pipeline_dualpipe_fx`.

    **Contract**: 0.3's ``PipeliningFunction`` keywords (``compile_config``, ``dump_folder``,
    ``model_config``, ``parallelize_fn`` unused: as in 0.2, dualpipe_fx neither wraps nor
    compiles the model itself) plus ``config`` bound by the trainer -> ``(MicroBatchSchedule,
    [part], True, True)``. The part saves 0.3's state-dict keys, has an ``lm_head``
    attribute on every rank (0.3's trainer hands it to ``ChunkedLossWrapper``; empty where
    another rank holds the weight) and its ``layers`` is a ``ModuleDict`` as 0.3's hooks expect.
    """
    from titan_integration.pipelining import pipeline_dualpipe_fx

    view = job_config_view(config, training=training, parallelism=parallelism, ac_config=ac_config)
    masks = document_masks(model)
    example = None if masks is None else lambda tokens: {"attention_masks": masks(_one_document_each(tokens))}
    schedule, parts, first, last = pipeline_dualpipe_fx(model, parallel_dims, view, device, None, None,
                                                        traced_loss(model, loss_fn), token_kwargs=TOKEN_KWARGS,
                                                        example_masks=example)
    schedule.loss_fn = lambda pred, labels: loss_fn(pred, labels)[0]
    for part in parts:
        # 0.3's post_dataloading_process asks model_parts[0] for the masks: the model's own method
        object.__setattr__(part, "get_attention_masks", model.get_attention_masks)
        _keep_0_3_state_dict(part, model)
        if not hasattr(part, "lm_head"):
            part.add_module("lm_head", torch.nn.Module())
        layers = getattr(part, "layers", None)
        if layers is not None and not isinstance(layers, torch.nn.ModuleDict):
            # 0.3's MoE load-balancing hook asserts a ModuleDict; same children, same keys
            part._modules["layers"] = torch.nn.ModuleDict(layers._modules)
    return MicroBatchSchedule(schedule, masks), parts, first, last


def _one_document_each(tokens: torch.Tensor) -> torch.Tensor:
    """RoPE positions for the example micro-batch: each sample one document (any layout traces
    alike: the mask's shapes and code are what the trace keeps)."""
    return torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)


def validate(config) -> None:
    """0.2's checks on the 0.3 config (the ``dualpipe_fx`` keys, micro-batches, parallelism),
    and with ``expert_parallel_degree > 1`` that the MoE layers dispatch through 0.3's standard
    dispatcher (:func:`_check_token_dispatchers`)."""
    if config.parallelism.expert_parallel_degree > 1:
        _check_token_dispatchers(config.model_spec.model)
    view = job_config_view(config, training=config.training, parallelism=config.parallelism,
                           ac_config=config.activation_checkpoint)
    dpfx_config.validate_job_config(view)


def _check_token_dispatchers(model_config) -> None:
    """Expert parallelism under dualpipe_fx keeps 0.3's routing, its local reorder and combine
    (the dispatcher of EP = 1) and does the exchange inside the experts
    (:mod:`titan_integration.expert_parallel`): the same rows to the same experts in the same
    order as 0.3's ``AllToAllTokenDispatcher`` (``moe_comm_backend="standard"``). DeepEP,
    HybridEP and MinimalAsyncEP dispatch with their own kernels and buffers, outside what the
    stage graphs trace."""
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher, LocalTokenDispatcher

    for fqn, dispatcher, *_ in model_config.traverse(LocalTokenDispatcher.Config):
        if type(dispatcher) not in (LocalTokenDispatcher.Config, AllToAllTokenDispatcher.Config):
            raise ValueError(f"parallelism.expert_parallel_degree > 1 with dualpipe_fx.enable and the MoE token "
                             f"dispatcher {type(dispatcher).__qualname__} at {fqn}: its dispatch/combine are "
                             f"kernels outside the traced forward; build the model with the standard all_to_all "
                             f"dispatcher (model_registry(..., moe_comm_backend=\"standard\"), "
                             f"AllToAllTokenDispatcher), whose exchange runs inside the stage graphs")


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
            _allow_tied_weights(config.model_spec.model)
            # grads on several meshes (EP's expert slices on "ep", the rest on the data-parallel
            # mesh, which has no dim names: 0.3's EP clipping asserts them) and DualPipe's mirrors
            use_replica_aware_clipping("torchtitan.trainer")
            # DualPipeFxSchedule broadcasts the loss to every rank: no "last rank only" warning
            importlib.import_module("torchtitan.trainer").ensure_pp_loss_visible = lambda **kwargs: None
        super().__init__(config)


def _allow_tied_weights(model_config) -> None:
    """Let a model with ``enable_weight_tying`` (qwen3) pass 0.3's pipeline check.

    0.3's ``Decoder.Config.update_from_config`` refuses weight tying under pipeline
    parallelism: its FQN split puts ``tok_embeddings`` and ``lm_head`` on different stages
    with no way to share the tensor. dualpipe_fx traces the tied weight as one parameter read
    by the first and the last stage and sums its gradient over both, so the check runs with
    tying off and the model is built tied as configured.
    """
    if not getattr(model_config, "enable_weight_tying", False) or hasattr(type(model_config), "_dualpipe_fx_tied"):
        return
    base = type(model_config)

    def update_from_config(self, *, config, **kwargs):
        self.enable_weight_tying = False
        try:
            base.update_from_config(self, config=config, **kwargs)
        finally:
            self.enable_weight_tying = True

    # the same slots, one method overridden: the config object changes class in place
    tied = type(base.__name__, (base,), {"__slots__": (), "__qualname__": base.__qualname__,
                                         "__module__": base.__module__, "_dualpipe_fx_tied": True,
                                         "update_from_config": update_from_config})
    model_config.__class__ = tied


def with_dualpipe_fx(base: Trainer.Config) -> DualPipeFxTrainer.Config:
    """0.3's registry config ``base`` on this machine, pipelined by dualpipe_fx (DualPipeV, 2 ranks).

    Kept as 0.3 defines it: the model spec (flex attention), the loss (``ChunkedLossWrapper``),
    activation checkpointing, optimizer, LR schedule, expert-parallel degree. Changed for a
    CPU run: the project's tiny corpus and tokenizer (nothing downloaded), seq 64 and local
    batch 4 in micro-batches of 1, fp32, no checkpoint saving and the pipeline section. The
    run without PP: ``--dualpipe_fx.no-enable --parallelism.pipeline_parallel_degree 1``.
    """
    from torchtitan.config import ParallelismConfig, TrainingConfig
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader

    from titan_integration.data import DATASET_NAME, TOKENIZER_DIR

    config = DualPipeFxTrainer.Config(**{f.name: getattr(base, f.name) for f in dataclasses.fields(Trainer.Config)})
    config.hf_assets_path = TOKENIZER_DIR
    config.dump_folder = "/tmp/dualpipe_fx_titan03/outputs"
    config.dataloader = HuggingFaceTextDataLoader.Config(dataset=DATASET_NAME)
    config.training = TrainingConfig(local_batch_size=4, seq_len=64, steps=10, max_norm=1.0,
                                     dtype="float32", mixed_precision_param="float32",
                                     disable_cuda_graphs=True)  # CUDA graphs refuse PP
    config.parallelism = ParallelismConfig(pipeline_parallel_degree=2, pipeline_parallel_microbatch_size=1,
                                           expert_parallel_degree=base.parallelism.expert_parallel_degree)
    config.checkpoint.enable = False
    config.metrics.disable_color_printing = True
    config.debug.seed = 42
    config.dualpipe_fx = DualPipeFx(enable=True, schedule="dualpipev")
    return config


def llama3_debugmodel() -> DualPipeFxTrainer.Config:
    """0.3's ``llama3_debugmodel`` (flex attention, chunked loss, selective AC) under dualpipe_fx."""
    from torchtitan.models.llama3 import config_registry

    return with_dualpipe_fx(config_registry.llama3_debugmodel())


def qwen3_debugmodel() -> DualPipeFxTrainer.Config:
    """0.3's ``qwen3_debugmodel`` (flex attention, chunked loss, selective AC) under dualpipe_fx."""
    from torchtitan.models.qwen3 import config_registry

    return with_dualpipe_fx(config_registry.qwen3_debugmodel())


def qwen3_moe_debug() -> DualPipeFxTrainer.Config:
    """0.3's ``qwen3_moe_debug`` (MoE, flex attention, chunked loss, selective AC) under dualpipe_fx."""
    from torchtitan.models.qwen3 import config_registry

    return with_dualpipe_fx(config_registry.qwen3_moe_debug())


def deepseek_v3_debugmodel() -> DualPipeFxTrainer.Config:
    """0.3's ``deepseek_v3_debugmodel`` (MoE, MLA, flex attention, chunked loss, selective AC)
    under dualpipe_fx."""
    from torchtitan.models.deepseek_v3 import config_registry

    return with_dualpipe_fx(config_registry.deepseek_v3_debugmodel())


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
