"""Which step values a stage takes as external inputs, and how a step's batch splits into micro-batches."""
from __future__ import annotations

from typing import Any, Collection, Mapping

import torch

from passes.stage_graphs import StageGraphs


def external_values(graphs: StageGraphs, values: Mapping[str, Any]) -> tuple:
    """A stage's external inputs, picked by name from ``values``: ``input:i`` (positional model
    input ``i``), ``kwarg:name`` (a tensor keyword argument, see ``passes.model_call.ModelCall``)
    and ``target``."""
    return tuple(values[name] for name in graphs.external_inputs)


def micro_batches(values: Mapping[str, torch.Tensor], examples: Mapping[str, torch.Tensor],
                  shared_ok: Collection[str], num_microbatches: int) -> dict[str, tuple]:
    """Each step value split along dim 0 into ``num_microbatches`` micro-batches.

    A flex-attention BlockMask's tensor (``shared_ok``: ``ModelCall.mask_names``) whose step
    value has its example's shape is shared, not per-sample (a ``B=None`` mask's ``[1, H, ...]``
    block counts, a table its ``mask_mod`` reads): every micro-batch gets it whole
    (``passes.block_masks`` states the rule; ``errors.check_inputs`` has checked the shapes).
    """
    parts = {}
    for name, t in values.items():
        whole = name in shared_ok and tuple(t.shape) == tuple(examples[name].shape)
        parts[name] = (t,) * num_microbatches if whole else t.tensor_split(num_microbatches)
    return parts
