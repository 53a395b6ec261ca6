"""What every rank must agree on, checked with a few small collectives before any P2P.

**Contract**: ``agree(fields, group, timeout, where)`` returns when every rank of ``group``
passed equal ``fields`` (``{name: value}``, plain data) and raises the same ``ValueError``
on every rank otherwise, naming the field, the ranks and their values. Fields in
``PARTIAL`` are ``{key: value}`` maps compared only on the keys several ranks hold (a
parameter checksum exists only where the parameter has values). ``vote(error, group,
timeout)`` is the per-step version: one all-reduce of "the lowest rank that failed", and,
only when one did, a broadcast of its error's type and text. ``with together(group,
timeout, where):`` votes on whether its body raised on any rank, so that a failure on
one rank in the middle of ``compile()`` stops every rank at once.

**Pseudocode**
    payloads = all_gather(len(pickle(fields))), all_gather(pickle(fields) padded)
    for each field, in order: group the ranks by value; more than one group -> ValueError
    vote: all_reduce(MIN, rank if failed else world); == world -> ok
          else broadcast the failed rank's (type, message) from it -> StepFailure

Every collective waits at most the pipeline's ``timeout`` (``work.wait(timeout)``), so a
rank that never comes makes the others raise ``PeerTimeoutError`` instead of hanging.
"""
from __future__ import annotations

import contextlib
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from dualpipe_fx.runtime.errors import PeerFailedError, PeerTimeoutError
from passes.block_masks import is_block_mask

PARTIAL = ("parameter checksums",)
_MESSAGE_BYTES = 4096  # a failed step's (type, message), utf-8, truncated
_MASK = (1 << 64) - 1


def as_timeout(value: Any, where: str = "compile(timeout=...)") -> timedelta:
    """``value`` as a ``timedelta``: a ``timedelta``, or seconds as an int/float > 0."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds, value = float(value), timedelta(seconds=float(value))
    else:
        raise TypeError(f"{where}: got {value!r} ({type(value).__name__}); expected a datetime.timedelta "
                        "or a number of seconds, e.g. timeout=300")
    if not seconds > 0:
        raise ValueError(f"{where}: got {seconds:g} seconds; expected a positive duration")
    return value


def _wait(work, group, timeout: timedelta, what: str) -> None:
    try:
        work.wait(timeout)
    except RuntimeError as err:
        raise PeerTimeoutError(dist.get_rank(group), None, what, timeout, err) from err


def vote_device(group) -> torch.device:
    """Where the agreement's and the votes' small tensors live: the CPU when ``group`` has a
    CPU backend (gloo, or ``"cuda:nccl,cpu:gloo"``: reading them syncs nothing), else the
    group's device (a pure ``"nccl"`` group, torchtitan's default, takes no CPU tensor; each
    read is then a device sync: two per step)."""
    config = dist.get_backend_config(group)  # e.g. "cpu:gloo,cuda:gloo" or "cuda:nccl"
    if "cpu:" in config:
        return torch.device("cpu")
    kind = config.split(":")[0]
    return torch.device(kind, torch.get_device_module(kind).current_device())


def gather_bytes(payload: bytes, group, timeout: timedelta, what: str) -> list[bytes]:
    """Every rank's ``payload``, in rank order (two all_gathers, each waited with ``timeout``)."""
    world, device = dist.get_world_size(group), vote_device(group)
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    _wait(dist.all_gather(sizes, size, group=group, async_op=True), group, timeout, what)
    longest = int(max(s.item() for s in sizes))
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else mine[:0]
    bufs = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    _wait(dist.all_gather(bufs, mine, group=group, async_op=True), group, timeout, what)
    return [bytes(b[: int(s.item())].tolist()) for b, s in zip(bufs, sizes)]


