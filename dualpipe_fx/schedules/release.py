"""Where a rank may wait for each of its sends without waiting on its peer: the release points.

A send's buffer is held until the send is waited for. torch's runtime waits for every send
at the step's end; the runtime waits for each at its release point instead, and the memory
plan frees the sent tensor there (``planning.memory``): both call ``send_release_points``.

Why not wait right after the send: a gloo send of an unbound buffer completes only once the
peer has posted the matching receive, so a blocking wait at an arbitrary point can wait for
a peer that is itself waiting for this rank (a deadlock). It is safe to wait for send ``X``
(rank ``a`` to rank ``b``) once ``a`` *knows* that ``b`` posted ``X``'s receive: ``a`` has
completed a receive whose send ``b`` issued after posting it (directly, or through a chain
of such messages via other ranks: happens-before). From then on the transfer needs nothing
more from ``b``'s program (gloo moves the data in its own threads; NCCL waits are stream
order), so the wait ends.

**Contract**: ``send_release_points(orders, program) -> {rank: {("F"|"B", stage, mb): index | None}}``.
``orders`` are the ranks' torch action lists with sends and receives, exactly as the runtime
runs them (``schedules.lowering.add_comms`` then ``hoist_receives``, or torch's own lowering;
``UNSHARD``/``RESHARD``/``REDUCE_GRAD`` are ignored). Each ``SEND_F``/``SEND_B`` action of a
rank (key: its kind's letter, the sending stage, the micro-batch) maps to the index in its
rank's order of its release point: the first compute action after the send at which the
rule holds once that action has waited for its inputs, or None when there is none (the
step's end). The runtime waits for the send right after that action's compute, and the plan
frees the tensor there: waiting before the compute would free it one action sooner, but
would block the host (gloo) or the compute stream (NCCL) on a transfer that may still be
running, where after it the transfer overlaps the action.

**Pseudocode**::

    runs(r, j): the prefix of every rank's order known to be done when rank r's action j
        has waited for its inputs (a vector clock): r's own 0..j-1, then for each receive
        j completes, what its sender knew when it produced the tensor
    release(X from a to b) = first compute action j on a after SEND X with
        runs(a, j)[b] > position of X's receive on b          (else None: the step's end)

The model of the runtime it relies on (``runtime.executor`` / ``runtime.stage``):
- a receive is posted at its ``RECV_*`` action and completed at the compute action that
  reads it, before that action's compute;
- a send is issued at its ``SEND_*`` action, or earlier inside the compute action that
  produces it (gloo's sends from inside an F&B pair): the producing action is taken as the
  issue point wherever that is the stricter choice, so one answer serves both.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from dualpipe_fx.schedules.ir import Program
from dualpipe_fx.schedules.lowering import COMPUTE_KINDS

SendKey = tuple[str, int, int]  # ("F" | "B", sending stage, micro-batch)

_PRODUCES = {"F": "F", "B": "G", "I": "G"}  # compute kind -> what it makes ("G": an input grad)


def _kind(action) -> str:
    return action.computation_type.value


def _parts(action) -> tuple:
    return tuple(action.sub_actions) if action.sub_actions else (action,)


class _Rank:
    """One rank's order, indexed: its compute actions' products and what each must receive."""

    def __init__(self, order: Sequence, program: Program) -> None:
        self.order = list(order)
        self.made: dict[tuple[str, int, int], int] = {}  # ("F"|"G", stage, mb) -> compute index
        self.posted: dict[tuple[str, int, int], int] = {}  # ("F"|"B", receiving stage, mb) -> RECV index
        self.sends: dict[SendKey, int] = {}  # SEND index
        for j, action in enumerate(self.order):
            kind = _kind(action)
            if kind in COMPUTE_KINDS:
                for p in _parts(action):
                    if _kind(p) in _PRODUCES:
                        self.made[(_PRODUCES[_kind(p)], p.stage_index, p.microbatch_index)] = j
            elif kind in ("RECV_F", "RECV_B"):
                self.posted[(kind[-1], action.stage_index, action.microbatch_index)] = j
            elif kind in ("SEND_F", "SEND_B"):
                self.sends[(kind[-1], action.stage_index, action.microbatch_index)] = j
        self.program = program

    def received(self, action) -> list[SendKey]:
        """The sends whose receives ``action`` completes before its compute."""
        out = []
        for p in _parts(action) if _kind(action) in COMPUTE_KINDS else ():
            stage, mb = p.stage_index, p.microbatch_index
            if _kind(p) == "F" and ("F", stage, mb) in self.posted:
                out.append(("F", self.program.previous_stage(stage), mb))
            elif _kind(p) in ("B", "I") and ("B", stage, mb) in self.posted:
                out.append(("B", self.program.next_stage(stage), mb))
        return out

    def issued_at(self, key: SendKey) -> int:
        """Where ``key``'s send may be issued at the earliest: its producing compute action."""
        kind, stage, mb = key
        return self.made[("F" if kind == "F" else "G", stage, mb)]


