"""Multiplex: the forward of stage a and the backward of stage b as ONE overlapped graph.

DualPipe hides communication by running two chunks at once: while one chunk waits for
its all_to_all (or its pipeline send), the other chunk computes. This pass builds that
pair as a single FX graph whose node order *is* the overlap:

1. **Merge.** The forward graph's nodes and the backward graph's nodes (backward_input,
   then backward_weight fed by backward_input's ``saved_for_weight``) are copied into one
   graph. The two chunks share no data, so any interleaving computes the same values. A
   weight-grad node equal to a backward-input node (same pure op, same inputs: W
   recomputing forward values under a recompute policy, ``passes.weight_inputs``) is that
   node: a full backward recomputes once.
2. **Collectives split in two.** A functional collective (``_c10d_functional.*``, e.g. the
   expert all_to_all, all_gather/reduce_scatter of sharded parameters) is *issued* when
   the node runs and only *waited for* at its ``wait_tensor``. Both graphs already hold
   the pair; the pass moves them apart.
3. **List scheduling** (one simulated compute thread, costs from ``passes.cost_model``):
   - a collective is issued as soon as its input is ready;
   - a pipeline send (a ``send_hook`` node on each forward output and each grad_input)
     goes out as soon as its value is ready;
   - among ready compute nodes, the one on the cheapest remaining path to a not yet
     issued collective or send runs first (communication starts as early as possible);
     without such a path, the chunk that is less far along (by cost) runs, which spreads
     each chunk's compute over the other chunk's communication;
   - a ``wait_tensor`` runs only when no other node can run (as late as data allows);
     then the wait of the collective issued first goes in.
   The order depends only on the graphs and the (deterministic, FLOP-based) costs, so
   every rank of an expert-parallel group issues its collectives in the same order.

Before and after, for F = (attention, dispatch all_to_all, experts, combine all_to_all)
and B = its backward (``a2a`` = issue, ``w`` = wait; ``|`` = the other chunk's work
hiding a collective)::

    before (F then B):  F.attn F.a2a F.w F.mlp F.a2a F.w F.out  B.a2a B.w B.mlp B.a2a B.w B.attn
                                  ^^^ idle            ^^^ idle       ^^^ idle        ^^^ idle
    after:              B.a2a | F.attn F.a2a | B.w B.mlp B.a2a | F.w F.mlp F.a2a |
                        B.w B.attn send(B) | F.w F.out send(F)

Sends: the merged graph owns a submodule ``send_hook``; a node
``send_hook(kind, index, value)`` follows each value that leaves the pair (``kind="F"``:
the forward's i-th output; ``kind="B"``: the backward's i-th grad_input). It does nothing
until a caller sets ``gm.send_hook.callback = fn(kind, index, tensor)``, which can then
start the pipeline send while the rest of the pair still computes (the runtime does, on
gloo; ``benchmarks/overlap.py`` measures it). The hook is never traced by torch.compile,
so a compiled merged graph runs as compiled segments between its sends.

Peak memory: the merged graph holds both chunks' live values at once, as running the two
chunks concurrently must.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from passes._compat import is_functional_collective, is_functional_wait

CostFn = Callable[[fx.Node], float]

_FLOPS_PER_S = 1e10  # only ratios between nodes matter; a CPU core's order of magnitude
_BYTES_PER_S = 1e10


class SendHook(torch.nn.Module):
    """Calls ``callback(kind, index, value)`` when set; a no-op otherwise. Never removed by DCE."""

    _is_impure = True

    def __init__(self) -> None:
        super().__init__()
        self.callback: Optional[Callable[[str, int, torch.Tensor], None]] = None

    # Never traced by torch.compile: a compiled merged graph runs in segments between the
    # hooks, and each hook calls the callback at run time (a send cannot live in a graph).
    @torch.compiler.disable
    def forward(self, kind: str, index: int, value: torch.Tensor) -> None:
        if self.callback is not None:
            self.callback(kind, index, value)


@dataclass(frozen=True)
class MultiplexInfo:
    """How a multiplexed graph's flat inputs and outputs divide; ``gm.meta["dpfx_multiplex"]``.

    Inputs: the forward's ``num_forward_inputs`` flat inputs, then the backward's.
    Outputs: the forward's ``num_forward_results`` results (its first
    ``num_forward_outputs`` are the stage outputs, the rest ``saved``), then the
    backward's (its first ``num_grad_inputs`` are grad_inputs, the rest
    ``saved_for_weight``, or ``param_grads`` when ``with_weight``). ``order`` lists
    the scheduled nodes as ``(name, chunk)``, for tests and pictures.
    """

    num_forward_inputs: int
    num_forward_results: int
    num_forward_outputs: int
    num_grad_inputs: int
    with_weight: bool
    order: tuple[tuple[str, str], ...]

    def split_results(self, results: Sequence) -> tuple[tuple, tuple]:
        """``gm(...)``'s flat results -> (forward results, backward results)."""
        return tuple(results[:self.num_forward_results]), tuple(results[self.num_forward_results:])


