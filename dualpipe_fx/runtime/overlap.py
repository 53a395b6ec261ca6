"""Overlapped F&B: run an FB action as one multiplexed graph (``passes.multiplex``).

**Contract**: ``executor.overlap = OverlapRunner()`` makes every FB action of the
executor run its forward and its backward (B, or I) as one graph whose collectives hide
under the other chunk's compute; the stages' states (saved values, hand-overs, sends,
``.grad``) end up exactly as after ``run_pair_sequentially``. ``run_overlapped`` is the
same for two bare ``StageGraphs``, outside the runtime.

**Pseudocode**
    gm = cache[(stage a, stage b, B or I)] or multiplex(F_a, I_b, W_b if B)
    b stage runs its backward with backward_input := (saved, grads) ->
        a stage runs its forward with forward := (params, inputs) ->
            gm(params, inputs, saved, grads) -> F results now, B results kept
        B results
    with W merged, backward_weight := the param grads gm already computed

The nesting reuses each stage's own input gathering and output hand-over, so the pair's
bookkeeping is the sequential one's. A stage whose graphs have no flat ``.gm`` (e.g.
compiled ones) falls back to F then B.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional, Sequence

import torch

from passes.multiplex import multiplex
from passes.stage_graphs import StageGraphs


def _grad_args(backward_input: Any, grad_outputs: Sequence) -> list:
    """The flat grad arguments ``backward_input.gm`` takes (as its own ``__call__`` builds them)."""
    grad_args = getattr(backward_input, "grad_args", None)
    return list(grad_outputs) if grad_args is None else grad_args(grad_outputs)


def can_multiplex(fwd: StageGraphs, bwd: StageGraphs) -> bool:
    """Whether the graphs are flat GraphModule callables that ``multiplex`` accepts."""
    return all(isinstance(getattr(g, "gm", None), torch.fx.GraphModule)
               for g in (fwd.forward, bwd.backward_input, bwd.backward_weight))


def build_pair(fwd: StageGraphs, bwd: StageGraphs, full_backward: bool) -> torch.fx.GraphModule:
    """The multiplexed graph of F of ``fwd`` and B (``full_backward``) or I of ``bwd``."""
    return multiplex(fwd.forward, bwd.backward_input, bwd.backward_weight if full_backward else None)


def run_pair_graph(gm: torch.fx.GraphModule, bwd: StageGraphs, fwd_args: tuple, bwd_args: tuple):
    """Call a multiplexed graph with the calling conventions' arguments.

    ``fwd_args = (params, inputs)``, ``bwd_args = (saved, grad_outputs)``. Returns
    ``((outputs, saved), (grad_inputs, saved_for_weight or param_grads))``.
    """
    info = gm.meta["dpfx_multiplex"]
    (params, inputs), (saved, grad_outputs) = fwd_args, bwd_args
    with torch.no_grad():
        flat = gm(*params, *inputs, *saved, *_grad_args(bwd.backward_input, grad_outputs))
    f_res, b_res = info.split_results(flat)
    n_out, n_gi = info.num_forward_outputs, info.num_grad_inputs
    return (f_res[:n_out], f_res[n_out:]), (b_res[:n_gi], b_res[n_gi:])


def run_overlapped(fwd_stage: StageGraphs, fwd_args: tuple, bwd_stage: StageGraphs, bwd_args: tuple,
                   *, full_backward: bool = True, on_ready: Optional[Callable] = None):
    """Run F of ``fwd_stage`` and B (or I) of ``bwd_stage`` as one overlapped graph.

    ``on_ready(kind, index, tensor)``, when given, sees each stage output (``"F"``) and
    each grad_input (``"B"``) as soon as it is computed, to start its send early.
    Returns ``((outputs, saved), (grad_inputs, param_grads or saved_for_weight))``.
    """
    gm = build_pair(fwd_stage, bwd_stage, full_backward)
    gm.send_hook.callback = on_ready
    try:
        return run_pair_graph(gm, bwd_stage, fwd_args, bwd_args)
    finally:
        gm.send_hook.callback = None


@contextlib.contextmanager
def _swapped(stage, **graphs):
    """Temporarily replace some of ``stage.graphs``' callables."""
    original = stage.graphs
    stage.graphs = dataclasses.replace(original, **graphs)
    try:
        yield
    finally:
        stage.graphs = original


class OverlapRunner:
    """``Executor.overlap`` that runs each F&B pair as one multiplexed graph (cached per pair)."""

    def __init__(self) -> None:
        self._graphs: dict[tuple[int, int, bool], Optional[torch.fx.GraphModule]] = {}

    def graph(self, fstage, bstage, full_backward: bool) -> Optional[torch.fx.GraphModule]:
        key = (fstage.place.stage, bstage.place.stage, full_backward)
        if key not in self._graphs:
            ok = can_multiplex(fstage.graphs, bstage.graphs) and fstage is not bstage
            self._graphs[key] = build_pair(fstage.graphs, bstage.graphs, full_backward) if ok else None
        return self._graphs[key]

    def __call__(self, executor, forward, backward) -> None:
        from dualpipe_fx.runtime.executor import run_pair_sequentially

        fstage, bstage = executor.stages[forward.stage], executor.stages[backward.stage]
        full = backward.kind == "B"
        gm = None if executor.forward_only else self.graph(fstage, bstage, full)
        if gm is None:
            run_pair_sequentially(executor, forward, backward)
            return
        original_bwd = bstage.graphs

        def backward_input(saved, grad_outputs):
            result = {}

            def forward_fn(params, inputs):
                f_res, result["b"] = run_pair_graph(gm, original_bwd, (params, inputs), (saved, grad_outputs))
                return f_res

            with _swapped(fstage, forward=forward_fn):
                executor.forward(forward.stage, forward.microbatch)
            return result["b"]

        weight = (lambda param_grads: tuple(param_grads)) if full else original_bwd.backward_weight
        with _swapped(bstage, backward_input=backward_input, backward_weight=weight):
            executor.backward(backward)
