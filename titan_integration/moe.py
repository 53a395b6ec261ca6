"""torchtitan's MoE load balancing on a dualpipe_fx model part.

torchtitan's MoE models (deepseek_v3, llama4) balance experts without an auxiliary loss: each
MoE layer's forward adds its per-expert token counts to the buffer ``moe.tokens_per_expert``
(under no_grad), and an optimizer pre-step hook (``build_optimizers_with_moe_load_balancing``)
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
        here = [id(moe.tokens_per_expert) in local_ids, id(moe.expert_bias) in local_ids]
        if here == [True, True]:
            _expose(block, moe)
        elif any(here):
            raise ValueError(f"layers.{name}.moe: the pipeline cut separates expert_bias from "
                             f"tokens_per_expert (different ranks), which torchtitan's load-balancing "
                             f"hook updates together; set dualpipe_fx.split_points at block starts "
                             f"(layers.<i>)")
    part._modules["layers"] = blocks  # same children: state_dict keys unchanged


def _expose(block: nn.Module, moe: nn.Module) -> None:
    block.moe_enabled = True
    if not hasattr(block, "moe"):
        block.add_module("moe", nn.Module())
    block.moe.load_balance_coeff = moe.load_balance_coeff
    block.moe.register_buffer("tokens_per_expert", moe.tokens_per_expert, persistent=False)
    if "expert_bias" not in block.moe._buffers:
        block.moe.register_buffer("expert_bias", moe.expert_bias)
