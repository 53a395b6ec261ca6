"""Fixtures shared by the pass tests."""
from __future__ import annotations

import pytest

import dualpipe_fx
from dualpipe_fx.examples import LlamaDecoder, llama_batch, llama_loss


@pytest.fixture(scope="session")
def llama_recompute_splits():
    """The llama example split into 4 stages under None, "selective" and "full":
    ``(model, tokens, target, {mode: Split})``. balance="time": one cut for every mode (a
    memory-aware cut moves with what is saved), so that the modes' stages compare."""
    model, (tokens, target) = LlamaDecoder(), llama_batch()
    splits = {mode: dualpipe_fx.split(model, llama_loss, tokens, target, num_stages=4,
                                      memory=dualpipe_fx.MemoryPolicy(recompute=mode, balance="time"))
              for mode in (None, "selective", "full")}
    return model, tokens, target, splits
