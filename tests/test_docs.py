"""The docs: ``mkdocs build --strict`` passes, and every Python block of README.md and docs/*.md runs.

Each Python block is one test case, named ``<file>:<line>``; the blocks of one file run in
order in one namespace (sybil), so a later block may use what an earlier one defined. Two
HTML comments on the line before a block change how it runs:

- ``<!-- ranks: 2 -->``: the block is a whole program that needs a process group; it runs
  alone as a script on 2 processes with the environment ``torchrun --nproc-per-node 2``
  gives (gloo, one intra-op thread each, 120 s at most). Keep these few: each costs seconds.
- ``<!-- skip: next "reason" -->`` (sybil's own): the block cannot run here (a GPU, a big
  model, a fragment of the reader's program); the reason is the skip's message.

Shell and TOML blocks are not run (the main job's command is tests/test_demo.py's).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import unittest
from pathlib import Path

import pytest

from tests.runtime.dist_harness import spawn_ranks

sybil = pytest.importorskip("sybil", reason="the docs extra is not installed: pip install -e '.[docs]'")
from sybil.evaluators.python import PythonEvaluator  # noqa: E402
from sybil.parsers.markdown import CodeBlockParser, SkipParser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RANKS_MARKER = re.compile(r"<!--\s*ranks:\s*(\d+)\s*-->\s*$")
RANKS_TIMEOUT_S = 120



def _env() -> dict[str, str]:
    # The checkout's packages first: the editable install may point at another checkout.
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_MKDOCS_2_WARNING="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _ranks(example) -> int:
    """The N of a ``<!-- ranks: N -->`` comment on the line before the block, else 0."""
    before = example.document.text[:example.start].rstrip("\n").rsplit("\n", 1)[-1]
    match = RANKS_MARKER.search(before)
    return int(match.group(1)) if match else 0


def _program(rank: int, world: int, code: str, filename: str, cwd: str) -> None:
    """One rank of a ``ranks:`` block: the block as a script (``__name__ == "__main__"``)."""
    os.chdir(cwd)
    exec(compile(code, filename, "exec"), {"__name__": "__main__", "__file__": filename})


def _run_on_ranks(example, ranks: int, tmp_dir: Path) -> None:
    """The block as the script it shows, on ``ranks`` processes with torchrun's environment
    (tests/runtime/dist_harness.spawn_ranks: forked from a server that imported torch once,
    not torchrun's agent and fresh interpreters: seconds less a block)."""
    where = f"{Path(example.path).relative_to(ROOT)}:{example.line}"
    outcomes = spawn_ranks(_program, ranks, (str(example.parsed), where, str(tmp_dir)), timeout=RANKS_TIMEOUT_S,
                           group=False)
    failed = [o for o in outcomes if not o.ok]
    assert not failed, f"{where} failed on {ranks} ranks:\n" + "\n".join(
        f"--- rank {o.rank} (exit {o.exitcode}) ---\n{o.error}" for o in failed)


def _evaluate(example, python=PythonEvaluator()) -> None:
    """A plain block runs here, in its file's namespace; a ``ranks:`` block under torchrun, in
    the current folder (the test's tmp_path)."""
    ranks = _ranks(example)
    if ranks:
        _run_on_ranks(example, ranks, Path.cwd())
    else:
        python(example)


SYBIL = sybil.Sybil(parsers=[CodeBlockParser(language="python", evaluator=_evaluate), SkipParser()])


def _examples():
    """One case per Python block, carrying the skip directive before it (sybil keeps the skip state)."""
    for path in DOC_FILES:
        directives = []
        for example in SYBIL.parse(path):
            if isinstance(example.region.parsed, tuple):  # a skip directive: (action, reason)
                directives.append(example)
                continue
            yield pytest.param([*directives, example], id=f"{path.relative_to(ROOT)}:{example.line}")
            directives = []


@pytest.mark.parametrize("examples", list(_examples()))
def test_doc_example(examples, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    for directive in examples[:-1]:
        action, reason = directive.parsed
        assert reason, (f"{Path(directive.path).relative_to(ROOT)}:{directive.line}: 'skip: {action}' gives no "
                        f"reason; write why the block cannot run here: <!-- skip: next \"needs a GPU\" -->")
    for example in examples:
        try:
            example.evaluate()
        except unittest.SkipTest as e:  # sybil's skip: report it here, with the block's place
            pytest.skip(f"{Path(example.path).relative_to(ROOT)}:{example.line}: {e}")


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    assert proc.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(warnings or [proc.stderr])
    assert (tmp_path / "site" / "reference" / "index.html").exists()