def _clocks(ranks: Mapping[int, _Rank]) -> dict[int, list[dict[int, int]]]:
    """``clocks[r][j][q]``: how many of rank ``q``'s first actions are done when rank ``r``'s
    action ``j`` has waited for its inputs (``q == r``: ``j``)."""
    sender = {key: r for r, rk in ranks.items() for key in rk.sends}
    clocks: dict[int, list[dict[int, int]]] = {r: [] for r in ranks}
    while any(len(clocks[r]) < len(rk.order) for r, rk in ranks.items()):
        progress = False
        for r, rk in ranks.items():
            while len(clocks[r]) < len(rk.order):
                j = len(clocks[r])
                known = dict(clocks[r][-1]) if j else {}
                sources = [(sender[k], ranks[sender[k]].issued_at(k)) for k in rk.received(rk.order[j])]
                if any(i >= len(clocks[q]) for q, i in sources):
                    break  # a sender has not got that far yet
                for q, i in sources:
                    for p, n in clocks[q][i].items():
                        known[p] = max(known.get(p, 0), n)
                known[r] = j
                clocks[r].append(known)
                progress = True
        assert progress, "the orders deadlock: a receive whose send never comes"
    return clocks


def _peer(program: Program, key: SendKey) -> tuple[str, int, int]:
    """The receive matching send ``key``: (kind, receiving stage, mb)."""
    kind, stage, mb = key
    return kind, (program.next_stage(stage) if kind == "F" else program.previous_stage(stage)), mb


def send_release_points(orders: Mapping[int, Sequence], program: Program) -> dict[int, dict[SendKey, Optional[int]]]:
    """Per rank, each send's release point: the index (in ``orders[rank]``) of the compute
    action after which it is waited for; None for the step's end. See the module docstring
    for the rule and why it cannot deadlock.

    Args:
        orders: every rank's torch actions with comms, as the runtime runs them.
        program: the program they lower (its chains say which stage feeds which).
    """
    ranks = {r: _Rank(order, program) for r, order in orders.items()}
    receiver = {key: r for r, rk in ranks.items() for key in rk.posted}
    clocks = _clocks(ranks)
    out: dict[int, dict[SendKey, Optional[int]]] = {}
    for a, rk in ranks.items():
        out[a] = {}
        for key, s in rk.sends.items():
            recv = _peer(program, key)
            b = receiver[recv]
            need = ranks[b].posted[recv] + 1  # b's actions up to and including the RECV
            out[a][key] = next((j for j in range(s + 1, len(rk.order))
                                if _kind(rk.order[j]) in COMPUTE_KINDS and clocks[a][j].get(b, 0) >= need), None)
    return out


def compute_positions(order: Sequence) -> list[Optional[int]]:
    """For each index of ``order``, its compute action's position among the rank's compute
    actions (the program's own index), None for a send, receive or other action."""
    out, n = [], 0
    for action in order:
        if _kind(action) in COMPUTE_KINDS:
            out.append(n)
            n += 1
        else:
            out.append(None)
    return out
