"""Per-rank memory plan in bytes: parameters, grads, optimizer state, peak activations, buffers.

**Contract**: ``split_plan(split, program) -> MemoryPlan`` for a split model without any
process group (``dualpipe_fx.plan``, in ``api/plan.py``, cuts the model as ``compile`` would
and calls it); ``Pipeline.memory_plan()`` gives the same rows for the rank(s) of a built pipeline.
``peak_activation_bytes(program, saved, for_weight) -> {rank: bytes}`` is the walk at the
core, on any per-stage byte figures (estimates for a memory-aware cut, say).

**Pseudocode**
    per stage: every storage its F, I and W graphs touch (fake tensors' storages, so a
        view counts once), with where it comes from and what keeps it (saved for I, kept
        for W, sent, handed over); the largest intermediates inside each graph
    per rank: its program lowered with sends and receives as the runtime does
    walk the actions: a storage lives from its birth to its last keeper; peak = max over
        actions of (live storages + the action's intermediates)

The model of a step, per micro-batch of a stage (what ``runtime.stage.GraphStage`` does):

- a received activation buffer is allocated when its receive is posted (gloo: up to two
  actions before its F, ``schedules.lowering.RECV_LOOKAHEAD``), and lives while F's ``saved``
  or I's ``saved_for_weight`` hold it;
- F's ``saved`` lives until I (or B); what I hands W (``saved_for_weight``: F values,
  received grads, I's own values) until W;
- a tensor sent to another rank (an activation after F, an input grad after I) is held by
  its send request through the action after which the runtime waits for that send and
  drops it (``schedules.release.send_release_points``: the first action at which the rank
  knows the peer posted the receive, else the step's end);
  one handed to a stage on the same rank lives until that stage's F (or I) takes it;
- the last stage's loss lives past the step (its model outputs, the logits, only through their F in a
  training step: the runtime keeps them for forward-only steps alone);
- param grads: allocated by the stage's first W (or B) when the step starts without them,
  summed in place afterwards;
- inside an action, its graph runs node by node: its inputs live throughout (the runtime
  holds them), each result from the node that makes it, each intermediate from its node to
  its last reader; the action adds the peak of that (intermediates + results made so far)
  beyond its results (``_intermediate_peak``: under recompute I's peak comes while it reruns
  the forward, before the grads it keeps for W exist). A B runs I, then W after I's saved
  inputs and received grads are dropped (``backward_intermediates``); an F&B pair runs its
  merged graph (``pair_intermediates``), or, without one, both halves' figures added.
- a value I's graph makes again (a forward value it recomputes) is I's, not F's, when F does
  not return it: the two share a storage in the traced ``meta["val"]``.

Not modelled: workspaces a kernel allocates inside one op (on CPU the flash-attention
backward's, a few times one head's ``[seq, head_dim]`` buffers per thread), and a boundary
value that two stages on one rank both keep (a stage that saves what it hands over) is
counted once by each.

Optimizer state (per parameter, after the first ``optimizer.step()``): ``"adamw"`` /
``"adam"``: torch's ``exp_avg`` and ``exp_avg_sq`` are ``zeros_like(param)``, so 2 x the
parameter bytes in the parameter's dtype, plus a 4-byte fp32 ``step`` per parameter tensor
(not fused, not capturable, no amsgrad); ``"sgd"`` (no momentum): 0; ``"sgd_momentum"``:
1 x the parameter bytes (``momentum_buffer``); a number: that many bytes per parameter
element.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from dualpipe_fx.schedules.ir import Action, Program
from dualpipe_fx.schedules.lowering import COMPUTE_KINDS, RECV_LOOKAHEAD, add_comms, hoist_receives, to_torch_actions
from dualpipe_fx.schedules.release import compute_positions, send_release_points
from passes.balance import PeakModel
from passes.cost_model import node_storages as _keys, value_storages as _storages

__all__ = ["MemoryPlan", "held_key", "peak_models", "stage_figures", "RankMemory", "StageMemory", "allocator_events", "peak_activation_bytes",
           "peak_live_bytes", "pipeline_plan", "rank_memory", "split_plan", "stage_memory"]

Optimizer = Union[str, float, int]
_END = math.inf  # position of "after the step"


# -- measuring (the CPU allocator, through the profiler) ---------------------------------

def peak_live_bytes(memory_events: Iterable[tuple[int, int]]) -> dict:
    """``memory_events``: ``(time_ns, signed bytes)`` of the allocator, any order.
    Returns the peak of their running sum (time order) and the sum at the end."""
    live = peak = 0
    for _, nbytes in sorted(memory_events, key=lambda e: e[0]):
        live += nbytes
        peak = max(peak, live)
    return {"peak": peak, "end": live}


def allocator_events(prof) -> list[tuple[int, int]]:
    """The CPU allocator's ``(time_ns, signed bytes)`` that a ``torch.profiler.profile(
    profile_memory=True)`` recorded (blocks allocated before it started: no free reported)."""
    return [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]


# -- per stage: the storages its graphs touch --------------------------------------------

def _placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _outputs(gm: torch.fx.GraphModule) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _intermediate_peak(gm: torch.fx.GraphModule, results: Iterable[int] = (), born: Iterable[int] = ()) -> int:
    """What running the graph adds at its peak to what the walk counts for its action: the most
    bytes alive at once, running its nodes in order, of its own intermediates (storages neither
    of its inputs nor of its outputs; each freed after its last reader) and of ``results`` (its
    outputs the walk counts from this action on: each from the node that makes it), less the
    bytes of ``results`` and ``born`` (values the walk counts through the whole action though
    the graph makes them and frees them, e.g. a full backward's inputs for W in a merged pair;
    their storages are then intermediates here; the figure is below zero where they are
    never all alive at once). Under recompute an I's peak comes while it
    reruns its forward, before the grads it keeps for W exist: counting those for the whole
    action on top of that peak overstated it. Outputs in neither set (W's param grads, summed
    into ``.grad`` in place) are not counted."""
    nodes = list(gm.graph.nodes)
    results, born = set(results), set(born)
    inputs = set(_keys(_placeholders(gm)))
    keep = inputs | (set(_keys(_outputs(gm))) - results - born)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    size: dict[int, int] = {}
    for i, n in enumerate(nodes):
        if n.op == "call_function":
            for k, b in _storages(n.meta.get("val")):
                if k not in keep:
                    first.setdefault(k, i)
                    size[k] = b
                    last[k] = len(nodes) - 1 if k in results else i
        for a in n.all_input_nodes:
            for k, _ in _storages(a.meta.get("val")):
                if k in last and k not in results:
                    last[k] = i
    delta = [0] * (len(nodes) + 1)
    for k, b in size.items():
        delta[first[k]] += b
        delta[last[k] + 1] -= b
    live = peak = 0
    for d in delta:
        live += d
        peak = max(peak, live)
    return peak - sum(b for k, b in size.items() if k in results or k in born)


@dataclass(frozen=True)
class StageMemory:
    """What one micro-batch of one stage holds, in bytes (storages, so views count once;
    parameters, buffers and the user's batch never).

    ``held`` lists ``(source, keepers, bytes)``: ``source`` is where a storage comes from
    (``"input"``: a received activation, ``"F"``: computed by F, ``"grad_output"``: a
    received grad, ``"I"``: computed by I), ``keepers`` what keeps it alive past its own
    action (``"saved"`` until I, ``"for_weight"`` until W, ``"output"`` sent on or handed
    over, ``"grad_input"`` sent back or handed over). ``intermediates`` is each graph's
    largest live sum of its own temporaries (``"F"``, ``"I"``, ``"W"``).
    """

    index: int
    saved: int
    for_weight: int
    held: tuple[tuple[str, frozenset, int], ...]
    intermediates: Mapping[str, int]
    param_grads: Mapping[str, int]  # FQN -> grad bytes of each parameter the stage trains

    @property
    def inputs(self) -> int:
        """Received activation bytes (a receive buffer) per micro-batch."""
        return sum(b for src, _, b in self.held if src == "input")

    @property
    def grad_outputs(self) -> int:
        """Received grad bytes (a receive buffer) per micro-batch."""
        return sum(b for src, _, b in self.held if src == "grad_output")


def stage_memory(graphs) -> StageMemory:
    """Byte figures of one split stage (``passes.stage_graphs.StageGraphs`` with flat ``.gm``s),
    read from the graphs' ``meta["val"]`` (fake tensors: nothing runs)."""
    fwd, bwd_i, bwd_w = graphs.forward.gm, graphs.backward_input.gm, graphs.backward_weight.gm
    phs = _placeholders(fwd)
    n_par = len(graphs.param_names) + len(graphs.buffer_names)
    n_act = len(graphs.input_names)
    outer = set(_keys(phs[:n_par])) | set(_keys(phs[n_par + n_act:]))  # params, buffers, the batch
    f_out = _outputs(fwd)
    outputs, saved = _keys(f_out[: graphs.forward.num_outputs]), _keys(f_out[graphs.forward.num_outputs:])
    # a training step keeps the last stage's loss, not its model outputs (logits): they live
    # through their F only, unless saved for I
    model_outputs = _keys(f_out[1: graphs.forward.num_outputs]) if graphs.is_last else {}
    if graphs.is_last:
        outputs = _keys(f_out[:1])
    i_phs, i_out = _placeholders(bwd_i), _outputs(bwd_i)
    n_gin = graphs.backward_input.num_grad_inputs
    grad_in, for_weight = _keys(i_out[:n_gin]), _keys(i_out[n_gin:])
    source: dict[int, str] = {}
    size: dict[int, int] = {}
    # under recompute, I's graph reruns forward nodes, whose values share their storages
    # (meta["val"]) with F's: such a value that F does not return is made again by I
    remade = set(_keys(n for n in bwd_i.graph.nodes if n.op == "call_function")) - set(_keys(f_out))
    for kind, nodes in (("input", phs[n_par: n_par + n_act]), ("F", fwd.graph.nodes),
                        ("grad_output", i_phs[_n_saved(graphs):]), ("I", bwd_i.graph.nodes)):
        for k, b in _keys(nodes).items():
            if k not in outer and k not in source and not (kind == "F" and k in remade):
                source[k], size[k] = kind, b
    keepers: dict[tuple[str, frozenset], int] = {}
    for k, src in source.items():
        keep = frozenset(name for name, keys in (("saved", saved), ("for_weight", for_weight),
                                                 ("output", outputs), ("grad_input", grad_in),
                                                 ("model_output", model_outputs)) if k in keys)
        keepers[(src, keep)] = keepers.get((src, keep), 0) + size[k]
    named_grads = {}
    w_out = _outputs(bwd_w)
    for name, g in zip(graphs.param_names, w_out):
        if isinstance(g, torch.fx.Node):
            named_grads[name] = sum(b for _, b in _storages(g.meta.get("val")))
    return StageMemory(
        index=graphs.index,
        saved=sum(b for k, b in saved.items() if k not in outer),
        for_weight=sum(b for k, b in for_weight.items() if k not in outer),
        held=tuple((src, keep, b) for (src, keep), b in sorted(keepers.items(), key=str)),
        intermediates={"F": _intermediate_peak(fwd, _keys(f_out)), "I": _intermediate_peak(bwd_i, _keys(i_out)),
                       "W": _intermediate_peak(bwd_w)},
        param_grads=named_grads,
    )


def pair_intermediates(fwd, bwd, full_backward: bool) -> int:
    """What an F&B pair's merged graph (``passes.multiplex``, in the order the runtime runs it:
    the two halves interleave, so their peaks need not add up) adds at its peak to what the
    walk counts for the action (``_intermediate_peak``): F's results and B's grad inputs from
    where each is made; a full backward's inputs for W, which the walk counts through the B,
    are the merged graph's own intermediates (made by its I half, freed by its W half)."""
    from passes.multiplex import multiplex

    gm = multiplex(fwd.forward, bwd.backward_input, bwd.backward_weight if full_backward else None)
    info = gm.meta["dpfx_multiplex"]
    results = _keys(_outputs(gm)[: info.num_forward_results + info.num_grad_inputs])
    i_out = _outputs(bwd.backward_input.gm)
    for_weight = _keys(i_out[bwd.backward_input.num_grad_inputs:])
    if not full_backward:
        return _intermediate_peak(gm, set(results) | set(for_weight))
    return _intermediate_peak(gm, results, set(for_weight) - set(results))


PairFn = Callable[[int, int, bool], Optional[int]]  # (F's model part, B's, full backward) -> bytes


def pair_figures(graphs: Mapping[int, Any]) -> PairFn:
    """``pair_intermediates`` of the stages' graphs by model part, each pair merged once."""
    cache: dict[tuple[int, int, bool], int] = {}

    def figure(f_part: int, b_part: int, full: bool) -> Optional[int]:
        if f_part == b_part:
            return None  # one stage's F and B run one after the other
        if (f_part, b_part, full) not in cache:
            cache[(f_part, b_part, full)] = pair_intermediates(graphs[f_part], graphs[b_part], full)
        return cache[(f_part, b_part, full)]
    return figure


def _n_saved(graphs) -> int:
    """How many of ``backward_input``'s placeholders are F's saved values (the rest are grads)."""
    return len(_outputs(graphs.forward.gm)) - graphs.forward.num_outputs


# -- per rank: walking the program -------------------------------------------------------

def _part_positions(actions: Sequence[Action]) -> dict[tuple[str, int, int], int]:
    """Index of the action running each ``("F"|"G"|"W", stage, mb)``; a B is its own W."""
    pos = {}
    for i, action in enumerate(actions):
        for p in action.parts():
            pos[("G" if p.kind in ("B", "I") else p.kind, p.stage, p.microbatch)] = i
            if p.kind == "B":
                pos[("W", p.stage, p.microbatch)] = i
    return pos


def _lowered(program: Program, lookahead: int) -> dict[int, list]:
    """Every rank's torch actions with sends and receives, as the runtime lowers the program
    (torch's placement, then receives posted ``lookahead`` actions earlier)."""
    orders = add_comms(to_torch_actions(program), program)
    return {r: hoist_receives(order, lookahead) if lookahead else order for r, order in orders.items()}


@dataclass(frozen=True)
class _Comms:
    """Where the runtime posts each receive and releases each send, in compute positions."""

    receives: Mapping[tuple[str, int, int], int]  # ("F"|"B", receiving stage, mb) -> posted before action i
    releases: Mapping[tuple[str, int, int], float]  # ("F"|"B", sending stage, mb) -> waited for after action i


def receive_positions(program: Program, lookahead: int) -> dict[tuple[str, int, int], int]:
    """``("F"|"B", receiving stage, mb) -> i``: the receive is posted before rank's compute
    action ``i``, as the runtime lowers the program (torch's placement, then posted
    ``lookahead`` actions earlier: ``schedules.lowering.hoist_receives``)."""
    return _comms(program, lookahead).receives


def _comms(program: Program, lookahead: int) -> _Comms:
    orders = _lowered(program, lookahead)
    receives: dict[tuple[str, int, int], int] = {}
    for order in orders.values():
        i = 0
        for a in order:
            kind = a.computation_type.value
            if kind in ("RECV_F", "RECV_B"):
                receives[(kind[-1], a.stage_index, a.microbatch_index)] = i
            elif kind in COMPUTE_KINDS:
                i += 1
    releases: dict[tuple[str, int, int], float] = {}
    for rank, points in send_release_points(orders, program).items():
        pos = compute_positions(orders[rank])
        releases.update({key: _END if j is None else pos[j] for key, j in points.items()})
    return _Comms(receives, releases)


def _intervals(program: Program, rank: int, mem: Callable[[int], StageMemory],
               comms: _Comms) -> list[tuple[str, int, float, float]]:
    """``(category, bytes, first, last)`` action positions of every storage of the rank's step
    (``_END`` = past the step); categories ``activations``, ``recv``, ``sent``, ``kept``.
    A sent tensor lives from its last keeper on through the action after which its send is
    waited for (``schedules.release``: the runtime waits there and drops it)."""
    recv = comms.receives
    actions = program[rank]
    pos = _part_positions(actions)
    place = program.stage_to_rank()
    out = []
    for stage in sorted(s for s, r in place.items() if r == rank):
        prev, nxt = program.previous_stage(stage), program.next_stage(stage)
        prev_far = prev is not None and place[prev] != rank
        next_far = nxt is not None and place[nxt] != rank
        sm = mem(stage)
        for m in range(program.num_microbatches):
            f, g, w = pos[("F", stage, m)], pos[("G", stage, m)], pos[("W", stage, m)]
            for src, keep, nbytes in sm.held:
                if src in ("F", "I") and not keep:
                    continue  # the graph's own intermediates: counted by _action_intermediates
                own = f if src in ("input", "F") else g  # the action that reads or makes it
                last = max([own] + [{"saved": g, "for_weight": w}[k] for k in keep if k in ("saved", "for_weight")])
                sent = None  # the category that holds it past its last keeper, if any
                until = _END  # ... through this action
                if "output" in keep:
                    if nxt is None:
                        sent = "kept"  # the last stage's loss
                    elif next_far:
                        sent, until = "sent", comms.releases[("F", stage, m)]  # held by its send
                    else:
                        last = max(last, pos[("F", nxt, m)] - 1)  # handed over: the next F takes it
                if "grad_input" in keep and prev is not None:
                    if prev_far:
                        sent, until = "sent", max(until if sent == "sent" else 0, comms.releases[("B", stage, m)])
                    else:
                        last = max(last, pos[("G", prev, m)] - 1)
                key = (program.model_part(stage), held_key(src, keep))
                if src == "input" and prev_far:
                    out.append(("recv", nbytes, recv[("F", stage, m)], f - 1, key))
                if src == "grad_output" and next_far:
                    out.append(("recv", nbytes, recv[("B", stage, m)], g - 1, key))
                out.append(("activations", nbytes, own, last, key))
                if sent and until > last:
                    out.append((sent, nbytes, last + 1, until, key))
    return out


def held_key(src: str, keep: Iterable[str]) -> str:
    """The name of a ``StageMemory.held`` entry as a ``passes.balance.PeakModel`` figure:
    ``"source|keeper,keeper"`` (e.g. ``"F|for_weight,saved"``)."""
    return f"{src}|{','.join(sorted(keep))}"


def stage_figures(mem: StageMemory) -> dict[str, int]:
    """A stage's per-micro-batch figures by ``PeakModel`` name: its ``held`` entries
    (``held_key``) and its graphs' temporaries (``"temp|F"``, ``"temp|I"``, ``"temp|W"``;
    ``"temp|B"``: what a B runs, ``backward_intermediates``)."""
    out: dict[str, int] = {}
    for src, keep, nbytes in mem.held:
        out[held_key(src, keep)] = out.get(held_key(src, keep), 0) + nbytes
    inter = mem.intermediates
    out.update({"temp|F": inter["F"], "temp|I": inter["I"], "temp|W": inter["W"],
                "temp|B": backward_intermediates(mem)})
    return out


def peak_models(program: Program, figures: Mapping[int, Iterable[str]], recv_lookahead: int = 2
                ) -> dict[int, PeakModel]:
    """Per rank, its step peak as a linear form per action in its stages' figures: the walk
    ``rank_memory`` makes (``_intervals``, ``_action_intermediates``), run on a unit figure
    for each ``(model part, name)`` of ``figures`` (``{part: names}``, see ``stage_figures``).
    ``rank_memory``'s step peak of any stage figures equals ``peak_models(...)[rank].peak(...)``
    of the same figures, and the stage cut (``passes.balance``) scores its cuts with it."""
    comms = _comms(program, recv_lookahead)
    names = {k: sorted(set(v)) for k, v in figures.items()}
    units = {}
    for k, ns in names.items():
        held = []
        for n in ns:
            src, _, keep = n.partition("|")
            if src != "temp":
                held.append((src, frozenset(keep.split(",")) - {""}, 1))
        units[k] = StageMemory(index=k, saved=0, for_weight=0, held=tuple(held),
                               intermediates={"F": 0, "I": 0, "W": 0}, param_grads={})
    place = program.stage_to_rank()
    out = {}
    for rank, actions in program.items():
        parts = sorted({program.model_part(s) for s, r in place.items() if r == rank})
        keys = tuple((k, n) for k in parts for n in names.get(k, ()))
        col = {key: i for i, key in enumerate(keys)}
        coef = np.zeros((max(len(actions), 1), len(keys)))
        empty = StageMemory(index=-1, saved=0, for_weight=0, held=(), intermediates={}, param_grads={})
        walk = _intervals(program, rank, lambda s: units.get(program.model_part(s), empty), comms)
        for _, nbytes, first, last, key in walk:
            if last >= first and key in col:
                coef[int(first): len(actions) if last == _END else int(last) + 1, col[key]] += nbytes
        for i, action in enumerate(actions):
            for p in action.parts():
                key = (program.model_part(p.stage), f"temp|{p.kind}")
                if key in col:
                    coef[i, col[key]] += 1
        out[rank] = PeakModel(keys=keys, coef=coef)
    return out


def _grad_births(program: Program, rank: int, mem: Callable[[int], StageMemory]) -> list[tuple[str, int, int, float]]:
    """Param grads, each allocated at the first W (or B) of a stage that trains it."""
    pos = _part_positions(program[rank])
    born: dict[str, tuple[int, int]] = {}
    for stage, r in program.stage_to_rank().items():
        if r != rank:
            continue
        first = min(pos[("W", stage, m)] for m in range(program.num_microbatches))
        for name, nbytes in mem(stage).param_grads.items():
            born[name] = (min(first, born.get(name, (first, 0))[0]), nbytes)
    return [("grads", nbytes, at, _END, None) for at, nbytes in born.values()]


def _action_intermediates(action: Action, mem: Callable[[int], StageMemory],
                          pair: Optional[Callable[[Action], Optional[int]]] = None) -> int:
    """The action's own temporaries at their peak: an F&B pair's from its merged graph when
    ``pair`` knows it, else (the two halves one after the other, or no graphs) both halves' peaks."""
    merged = pair(action) if pair is not None and action.kind == "FB" else None
    if merged is not None:
        return merged

    def one(p: Action) -> int:
        return backward_intermediates(mem(p.stage)) if p.kind == "B" else mem(p.stage).intermediates[p.kind]
    return sum(one(p) for p in action.parts())


def backward_intermediates(mem: StageMemory) -> int:
    """What a B (I, then W, one after the other) adds to what the walk counts for it: I's rise,
    or W's temporaries less what I's end freed (its saved inputs and the received grads,
    which the runtime drops when I returns; the walk counts them through the B)."""
    freed = sum(b for src, keep, b in mem.held if keep == {"saved"} or (src == "grad_output" and not keep))
    return max(mem.intermediates["I"], mem.intermediates["W"] - freed)


def _peak(n: int, intervals, intermediates: Sequence[int]) -> dict[str, int]:
    """The breakdown at the action where the sum of everything live is largest."""
    cats = ("activations", "recv", "sent", "kept", "grads")
    live = {c: [0] * (n + 1) for c in cats}
    for cat, nbytes, first, last, *_ in intervals:
        if last < first:
            continue
        live[cat][int(first)] += nbytes
        live[cat][n if last == _END else int(last) + 1] -= nbytes
    for c in cats:
        for i in range(1, n + 1):
            live[c][i] += live[c][i - 1]
    totals = [sum(live[c][i] for c in cats) + intermediates[i] for i in range(n)]
    at = max(range(n), key=totals.__getitem__, default=0)
    if n == 0:
        return dict.fromkeys((*cats, "intermediates", "total", "at"), 0)
    return {**{c: live[c][at] for c in cats}, "intermediates": intermediates[at], "total": totals[at], "at": at}


def peak_activation_bytes(program: Program, saved: Union[Mapping[int, int], Sequence[int]],
                          for_weight: Union[Mapping[int, int], Sequence[int]]) -> dict[int, int]:
    """Per rank, the most bytes of activations held at once between its actions: each
    (stage, micro-batch) holds ``saved[part]`` from its F until its I (or B), then
    ``for_weight[part]`` until its W. An action's additions count before its releases (an
    I holds ``saved`` while it makes ``for_weight``; an F&B pair holds its F's while its B
    runs). ``part`` is ``program.model_part(stage)`` (the stage itself but for DualPipe's
    mirrors). The simulator's ``peak_activations`` with bytes instead of chunks.
    """
    out = {}
    for rank, actions in program.items():
        held = peak = 0
        for action in actions:
            for p in action.parts():
                k = program.model_part(p.stage)
                held += saved[k] if p.kind == "F" else (for_weight[k] if p.kind == "I" else 0)
            peak = max(peak, held)
            for p in action.parts():
                k = program.model_part(p.stage)
                held -= (saved[k] if p.kind in ("I", "B") else 0) + (for_weight[k] if p.kind == "W" else 0)
        out[rank] = peak
    return out


# -- the plan ----------------------------------------------------------------------------

def optimizer_bytes(optimizer: Optimizer, param_bytes: int, param_elements: int, param_tensors: int) -> int:
    """Optimizer state for parameters of these sizes (see the module docstring)."""
    if isinstance(optimizer, bool) or not isinstance(optimizer, (str, int, float)):
        raise TypeError(f"optimizer={optimizer!r}; expected 'adamw', 'adam', 'sgd', 'sgd_momentum' or a number "
                        "of bytes per parameter element")
    if isinstance(optimizer, str):
        name = optimizer.lower()
        if name in ("adamw", "adam"):
            return 2 * param_bytes + 4 * param_tensors
        if name == "sgd":
            return 0
        if name == "sgd_momentum":
            return param_bytes
        raise ValueError(f"optimizer={optimizer!r} is not known; expected 'adamw', 'adam', 'sgd', 'sgd_momentum' "
                         "or a number of bytes per parameter element (e.g. 12 for fp32 master weights + Adam)")
    if optimizer < 0:
        raise ValueError(f"optimizer={optimizer} bytes per parameter element is negative; expected >= 0")
    return int(round(optimizer * param_elements))


@dataclass(frozen=True)
class RankMemory:
    """One rank's bytes. ``params`` (and buffers), ``grads`` and ``optimizer`` live through
    training; the step's peak is ``activations + recv_buffers + send_buffers +
    kept_outputs + intermediates``, its breakdown at the action where their sum is largest (grads already
    allocated, e.g. zeroed in place). ``step_increase`` is the most the step adds when it
    starts with no grads (``zero_grad(set_to_none=True)``): that walk with each grad
    allocated at its stage's first W. ``peak_activations``: ``peak_activation_bytes`` with
    the stages' ``saved`` and ``for_weight`` only."""

    rank: int
    stages: tuple[int, ...]
    params: int
    grads: int
    optimizer: int
    activations: int
    recv_buffers: int
    send_buffers: int
    kept_outputs: int
    intermediates: int
    peak_action: str
    step_increase: int
    peak_activations: int

    @property
    def step_peak(self) -> int:
        return self.activations + self.recv_buffers + self.send_buffers + self.kept_outputs + self.intermediates

    @property
    def total(self) -> int:
        """params + grads + optimizer + the step's peak: an upper bound for training."""
        return self.params + self.grads + self.optimizer + self.step_peak


def _fmt(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class MemoryPlan:
    """Per-rank bytes of a pipelined model (see ``RankMemory``); ``table()`` prints them."""

    ranks: tuple[RankMemory, ...]
    schedule: str
    num_microbatches: int
    optimizer: Optimizer
    recompute: Optional[str] = None
    stages: tuple[StageMemory, ...] = field(default=(), repr=False)

    def rank(self, r: int) -> RankMemory:
        return next(row for row in self.ranks if row.rank == r)

    def to_dict(self) -> dict:
        rows = [asdict(r) | {"step_peak": r.step_peak, "total": r.total} for r in self.ranks]
        for row in rows:
            row["stages"] = list(row["stages"])
        stages = [{"stage": s.index, "saved": s.saved, "for_weight": s.for_weight, "inputs": s.inputs,
                   "intermediates": dict(s.intermediates)} for s in self.stages]
        return {"schedule": self.schedule, "num_microbatches": self.num_microbatches,
                "optimizer": self.optimizer, "recompute": self.recompute, "ranks": rows, "stages": stages}

    def table(self, exact: bool = True) -> str:
        """One row per rank (readable units; with ``exact``, bytes below each figure)."""
        head = ("rank", "stages", "params", "grads", "optimizer", "activations", "recv buf", "sent buf",
                "outputs", "temporaries", "total")
        rows = [head]
        for r in self.ranks:
            nums = (r.params, r.grads, r.optimizer, r.activations, r.recv_buffers, r.send_buffers,
                    r.kept_outputs, r.intermediates, r.total)
            rows.append((str(r.rank), ",".join(map(str, r.stages)), *map(_fmt, nums)))
            if exact:
                rows.append(("", "", *(f"{n:,}" for n in nums)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.append(f"{self.schedule}, {self.num_microbatches} micro-batches, optimizer {self.optimizer}"
                     + (f", recompute {self.recompute}" if self.recompute else "")
                     + "\ntotal = params + grads + optimizer + the step's peak: activations (saved for I, kept "
                     "for W, handed over), receive buffers, sent tensors (held until their send is released), the "
                     "last stage's losses (kept for the whole step), one action's temporaries")
        return "\n".join(lines)


@dataclass(frozen=True)
class ParamBytes:
    """A rank's parameters and buffers (distinct tensors): all their bytes, and the trainable
    parameters' bytes, elements and tensor count (what grads and the optimizer follow)."""

    total: int
    trainable: int
    elements: int
    tensors: int


def rank_memory(program: Program, rank: int, stages: Mapping[int, StageMemory], params: ParamBytes,
                optimizer: Optimizer = "adamw", recv_lookahead: int = 2,
                comms: Optional[_Comms] = None, pairs: Optional[PairFn] = None) -> RankMemory:
    """One rank's ``RankMemory`` from its stages' figures (``stages[model part]``); ``pairs``:
    the F&B pairs' merged-graph temporaries (``pair_figures``), when they run overlapped."""
    def mem(stage: int) -> StageMemory:
        return stages[program.model_part(stage)]

    def pair(action: Action) -> Optional[int]:
        f, b = action.forward, action.backward
        return pairs(program.model_part(f.stage), program.model_part(b.stage), b.kind == "B")

    comms = _comms(program, recv_lookahead) if comms is None else comms
    actions = program[rank]
    intervals = _intervals(program, rank, mem, comms)
    inter = [_action_intermediates(a, mem, pair if pairs is not None else None) for a in actions]
    grads = _grad_births(program, rank, mem)
    steady = _peak(len(actions), intervals, inter)
    fresh = _peak(len(actions), intervals + grads, inter)
    mine = sorted(s for s, r in program.stage_to_rank().items() if r == rank)
    saved = _Default({k: m.saved for k, m in stages.items()})
    for_weight = _Default({k: m.for_weight for k, m in stages.items()})
    only = Program({rank: actions}, chains=program.chains, num_microbatches=program.num_microbatches,
                   model_parts=program.model_parts)
    return RankMemory(
        rank=rank, stages=tuple(mine), params=params.total,
        grads=sum(g[1] for g in grads), optimizer=optimizer_bytes(optimizer, params.trainable, params.elements,
                                                                   params.tensors),
        activations=steady["activations"], recv_buffers=steady["recv"], send_buffers=steady["sent"],
        kept_outputs=steady["kept"],
        intermediates=steady["intermediates"], peak_action=str(actions[steady["at"]]) if actions else "",
        step_increase=fresh["total"],
        peak_activations=peak_activation_bytes(only, saved, for_weight)[rank],
    )


class _Default(dict):
    """Figures of this rank's stages; others read as 0 (never read by this rank's walk)."""

    def __missing__(self, key):
        return 0


def _param_bytes(names: Iterable[str], values: Mapping[str, torch.Tensor], trainable: set[str]) -> ParamBytes:
    seen: dict[str, torch.Tensor] = {n: values[n] for n in dict.fromkeys(names)}
    nbytes = {n: t.numel() * t.element_size() for n, t in seen.items()}
    train = [n for n in seen if n in trainable]
    return ParamBytes(total=sum(nbytes.values()), trainable=sum(nbytes[n] for n in train),
                      elements=sum(seen[n].numel() for n in train), tensors=len(train))


def split_plan(split, program: Program, *, optimizer: Optimizer = "adamw", recv_lookahead: int = 2,
               recompute=None, overlap: bool = True) -> MemoryPlan:
    """The plan of a ``dualpipe_fx.split(...)`` result run by ``program`` (one whose stages are
    the split's model parts, e.g. ``generate("dualpipev", S // 2, C)`` for ``S`` stages); every
    stage must have been split (no ``only_stages``). ``recv_lookahead``: 2 on gloo, 0 on NCCL.
    ``overlap``: the F&B pairs run as merged graphs (``compile(overlap=True)``, the default).

    ``print(split.describe()); print(split_plan(split, program).table())``
    """
    missing = [k for k, sg in enumerate(split.stages) if sg is None]
    if missing or program.num_model_parts != len(split.stages):
        raise ValueError(f"split_plan: the split has {len(split.stages)} stages (not split: {missing}) and the "
                         f"program runs {program.num_model_parts} model parts; expected a fully split model "
                         "with one stage per model part. Fix: dualpipe_fx.split(..., num_stages="
                         f"{program.num_model_parts}) without only_stages")
    values = _graph_values(split.partition.stages)
    graphs = dict(enumerate(split.stages))
    held = dict(split.model.named_parameters(remove_duplicate=False))
    # mixed precision: the graphs hold param_dtype copies of the model's parameters
    cast = {k: {n: (held[n], v) for n, v in vals.items() if n in held and v.dtype != held[n].dtype}
            for k, vals in values.items()}
    stages = {k: _with_casts(stage_memory(sg), cast[k]) for k, sg in enumerate(split.stages)}
    values = {k: {n: cast[k][n][0] if n in cast[k] else v for n, v in vals.items()} for k, vals in values.items()}
    copies = {n: c.numel() * c.element_size() for pairs in cast.values() for n, (_, c) in pairs.items()}
    return _plan_from(program, stages, values, _trainable(split.model), optimizer, recv_lookahead, recompute,
                      sorted(program), copies, pair_figures(graphs) if overlap and _flat(graphs) else None)


def _graph_values(part_graphs) -> dict[int, dict[str, torch.Tensor]]:
    """Per part, its parameters' and buffers' traced values by FQN (fake: only shapes)."""
    return {k: {n.meta["dpfx_name"]: n.meta["val"] for n in gm.graph.nodes
                if n.op == "placeholder" and n.meta.get("dpfx_kind") in ("param", "buffer")}
            for k, gm in enumerate(part_graphs)}


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def _plan_from(program: Program, stages: Mapping[int, StageMemory], values: Mapping[int, Mapping[str, torch.Tensor]],
               trainable: set[str], optimizer: Optimizer, lookahead: int, recompute, ranks: Iterable[int],
               copies: Optional[Mapping[str, int]] = None, pairs: Optional[PairFn] = None) -> MemoryPlan:
    """``copies``: mixed precision, FQN -> bytes of its param_dtype copy, counted with the parameters;
    ``pairs``: the overlapped F&B pairs' temporaries (``pair_figures``)."""
    comms = _comms(program, lookahead)
    place = program.stage_to_rank()
    rows = []
    for r in ranks:
        parts = sorted({program.model_part(s) for s, q in place.items() if q == r})
        named = {n: t for k in parts for n, t in values[k].items()}
        row = rank_memory(program, r, stages, _param_bytes(named, named, trainable), optimizer, lookahead, comms,
                          pairs)
        extra = sum((copies or {}).get(n, 0) for n in named)
        rows.append(dataclasses.replace(row, params=row.params + extra) if extra else row)
    return MemoryPlan(ranks=tuple(rows), schedule=program.name, num_microbatches=program.num_microbatches,
                      optimizer=optimizer, recompute=recompute if isinstance(recompute, str) else
                      (None if recompute is None else getattr(recompute, "__name__", "custom")),
                      stages=tuple(stages[k] for k in sorted(stages)))


def pipeline_plan(pipe, optimizer: Optimizer = "adamw") -> MemoryPlan:
    """``Pipeline.memory_plan``: this rank's row, from its own stages' graphs and tensors."""
    program, stages, values, trainable, copies = pipe.program, {}, {}, set(), {}
    for s, stage in pipe.stages.items():
        k = program.model_part(s)
        names = stage.graphs.param_names + stage.graphs.buffer_names
        values[k] = dict(zip(names, stage.params))
        trainable |= {n for n, t in values[k].items() if isinstance(t, torch.nn.Parameter) and t.requires_grad}
        cast = {n: (p, c) for n, p, c in zip(names, stage.params, stage.compute) if c is not p}
        stages[k] = _with_casts(stage_memory(stage.flat_graphs), cast)
        copies.update({n: c.numel() * c.element_size() for n, (_, c) in cast.items()})
    lookahead = RECV_LOOKAHEAD if any(st.early_sends for st in pipe.stages.values()) else 0
    overlapped = getattr(pipe._executor.overlap, "pair", None) is not None  # runtime.overlap.OverlapRunner
    flat = {program.model_part(s): stage.flat_graphs for s, stage in pipe.stages.items()}
    return _plan_from(program, stages, values, trainable, optimizer, lookahead, None, [pipe.rank], copies,
                      pair_figures(flat) if overlapped and _flat(flat) else None)


def _flat(graphs: Mapping[int, Any]) -> bool:
    """Whether every stage's graphs are flat GraphModules (what ``passes.multiplex`` merges)."""
    return all(isinstance(getattr(getattr(g, part), "gm", None), torch.fx.GraphModule)
               for g in graphs.values() for part in ("forward", "backward_input", "backward_weight"))


def _with_casts(mem: StageMemory, cast: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> StageMemory:
    """Mixed precision: W's param_dtype grads are summed into ``.grad`` in the parameter's own
    dtype (``cast``: FQN -> (parameter, its param_dtype copy))."""
    if not cast:
        return mem
    grads = {n: b * cast[n][0].element_size() // cast[n][1].element_size() if n in cast else b
             for n, b in mem.param_grads.items()}
    return dataclasses.replace(mem, param_grads=grads)
