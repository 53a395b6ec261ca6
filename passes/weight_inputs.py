"""weight_inputs: what I hands W under recompute, the fewest bytes by a minimum cut.

Without this pass, W reads forward values only through I (``saved_for_weight``): under a
recompute policy, I recomputes its stage's forward and hands W every value W reads (the
inputs of every weight's matmul, each norm's normalised input), and they live from I until
W, which DualPipeV defers: as many bytes as ``recompute=None`` saves. Here W recomputes
forward values too, from fewer kept ones, and I computes the cheap weight-grad work whose
result is smaller than what it reads (a norm's weight grad, a ``[dim]`` sum of two
``[tokens, dim]`` values), so what lives from I to W is a minimum.

The choice is a minimum cut of a flow network over the stage's joint graph (the form of
AOTAutograd's min-cut partitioner). Each value ``v`` is two vertices, ``v_in -> v_out``
with capacity its bytes: the cut passes through it when ``v`` is kept from I to W.
``v_in`` on the sink side: W computes ``v``; ``v_out`` on the sink side: W has ``v``.

- a weight-grad node W must compute (matmul-class work, ``cost_model.has_flop_formula``)
  is tied to the sink; a cheap one may move to I (then all its weight-grad inputs move too);
- a forward node W may recompute is one the policy recomputes (``recompute_policy``:
  never dropout or collectives); any other forward value, I's values and the received
  grads are tied to the source (kept if W needs them);
- parameters and buffers cost nothing to keep (they live anyway); a tuple cannot be kept;
- W's results (the parameter grads) must be on the sink side.

Ties go the cheaper way in time: each forward node W recomputes and each weight-grad node
I computes costs its output bytes (64 times for matmul-class work) in units far below one
byte, so W recomputes nothing, and I does no weight-grad work, that saves no byte. The
policy says what may be recomputed; ``"full"`` lets W recompute matmuls, ``"selective"``
pointwise ops, norms and views only. The time it adds is in W's graph (and I's), which the
cost model and the simulator read.

**Contract**: ``weight_inputs(graph, phase, weight_nodes, param_grads, wants) ->
WeightInputs(keep, recompute, moved)``: W's graph reads ``keep`` only and computes
``recompute`` (forward nodes) and ``weight_nodes - moved``; I computes ``moved``.

**Pseudocode**::

    network: v_in -> v_out (bytes); u_out -> v_in (inf) for each input u of a node W may compute
    tie to source: values W cannot compute; tie to sink: W's results and matmul-class W nodes
    S = vertices reachable from the source after max-flow (Dinic)
    keep = {v: v_in in S, v_out not in S}; recompute = forward v with v_in not in S
    moved = weight-grad v with v_in in S
"""
from __future__ import annotations

import collections
import operator
from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Sequence

import torch
from torch.fx import Graph, Node

from passes.cost_model import activation_bytes, has_flop_formula

__all__ = ["WeightInputs", "weight_inputs"]

_INF = 1 << 200
_BYTE = 1 << 64  # one byte outweighs every tie-breaking cost together
_HEAVY_TIE = 64  # a matmul-class node's tie cost per output byte, against 1 for a cheap one


@dataclass(frozen=True)
class WeightInputs:
    """``keep``: values I hands W, in graph order; ``recompute``: forward nodes W computes
    again; ``moved``: weight-grad nodes I computes instead of W."""

    keep: tuple[Node, ...]
    recompute: frozenset
    moved: frozenset


