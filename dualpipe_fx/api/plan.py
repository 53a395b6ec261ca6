"""``dualpipe_fx.plan``: the per-rank memory plan of a model before any process group exists.

It needs the cut ``compile`` makes (``split_for_program``), so it lives beside ``compile``;
the byte model itself (``planning.memory``) knows nothing of the API or the runtime.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from dualpipe_fx.api import options
from dualpipe_fx.api.split import split_for_program
from dualpipe_fx.api.options import MemoryPolicy
from dualpipe_fx.planning.memory import MemoryPlan, optimizer_bytes, split_plan
from dualpipe_fx.schedules.lowering import RECV_LOOKAHEAD
from dualpipe_fx.schedules.registry import generate


def plan(model: torch.nn.Module, loss_fn: Callable, example_inputs, example_target=None, *, ranks: int,
         num_microbatches: int, schedule: str = "dualpipev", device=None,
         example_kwargs: Optional[Mapping[str, Any]] = None, cost="flops",
         split_points: Optional[Sequence[str]] = None, memory: Optional[MemoryPolicy] = None,
         recv_lookahead: Optional[int] = None, mixed_precision=None, **deprecated) -> MemoryPlan:
    """Per-rank memory of ``dualpipe_fx.compile(model, ...)`` on ``ranks`` ranks, without any
    process group and without allocating the model.

    Args:
        model, loss_fn, example_inputs, example_target, example_kwargs: as ``compile``; ONE
            micro-batch. A model on meta is traced on fake tensors of ``device``.
        ranks, num_microbatches, schedule, cost, split_points, memory, mixed_precision: as
            ``compile``, whose cut this repeats (the same call to ``split``); ``memory.optimizer``
            (``"adamw"``, ``"adam"``, ``"sgd"``, ``"sgd_momentum"`` or bytes per parameter
            element) also sizes the optimizer state (see ``planning.memory``).
        device: where the stages would run (default cpu); it picks the kernels traced and
            the backend's receive look-ahead (cpu: gloo, ``schedules.lowering.RECV_LOOKAHEAD``;
            others: 0) unless ``recv_lookahead`` is given.
        **deprecated: ``recompute=``, ``balance=``, ``memory_budget=``, ``optimizer=`` as 0.1
            took them (``FutureWarning``; they go in 0.3).

    Returns:
        ``MemoryPlan`` with a ``RankMemory`` per rank.

    Raises:
        ValueError: the schedule does not fit ``ranks``/``num_microbatches``, or as ``split``.
    """
    memory = options.resolve("plan", deprecated, allowed=("memory",), memory=memory)["memory"]
    device = torch.device("cpu" if device is None else device)
    optimizer_bytes(memory.optimizer, 0, 0, 0)  # an unknown optimizer fails before the trace
    program = generate(schedule, ranks, num_microbatches)
    examples = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    parts = split_for_program(program, model, loss_fn, examples, example_target, cost=cost,
                              split_points=split_points, example_kwargs=example_kwargs, device=device,
                              memory=memory, mixed_precision=mixed_precision)
    lookahead = (RECV_LOOKAHEAD if device.type == "cpu" else 0) if recv_lookahead is None else recv_lookahead
    return split_plan(parts, program, optimizer=memory.optimizer, recv_lookahead=lookahead,
                      recompute=memory.recompute)