def _ranks(ranks: Sequence[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_difference(a: Any, b: Any) -> str:
    """Where two unequal values first differ, for long lists and dicts (empty otherwise)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return f" (first difference at {key!r}: {_short(a.get(key))} vs {_short(b.get(key))})"
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f" (first difference at [{i}]: {_short(x)} vs {_short(y)}{_first_difference(x, y)})"
        if len(a) != len(b):
            return f" (lengths {len(a)} vs {len(b)})"
    return ""


def _disagreement(where: str, field: str, by_value: list[tuple[Any, list[int]]], hint: str) -> ValueError:
    held = "; ".join(f"{_ranks(ranks)} {'have' if len(ranks) > 1 else 'has'} {_short(value)}"
                     for value, ranks in by_value)
    detail = _first_difference(by_value[0][0], by_value[1][0])
    return ValueError(f"{where}: the ranks disagree on {field}: {held}{detail}. Every rank must call it with "
                      f"the same arguments and the same model; {hint}")


def _grouped(values: Sequence[Any]) -> list[tuple[Any, list[int]]]:
    groups: list[tuple[Any, list[int]]] = []
    for rank, value in enumerate(values):
        for seen, ranks in groups:
            if seen == value:
                ranks.append(rank)
                break
        else:
            groups.append((value, [rank]))
    return groups


def check_agreement(per_rank: Sequence[Mapping[str, Any]], where: str,
                    hints: Optional[Mapping[str, str]] = None) -> None:
    """Raise ``ValueError`` for the first field (in the first rank's order) the ranks disagree on."""
    hints = hints or {}
    for field in per_rank[0]:
        values = [fields.get(field) for fields in per_rank]
        hint = hints.get(field, "fix the rank(s) that differ")
        if field in PARTIAL:  # {key: value}: compared among the ranks that have the key
            for key in sorted({k for v in values for k in (v or {})}):
                holders = [(v[key], r) for r, v in enumerate(values) if v and key in v]
                groups = _grouped([h for h, _ in holders])
                if len(groups) > 1:
                    ranks = [r for _, r in holders]
                    by_value = [(value, [ranks[i] for i in idx]) for value, idx in groups]
                    raise _disagreement(where, f"{field} of {key!r}", by_value, hint)
            continue
        groups = _grouped(values)
        if len(groups) > 1:
            raise _disagreement(where, field, groups, hint)


def agree(fields: Mapping[str, Any], group, timeout: timedelta, where: str,
          hints: Optional[Mapping[str, str]] = None) -> None:
    """Gather ``fields`` from every rank; the same ``ValueError`` on every rank if any differ."""
    if dist.get_world_size(group) == 1:
        return
    payloads = gather_bytes(pickle.dumps(dict(fields)), group, timeout, f"{where}'s agreement")
    check_agreement([pickle.loads(p) for p in payloads], where, hints)


def checksum(t: torch.Tensor) -> Optional[str]:
    """A cheap digest of ``t``'s bytes (wrapping sum of its 64-bit words, dtype, shape); None on meta.

    Not cryptographic: it tells different values apart (different seeds, different
    checkpoints), not a deliberate collision. An int64 sum runs at memory speed (~13 GB/s
    on one CPU thread; an int32 sum into int64 is 50x slower).
    """
    if t.is_meta:
        return None
    data = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if data.storage_offset() % 8:  # a view into a storage: int64 words need 8-byte alignment
        data = data.clone()
    whole = data.numel() // 8 * 8
    words = data[:whole].view(torch.int64).sum().item() if whole else 0
    tail = data[whole:].sum(dtype=torch.int64).item() if whole < data.numel() else 0
    return f"{str(t.dtype)[6:]}{list(t.shape)}:{words & _MASK:016x}{tail:02x}"


@dataclass(frozen=True)
class StepFailure:
    """The lowest rank whose part of a step failed: its error's type name and message."""

    rank: int
    kind: str
    message: str
    where: str = ""  # e.g. "action F0.2"


def vote(error: Optional[BaseException], group, timeout: timedelta, what: str,
         where: str = "", kind: Optional[str] = None) -> Optional[StepFailure]:
    """None when no rank failed; else the lowest failing rank's error (and ``where`` it
    failed), the same on every rank. ``kind``: the error's type name, when ``error`` relays
    another rank's (default: ``type(error).__name__``)."""
    return vote_keyed(error, 0, group, timeout, what, where, kind)[0]


def vote_keyed(error: Optional[BaseException], key: int, group, timeout: timedelta, what: str,
               where: str = "", kind: Optional[str] = None) -> tuple[Optional[StepFailure], bool]:
    """``vote``, and whether every rank passed the same ``key`` (an int64, e.g. a digest of
    the step's shapes) in the same all-reduce: MIN over ``[failed rank, key, -key]``, so
    the keys agree iff their min equals their max. No extra collective."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if world == 1:
        return (None if error is None else StepFailure(rank, kind or type(error).__name__, str(error), where)), True
    device = vote_device(group)
    flag = torch.tensor([rank if error is not None else world, key, -key], dtype=torch.int64, device=device)
    _wait(dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group, async_op=True), group, timeout, what)
    failed, low, minus_high = (int(v) for v in flag.tolist())
    same = low == -minus_high
    if failed == world:
        return None, same
    buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8, device=device)
    if rank == failed:
        text = f"{kind or type(error).__name__}\n{where}\n{error}".encode()[: _MESSAGE_BYTES - 1]
        buf[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(device)
    _wait(dist.broadcast(buf, group_src=failed, group=group, async_op=True), group, timeout, what)
    raw = bytes(buf.tolist()).rstrip(b"\0").decode(errors="replace")
    kind, where, message = raw.split("\n", 2)
    return StepFailure(failed, kind, message, where), same


@contextlib.contextmanager
def together(group, timeout: timedelta, where: str):
    """Run the ``with`` body on every rank, then ``vote``: if it raised on any rank, every
    rank raises at once, the failing rank(s) their own error and the others
    ``PeerFailedError`` naming the lowest failing rank and its message. Without it a rank
    whose part of ``compile()`` failed leaves the others waiting out the timeout in the next
    collective."""
    rank = dist.get_rank(group)
    try:
        yield
    except Exception as err:
        with contextlib.suppress(PeerTimeoutError):  # a lost peer: this rank's own error says more
            vote(err, group, timeout, f"{where}'s vote")
        raise
    failure = vote(None, group, timeout, f"{where}'s vote")
    if failure is not None:
        raise PeerFailedError(rank, failure.rank, where, failure.kind, failure.message)


# -- compile()'s two fingerprints ------------------------------------------------------

HINTS = {
    "versions": "install the same torch and dualpipe_fx on every rank",
    "examples": "pass example micro-batches of the same shapes and dtypes on every rank",
    "stage cut": "build the same model on every rank (same config; the cut is computed from it)",
    "parameter checksums": "build every rank's model from the same seed (torch.manual_seed(...) before "
                           "building it) or load one checkpoint on every rank",
}


def _tensor_sig(t: Any) -> Any:
    if is_block_mask(t):  # its repr draws the whole mask
        return ("BlockMask", tuple(t.shape))
    return (tuple(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else _short(t, 80)


def call_fields(schedule: str, world: int, num_microbatches: int, examples: Sequence, target: Any,
                kwargs: Optional[Mapping[str, Any]], options: Mapping[str, Any]) -> dict[str, Any]:
    """What ``compile()`` was called with, as the first fingerprint (before the split)."""
    import dualpipe_fx
    kwargs = dict(kwargs or {})
    return {
        "world size": world,
        "versions": f"torch {torch.__version__}, dualpipe_fx {dualpipe_fx.__version__}",
        "schedule": schedule,
        "num_microbatches": num_microbatches,
        "examples": {"inputs": [_tensor_sig(t) for t in examples], "target": _tensor_sig(target),
                     "kwargs": {k: _tensor_sig(v) for k, v in sorted(kwargs.items())}},
        **{k: _short(v, 120) for k, v in options.items()},
    }


def _placeholders(gm: torch.fx.GraphModule, kind: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(n.meta["dpfx_name"], tuple(n.meta["val"].shape)) for n in gm.graph.nodes
            if n.op == "placeholder" and n.meta.get("dpfx_kind") == kind and "val" in n.meta]


def _boundary(gm: torch.fx.GraphModule) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    args = out.args[0] if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    return [_tensor_sig(a.meta.get("val")) if isinstance(a, torch.fx.Node) else None for a in args]


def cut_fields(part_graphs: Sequence[torch.fx.GraphModule], state: Mapping[str, torch.Tensor],
               verify: Sequence[str]) -> dict[str, Any]:
    """The second fingerprint: each part's parameters (names, shapes) and outputs, and the
    checksums of the ``verify`` FQNs that have values on this rank (see ``checksum``)."""
    cut = [{"params": _placeholders(gm, "param"), "buffers": _placeholders(gm, "buffer"),
            "outputs": _boundary(gm)} for gm in part_graphs]
    sums = {}
    for name in verify:
        if name in state:
            digest = checksum(state[name])
            if digest is not None:
                sums[name] = digest
    return {"stage cut": cut, "parameter checksums": sums}


def verify_names(state: Mapping[str, torch.Tensor], part_graphs: Sequence[torch.fx.GraphModule], program,
                 everything: bool, skip: Sequence[str] = ()) -> list[str]:
    """FQNs to checksum: all of ``state`` (``everything``) or those read by more than one rank;
    never the ``skip`` ones (allocated, waiting for a checkpoint: no values yet)."""
    if everything:
        names = set(state)
    else:
        readers: dict[str, set[int]] = {}
        for stage, rank in program.stage_to_rank().items():
            for name, _ in _placeholders(part_graphs[program.model_part(stage)], "param"):
                readers.setdefault(name, set()).add(rank)
        names = {n for n, ranks in readers.items() if len(ranks) > 1}
    return sorted(names - set(skip))