# ----------------------------------------------------------------------------- merge
def _copy_attr(attrs: dict, src: fx.GraphModule, target: str, prefix: str) -> str:
    """Copy ``src``'s attribute/submodule at ``target`` to ``attrs`` under a fresh flat name."""
    name = prefix + target.replace(".", "_")
    value = src
    for part in target.split("."):
        value = getattr(value, part)
    attrs[name] = value
    return name


def _pure_key(node: fx.Node) -> Optional[tuple]:
    """``(op, args, kwargs)`` of a node that always computes the same value from the same
    inputs (an ATen op that writes nothing and draws no random numbers); else None."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return None

    def frozen(a):
        return tuple(frozen(x) for x in a) if isinstance(a, (list, tuple)) else a

    key = (target, frozen(node.args), frozen(tuple(sorted(node.kwargs.items()))))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _inline(graph: fx.Graph, attrs: dict, src: fx.GraphModule, args: Sequence, chunk: str,
            known: Optional[dict] = None) -> list:
    """Copy ``src``'s nodes into ``graph`` with placeholders bound to ``args``; its flat outputs.
    With ``known``, a pure node equal to one copied before (in ``known``) is that node (W
    recomputing what I computed: ``passes.weight_inputs``; I's own twin views, which W's
    copies would otherwise match one of), else it joins ``known``."""
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in src.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(args), (len(placeholders), len(args))
    env.update(zip(placeholders, args))
    for node in src.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            return list(fx.node.map_arg(_as_list(node.args[0]), lambda n: env[n]))
        new = graph.node_copy(node, lambda n: env[n])
        key = None if known is None else _pure_key(new)
        if key is not None and key in known:
            graph.erase_node(new)
            env[node] = known[key]
            continue
        if key is not None:
            known[key] = new
        if node.op in ("get_attr", "call_module"):
            new.target = _copy_attr(attrs, src, node.target, chunk.lower() + "_")
        new.meta["dpfx_chunk"] = chunk
        env[node] = new
    raise AssertionError("graph without output")


def _placeholders(graph: fx.Graph, src: fx.GraphModule, prefix: str) -> list[fx.Node]:
    nodes = []
    for node in src.graph.nodes:
        if node.op == "placeholder":
            new = graph.placeholder(prefix + node.name)
            new.meta = dict(node.meta)
            nodes.append(new)
    return nodes


def _add_send_hooks(graph: fx.Graph, kind: str, values: Sequence) -> None:
    for index, value in enumerate(values):
        if isinstance(value, fx.Node):
            hook = graph.call_module("send_hook", (kind, index, value))
            hook.meta["dpfx_chunk"] = kind
            hook.meta["dpfx_send"] = True


def _merge(forward: fx.GraphModule, backward_input: fx.GraphModule, backward_weight: Optional[fx.GraphModule],
           num_outputs: int, num_grad_inputs: int) -> tuple[fx.Graph, dict]:
    """Both chunks in one graph, in program order (F then B), plus the attributes they use."""
    graph, attrs = fx.Graph(), {"send_hook": SendHook()}
    f_args = _placeholders(graph, forward, "f_")
    b_args = _placeholders(graph, backward_input, "b_")
    f_out = _inline(graph, attrs, forward, f_args, "F")
    # a full backward computes each value once: W nothing I computed (W's recomputation)
    known = None if backward_weight is None else {}
    b_out = _inline(graph, attrs, backward_input, b_args, "B", known)
    if backward_weight is not None:
        saved_for_weight = b_out[num_grad_inputs:]
        b_out = b_out[:num_grad_inputs] + _inline(graph, attrs, backward_weight, saved_for_weight, "B", known)
    _add_send_hooks(graph, "F", f_out[:num_outputs])
    _add_send_hooks(graph, "B", b_out[:num_grad_inputs])
    graph.output(tuple(f_out + b_out))
    return graph, attrs


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


# ----------------------------------------------------------------------------- costs
def _flop_costs(gm: fx.GraphModule) -> dict[str, float]:
    """Seconds per node from FLOPs and bytes; uniform where the cost model cannot say."""
    from passes.cost_model import node_costs

    try:
        costs = node_costs(gm)
    except Exception:  # a node the cost model cannot evaluate: order by count instead
        return {}
    return {name: c.flops / _FLOPS_PER_S + c.bytes / _BYTES_PER_S for name, c in costs.items()}


def _cost_fn(gm: fx.GraphModule, cost: Optional[CostFn]) -> CostFn:
    if cost is not None:
        return cost
    table = _flop_costs(gm)
    return lambda node: table.get(node.name, 1e-9)


# ----------------------------------------------------------------------------- schedule
def _is_issue(node: fx.Node) -> bool:
    return is_functional_collective(node) or bool(node.meta.get("dpfx_send"))


class _Scheduler:
    """The list scheduler of the module docstring, over one merged graph."""

    def __init__(self, graph: fx.Graph, cost: CostFn) -> None:
        body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
        self.index = {n: i for i, n in enumerate(body)}
        self.cost = {n: max(float(cost(n)), 0.0) for n in body}
        self.deps = {n: [d for d in n.all_input_nodes if d in self.index] for n in body}
        self.missing = {n: len(set(self.deps[n])) for n in body}
        self.users = {n: [u for u in n.users if u in self.index] for n in body}
        self.ancestors = {n: self._ancestors(n) for n in body if _is_issue(n)}
        self.remaining = {n: sum(self.cost[a] for a in anc) for n, anc in self.ancestors.items()}
        self.total = {c: sum(v for n, v in self.cost.items() if n.meta.get("dpfx_chunk") == c) or 1.0
                      for c in ("F", "B")}
        self.done_cost = {"F": 0.0, "B": 0.0}
        self.ready = {n for n in body if self.missing[n] == 0}
        self.order: list[fx.Node] = []

    def _ancestors(self, node: fx.Node) -> set[fx.Node]:
        seen, stack = set(), list(self.deps[node])
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(self.deps[n])
        return seen

    def _run(self, node: fx.Node) -> None:
        self.ready.discard(node)
        self.order.append(node)
        chunk = node.meta.get("dpfx_chunk", "F")
        self.done_cost[chunk] = self.done_cost.get(chunk, 0.0) + self.cost[node]
        for issue, anc in self.ancestors.items():
            if node in anc:
                anc.discard(node)
                self.remaining[issue] -= self.cost[node]
        self.ancestors.pop(node, None)
        self.remaining.pop(node, None)
        for user in set(self.users[node]):
            self.missing[user] -= 1
            if self.missing[user] == 0:
                self.ready.add(user)

    def _pick_compute(self, compute: list[fx.Node]) -> fx.Node:
        # Cheapest remaining path to a pending collective or send: start comms early.
        best = None
        for issue, anc in self.ancestors.items():
            runnable = [n for n in compute if n in anc]
            if runnable:
                key = (self.remaining[issue], self.index[issue])
                if best is None or key < best[0]:
                    best = (key, min(runnable, key=self.index.get))
        if best is not None:
            return best[1]
        # Otherwise the chunk less far along, so both chunks spread over each other's comms.
        behind = min(("F", "B"), key=lambda c: (self.done_cost[c] / self.total[c], c != "B"))
        mine = [n for n in compute if n.meta.get("dpfx_chunk", "F") == behind] or compute
        return min(mine, key=self.index.get)

    def schedule(self) -> list[fx.Node]:
        issued: list[fx.Node] = []  # collectives in issue order
        while self.ready:
            issues = sorted((n for n in self.ready if _is_issue(n)), key=self.index.get)
            compute = [n for n in self.ready if not _is_issue(n) and not is_functional_wait(n)]
            if issues:
                issued.extend(n for n in issues[:1] if is_functional_collective(n))
                self._run(issues[0])
            elif compute:
                self._run(self._pick_compute(compute))
            else:  # only waits left: the collective issued first is the likeliest done
                waits = sorted(self.ready, key=lambda w: (_issue_rank(w, issued), self.index[w]))
                self._run(waits[0])
        assert len(self.order) == len(self.index), "cycle in merged graph"
        return self.order


def _issue_rank(wait: fx.Node, issued: list[fx.Node]) -> int:
    src = wait.args[0]
    return issued.index(src) if src in issued else len(issued)


# ----------------------------------------------------------------------------- rebuild
def _rebuild(graph: fx.Graph, order: list[fx.Node]) -> fx.Graph:
    """A copy of ``graph`` with its body in ``order`` (placeholders first, output last)."""
    new, env = fx.Graph(), {}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = new.node_copy(node, lambda n: env[n])
    for node in order:
        env[node] = new.node_copy(node, lambda n: env[n])
    new.output(fx.node.map_arg(graph.output_node().args[0], lambda n: env[n]))
    return new


def _unwrap(name: str, graph: Any, count_attr: Optional[str], count: Optional[int]) -> tuple[fx.GraphModule, int]:
    """The flat GraphModule of a StageGraphs callable (``.gm``) or a GraphModule, and its count."""
    gm = getattr(graph, "gm", graph)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"multiplex: {name} is a {type(graph).__name__}, expected a torch.fx.GraphModule or a "
                        f"passes.split_backward stage callable with a flat .gm; pass one of those")
    if count is None and count_attr is not None:
        count = getattr(graph, count_attr, None)
    if count_attr is not None and count is None:
        raise ValueError(f"multiplex: {name} is a bare GraphModule, so {count_attr} is unknown; pass it "
                         f"(e.g. multiplex(..., {count_attr}=1))")
    return gm, count or 0


def multiplex(forward: Any, backward_input: Any, backward_weight: Any = None, *,
              num_outputs: Optional[int] = None, num_grad_inputs: Optional[int] = None,
              cost: Optional[CostFn] = None) -> fx.GraphModule:
    """Merge one stage's forward and another stage's backward into one overlapped graph.

    **Contract** (flat ``.gm`` conventions of ``passes.split_backward``):
    ``F(*params, *inputs) -> (*outputs, *saved)``,
    ``I(*saved_b, *grad_outputs_b) -> (*grad_inputs_b, *saved_for_weight_b)``
    [, ``W(*saved_for_weight_b) -> (*param_grads_b)``] become
    ``gm(*F inputs, *I inputs) -> (*F results, *I results)`` (with W merged:
    ``(*F results, *grad_inputs_b, *param_grads_b)``), values equal to running them one
    by one; ``gm.meta["dpfx_multiplex"]`` (``MultiplexInfo``) says where each part is.

    **Pseudocode**:
        graph = copy(F) + copy(I) [+ copy(W) fed by I's saved_for_weight, a node equal to I's is I's]
        add send_hook(kind, i, value) after every stage output and grad_input
        list-schedule: issue collectives/sends first; cheapest path to the next issue;
            else the chunk less far along; a wait_tensor only when nothing else can run
        rebuild the graph in that order; lint; recompile

    Args:
        forward: stage a's forward (a StageGraphs callable with ``.gm``, or a GraphModule).
        backward_input: stage b's backward-input (same forms).
        backward_weight: stage b's backward-weight, to merge a full backward (B); None for
            an I (its W runs later).
        num_outputs, num_grad_inputs: how many of F's / I's results are stage outputs /
            grad_inputs; read from the callables when they are StageGraphs callables.
        cost: seconds of compute per node, identical on every rank; default: FLOPs and
            bytes from ``passes.cost_model``.

    Returns:
        A new GraphModule (the inputs are untouched) with a ``send_hook`` submodule.

    Raises:
        TypeError: an argument is neither a GraphModule nor has a ``.gm``.
        ValueError: a count is missing for a bare GraphModule.
    """
    f_gm, num_outputs = _unwrap("forward", forward, "num_outputs", num_outputs)
    i_gm, num_grad_inputs = _unwrap("backward_input", backward_input, "num_grad_inputs", num_grad_inputs)
    w_gm = None if backward_weight is None else _unwrap("backward_weight", backward_weight, None, None)[0]
    merged, attrs = _merge(f_gm, i_gm, w_gm, num_outputs, num_grad_inputs)
    draft = fx.GraphModule(attrs, merged)
    order = _Scheduler(draft.graph, _cost_fn(draft, cost)).schedule()
    graph = _rebuild(draft.graph, order)
    graph.lint()
    gm = fx.GraphModule(attrs, graph, class_name="MultiplexedFB")
    gm.meta["dpfx_multiplex"] = MultiplexInfo(
        num_forward_inputs=sum(n.op == "placeholder" for n in f_gm.graph.nodes),
        num_forward_results=len(_as_list(f_gm.graph.output_node().args[0])),
        num_forward_outputs=num_outputs, num_grad_inputs=num_grad_inputs, with_weight=w_gm is not None,
        order=tuple((n.name, n.meta.get("dpfx_chunk", "")) for n in order))
    gm.recompile()
    return gm


def drop_send_hooks(gm: fx.GraphModule, kinds: Sequence[str]) -> fx.GraphModule:
    """``gm`` (a ``multiplex`` graph) without its ``send_hook`` nodes of the given kinds.

    For a graph that will be compiled: each hook is a graph break (it cannot be traced), so
    the hooks whose callback could never send (no peer on another rank, or a backend whose
    P2P keeps torch's places: NCCL) are dropped and the compiled graph has fewer segments.
    The values and the schedule's order are otherwise unchanged; ``gm`` is not modified.
    """
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    for node in list(out.graph.nodes):
        if node.meta.get("dpfx_send") and node.args[0] in kinds:
            out.graph.erase_node(node)
    out.graph.lint()
    out.meta.update(gm.meta)
    out.recompile()
    return out
