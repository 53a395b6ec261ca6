"""recompute: which forward values a stage's backward recomputes instead of saving.

``split_backward`` partitions a stage's joint graph into F, I and W. Without recompute
every F value that I or W reads is saved from F to I. With a policy, an F value whose
node the policy marks ``"recompute"`` is computed again at the start of I (from saved
values and the stage's inputs and parameters), and only the values the recomputation
starts from are saved. What I keeps for W (``saved_for_weight``) is a minimum cut
(``passes.weight_inputs``): W recomputes, from fewer kept bytes, the forward values the
policy drops where that keeps less alive from I to W (which DualPipeV defers); otherwise
it reads them from I. Each value is recomputed at most once in I and once in W.

Policies (``split_backward(..., recompute=...)``):

- ``None``: save everything, except nodes in ``torch.utils.checkpoint(...,
  use_reentrant=False)`` regions of the model (``capture`` marks them), which recompute.
- ``"full"``: recompute every forward node; F saves the stage inputs and parameters only.
- ``"selective"``: save the outputs of matmul-class ops and attention (SDPA and flex
  attention: the expensive ones) and attention's inputs, recompute the rest (norms, activations, pointwise,
  views), as torchtitan's op-level selective activation checkpointing does.
- a callable ``policy(node) -> "save" | "recompute"``: ``node`` is a node of the stage's
  post-autograd ATen joint graph (``node.target`` an ATen op; ``node.meta["dpfx_module"]``
  the FQN of the module that made it, when known).

Whatever the policy: random ops (dropout), functional collectives and their waits are
always saved, since recomputing them would draw other numbers or communicate again.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional, Union

import torch
from torch.fx import Node

from passes import _compat

__all__ = ["Policy", "SELECTIVE_SAVE", "recompute_policy", "recomputed", "selective"]

Policy = Union[None, str, Callable[[Node], str]]

_aten = torch.ops.aten

_ATTENTION = frozenset({
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._flash_attention_forward.default,
    _aten._efficient_attention_forward.default,
})

# Outputs torchtitan's op-level selective AC saves: matmuls and attention (flex included).
SELECTIVE_SAVE = frozenset({
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten.convolution.default, _aten._grouped_mm.default,
}) | _ATTENTION | {_compat.FLEX_ATTENTION}


def _never_recomputed(node: Node) -> bool:
    target = node.target
    if target is _compat.FLEX_ATTENTION:
        return False  # a pure function of q, k, v, the mask's tensors and its mask_mod's inputs
    if not isinstance(target, torch._ops.OpOverload):
        return True  # other higher-order ops, Python callables: keep what they made
    if torch.Tag.nondeterministic_seeded in target.tags:
        return True  # dropout, rand: a second call draws other numbers
    return _compat.is_functional_collective(node) or _compat.is_functional_wait(node)


def _full(node: Node) -> str:
    return "recompute"


def _selective(node: Node) -> str:
    # Attention's inputs too: its backward reads q, k, v, and recomputing them redoes RoPE's
    # strided multiplies from the saved projections (benchmarks/recompute.py: 1.08-1.16x
    # step time -> 1.02-1.07x, the same saved bytes, as the projections are then not saved)
    feeds_attention = any(user.target in _ATTENTION or user.target is _compat.FLEX_ATTENTION
                          for user in node.users)
    return "save" if node.target in SELECTIVE_SAVE or feeds_attention else "recompute"


def selective(node: Node) -> str:
    """The ``"selective"`` policy's answer for ``node``, for policies that refine it."""
    return _selective(node)


def recompute_policy(recompute: Policy) -> Callable[[Node], bool]:
    """``recompute`` as ``wants(node) -> True`` for a forward node to recompute.

    Raises:
        ValueError: an unknown policy name.
        TypeError: a callable that answers other than ``"save"``/``"recompute"``.
    """
    if recompute is None:
        base: Optional[Callable[[Node], str]] = None
    elif callable(recompute):
        base = recompute
    elif recompute in ("full", "selective"):
        base = _full if recompute == "full" else _selective
    else:
        raise ValueError(f"recompute={recompute!r}; expected None, 'full', 'selective' or a callable "
                         "policy(node) -> 'save' | 'recompute'")

    def wants(node: Node) -> bool:
        if _never_recomputed(node):
            return False
        if node.meta.get("dpfx_recompute"):  # a torch.utils.checkpoint region of the model
            return True
        if base is None:
            return False
        answer = base(node)
        if answer not in ("save", "recompute"):
            raise TypeError(f"recompute policy returned {answer!r} for {node.format_node()}; "
                            "expected 'save' or 'recompute'")
        return answer == "recompute"

    return wants


def _source(node: Node) -> Node:
    """The node whose decision a node follows: a getitem follows its tuple's producer."""
    while node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]
    return node


def recomputed(needed: list[Node], is_forward: Callable[[Node], bool],
               wants: Callable[[Node], bool]) -> set[Node]:
    """The forward nodes to recompute so that every node in ``needed`` is available in I.

    Starting from the forward values the backward reads, a value is recomputed when the
    policy wants its producer recomputed; then the values that producer reads are needed
    in turn. Values not recomputed are saved. A getitem is recomputed with its tuple.
    """
    chosen: set[Node] = set()
    stack = [n for n in needed if is_forward(n)]
    while stack:
        node = stack.pop()
        if node in chosen or node.op != "call_function" or not wants(_source(node)):
            continue
        chosen.add(node)
        src = _source(node)
        if src is not node:
            chosen.add(src)
        stack.extend(a for a in src.all_input_nodes if is_forward(a))
        # a getitem of a getitem (nested tuples) needs the inner getitem recomputed too
        stack.extend(a for a in node.all_input_nodes if is_forward(a))
    return chosen
