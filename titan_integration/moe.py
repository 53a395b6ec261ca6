"""torchtitan's MoE load balancing on a dualpipe_fx model part.

torchtitan's MoE models (deepseek_v3, llama4) balance experts without an auxiliary loss: each
MoE layer's forward adds its per-expert token counts to the buffer ``moe.tokens_per_expert``
(under no_grad; 0.3 names them ``tokens_per_expert_E`` and ``expert_bias_E``), and an optimizer pre-step hook (``build_optimizers_with_moe_load_balancing``)
moves ``moe.expert_bias`` by ``coeff * sign(mean - counts)`` and zeroes the counts. The hook
walks ``model_part.layers`` as an ``nn.ModuleDict`` of blocks with ``moe_enabled`` and ``moe``.

With dualpipe_fx the forward graphs write the counts into the rank's live buffer (the I/W
split keeps a forward's buffer writes as an in-place ``copy_`` at the end of F), and
:func:`expose_moe_load_balancing` gives the rank's model part the structure the hook reads,
holding the same live ``tokens_per_expert`` and ``expert_bias`` tensors the stage graphs read
and write. Each MoE layer lives on one pipeline rank and sees every micro-batch of the step,
so its counts, and the bias update, equal the unpipelined run's.
"""
from __future__ import annotations

from torch import nn


def _moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        return {}
    return {name: block for name, block in layers.items() if getattr(block, "moe_enabled", False)
            and getattr(block.moe, "load_balance_coeff", None) is not None}


def uses_moe_load_balancing(model: nn.Module) -> bool:
    """Whether ``model`` has torchtitan MoE layers with auxiliary-loss-free load balancing."""
    return bool(_moe_layers(model))


def expose_moe_load_balancing(part: nn.Module, model: nn.Module, local_ids: set[int]) -> None:
    """Give ``part`` (a ``StageLocalModel``) torchtitan's ``layers`` ModuleDict, with
    ``moe_enabled``, ``moe.load_balance_coeff`` and the live ``moe.tokens_per_expert`` /
    ``moe.expert_bias`` of the MoE layers this rank holds (``local_ids``: ids of the tensors
    its stage graphs read). A no-op for models without MoE load balancing.

    Raises:
        ValueError: a cut separates an MoE layer's ``expert_bias`` from its ``tokens_per_expert``.
    """
    balanced = _moe_layers(model)
    if not balanced:
        return
    held = getattr(part, "layers", None)
    blocks = nn.ModuleDict(dict(held.named_children()) if held is not None else {})
    for name, block in blocks.items():
        block.moe_enabled = False  # the hook reads it on every block
        if name not in balanced:
            continue
        moe = balanced[name].moe
        counts, bias = _buffer_names(moe)
        here = [id(getattr(moe, counts)) in local_ids, id(getattr(moe, bias)) in local_ids]
        if here == [True, True]:
            _expose(block, moe)
        elif any(here):
            raise ValueError(f"layers.{name}.moe: the pipeline cut separates expert_bias from "
                             f"tokens_per_expert (different ranks), which torchtitan's load-balancing "
                             f"hook updates together; set dualpipe_fx.split_points at block starts "
                             f"(layers.<i>)")
    part._modules["layers"] = blocks  # same children: state_dict keys unchanged


def _buffer_names(moe: nn.Module) -> tuple[str, str]:
    """The counts and bias buffers: 0.3 suffixes them with their shape (``tokens_per_expert_E``)."""
    if hasattr(moe, "tokens_per_expert_E"):
        return "tokens_per_expert_E", "expert_bias_E"
    return "tokens_per_expert", "expert_bias"


def _expose(block: nn.Module, moe: nn.Module) -> None:
    block.moe_enabled = True
    if not hasattr(block, "moe"):
        block.add_module("moe", nn.Module())
    counts, bias = _buffer_names(moe)
    block.moe.load_balance_coeff = moe.load_balance_coeff
    block.moe.register_buffer(counts, getattr(moe, counts), persistent=False)
    if bias not in block.moe._buffers:
        block.moe.register_buffer(bias, getattr(moe, bias))


def permute_indices(tokens_per_expert_group, experts_per_rank: int, num_ranks: int, max_len: int,
                    alignment: int, use_cpu: bool = False):
    """torchtitan's ``generate_permute_indices`` (``torchtitan.models.moe.kernels``) in tensor ops
    that trace: no ``.item()``, no Python loop over counts, no Triton launch; static output shape.

    ``tokens_per_expert_group`` [num_ranks * experts_per_rank]: rows arrive grouped by (source
    rank, local expert). Each local expert gets a block of ``m_sizes[e]`` slots (its tokens
    over all ranks, at least ``alignment``, rounded up to it), rank by rank; slot ``j`` reads row
    ``permuted[j]`` or ``-1`` (padding: the zero row torchtitan appends), truncated at
    ``max_len``. Returns ``(permuted int32 [max_len], m_sizes int32, m_offsets int32)``, equal to
    torchtitan's (``tests/titan/test_moe_permute.py``, against its CPU reference). ``use_cpu``
    is accepted and ignored (the same ops run on any device).
    """
    import torch

    del use_cpu
    counts = tokens_per_expert_group.to(torch.int64)
    start = torch.cumsum(counts, 0) - counts
    total = counts.view(num_ranks, experts_per_rank).sum(0)
    m_sizes = ((torch.clamp_min(total, alignment) + alignment - 1) // alignment * alignment).to(torch.int32)
    m_offsets = torch.cumsum(m_sizes.to(torch.int64), 0)
    write = m_offsets - m_sizes
    # segments in write order (local expert, then source rank): where they land, where they read, how many
    lengths = counts.view(num_ranks, experts_per_rank).t()
    seg_write = (write.view(-1, 1) + torch.cumsum(lengths, 1) - lengths).reshape(-1).contiguous()
    seg_read = start.view(num_ranks, experts_per_rank).t().reshape(-1)
    seg_len = lengths.reshape(-1)
    slot = torch.arange(max_len, dtype=torch.int64, device=counts.device)
    # the last segment starting at or before the slot (zero-length ones start where the next does)
    seg = (torch.searchsorted(seg_write, slot, right=True) - 1).clamp_min(0)
    offset = slot - seg_write[seg]
    inside = (offset >= 0) & (offset < seg_len[seg])
    permuted = torch.where(inside, seg_read[seg] + offset, torch.full_like(offset, -1)).to(torch.int32)
    return permuted, m_sizes, m_offsets.to(torch.int32)


def use_traceable_permute_indices() -> None:
    """torchtitan's MoE pads each expert's tokens for grouped GEMMs (``use_grouped_mm``: on GPU
    by default, qwen3's MoE everywhere) with ``generate_permute_indices``, a Triton kernel, or on
    CPU a loop over ``.item()`` values; neither traces. ``torchtitan.models.moe.utils`` calls
    :func:`permute_indices` instead (the same indices), for the dualpipe_fx stage graphs. A
    torchtitan without that module (0.3 routes tokens through ``models/common`` dispatchers)
    is left as it is."""
    import importlib

    try:
        utils = importlib.import_module("torchtitan.models.moe.utils")
    except ModuleNotFoundError:
        return
    utils.generate_permute_indices = permute_indices