class _Network:
    """A flow network on integer vertices; Dinic's max-flow; the source side of a min cut."""

    def __init__(self):
        self.adj: dict[int, list[list]] = collections.defaultdict(list)  # v -> [to, cap, rev index]

    def edge(self, a: int, b: int, cap: int) -> None:
        self.adj[a].append([b, cap, len(self.adj[b])])
        self.adj[b].append([a, 0, len(self.adj[a]) - 1])

    def _levels(self, s: int, t: int):
        level = {s: 0}
        queue = collections.deque([s])
        while queue:
            v = queue.popleft()
            for to, cap, _ in self.adj[v]:
                if cap > 0 and to not in level:
                    level[to] = level[v] + 1
                    queue.append(to)
        return level if t in level else None

    def _push(self, s: int, t: int, level, nxt) -> int:
        # iterative DFS for one augmenting path along the level graph
        path: list[tuple[int, int]] = []
        v = s
        while True:
            if v == t:
                flow = min(self.adj[u][i][1] for u, i in path)
                for u, i in path:
                    e = self.adj[u][i]
                    e[1] -= flow
                    self.adj[e[0]][e[2]][1] += flow
                return flow
            edges = self.adj[v]
            while nxt[v] < len(edges):
                to, cap, _ = edges[nxt[v]]
                if cap > 0 and level.get(to) == level[v] + 1:
                    break
                nxt[v] += 1
            if nxt[v] == len(edges):
                if not path:
                    return 0
                level[v] = -1  # dead end
                v, _ = path.pop()
                nxt[v] += 1
                continue
            path.append((v, nxt[v]))
            v = edges[nxt[v]][0]

    def source_side(self, s: int, t: int) -> set[int]:
        while (level := self._levels(s, t)) is not None:
            nxt = collections.defaultdict(int)
            while self._push(s, t, level, nxt):
                pass
        seen, stack = {s}, [s]
        while stack:
            v = stack.pop()
            for to, cap, _ in self.adj[v]:
                if cap > 0 and to not in seen:
                    seen.add(to)
                    stack.append(to)
        return seen


def _source(node: Node) -> Node:
    while node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]
    return node


def _keep_cost(node: Node, free: Collection[Node]) -> int:
    if node.op == "get_attr" or node in free:
        return 0  # lives anyway
    if isinstance(node.meta.get("val"), (tuple, list)):
        return _INF  # tuples never cross graphs
    return activation_bytes(node) * _BYTE


def _tie(node: Node) -> int:
    return activation_bytes(node) * (_HEAVY_TIE if has_flop_formula(_source(node)) else 1) + 1


def _recomputable(node: Node, phase: Mapping[Node, str], wants: Callable[[Node], bool]) -> bool:
    return phase.get(node) == "F" and node.op == "call_function" and wants(_source(node))


def weight_inputs(graph: Graph, phase: Mapping[Node, str], weight_nodes: Sequence[Node],
                  param_grads: Sequence, wants: Callable[[Node], bool], free: Collection[Node] = ()) -> WeightInputs:
    """The values I keeps for W, and what W recomputes and I computes for it (see module doc).

    Args:
        graph: the stage's joint graph.
        phase: node -> ``"F"`` (forward), ``"G"`` (a received grad), ``"I"`` or ``"W"``,
            after I's recomputation (values I recomputes are ``"I"``).
        weight_nodes: the weight-grad nodes (phase ``"W"``), in graph order.
        param_grads: W's results (nodes or None), one per parameter.
        wants: the recompute policy (``passes.recompute.recompute_policy``), read on the
            forward nodes' producers.
        free: values that cost nothing to keep: the stage's parameters and buffers.
    """
    ids: dict[Node, int] = {}
    net = _Network()
    s, t = 0, 1

    def vertex(n: Node) -> int:  # v_in = 2 + 2k, v_out = v_in + 1
        if n not in ids:
            ids[n] = 2 + 2 * len(ids)
            net.edge(ids[n], ids[n] + 1, _keep_cost(n, free))
        return ids[n]

    weights = set(weight_nodes)
    stack = list(weight_nodes)
    seen: set[Node] = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        v = vertex(n)
        in_w = n in weights
        if in_w or _recomputable(n, phase, wants):
            for u in n.all_input_nodes:
                net.edge(vertex(u) + 1, v, _INF)  # W computes n: W has u
                if in_w and u in weights:
                    net.edge(v, vertex(u), _INF)  # I computes n: I computes u
                stack.append(u)
            if in_w:
                net.edge(v, t, _INF if has_flop_formula(_source(n)) else _tie(n))
            else:
                net.edge(s, v, _tie(n))
        else:
            net.edge(s, v, _INF)  # W cannot compute it
    for g in param_grads:
        if isinstance(g, Node):
            net.edge(vertex(g) + 1, t, _INF)
    side = net.source_side(s, t)
    keep = tuple(n for n in graph.nodes if n in ids and ids[n] in side and ids[n] + 1 not in side)
    recompute = frozenset(n for n in ids if n not in weights and ids[n] not in side)
    moved = frozenset(n for n in weights if ids[n] in side)
    _check(keep, recompute, weights - moved)
    return WeightInputs(keep=keep, recompute=recompute, moved=moved)


def _check(keep, recompute, in_w) -> None:
    have = set(keep) | set(recompute) | set(in_w)
    for n in set(recompute) | set(in_w):
        missing = [u for u in n.all_input_nodes if u not in have]
        assert not missing, f"W computes {n} but has not {missing}"
