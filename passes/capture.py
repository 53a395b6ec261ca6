"""Capture: a model and its loss become one flat ATen-level FX graph with lifted params.

The graph is what ``torch.export.export(..., strict=False)`` produces for
``(loss, *model_outputs) = loss_fn(model(*args, **kwargs), target)``, post-processed so that
the later passes can rely on a few annotations (see :func:`capture`). The tensors among
``args`` and ``kwargs`` are the graph's inputs, and so are a flex-attention ``BlockMask``'s
tensors and those its ``mask_mod`` closes over (``passes.block_masks``); every other keyword
value (``use_cache=False``, ``None``) is a constant baked into the graph (:class:`ModelCall`). The model output may be
any pytree (dict, tuple, dataclass, ``transformers`` ``ModelOutput``): its tensor leaves are
graph outputs, the rest is kept as traced (:class:`OutputLayout`).

Custom ``torch.autograd.Function`` calls are recorded as atomic *regions*: export inlines
``Function.forward`` and forgets the user's ``backward``; we tag the inlined nodes so that
``split_backward`` can call the Function again and make the user's own backward run.

The steps live in their own modules: ``model_call`` (the call and output templates),
``export`` (torch.export of model + loss, on fake tensors when needed), ``regions`` (custom
Function and checkpoint regions), ``inplace`` (in-place writes refused), ``trace_error``
(``TraceError`` naming the user's source line); this module post-processes the exported
graph into :class:`Captured`.

Buffers written in forward (BatchNorm's running statistics in train mode, an MoE's token
counts) stay in-place ops of the graph (``passes.inplace``); writes into parameters or
inputs raise :class:`TraceError` naming the tensor.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.fx
from torch import nn

from passes.export import export_with_loss, fake_device, held
from passes.inplace import check_inplace, updating_batch_norms
from passes.model_call import ModelCall, OutputLayout, as_inputs, as_kwargs
from passes.regions import RegionInfo, collect_regions
from passes.trace_error import TraceError

__all__ = ["Captured", "TraceError", "capture"]


@dataclass(frozen=True)
class Captured:
    """The result of :func:`capture`; see its docstring for the graph's annotations."""

    gm: torch.fx.GraphModule
    param_names: tuple[str, ...]
    buffer_names: tuple[str, ...]
    num_inputs: int
    has_target: bool
    regions: Mapping[int, RegionInfo]
    param_aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    output_spec: Any = None
    num_model_outputs: int = 0
    call: Optional[ModelCall] = None
    output_layout: Optional[OutputLayout] = None


