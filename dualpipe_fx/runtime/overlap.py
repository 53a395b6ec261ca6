"""Overlapped F&B: run an FB action as one multiplexed graph (``passes.multiplex``).

**Contract**: ``executor.overlap = OverlapRunner()`` makes every FB action of the
executor run its forward and its backward (B, or I) as one graph whose collectives hide
under the other chunk's compute; the stages' states (saved values, hand-overs, sends,
``.grad``) end up exactly as after ``run_pair_sequentially``. ``run_overlapped`` is the
same for two bare ``StageGraphs``, outside the runtime.

**Pseudocode**
    gm = cache[(stage a, stage b, B or I, accumulate)] or multiplex(F_a, I_b, W_b if B)
         (B: accumulate_grads(gm) sums the param grads into .grad in place, a missing
          .grad zeroed first, so the first micro-batch's grads are no second copy)
    b stage runs its backward with backward_input := (saved, grads) ->
        a stage runs its forward with forward := (params, inputs) ->
            gm(params, inputs, saved, grads) -> F results now, B results kept
        B results
    with W merged, backward_weight := the param grads gm already computed

The nesting reuses each stage's own input gathering and output hand-over, so the pair's
bookkeeping is the sequential one's. The merged graph is built from the stages'
uncompiled ``flat_graphs`` (and compiled itself when the stages are). While it runs, its
send hooks hand each stage output and grad_input to the stage, which starts the send at
once (gloo; see ``GraphStage.send_early``); torch's SEND_F/SEND_B then skip what is sent.
Only a stage without flat graphs, or a pair on one stage, runs F then B.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional, Sequence

import torch

from passes.accumulate_grads import accumulate_grads, accumulated_positions
from passes.multiplex import drop_send_hooks, multiplex
from passes.split_backward import compile_graph
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


def run_pair_graph(gm: torch.fx.GraphModule, bwd: StageGraphs, fwd_args: tuple, bwd_args: tuple,
                   extra: Sequence[torch.Tensor] = (), fn: Optional[Callable] = None):
    """Call a multiplexed graph with the calling conventions' arguments.

    ``fwd_args = (params, inputs)``, ``bwd_args = (saved, grad_outputs)``; ``extra``
    trails them (an ``accumulate_grads`` graph's accumulators); ``fn`` runs instead of
    ``gm`` (its compiled form). Returns
    ``((outputs, saved), (grad_inputs, saved_for_weight or param_grads))``.
    """
    info = gm.meta["dpfx_multiplex"]
    (params, inputs), (saved, grad_outputs) = fwd_args, bwd_args
    with torch.no_grad():
        grads = _grad_args(bwd.backward_input, grad_outputs)
        flat = (gm if fn is None else fn)(*params, *inputs, *saved, *grads, *extra)
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


class _ParamGrads(tuple):
    """A full-backward pair's param grads, handed to ``GraphStage.run_backward_weight`` as W's
    saved values; ``shared``: the tensors they may alias (a grad that is one of them is copied
    before it becomes a ``.grad``, which later micro-batches sum into)."""

    shared: tuple = ()

    def __new__(cls, grads, shared):
        self = super().__new__(cls, grads)
        self.shared = tuple(shared)
        return self


@dataclasses.dataclass(frozen=True)
class _Pair:
    """One F&B pair's multiplexed graph, and what runs it (the graph, or its compiled form)."""

    gm: torch.fx.GraphModule
    run: Callable
    grads_at: int  # where the backward's param grads start in the flat results (full B)


class OverlapRunner:
    """``Executor.overlap`` that runs each F&B pair as one multiplexed graph (cached per pair).

    ``compile_graphs``: run each merged graph through ``torch.compile`` (the stages are
    compiled); its ``send_hook`` calls stay eager, so the compiled segments run between
    them, and the hooks that could never send (``GraphStage.sends_early``: NCCL, a
    same-rank hand-over, no peer) are dropped first, so that those breaks are not paid.
    A full-backward pair runs the ``accumulate_grads`` form of its graph: the weight GEMMs
    sum into ``.grad`` in place (``GraphStage.grad_buffers`` zeroes a missing one).
    Each stage output and grad_input is handed to the stage's ``send_early`` the moment
    the graph makes it; the stage starts the send when its backend allows (gloo).
    """

    def __init__(self, compile_graphs: bool = False) -> None:
        self.compile_graphs = compile_graphs
        self._graphs: dict[tuple[int, int, bool, bool], Optional[_Pair]] = {}

    def pair(self, fstage, bstage, full_backward: bool, accumulate: bool = False) -> Optional[_Pair]:
        key = (fstage.place.stage, bstage.place.stage, full_backward, accumulate)
        if key not in self._graphs:
            self._graphs[key] = self._build(fstage, bstage, full_backward, accumulate)
        return self._graphs[key]

    def _build(self, fstage, bstage, full_backward: bool, accumulate: bool) -> Optional[_Pair]:
        fwd, bwd = fstage.flat_graphs, bstage.flat_graphs
        if fstage is bstage or not can_multiplex(fwd, bwd):
            return None
        gm = build_pair(fwd, bwd, full_backward)
        info = gm.meta["dpfx_multiplex"]
        grads_at = info.num_forward_results + info.num_grad_inputs
        if accumulate:
            gm = accumulate_grads(gm, range(grads_at, grads_at + bstage.num_params), opaque=self.compile_graphs,
                                  cast=[grads_at + i for i in bstage.cast_positions()])
        if self.compile_graphs:  # a send hook is a graph break: keep only those that can send
            never = [kind for kind, stage in (("F", fstage), ("B", bstage)) if not stage.sends_early(kind)]
            gm = drop_send_hooks(gm, never) if never else gm
        run = compile_graph(gm) if self.compile_graphs else gm
        return _Pair(gm, run, grads_at)

    def _accumulating(self, fstage, bstage) -> tuple[Optional[_Pair], Sequence[torch.Tensor]]:
        """The accumulating pair and its accumulators, when ``bstage`` holds every grad."""
        acc = self.pair(fstage, bstage, True, accumulate=True)
        if acc is None:
            return None, ()
        buffers = bstage.grad_buffers([p - acc.grads_at for p in accumulated_positions(acc.gm)])
        return (acc, buffers) if buffers is not None else (None, ())

    def __call__(self, executor, forward, backward) -> None:
        from dualpipe_fx.runtime.executor import run_pair_sequentially

        fstage, bstage = executor.stages[forward.stage], executor.stages[backward.stage]
        full = backward.kind == "B"
        pair = None if executor.forward_only else self.pair(fstage, bstage, full)
        if pair is None:
            run_pair_sequentially(executor, forward, backward)
            return
        extra: Sequence[torch.Tensor] = ()
        if full:
            acc, extra = self._accumulating(fstage, bstage)
            pair = acc or pair
        original_bwd = bstage.flat_graphs

        def on_ready(kind: str, index: int, tensor: torch.Tensor) -> None:
            if kind == "F":
                fstage.send_early("F", forward.microbatch, index, tensor)
            else:
                bstage.send_early("B", backward.microbatch, index, tensor)

        def backward_input(saved, grad_outputs):
            result = {}

            def forward_fn(params, inputs):
                f_res, result["b"] = run_pair_graph(pair.gm, original_bwd, (params, inputs),
                                                    (saved, grad_outputs), extra, pair.run)
                return f_res

            with _swapped(fstage, forward=forward_fn):
                executor.forward(forward.stage, forward.microbatch)
            grad_inputs, rest = result["b"]
            if not full:
                return grad_inputs, rest
            # rest: the param grads, which the stage's W step takes as its saved_w; what they may
            # share storage with is what the pair read and kept, not the grads themselves
            return grad_inputs, _ParamGrads(rest, (*saved, *grad_outputs, *grad_inputs))

        # full: the param grads came out of the pair (summed into .grad already when accumulating)
        weight = (lambda param_grads: tuple(param_grads)) if full else bstage.graphs.backward_weight
        pair.gm.send_hook.callback = on_ready
        try:
            with _swapped(bstage, backward_input=backward_input, backward_weight=weight):
                executor.backward(backward)
        finally:
            pair.gm.send_hook.callback = None
