"""torchtitan's own tensor-parallel plan on the meta model, before ``dualpipe_fx.compile`` traces it.

torchtitan 0.2.2's ``parallelize_fn`` (``parallelize_llama``, ``parallelize_qwen3``, ...) applies
TP first, with a module-level function of the same file: ``apply_tp`` (llama3) or
``apply_non_moe_tp`` (qwen3, deepseek_v3, llama4, gpt_oss). Under ``dualpipe_fx.enable`` the
rest of ``parallelize_fn`` (activation checkpointing, torch.compile, FSDP/DDP) maps onto
``dualpipe_fx.compile`` arguments, so :func:`apply_titan_tp` calls only that TP function, on
the meta model with torchtitan's ``tp`` mesh; ``compile()`` then turns the DTensor styles into
local shards and traced collectives (``dualpipe_fx.runtime.tensor_parallel``).

Arguments torchtitan would pass, and what is passed here:

- ``loss_parallel``: ``False`` whatever ``parallelism.disable_loss_parallel`` says. With loss
  parallel the head's output stays a vocab-sharded DTensor and the loss runs under
  ``loss_parallel()``; dualpipe_fx traces the loss with the model and refuses a sharded model
  output. The head then gathers its logits (``output_layouts=Replicate()``) and the loss is
  the model's own cross entropy on them: the same loss and gradients (a pure parallelisation
  choice), at the cost of the full ``[micro-batch, seq, vocab]`` logits on each TP rank.
- ``enable_float8_tensorwise_tp`` / ``enable_async_tp``: ``False``; Float8 converters and async
  TP with TP are refused by ``titan_integration.config.validate_job_config``, naming their keys.
- ``cp_enabled``: ``False`` (context parallelism is refused).

Tied parameters (qwen3's ``enable_weight_tying``: ``tok_embeddings.weight`` is ``output.weight``,
both ``Shard(0)`` over the vocabulary) stay tied: ``parallelize_module`` distributes each module's
parameter separately, and torchtitan re-ties them in ``init_weights``, after its TP; here that
happens right after the plan, before the trace.

**Contract**: ``apply_titan_tp(model, parallelize_fn, tp_mesh, model_name) -> str`` (the function's
name); ``model`` (meta) carries torchtitan's DTensor parameters and ParallelStyle hooks afterwards,
tied FQNs sharing one DTensor; every parameter is a DTensor (else ``ValueError``: MoE layers,
whose TP is torchtitan's separate ``apply_moe_ep_tp``, are refused).
"""
from __future__ import annotations

import inspect
import sys

from torch import nn

TP_FUNCTIONS = ("apply_tp", "apply_non_moe_tp")  # llama3; qwen3, deepseek_v3, llama4, gpt_oss
_ARGS = {"loss_parallel": False, "enable_float8_tensorwise_tp": False, "enable_async_tp": False,
         "cp_enabled": False}


def titan_tp_function(parallelize_fn, model_name: str):
    """The TP function of the module that defines ``parallelize_fn`` (see :data:`TP_FUNCTIONS`).

    Raises:
        ValueError: that module has none (naming the model and the key).
    """
    module = sys.modules.get(getattr(parallelize_fn, "__module__", ""), None)
    for name in TP_FUNCTIONS:
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    raise ValueError(f"parallelism.tensor_parallel_degree > 1 with dualpipe_fx.enable applies the TP part of "
                     f"model.name = {model_name!r}'s parallelize_fn ({getattr(parallelize_fn, '__qualname__', parallelize_fn)}), "
                     f"a function named one of {TP_FUNCTIONS} in {getattr(module, '__name__', module)}, which has none; "
                     f"set parallelism.tensor_parallel_degree = 1 for this model")


def apply_titan_tp(model: nn.Module, parallelize_fn, tp_mesh, model_name: str) -> str:
    """Apply torchtitan's TP plan for ``model`` (module docstring) on ``tp_mesh``; its name.

    Raises:
        ValueError: no TP function for this model, or one whose parameters are not
            ``(model, tp_mesh, ...)`` plus keywords from :data:`_ARGS`.
    """
    fn = titan_tp_function(parallelize_fn, model_name)
    params = list(inspect.signature(fn).parameters)
    unknown = [p for p in params[2:] if p not in _ARGS]
    if unknown:
        raise ValueError(f"{fn.__module__}.{fn.__name__} takes {unknown}, which dualpipe_fx does not know how to "
                         f"set (it knows {sorted(_ARGS)}); set parallelism.tensor_parallel_degree = 1")
    tied = _tied(model)
    fn(model, tp_mesh, **{p: _ARGS[p] for p in params[2:]})
    _retie(model, tied)
    _check_all_placed(model, fn)
    return fn.__name__


def _check_all_placed(model: nn.Module, fn) -> None:
    """Every parameter is a DTensor after the plan. A plain one would run as a replica on each TP
    rank's local part of its input (a sequence shard) with a partial grad that nothing reduces:
    torchtitan's MoE layers, whose TP (``apply_moe_ep_tp``) is a separate function not applied here.

    Raises:
        ValueError: naming the first such parameters.
    """
    from torch.distributed.tensor import DTensor

    plain = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        raise ValueError(f"parallelism.tensor_parallel_degree > 1 with dualpipe_fx.enable: after {fn.__name__} "
                         f"{len(plain)} parameters are not tensor-parallel, e.g. {plain[:3]} (MoE layers: their TP "
                         f"is torchtitan's apply_moe_ep_tp, which dualpipe_fx does not apply yet); expected the "
                         f"plan to place every parameter. Fix: parallelism.tensor_parallel_degree = 1 for this "
                         f"model (MoE models: expert_parallel_degree shards the experts instead)")


def _tied(model: nn.Module) -> list[list[str]]:
    """FQNs that name one parameter (qwen3's ``enable_weight_tying``: embedding and head)."""
    by_id: dict[int, list[str]] = {}
    for fqn, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(fqn)
    return [fqns for fqns in by_id.values() if len(fqns) > 1]


def _retie(model: nn.Module, tied: list[list[str]]) -> None:
    """Tie again what ``parallelize_module`` untied: it distributes each module's parameter on
    its own, so a tied embedding and head become two DTensors (torchtitan ties them back in
    ``init_weights``; dualpipe_fx traces before that, so here). They must share placements.

    Raises:
        ValueError: the plan placed the tied FQNs differently.
    """
    for fqns in tied:
        params = [model.get_parameter(f) for f in fqns]
        first = params[0]
        layouts = {(tuple(getattr(p, "placements", ())), tuple(p.shape)) for p in params}
        if len(layouts) > 1:
            raise ValueError(f"the tensor-parallel plan places the tied parameters {fqns} differently "
                             f"({[getattr(p, 'placements', 'not a DTensor') for p in params]}); expected one "
                             f"placement for one tensor. Fix: disable weight tying in the model flavor, or set "
                             f"parallelism.tensor_parallel_degree = 1")
        for fqn in fqns[1:]:
            owner, _, leaf = fqn.rpartition(".")
            model.get_submodule(owner).register_parameter(leaf, first)
