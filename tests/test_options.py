"""compile()/split()/plan() option groups: ``Parallelism`` and ``MemoryPolicy``, and the 0.1
keywords they replace (still accepted with a ``FutureWarning``; refused beside their group).

Rebuilds: a split made with ``memory=MemoryPolicy(...)`` is the split made with the 0.1
keywords (same cut, same saved bytes), and ``plan()`` likewise.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import dualpipe_fx
from dualpipe_fx.api import options
from dualpipe_fx.examples import LinearGeluStack, linear_gelu_batch, mse_loss
from passes.split_backward import saved_bytes


def test_resolve_folds_the_0_1_keywords_into_their_groups_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = options.resolve("compile", {"memory_budget": 2**30, "dp_mode": "shard", "recompute": "full"})
    assert [(w.category, str(w.message)) for w in caught] == [(FutureWarning, (
        f"compile({old}=...) is deprecated since dualpipe_fx 0.2 and goes in 0.3; pass "
        f"{group}=dualpipe_fx.{cls}({new}=...) instead")) for old, group, cls, new in (
        ("memory_budget", "memory", "MemoryPolicy", "budget"), ("dp_mode", "parallelism", "Parallelism", "dp_mode"),
        ("recompute", "memory", "MemoryPolicy", "recompute"))]
    assert got["memory"] == dualpipe_fx.MemoryPolicy(recompute="full", budget=2**30)
    assert got["parallelism"] == dualpipe_fx.Parallelism(dp_mode="shard")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        assert options.resolve("compile", {}) == {"parallelism": dualpipe_fx.Parallelism(),
                                                  "memory": dualpipe_fx.MemoryPolicy()}


@pytest.mark.parametrize("call, error, match", [
    (dict(fn="split", legacy={"dp_group": None}, allowed=("memory",)), TypeError,
     r"split\(\) got an unexpected keyword argument 'dp_group'"),
    (dict(fn="compile", legacy={"recompte": "full"}), TypeError,
     r"compile\(\) got an unexpected keyword argument 'recompte'"),
    (dict(fn="compile", legacy={"balance": "time"}, memory=dualpipe_fx.MemoryPolicy()), ValueError,
     r"compile\(balance=\.\.\., memory=\.\.\.\): balance is a field of memory; expected one of them\. "
     r"Fix: memory=MemoryPolicy\(\.\.\., balance='time'\)"),
    (dict(fn="compile", legacy={}, memory="full"), TypeError,
     r"compile\(memory='full'\): expected a dualpipe_fx\.MemoryPolicy or None"),
])
def test_misuse_is_named(call, error, match):
    fn, legacy = call.pop("fn"), call.pop("legacy")
    with pytest.raises(error, match=match):
        options.resolve(fn, legacy, **call)


def test_split_and_plan_with_memory_policy_equal_the_0_1_keywords():
    model, (x, y) = LinearGeluStack(depth=8, width=16, seed=0), linear_gelu_batch(16, batch=4, seed=1)
    policy = dualpipe_fx.MemoryPolicy(recompute="selective", balance="time", optimizer="sgd")
    new = dualpipe_fx.split(model, mse_loss, (x,), y, num_stages=4, memory=policy)
    with pytest.warns(FutureWarning):
        old = dualpipe_fx.split(model, mse_loss, (x,), y, num_stages=4, recompute="selective", balance="time",
                                optimizer="sgd")
    assert new.partition.param_stages == old.partition.param_stages and new.partition.costs == old.partition.costs
    assert [saved_bytes(s) for s in new.stages] == [saved_bytes(s) for s in old.stages]
    got = dualpipe_fx.plan(model, mse_loss, (x,), y, ranks=2, num_microbatches=4, memory=policy)
    with pytest.warns(FutureWarning):
        was = dualpipe_fx.plan(model, mse_loss, (x,), y, ranks=2, num_microbatches=4, recompute="selective",
                               balance="time", optimizer="sgd")
    assert got.to_dict() == was.to_dict()
    torch.testing.assert_close(new.run(x, y)[0], old.run(x, y)[0])
