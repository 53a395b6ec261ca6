"""Recompute on two ranks: DualPipeV steps with ``recompute="selective"`` and ``"full"`` give
the unsplit model's loss and grads.

The F&B pairs (multiplexed, summing grads in place) run the recomputing graphs; each case
also reports the bytes its stages save per micro-batch, which must fall below those of the
same stages without recompute. The compiled-stage path with ``"full"`` runs in the long tier:
torchtitan's ``compile.enable`` with full activation checkpointing (tests/titan/test_train.py).
"""
from __future__ import annotations

import pytest

from tests.runtime import cases
from tests.runtime.dist_harness import run_ranks
from tests.runtime.test_equivalence import check_step

C = 4
MODES = [("selective", False), ("full", False), (None, False)]


def recompute_steps(rank, world):
    import dualpipe_fx
    from passes.split_backward import saved_bytes

    out = {}
    for mode, compiled in MODES:
        pipe, x, y = cases._compile("llama", "dualpipev", C, compile_stages=compiled,
                                     memory=dualpipe_fx.MemoryPolicy(recompute=mode))
        for _ in range(2):  # the second step starts from zeroed grads, pairs sum in place
            pipe.zero_grad()
            loss = pipe.step(x, target=y)
        out[(mode, compiled)] = {
            "loss": None if loss is None else loss.item(), "grads": cases._grads(pipe),
            "saved": sum(saved_bytes(s.flat_graphs) for s in pipe.stages.values())}
    return out


@pytest.mark.timeout(900)
def test_recompute_modes_on_two_ranks_equal_one_process_and_save_less():
    results = run_ranks(recompute_steps, 2, timeout=800)
    for mode, compiled in MODES:
        check_step([{"dualpipev": r[(mode, compiled)]} for r in results], "llama", "dualpipev", C)
    for r in results:
        plain = r[(None, False)]["saved"]
        for mode, compiled in MODES[:-1]:
            assert r[(mode, compiled)]["saved"] < plain, (mode, compiled, r[(mode, compiled)]["saved"], plain)