def _check_loss_needs_no_target(loss_fn: Callable) -> None:
    """``example_target=None`` calls ``loss_fn(output)``: refuse a loss that needs a target."""
    try:
        params = list(inspect.signature(loss_fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: let the trace tell
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) >= 2:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise ValueError(
            f"example_target=None, but loss_fn {name}{inspect.signature(loss_fn)} takes a target "
            f"({required[1].name!r}); expected one micro-batch of targets. Fix: pass example_target= "
            f"(and target= to step()), or a loss_fn(output) of one argument")


def _strip(fqn: str) -> str:
    assert fqn == "model" or fqn.startswith("model."), fqn
    return fqn[len("model."):] if fqn != "model" else ""


def _check_mutations(ep) -> None:
    sig = ep.graph_signature
    if sig.buffers_to_mutate:
        names = sorted(_strip(b) for b in sig.buffers_to_mutate.values())
        raise TraceError(
            f"buffers {names} are updated in forward (e.g. BatchNorm running stats); "
            "expected no buffer mutation. Fix: put those modules in eval() mode or use "
            "track_running_stats=False."
        )
    if sig.user_inputs_to_mutate:
        raise TraceError(
            f"forward mutates its inputs {sorted(sig.user_inputs_to_mutate.values())} in "
            "place; expected pure inputs. Fix: clone an input before writing into it."
        )


def _check_cumulative_batch_norms(model: nn.Module) -> None:
    """BatchNorm with ``momentum=None`` in train mode divides by ``float(num_batches_tracked)``:
    a Python number read off a tensor, which no static graph holds."""
    names = [name for name, m in updating_batch_norms(model).items() if m.momentum is None]
    if names:
        raise TraceError(
            f"BatchNorm {', '.join(map(repr, names))} in train mode with momentum=None (a cumulative average) "
            "reads float(num_batches_tracked) in Python, which a traced graph cannot hold; expected a "
            "momentum. Fix: set momentum (e.g. 0.1, the default), or put the layer in eval() mode")


def _canonical_names(model: nn.Module) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """FQN -> first FQN of the same tensor, and first FQN -> its aliases (tied weights)."""
    first: dict[int, str] = {}
    canon: dict[str, str] = {}
    aliases: dict[str, list[str]] = {}
    named = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        root = first.setdefault(id(t), name)
        canon[name] = root
        if root != name:
            aliases.setdefault(root, []).append(name)
    return canon, {k: tuple(v) for k, v in aliases.items()}


def _lift_placeholders(gm, ep, model, input_names: Sequence[str]):
    """Annotate placeholders, merge tied ones, turn lifted constants into get_attr."""
    canon, aliases = _canonical_names(model)
    kinds = {s.arg.name: s for s in ep.graph_signature.input_specs}
    graph = gm.graph
    params, buffers, by_name, user_i = [], [], {}, 0
    first_non_ph = next(n for n in graph.nodes if n.op != "placeholder")
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        spec = kinds[node.name]
        kind = spec.kind.name
        if kind in ("PARAMETER", "BUFFER"):
            fqn = canon.get(_strip(spec.target), _strip(spec.target))
            if fqn in by_name:  # tied: one placeholder for all aliases
                node.replace_all_uses_with(by_name[fqn])
                graph.erase_node(node)
                continue
            by_name[fqn] = node
            node.meta["dpfx_kind"] = "param" if kind == "PARAMETER" else "buffer"
            node.meta["dpfx_name"] = fqn
            (params if kind == "PARAMETER" else buffers).append(fqn)
        elif kind == "CONSTANT_TENSOR":
            _constant_to_get_attr(gm, node, ep.constants[spec.target], first_non_ph)
        elif kind == "USER_INPUT":  # the model's tensor inputs in ModelCall order, then the target
            is_target = user_i == len(input_names)
            node.meta["dpfx_kind"] = "target" if is_target else "input"
            node.meta["dpfx_name"] = "target" if is_target else input_names[user_i]
            user_i += 1
        else:
            raise TraceError(f"unsupported graph input kind {kind} for {node.name}; "
                             "expected parameters, buffers and tensor inputs only")
    used_aliases = {k: v for k, v in aliases.items() if k in by_name}
    return tuple(params), tuple(buffers), used_aliases


def _constant_to_get_attr(gm, node, value, before_node):
    attr = f"_dpfx_const_{node.name}"
    gm.register_buffer(attr, value.detach().clone() if isinstance(value, torch.Tensor) else value,
                       persistent=False)
    with gm.graph.inserting_before(before_node):
        new = gm.graph.get_attr(attr)
    new.meta.update(node.meta)
    new.meta["dpfx_module"] = ""
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _annotate_modules(graph: torch.fx.Graph) -> None:
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        node.meta["dpfx_module"] = _strip(path) if path.startswith("model") else ""
        # make_fx copies meta["custom"] onto the nodes a node becomes when re-traced under
        # torch.fx.traceback.preserve_node_meta (split_backward's joint trace)
        node.meta["custom"] = {**node.meta.get("custom", {}), "dpfx_module": node.meta["dpfx_module"],
                               "dpfx_recompute": bool(node.meta.get("dpfx_recompute"))}


def _check_outputs(gm: torch.fx.GraphModule) -> int:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    values = out.args[0]
    loss = values[0].meta.get("val") if isinstance(values[0], torch.fx.Node) else values[0]
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.dtype.is_floating_point:
        desc = f"shape {tuple(loss.shape)} {loss.dtype}" if isinstance(loss, torch.Tensor) else repr(loss)
        raise TypeError(f"loss_fn must return a scalar floating tensor, got {desc}. Fix: "
                        "reduce the loss (e.g. reduction='mean').")
    for v in values[1:]:
        if not (isinstance(v, torch.fx.Node) and isinstance(v.meta.get("val"), torch.Tensor)):
            raise TypeError(f"model outputs must be tensors (in any pytree), got {v!r}")
    return len(values) - 1


def capture(model: nn.Module, loss_fn: Callable, example_inputs, example_target=None, *,
            example_kwargs: Optional[Mapping[str, Any]] = None, device=None, mixed_precision=None) -> Captured:
    """Trace ``loss_fn(model(*args, **kwargs), target)`` into one ATen-level FX graph.

    **Contract**: ``(model, loss_fn, example micro-batch) -> Captured`` whose ``gm`` maps
    ``(*params, *buffers, *inputs[, target]) -> (loss, *model_outputs)``: ``inputs`` are the
    tensors of ``args`` then of ``kwargs`` (``Captured.call``), ``model_outputs`` the tensor
    leaves of the model's output (``Captured.output_layout`` rebuilds it). Placeholders carry
    ``meta["dpfx_kind"]`` (param/buffer/input/target) and ``meta["dpfx_name"]`` (FQN,
    ``input:i``, ``kwarg:name`` or ``target``); tied params are one placeholder (first FQN;
    the rest in ``param_aliases``). Every node has ``meta["val"]``; call nodes ``meta["dpfx_module"]``
    (innermost module FQN, ``""`` for top-level code and the loss). Nodes of a custom
    ``autograd.Function`` call carry ``meta["dpfx_region"]`` (+ ``dpfx_region_spec``, and
    ``dpfx_region_input``/``dpfx_region_output`` on entry/exit nodes).

    **Pseudocode**::

        wrap model+loss (non-tensor kwargs as constants); patch Function.apply to tag regions
        anything on meta: params, buffers and inputs become fake tensors of `device` for the trace
        ep = torch.export.export(wrapper, (*tensor_inputs, target), strict=False)
        reject buffer/input mutation; merge tied params; constants -> get_attr
        annotate placeholders, module FQNs, regions; lint; recompile

    Args:
        model: any ``nn.Module`` traceable by ``torch.export(strict=False)``.
        loss_fn: ``loss_fn(output, target)`` (or ``loss_fn(output)`` without a target),
            returning a scalar; ``output`` is the model's own output (dict, dataclass, ...).
        example_inputs: a tensor or tuple of tensors, one micro-batch (may be empty).
        example_target: the target tensor, or None.
        example_kwargs: keyword arguments of the model: tensors (or pytrees of tensors) are
            graph inputs like ``example_inputs``; anything else is a constant of the graph.
        device: where the graphs will run. Needed when the model (built under
            ``torch.device("meta")``) or an example is on meta: the trace then runs on fake
            tensors of ``device``, so it records that device's kernels (CPU SDPA stays
            ``_scaled_dot_product_flash_attention_for_cpu``, not meta's bmm + softmax), and
            ``meta["val"]`` is on ``device``. The model is left as it was.
        mixed_precision: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (or None): the
            trace runs on fake tensors with the floating-point parameters in its
            ``param_dtype`` (their placeholders, and so the activations, in that dtype),
            floating-point model inputs cast to it (``cast_forward_inputs``) and outputs to
            ``output_dtype``, as FSDP2's ``fully_shard(model, mp_policy=...)`` computes.

    Returns:
        :class:`Captured`.

    Raises:
        TraceError: the model cannot be traced (the message names the user's source line
            and suggests a fix), or mutates buffers/inputs in forward.
        TypeError: non-tensor positional inputs, non-scalar loss.
        ValueError: a tensor on meta and ``device=None``.
    """
    _check_cumulative_batch_norms(model)
    inputs, kwargs = as_inputs(example_inputs), as_kwargs(example_kwargs)
    if example_target is None:
        _check_loss_needs_no_target(loss_fn)
    call = ModelCall.of(inputs, kwargs)
    found = call.values(inputs, kwargs, "capture()", "")
    # flex_attention traces its mask_mod through Dynamo, which makes a view's storage size
    # symbolic and then fails to trace it: the mask's tensors are traced as fresh tensors.
    found = {n: t.clone() if n in call.mask_names else t for n, t in found.items()}
    fake_on = fake_device(model, [*found.items(), ("target", example_target)], device)
    if fake_on is None and getattr(mixed_precision, "param_dtype", None) is not None:
        # parameters in param_dtype: fake copies of them, the model's own stay as they are
        fake_on = torch.device(device) if device is not None else next(
            (t.device for _, t in held(model)), torch.device("cpu"))
    ep, layout = export_with_loss(model, loss_fn, call, [found[n] for n in call.names], example_target, fake_on,
                         mixed_precision)
    _check_mutations(ep)
    gm = ep.graph_module
    params, buffers, aliases = _lift_placeholders(gm, ep, model, call.names)
    _annotate_modules(gm.graph)
    check_inplace(gm.graph)
    regions = collect_regions(gm.graph)
    num_outputs = _check_outputs(gm)
    gm.graph.lint()
    gm.recompile()
    return Captured(
        gm=gm, param_names=params, buffer_names=buffers, num_inputs=len(call.names),
        has_target=example_target is not None, regions=MappingProxyType(regions),
        param_aliases=MappingProxyType(aliases), output_spec=layout.spec,
        num_model_outputs=num_outputs, call=call, output_layout=layout,
    )
