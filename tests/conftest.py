"""Test tiers. The README's test command runs ``-m "not long"`` (the main tier, within 12
minutes on a 2-core machine); the ``long`` tier (the end-to-end torchtitan trainings, a few
minutes each) has its own command, which ``.ci/run`` runs after it (docs/contributing.md).
A run that deselects the long tier says so and names that command: it is never skipped
silently."""
from __future__ import annotations

import pytest

LONG_TIER = ".venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 -m long tests"
_DESELECTED_LONG = pytest.StashKey[list]()


def pytest_deselected(items):
    config = items[0].config if items else None
    if config is not None:
        long = [item for item in items if item.get_closest_marker("long") is not None]
        config.stash.setdefault(_DESELECTED_LONG, []).extend(long)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    long = config.stash.get(_DESELECTED_LONG, [])
    if long:
        terminalreporter.write_line(
            f"long tier: {len(long)} tests not run by this command (-m \"not long\"); CI runs them with: {LONG_TIER}",
            yellow=True)
