"""Host syncs in dualpipe_fx/runtime: every one is listed, with its reason, in docs/cuda.md.

On a GPU, ``.item()``, ``.tolist()``, ``.cpu()`` and ``.numpy()`` of a device tensor wait
for all the work queued before it, ``synchronize`` and ``barrier`` wait for everything, and
a ``work.wait(timeout)`` on NCCL blocks the host until the transfer ends. An AST scan of
``dualpipe_fx/runtime/*.py`` finds each such call; a call not in ``ALLOWED`` (a new sync on
the step's path) fails, and so does an entry no longer in the code (the table went stale).
Waits go through ``runtime.sync.wait``, which passes no timeout on a GPU.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CALLS = {"item", "tolist", "cpu", "numpy", "wait", "synchronize", "barrier"}

# (file, function, call): why it stays. docs/cuda.md has the same rows as a table.
ALLOWED = {
    ("agree.py", "_wait", "wait"): "compile()'s agreement and the step's votes: CPU tensors, the host reads them",
    ("agree.py", "gather_bytes", "item"): "compile() only: the payload sizes",
    ("agree.py", "gather_bytes", "tolist"): "compile() only: the gathered payloads",
    ("agree.py", "checksum", "item"): "compile() only: parameter checksums",
    ("agree.py", "vote_keyed", "tolist"): "per step (twice, world > 1): the flag and the shapes' digest, a CPU "
                                          "tensor, no device sync; the ranks must know before any P2P (inputs) "
                                          "and before returning (outcome); and, only when a rank failed, its "
                                          "error message",
    ("clock.py", "CudaEventClock.finish", "synchronize"): "profiling only: once per profiled step, to read its events",
    ("profile.py", "_record_steps", "barrier"): "profiling only: the ranks start each profiled step together",
    ("sync.py", "wait", "wait"): "every send/receive/collective wait: host wait on gloo (CPU), stream order on NCCL",
}


def _calls(path: pathlib.Path):
    """(function qualname, attribute called) for each ``x.<attr>(...)`` in CALLS."""
    found = []

    def walk(node, stack):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                walk(child, stack + [child.name])
                continue
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                    and child.func.attr in CALLS):
                found.append((".".join(stack), child.func.attr, child.lineno))
            walk(child, stack)

    walk(ast.parse(path.read_text()), [])
    return found


def test_every_host_sync_in_the_runtime_is_listed_with_its_reason():
    found = {}
    for path in sorted((ROOT / "dualpipe_fx" / "runtime").glob("*.py")):
        for func, attr, line in _calls(path):
            found.setdefault((path.name, func, attr), line)
    new = {k: v for k, v in found.items() if k not in ALLOWED}
    assert not new, ("host syncs not in tests/test_host_syncs.ALLOWED (remove them from the step's path, or "
                     "list them with the reason they stay, here and in docs/cuda.md): "
                     + ", ".join(f"{f}:{fn} .{a}() line {line}" for (f, fn, a), line in sorted(new.items())))
    gone = sorted(set(ALLOWED) - set(found))
    assert not gone, f"listed but no longer in the code (drop them here and in docs/cuda.md): {gone}"


def test_the_docs_table_names_every_listed_sync():
    page = (ROOT / "docs" / "cuda.md").read_text()
    missing = [f"{f}:{fn} .{a}()" for f, fn, a in ALLOWED if f"{f}:{fn}" not in page or f".{a}()" not in page]
    assert not missing, f"docs/cuda.md's host-sync table lacks {missing}"


def _vote_devices(rank, world):
    import torch.distributed as dist

    from dualpipe_fx.runtime.agree import vote_device
    return str(vote_device(None)), dist.get_backend_config()


def test_the_votes_stay_on_the_cpu_where_the_group_takes_cpu_tensors():
    """gloo (and "cuda:nccl,cpu:gloo") take the votes' flags on the CPU: no device sync.
    A pure NCCL group (torchtitan's default) puts them on its device: checked on a GPU only."""
    from tests.runtime.dist_harness import run_ranks

    (got,) = run_ranks(_vote_devices, 1, timeout=120)
    assert got[0] == "cpu", got
