"""Which values of a captured graph carry a gradient.

A stage split out of the graph receives the values that cross its cut as inputs. The I/W
split makes every floating-point input require grad, which is right for the residual stream
but not for a float that no gradient reaches: an MoE router's ``histc`` counts (float, from a
non-differentiable op), then ``cumsum(counts, dtype=int32)``, which autograd refuses on a
tensor that requires grad. This pass says which values carry grad, so that such an input
stays a plain tensor (its grad is zeros, as for any input the loss does not reach).

**Contract**: ``grad_carrying(gm) -> frozenset[str]``: names of the nodes of ``gm`` (a
captured graph: placeholders with ``meta["dpfx_kind"]``, nodes with ``meta["val"]``) whose
value requires grad when the parameters do and the batch and buffers do not. Pure.

**Pseudocode**::

    carrying = {floating-point params}
    for each call node, in order:
        if none of its inputs carries: it does not
        else run its op once on fake tensors, the carrying inputs requiring grad (memoised by
        signature): it carries where its (selected) output requires grad
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from passes._compat import FakeTensorMode, tree_flatten
from passes.cost_model import _materialize, _signature

__all__ = ["grad_carrying"]


def _floating(val) -> bool:
    return isinstance(val, torch.Tensor) and (val.dtype.is_floating_point or val.dtype.is_complex)


def _output_flags(node: fx.Node, carrying: set[fx.Node]) -> tuple[bool, ...]:
    """requires_grad of each flat output of ``node`` run on fake tensors; carrying inputs need
    grad. An op the fake kernels or autograd refuse: outputs carry where they are floats."""
    try:
        args, kwargs = _materialize(node, real=False)
        fakes = tree_flatten((args, kwargs))[0]
        nodes = tree_flatten((node.args, node.kwargs))[0]
        for fake, arg in zip(fakes, nodes):
            if isinstance(fake, torch.Tensor) and _floating(fake) and arg in carrying:
                fake.requires_grad_(True)
        with torch.enable_grad():
            out = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - unknown: assume a gradient can flow
        return tuple(_floating(v) for v in tree_flatten(node.meta.get("val"))[0])
    return tuple(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_flatten(out)[0])


def grad_carrying(gm: fx.GraphModule) -> frozenset[str]:
    """See the module docstring."""
    carrying: set[fx.Node] = {n for n in gm.graph.nodes if n.op == "placeholder"
                              and n.meta.get("dpfx_kind") == "param" and _floating(n.meta.get("val"))}
    flags: dict[fx.Node, tuple[bool, ...]] = {}
    memo: dict[tuple, tuple[bool, ...]] = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        for node in gm.graph.nodes:
            if node.op not in ("call_function", "call_method") or not any(a in carrying for a in node.all_input_nodes):
                continue
            if node.target is operator.getitem and node.args[0] in flags and isinstance(node.args[1], int):
                parent = flags[node.args[0]]
                if node.args[1] < len(parent) and parent[node.args[1]]:
                    carrying.add(node)
                continue
            mask = tuple(a in carrying for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node))
            key = (_signature(node), mask)
            if key not in memo:
                memo[key] = _output_flags(node, carrying)
            flags[node] = memo[key]
            if any(memo[key]):  # a multi-output op: its getitems pick their own flag
                carrying.add(node)
    return frozenset(n.name for n in carrying)

