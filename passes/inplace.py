"""In-place writes into the captured graph's params, buffers or inputs.

``mutated_base(node)``: the placeholder an in-place op writes into through views, if any
(``split_backward`` uses it too). ``check_inplace(graph)`` refuses writes into parameters
and inputs, naming the tensor, the op and the module: a pipelined step cannot keep them
(a parameter's value is what the optimizer steps; an input is the user's batch).

Writes into buffers are kept: BatchNorm's ``num_batches_tracked.add_(1)`` and running
statistics in train mode, an MoE's token counts. ``split_backward`` traces them
functionally and the stage's F graph writes each new value back into the live buffer
(``copy_``) once per micro-batch, so the buffer sees the micro-batches in the order the
rank runs that stage's forwards: micro-batch order, as eager micro-batching.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx

from passes.trace_error import TraceError


def mutated_base(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The placeholder an in-place op of ``node`` writes into (through views), if any."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return None
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        while isinstance(value, torch.fx.Node) and value.op == "call_function" and \
                getattr(value.target, "is_view", False):
            value = value.args[0]
        if isinstance(value, torch.fx.Node) and value.op == "placeholder":
            return value
    return None


def updating_batch_norms(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The BatchNorm layers (by FQN) whose forward writes their running statistics: train mode
    with ``track_running_stats``."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats}


def check_inplace(graph: torch.fx.Graph) -> None:
    """Reject in-place writes into params or inputs (export keeps them as ops); buffer
    writes are kept (see the module docstring)."""
    for node in graph.nodes:
        base = mutated_base(node)
        if base is None or base.meta.get("dpfx_kind") == "buffer":
            continue
        what = f"{base.meta.get('dpfx_kind', 'graph input')} {base.meta.get('dpfx_name', base.name)!r}"
        where = node.meta.get("dpfx_module") or "top-level code"
        raise TraceError(
            f"{what} is written in place by {node.target} in module {where!r}; expected forward() to "
            "leave parameters and inputs unchanged (buffers may be written). Fix: clone the tensor "
            "before writing into it, or keep the state in a buffer (register_buffer)."
        )
