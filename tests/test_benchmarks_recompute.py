"""benchmarks/recompute.py on its smallest settings, so it cannot rot: its core (2 gloo
ranks, a tiny llama, none / selective / full) end to end. The allocator count it rests on
is tested in tests/test_memory.py.

Timings are never asserted; the figures' structure, the grads check and the memory
count's closing are.
"""
from __future__ import annotations

import json

import pytest

from benchmarks import recompute as bench


@pytest.mark.timeout(120)
def test_benchmark_core_on_the_tiny_config(tmp_path):
    variants = {"none": None, "selective": "selective", "full": "full"}
    results = bench.measure(bench.TINY, variants, warmup=0, rounds=1, op_rounds=1, costs=False, timeout=100)
    fig = bench.figures(results, bench.TINY, (0.0, 0.0))
    bench.report(fig)
    rows = fig["variants"]
    assert list(rows) == list(variants)
    for label in ("selective", "full"):
        assert rows[label]["saved_ratio"] < 1 and rows[label]["saved_storage_ratio"] < 1, (label, rows[label])
        assert all(q < 1 for q in rows[label]["peak_ratio_per_rank"]), (label, rows[label])
    assert rows["full"]["saved_ratio"] < rows["selective"]["saved_ratio"]
    for label, r in rows.items():
        assert r["grad_max_abs_diff"] <= 1e-5, label  # also asserted (allclose) inside the ranks
        assert set(r["saved_bytes_per_stage"]) == {0, 1, 2, 3}
        for peak, book in zip(r["peak_live_bytes_per_rank"], r["bookkeeping_peak_bytes_per_rank"]):
            assert peak >= book > 0, (label, peak, book)  # the measured peak holds what is kept
    (tmp_path / "f.json").write_text(json.dumps(fig, default=str))
