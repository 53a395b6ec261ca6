"""Layer-level planning: the figures of a model's repeated layers, split and costed once per
kind, summed into the stages of any cut at layer boundaries (``autoplan(granularity="layer")``).

**Contract**: ``profile_layers(model, names, split_units, seconds_of, expert_layers) ->
LayerProfile``: units ``[what precedes the layers, layer 0, ..., layer L-1, what follows]``
(the first and last where a module holds them; the loss is in the last), each with its F, I,
W seconds, its ``StageMemory``, its parameters' values and the bytes it hands the next, every
layer's from the one traced layer of its kind (``layer_kinds``: same class, same parameter
and buffer shapes), renamed. ``LayerProfile.stages(bounds) -> (StageMemory, values, seconds
per part, boundary bytes)`` for parts that are runs of units; ``layer_bounds(seconds, parts)``
the cut whose longest part is the shortest; ``affine(profile at 1, profile at 2, mb)`` the
profile at another micro-batch size.

Why: a candidate of the op-level search (``granularity="op"``) cuts the whole graph and
traces the joint graph of each of its stages (about 50 s per candidate for llama3 8B on this
machine); here the model, cut down to one layer of each kind (``kept_layers``), is traced
and split once per micro-batch size (1 and 2, the rest affine) and recompute policy, and a
candidate only adds figures up, plans memory and simulates.

What it gives up (the op-level search keeps these exact): cuts only between layers, layers
of one kind taken to compute one graph (a layer whose forward reads its index otherwise
would be misjudged), a part's temporaries are its largest unit's (each graph's own peak, as
``stage_memory`` counts them), the merged F&B pair's temporaries are the two halves' (no
``pairs`` for ``rank_memory``), and sizes other than 1 and 2 are extrapolated.

**Pseudocode**
    kinds = first layer of each kind; with the model cut down to them:
        units = cut(capture at mb, split_points = [each kept layer, the module after them])
        per unit: seconds (F, I, W) = roofline of its graphs; memory = stage_memory(graphs)
    every layer: its kind's unit, its own names
    part [a, b): seconds summed; saved / for_weight / grads summed; temporaries the max;
        what one unit hands the next (its output, the next one's input) becomes the part's own
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from dualpipe_fx.planning.memory import StageMemory, stage_memory
from passes.cost_model import stage_io_bytes

__all__ = ["LayerProfile", "affine", "layer_names", "layer_kinds", "kept_layers", "profile_layers", "layer_bounds",
           "merge_units"]


def layer_names(model: nn.Module) -> list[str]:
    """The FQNs of the layers of ``model``'s largest ``ModuleList`` / ``ModuleDict`` (the
    repeated blocks of a decoder), in order; [] when it has none with two or more."""
    best: list[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)) and len(mod) > len(best):
            keys = list(mod.keys()) if isinstance(mod, nn.ModuleDict) else [str(i) for i in range(len(mod))]
            best = [f"{name}.{k}" if name else k for k in keys]
    return best if len(best) >= 2 else []


@dataclass(frozen=True)
class LayerProfile:
    """One micro-batch size's per-unit figures (unit ``u``: layer ``u``, the first with what
    precedes the layers, the last with what follows them)."""

    seconds: tuple[tuple[float, float, float], ...]   # per unit: F, I, W on the device model
    memory: tuple[StageMemory, ...]                   # per unit, as stage_memory counts a stage
    values: tuple[Mapping[str, torch.Tensor], ...]    # per unit: its params' and buffers' traced values
    out_bytes: tuple[int, ...]                        # per unit: activation bytes it hands the next
    experts: tuple[int, ...] = ()                     # per unit: its MoE layers (expert containers)

    def __len__(self) -> int:
        return len(self.seconds)

    def stages(self, bounds: Sequence[tuple[int, int]]):
        """Per part ``[a, b)`` of units: its ``StageMemory``, values, (F, I, W) seconds; and the
        largest activation a part hands the next."""
        mems = {k: merge_units(self.memory[a:b], k) for k, (a, b) in enumerate(bounds)}
        values = {k: {n: v for u in range(a, b) for n, v in self.values[u].items()} for k, (a, b) in enumerate(bounds)}
        secs = {k: tuple(sum(self.seconds[u][j] for u in range(a, b)) for j in range(3))
                for k, (a, b) in enumerate(bounds)}
        hop = max((self.out_bytes[b - 1] for _, b in bounds[:-1]), default=0)
        return mems, values, secs, hop


def affine(one: LayerProfile, two: LayerProfile, mb: int) -> LayerProfile:
    """The profile at micro-batch size ``mb`` from those at 1 and 2: every figure (seconds,
    activation bytes, temporaries) as ``f(1) + (f(2) - f(1)) (mb - 1)``. Exact for what is
    affine in the batch size: activations and FLOPs (linear), the parameters a GEMM reads
    (constant); a roofline op that turns from memory- to compute-bound between sizes, or a
    GEMM whose shape class changes, is where it is not."""
    def at(a: float, b: float):
        return max(0, type(a)(a + (b - a) * (mb - 1)))

    def mem(a: StageMemory, b: StageMemory) -> StageMemory:
        held = {(s, k): at(n, dict(((s2, k2), n2) for s2, k2, n2 in b.held).get((s, k), n)) for s, k, n in a.held}
        return StageMemory(a.index, at(a.saved, b.saved), at(a.for_weight, b.for_weight),
                           tuple((s, k, n) for (s, k), n in held.items()),
                           {g: at(a.intermediates[g], b.intermediates[g]) for g in a.intermediates}, a.param_grads)
    return LayerProfile(seconds=tuple(tuple(at(x, y) for x, y in zip(a, b)) for a, b in zip(one.seconds, two.seconds)),
                        memory=tuple(mem(a, b) for a, b in zip(one.memory, two.memory)), values=one.values,
                        out_bytes=tuple(at(a, b) for a, b in zip(one.out_bytes, two.out_bytes)), experts=one.experts)


def merge_units(units: Sequence[StageMemory], index: int) -> StageMemory:
    """The ``StageMemory`` of consecutive units run as one stage: what unit u sends unit u+1
    (its output, the next one's input) is the stage's own value, kept for what the next unit
    keeps it for (saved for I, ...); the grads they exchange likewise; temporaries are each
    graph's largest."""
    held: dict[tuple[str, frozenset], int] = {}
    last = len(units) - 1
    for u, mem in enumerate(units):
        for src, keep, nbytes in mem.held:
            if u > 0 and src == "input":
                src = "F"      # made by the unit before, inside the stage
            if u < last and src == "grad_output":
                src = "I"      # made by the next unit's I, inside the stage
            if u < last and src == "F":
                keep = keep - {"output"}       # handed to the next unit, which counts it as its input
            if u > 0 and src == "I":
                keep = keep - {"grad_input"}   # handed to the unit before, its grad_output
            if keep or src in ("input", "grad_output"):
                held[(src, keep)] = held.get((src, keep), 0) + nbytes
    return StageMemory(
        index=index, saved=sum(m.saved for m in units), for_weight=sum(m.for_weight for m in units),
        held=tuple((s, k, b) for (s, k), b in sorted(held.items(), key=str)),
        intermediates={g: max(m.intermediates[g] for m in units) for g in ("F", "I", "W")},
        param_grads={n: b for m in units for n, b in m.param_grads.items()})


def layer_kinds(model: nn.Module, names: Sequence[str]) -> list[int]:
    """Per layer, the index of the first layer of its kind: same class, same parameters and
    buffers (names, shapes, dtypes). Layers of one kind are taken to compute the same graph."""
    seen: dict[tuple, int] = {}
    kinds = []
    for i, name in enumerate(names):
        mod = model.get_submodule(name)
        sig = (type(mod), tuple((n, tuple(t.shape), t.dtype) for n, t in mod.named_parameters()),
               tuple((n, tuple(t.shape), t.dtype) for n, t in mod.named_buffers()))
        kinds.append(seen.setdefault(sig, i))
    return kinds


@contextlib.contextmanager
def kept_layers(model: nn.Module, names: Sequence[str], keep: Sequence[int]):
    """``model`` with only the layers ``keep`` of its container (``names``' parent) for the
    duration (put back after, whatever happens): the planner traces one layer of each kind."""
    container = names[0].rsplit(".", 1)[0] if "." in names[0] else ""
    parent_name, _, attr = container.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    full = getattr(parent, attr)
    if isinstance(full, nn.ModuleDict):
        part = nn.ModuleDict({names[i].rsplit(".", 1)[-1]: full[names[i].rsplit(".", 1)[-1]] for i in keep})
    else:
        part = nn.ModuleList(full[i] for i in keep)
    setattr(parent, attr, part)
    try:
        yield
    finally:
        setattr(parent, attr, full)


def _after(model: nn.Module, names: Sequence[str]) -> Optional[str]:
    """The first module with parameters registered after the layer container beside it (a
    decoder's final norm): where the part after the layers starts."""
    container = names[0].rsplit(".", 1)[0]
    parent_name, _, attr = container.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    children = list(parent.named_children())
    at = [n for n, _ in children].index(attr)
    for name, mod in children[at + 1:]:
        if any(True for _ in mod.parameters()):
            return f"{parent_name}.{name}" if parent_name else name
    return None


def profile_layers(model: nn.Module, names: Sequence[str], split_units: Callable, seconds_of: Callable,
                   expert_layers: Callable[[set], int]) -> LayerProfile:
    """Units ``[before the layers, layer 0, ..., layer L-1, after them]`` (the first and last
    only where a module holds them), each layer's figures from the one layer of its kind that
    is traced. ``split_units(split_points)``: ``dualpipe_fx.split`` of the model (cut down to
    those layers) into one stage per unit; ``seconds_of(gm)``: a graph's roofline seconds;
    ``expert_layers(param names)``: how many MoE layers those parameters hold."""
    from dualpipe_fx.planning.memory import _graph_values

    kinds = layer_kinds(model, names)
    keep = sorted(set(kinds))
    post = _after(model, names)
    container = names[0].rsplit(".", 1)[0]
    with kept_layers(model, names, keep):
        traced_names = [f"{container}.{j}" for j in range(len(keep))] \
            if isinstance(model.get_submodule(container), nn.ModuleList) else [names[i] for i in keep]
        points = traced_names + ([post] if post else [])
        try:
            units = split_units(points)
            pre = True
        except ValueError:  # nothing before the layers to cut off
            units = split_units(points[1:])
            pre = False
    by_key: dict = {}

    def figures(sg):
        key = id(sg.forward.gm)  # units sharing one split share its graphs' figures
        if key not in by_key:
            by_key[key] = ((seconds_of(sg.forward.gm), seconds_of(sg.backward_input.gm),
                            seconds_of(sg.backward_weight.gm)), stage_memory(sg))
        return by_key[key]

    graphs = units.partition.stages
    values = _graph_values(graphs)
    traced = [(figures(sg), values[u], stage_io_bytes(graphs[u])[1]) for u, sg in enumerate(units.stages)]
    # which traced unit each full unit takes its figures from, and the renaming of its names
    first_layer = 1 if pre else 0
    layer_unit = {k: first_layer + j for j, k in enumerate(keep)}
    plan: list[tuple[int, Callable[[str], str]]] = [(0, str)] if pre else []
    for i, kind in enumerate(kinds):
        old, new = f"{traced_names[keep.index(kind)]}.", f"{names[i]}."
        plan.append((layer_unit[kind], _renamer(old, new)))
    if post:
        plan.append((len(traced) - 1, str))
    seconds, mems, vals, outs, experts = [], [], [], [], []
    for u, (t, rename) in enumerate(plan):
        (secs, mem), value, out = traced[t]
        seconds.append(secs)
        mems.append(StageMemory(u, mem.saved, mem.for_weight, mem.held, mem.intermediates,
                                {rename(n): b for n, b in mem.param_grads.items()}))
        vals.append({rename(n): v for n, v in value.items()})
        outs.append(out)
        experts.append(expert_layers(set(vals[-1])))
    return LayerProfile(seconds=tuple(seconds), memory=tuple(mems), values=tuple(vals), out_bytes=tuple(outs),
                        experts=tuple(experts))


def _renamer(old: str, new: str) -> Callable[[str], str]:
    return lambda n: new + n[len(old):] if n.startswith(old) else n


def layer_bounds(unit_seconds: Sequence[float], parts: int) -> list[tuple[int, int]]:
    """``parts`` runs of consecutive units (each at least one) whose longest is the shortest
    it can be: the least bound, over the sums of consecutive units, for which a greedy walk
    (each part as long as the bound allows, leaving a unit for each part after it) fits."""
    n = len(unit_seconds)
    if not 1 <= parts <= n:
        raise ValueError(f"layer_bounds: {parts} parts of {n} layers; expected 1..{n} (a stage holds whole layers: "
                         "pick a pipeline with at most as many stages as the model has layers)")
    prefix = [0.0]
    for s in unit_seconds:
        prefix.append(prefix[-1] + s)

    def greedy(limit: float) -> Optional[list[tuple[int, int]]]:
        bounds, a = [], 0
        for k in range(parts):
            b = n if k == parts - 1 else a + 1
            while b < n - (parts - k - 1) and prefix[b + 1] - prefix[a] <= limit:
                b += 1
            bounds.append((a, b))
            a = b
        return bounds if all(prefix[b] - prefix[a] <= limit for a, b in bounds) else None

    sums = sorted({prefix[b] - prefix[a] for a in range(n) for b in range(a + 1, n + 1)})
    lo, hi = 0, len(sums) - 1
    while lo < hi:  # the least bound a greedy walk fits (the largest sum always does)
        mid = (lo + hi) // 2
        if greedy(sums[mid]) is None:
            lo = mid + 1
        else:
            hi = mid
    return greedy(sums[lo])
