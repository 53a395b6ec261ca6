"""split_backward: one stage graph -> forward, backward-input (I) and backward-weight (W).

The joint forward+backward graph of the stage is traced with ``make_fx`` (post-autograd
ATen) over a function that runs the stage graph and calls ``torch.autograd.grad``, and
functionalised as it is traced (as AOTAutograd traces its joints): every in-place op and
every write through a view, in the forward and in autograd's backward, becomes its
out-of-place form. Each node then computes a fresh value, so no partition can run a read
after a write that came later in the model (a router's ``topk`` values divided in place
were read by the backward after the forward had overwritten them). Custom
``autograd.Function`` regions (see ``passes.regions``) are replayed through the Function
itself, so the user's own ``backward`` is what gets traced. The joint graph's nodes are
then partitioned by dataflow:

- forward  F = ancestors of the stage outputs (plus getitems of F nodes);
- input    I = ancestors of the input grads, minus F;
- weight   W = ancestors of the param grads, minus F and I.

``saved`` = F values (params and inputs included) that I or W read; W reads F values only
through I: ``saved_for_weight`` = values of F, I or the grad outputs that W reads, and I
returns them unchanged (a reference, not a copy), so each tensor is saved once per edge.
Under a recompute policy, ``saved_for_weight`` is instead the fewest bytes from which W can
finish (``passes.weight_inputs``): W recomputes the forward values the policy drops from
them, and I computes cheap weight-grad work whose result is smaller than its inputs.
Fused backward kernels with an ``output_mask`` (layer norm, convolution, group/batch
norm) are split into an input-grad call (in I) and a weight-grad call (in W) first, so
that I does no weight-grad work.
"""
from __future__ import annotations

import copy
import operator
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx
from torch.fx import GraphModule, Node

from passes import _compat
from passes.inplace import mutated_base
from passes.trace_error import TraceError
from passes.cost_model import node_storages, value_bytes
from passes.recompute import Policy, recompute_policy, recomputed
from passes.stage_graphs import StageGraphs
from passes.weight_inputs import weight_inputs

__all__ = ["kept_for_weight", "saved_bytes", "split_backward", "stage_names", "trace_joint"]

_F, _G, _I, _W = "F", "G", "I", "W"


# --------------------------------------------------------------------------------------
# Running a stage graph with custom Function regions replayed


class _ReplayInterpreter(torch.fx.Interpreter):
    """Runs a stage graph; each custom-Function region runs as ``Fn.apply`` (user backward)."""

    def __init__(self, gm: GraphModule):
        super().__init__(gm)
        self.entries: dict[int, dict[int, Node]] = {}
        for node in gm.graph.nodes:
            if "dpfx_region_input" in node.meta:
                self.entries.setdefault(node.meta["dpfx_region"], {})[node.meta["dpfx_region_input"]] = node
        self.replayed: dict[int, tuple] = {}

    def run_node(self, n: Node) -> Any:
        rid = n.meta.get("dpfx_region")
        if rid is None:
            return super().run_node(n)
        if rid not in self.replayed:
            spec = n.meta["dpfx_region_spec"]
            entries = self.entries.get(rid, {})
            missing = [i for i in range(spec.num_inputs) if i not in entries or entries[i].args[0] not in self.env]
            assert not missing, f"region {rid} ({spec.fn.__qualname__}): inputs {missing} not ready at {n}"
            self.replayed[rid] = spec.call([self.env[entries[i].args[0]] for i in range(spec.num_inputs)])
        j = n.meta.get("dpfx_region_output")
        return None if j is None else self.replayed[rid][j]


# --------------------------------------------------------------------------------------
# Stage graph inspection


def _placeholders(gm: GraphModule, kinds: Sequence[str]) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder" and n.meta.get("dpfx_kind") in kinds]


def stage_names(stage_gm: GraphModule, is_last: bool) -> dict[str, tuple[str, ...]]:
    """``StageGraphs``' name fields for ``stage_gm``: its parameters', buffers', activations',
    external inputs' and outputs' names, in the calling conventions' order."""
    def names(*kinds: str) -> tuple[str, ...]:
        return tuple(n.meta["dpfx_name"] for n in _placeholders(stage_gm, kinds))

    return {"param_names": names("param"), "buffer_names": names("buffer"), "input_names": names("activation"),
            "external_inputs": names("input", "target"), "output_names": _output_names(stage_gm, is_last)}


def _output_args(gm: GraphModule) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    args = out.args[0]
    return list(args) if isinstance(args, (tuple, list)) else [args]


def _infer_is_last(gm: GraphModule) -> bool:
    """Last stage: marked so in meta, or it reads the target, or it has no activations out."""
    for holder in (gm.meta, next(n for n in gm.graph.nodes if n.op == "output").meta):
        if "dpfx_is_last" in holder:
            return bool(holder["dpfx_is_last"])
    if _placeholders(gm, ("target",)):
        return True
    first = _output_args(gm)[0]
    val = first.meta.get("val") if isinstance(first, Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 0 and not _placeholders(gm, ("activation",))


def _output_names(gm: GraphModule, is_last: bool) -> tuple[str, ...]:
    args = _output_args(gm)
    if is_last:
        return ("loss", *(f"output:{i}" for i in range(len(args) - 1)))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    names = out.meta.get("dpfx_output_names")
    if names is not None:
        return tuple(names)
    return tuple(a.meta.get("dpfx_name", a.name) if a.op == "placeholder" else a.name for a in args)


def _fake_like(mode, val) -> Any:
    if not isinstance(val, torch.Tensor):
        return val
    with mode:
        return torch.empty_strided(tuple(val.shape), tuple(val.stride()), dtype=val.dtype, device=val.device)


def _differentiable(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.dtype.is_floating_point or t.dtype.is_complex)


# --------------------------------------------------------------------------------------
# The joint trace


def _joint_fn(stage_gm: GraphModule, order: list[Node], n_params: int, n_bufs: int, n_inputs: int,
              diff_out: list[int]):
    """f(*params, *buffers, *inputs, *grad_outs) -> (*outputs, *grad_inputs, *param_grads,
    *buffers after the forward). The last are the buffers as written by the forward (an MoE's
    ``tokens_per_expert.add_(counts)`` under no_grad); an unwritten one comes back as itself."""
    pos = {n: i for i, n in enumerate(order)}
    ph_order = [n for n in stage_gm.graph.nodes if n.op == "placeholder"]
    # A cut can fall just before an in-place write into the value it carries: in the model
    # that value was an intermediate, here it is a leaf, which autograd won't let be written.
    written = {pos[b] for b in map(mutated_base, stage_gm.graph.nodes) if b is not None and b in pos}
    # a received float no gradient reaches (split_stages marks it) stays a plain tensor; its grad is zeros
    carry = [n.meta.get("dpfx_requires_grad", True) for n in order[n_params + n_bufs: n_params + n_bufs + n_inputs]]

    def fn(*flat):
        args = list(flat[: len(order)])
        grads_out = flat[len(order):]
        params = [p.detach().requires_grad_(True) if _differentiable(p) else p for p in args[:n_params]]
        inputs = [x.detach().requires_grad_(True) if _differentiable(x) and carries else x
                  for x, carries in zip(args[n_params + n_bufs: n_params + n_bufs + n_inputs], carry)]
        vals = params + args[n_params: n_params + n_bufs] + inputs + args[n_params + n_bufs + n_inputs:]
        with torch.enable_grad():
            run_vals = [v.clone() if i in written else v for i, v in enumerate(vals)]
            outs = _ReplayInterpreter(stage_gm).run(*[run_vals[pos[n]] for n in ph_order])
            outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
            pairs = [(outs[i], g) for i, g in zip(diff_out, grads_out) if getattr(outs[i], "requires_grad", False)]
            wrt = [t for t in inputs + params if isinstance(t, torch.Tensor) and t.requires_grad]
            grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                        allow_unused=True) if pairs and wrt else [None] * len(wrt)
        by_id = {id(t): g for t, g in zip(wrt, grads)}
        g_in = [_grad_or_zero(x, by_id) for x in inputs]
        g_par = [_grad_or_zero(p, by_id) for p in params]
        return (*outs, *g_in, *g_par, *run_vals[n_params: n_params + n_bufs])

    return fn


def _grad_or_zero(t, by_id):
    if not _differentiable(t):
        return None
    g = by_id.get(id(t))
    # zeros from the shape alone: a zeros_like(t) would make backward_input save t
    return torch.zeros(t.shape, dtype=t.dtype, device=t.device) if g is None else g


# --------------------------------------------------------------------------------------
# Partition


_MASKED_BACKWARDS = {
    torch.ops.aten.native_layer_norm_backward.default,
    torch.ops.aten.convolution_backward.default,
    torch.ops.aten.native_group_norm_backward.default,
    torch.ops.aten.native_batch_norm_backward.default,
}


def _split_masked_backwards(graph: torch.fx.Graph) -> None:
    """op(..., mask=[a, b, c]) -> op(..., [a, F, F]) for the input grad, op(..., [F, b, c])."""
    for node in list(graph.nodes):
        if node.target not in _MASKED_BACKWARDS:
            continue
        mask = list(node.args[-1])
        users = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        if not mask[0] or not any(mask[1:]) or 0 not in users:
            continue
        with graph.inserting_after(node):
            w_call = graph.call_function(node.target, (*node.args[:-1], [False, *mask[1:]]), node.kwargs)
        with graph.inserting_after(node):
            i_call = graph.call_function(node.target, (*node.args[:-1], [True, False, False]), node.kwargs)
        for k, user in users.items():
            user.replace_input_with(node, i_call if k == 0 else w_call)
        for new in (i_call, w_call):
            new.meta.update(node.meta)
        graph.erase_node(node)


def _ancestors(roots: Sequence[Any], stop: set) -> set:
    seen: set = set()
    stack = [r for r in roots if isinstance(r, Node)]
    while stack:
        n = stack.pop()
        if n in seen or n in stop:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _backward_collectives(phase: dict, grads: Sequence) -> list[Node]:
    """The functional collectives (a TP gather's reduce_scatter, EP's reverse all_to_all) and
    their waits that the backward's ``grads`` need: I roots, so that W stays local even in a
    stage whose inputs take no grad (the first, reading token ids; I would be empty)."""
    return [n for n in _ancestors(grads, set(phase))
            if _compat.is_functional_collective(n) or _compat.is_functional_wait(n)]


def _phases(graph, phs_fwd, phs_grad, outs, g_in, g_par) -> dict[Node, str]:
    phase: dict[Node, str] = {n: _F for n in phs_fwd}
    phase.update({n: _G for n in phs_grad})
    for n in _ancestors(outs, set(phase)):
        phase[n] = _F
    for ph, roots in ((_I, list(g_in) + _backward_collectives(phase, list(g_in) + list(g_par))), (_W, g_par)):
        for n in _ancestors(roots, set(phase)):
            phase[n] = ph
    # A getitem must live with its tuple-producing source; tuples never cross graphs.
    for n in graph.nodes:
        if n.op == "call_function" and n.target is operator.getitem and n in phase:
            src = n.args[0]
            if phase.get(src) in (_F, _I) and phase[src] != phase[n]:
                phase[n] = phase[src]
    return phase


def _reads(nodes, outputs, phase, allowed) -> list[Node]:
    """Nodes with a phase in ``allowed`` read by ``nodes`` or listed in ``outputs``, in order."""
    found: dict[Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if phase.get(a) in allowed:
                found[a] = None
    for o in outputs:
        if isinstance(o, Node) and phase.get(o) in allowed:
            found[o] = None
    return list(found)


def _sub_graph(joint: GraphModule, inputs: Sequence[Node], body: Sequence[Node], outputs: Sequence,
               writes: Sequence[tuple[Node, Node]] = ()) -> GraphModule:
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    for n in inputs:
        env[n] = graph.placeholder(n.name)
        env[n].meta.update(n.meta)
    for n in body:
        env[n] = graph.node_copy(n, lambda a: env[a])
    for dst, src in writes:  # in place into the live buffer: impure, kept by dead-code elimination
        graph.call_function(torch.ops.aten.copy_.default, (env[dst], env[src]))
    graph.output(tuple(env[o] if isinstance(o, Node) else o for o in outputs))
    graph.eliminate_dead_code()
    graph.lint()
    return GraphModule(joint, graph)


# --------------------------------------------------------------------------------------
# Callables following the stage-graph calling conventions


class StageForward:
    """``forward(params, inputs) -> (outputs, saved)``; ``.gm`` takes them flat.

    Each of these callables runs ``.run``: ``.gm`` itself, or (``compiled``) its compiled
    forward, so that ``.gm`` stays the GraphModule the passes read."""

    def __init__(self, gm: GraphModule, num_outputs: int):
        self.gm, self.num_outputs = gm, num_outputs
        self.run: Callable = gm

    def __call__(self, params: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]):
        with torch.no_grad():
            res = self.run(*params, *inputs)
        return tuple(res[: self.num_outputs]), tuple(res[self.num_outputs:])


def saved_bytes(graphs: StageGraphs) -> int:
    """Bytes that one micro-batch's ``saved`` holds from F until I: every saved value but
    the stage's parameters and buffers (which live anyway). Received inputs count, since
    saving them keeps them alive; each value counts once even when saved twice."""
    gm = graphs.forward.gm
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = set(holders[: len(graphs.param_names) + len(graphs.buffer_names)])
    saved = dict.fromkeys(_output_args(gm)[graphs.forward.num_outputs:])
    return sum(_bytes(n.meta.get("val")) for n in saved if isinstance(n, Node) and n not in params)


def _bytes(val: Any) -> int:
    return value_bytes(val) if isinstance(val, torch.Tensor) else 0  # data-dependent sizes: a guess


class StageBackwardInput:
    """``backward_input(saved, grad_outputs) -> (grad_inputs, saved_for_weight)``.

    ``grad_outputs`` has one entry per stage output (last stage: ``(grad_loss,)``);
    entries for outputs that need no grad are ignored and may be None; a None entry for an
    output that needs one counts as zeros.
    """

    def __init__(self, gm: GraphModule, num_grad_inputs: int, grad_slots: Sequence[int],
                 used: Sequence[bool], grad_vals: Sequence[Any]):
        self.gm, self.num_grad_inputs = gm, num_grad_inputs
        self.grad_slots, self.used, self.grad_vals = tuple(grad_slots), tuple(used), tuple(grad_vals)
        self.run: Callable = gm

    def grad_args(self, grad_outputs: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        """The graph's grad arguments: None where unused, zeros for a missing grad, and
        contiguous, the layout the graph was traced with (a grad comes from whatever
        produced it: the next stage's backward, a receive buffer)."""
        grads = []
        for slot, used, val in zip(self.grad_slots, self.used, self.grad_vals):
            g = grad_outputs[slot] if slot < len(grad_outputs) else None
            if not used:
                grads.append(None)
            elif g is None:
                grads.append(torch.zeros(val.shape, dtype=val.dtype, device=val.device))
            else:
                grads.append(g.contiguous())
        return grads

    def __call__(self, saved: Sequence[torch.Tensor], grad_outputs: Sequence[Optional[torch.Tensor]]):
        grads = self.grad_args(grad_outputs)
        with torch.no_grad():
            res = self.run(*saved, *grads)
        return tuple(res[: self.num_grad_inputs]), tuple(res[self.num_grad_inputs:])


class StageBackwardWeight:
    """``backward_weight(saved_for_weight) -> param_grads`` (empty for a stage without params)."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.run: Callable = gm

    def __call__(self, saved_for_weight: Sequence[torch.Tensor]):
        with torch.no_grad():
            return tuple(self.run(*saved_for_weight))


def compile_graph(gm: GraphModule) -> Callable:
    """``torch.compile`` of ``gm``'s own ``forward`` (static shapes, compiled on first call).

    Dynamo caches compiled code per Python code object. Each GraphModule's generated
    ``forward`` is a code object of its own, so each graph gets one cache entry. Compiling
    the module, or a ``StageForward``-like callable, would instead compile a wrapper whose
    code object every graph shares: each graph one more cache entry of it, guarded on the
    object, and past ``torch._dynamo.config.recompile_limit`` graphs the rest run eager."""
    return torch.compile(gm.forward, dynamic=False)


def compiled(graph_callable: Any, compile_fn: Callable[[GraphModule], Callable] = compile_graph) -> Any:
    """A copy of a ``StageForward`` / ``StageBackwardInput`` / ``StageBackwardWeight`` that
    runs ``compile_fn(graph_callable.gm)``; ``.gm`` is the same GraphModule."""
    out = copy.copy(graph_callable)
    out.run = compile_fn(graph_callable.gm)
    return out


# --------------------------------------------------------------------------------------


_UNSUPPORTED_HINT = ("Recurrent layers (nn.RNN/nn.GRU/nn.LSTM) are not supported yet; write the "
                     "recurrence with out-of-place ops (a loop over time steps) or keep it out of the model")


# Recurrent ops: on CPU they decompose into cells that write in place (sigmoid_/add_) into
# values the joint trace saves (grads came out wrong), or into a fused kernel whose
# workspace a fake-tensor trace cannot record.
_RNN_OPS = ("gru", "lstm", "rnn_tanh", "rnn_relu", "mkldnn_rnn_layer", "_thnn_fused_lstm_cell",
            "_thnn_fused_gru_cell", "_cudnn_rnn", "miopen_rnn")


def _refuse_unsupported(stage_gm: GraphModule) -> None:
    """Refuse, never guess: a stage holding a recurrent op."""
    ops = [n.target for n in stage_gm.graph.nodes
           if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)]
    bad = sorted({str(op) for op in ops if op._schema.name.split("::")[-1] in _RNN_OPS})
    if bad:
        raise TraceError(f"the stage uses {', '.join(bad)}, which dualpipe_fx cannot split into "
                         f"input-grad and weight-grad graphs safely. {_UNSUPPORTED_HINT}")


def _trace_joint(stage_gm, params, bufs, inputs, diff_out, out_vals):
    _refuse_unsupported(stage_gm)
    order = params + bufs + inputs
    fn = _joint_fn(stage_gm, order, len(params), len(bufs), len(inputs), diff_out)
    # real constants of the stage graph (lifted tensors: index lists, masks) meet fake values
    # with a shape env: data-dependent sizes (an MoE's .tolist() counts) trace as unbacked SymInts
    mode = _compat.fake_mode_with_shape_env()
    example = [_fake_like(mode, n.meta["val"]) for n in order]
    # grads are traced dense whatever the output's layout; StageBackwardInput.grad_args agrees
    example += [_fake_like(mode, out_vals[i].contiguous()) if isinstance(out_vals[i], torch.Tensor)
                else out_vals[i] for i in diff_out]
    try:
        with torch.fx.traceback.preserve_node_meta():
            joint = _compat.make_functional_fx(fn)(*example)
    except RuntimeError as err:
        raise TraceError(f"the forward+backward of a stage cannot be traced: {err}. {_UNSUPPORTED_HINT}") from err
    for node in joint.graph.nodes:  # module and checkpoint marks of the stage node each came from
        custom = node.meta.get("custom") or {}
        for key in ("dpfx_module", "dpfx_recompute"):
            if key in custom:
                node.meta[key] = custom[key]
    _split_masked_backwards(joint.graph)
    return joint


def trace_joint(stage_gm: GraphModule, is_last: Optional[bool] = None) -> GraphModule:
    """The stage's functionalised forward+backward graph that :func:`split_backward` partitions:
    trace it once and pass it as ``split_backward(..., joint=)`` for several policies."""
    return _joint_of(stage_gm, _infer_is_last(stage_gm) if is_last is None else is_last)[0]


def _io(stage_gm: GraphModule, is_last: bool) -> tuple:
    """``(params, bufs, acts, ext, out_args, diff_out, out_vals)`` of the stage graph."""
    params = _placeholders(stage_gm, ("param",))
    bufs = _placeholders(stage_gm, ("buffer",))
    acts = _placeholders(stage_gm, ("activation",))
    ext = _placeholders(stage_gm, ("input", "target"))
    out_args = _output_args(stage_gm)
    out_vals = [a.meta.get("val") if isinstance(a, Node) else a for a in out_args]
    diff_out = [0] if is_last else [i for i, v in enumerate(out_vals) if _differentiable(v)]
    return params, bufs, acts, ext, out_args, diff_out, out_vals


def _joint_of(stage_gm: GraphModule, is_last: bool) -> tuple[GraphModule, tuple]:
    io = _io(stage_gm, is_last)
    params, bufs, acts, ext, _, diff_out, out_vals = io
    return _trace_joint(stage_gm, params, bufs, acts + ext, diff_out, out_vals), io


def split_backward(stage_gm: GraphModule, *, index: Optional[int] = None,
                   is_last: Optional[bool] = None, recompute: Policy = None,
                   joint: Optional[GraphModule] = None) -> StageGraphs:
    """Split one stage graph into forward, backward-input and backward-weight graphs.

    **Contract**: ``stage_gm(*params, *buffers, *activations, *external) -> outputs``
    (annotated as by ``split_stages``/``capture``) becomes ``StageGraphs`` with
    ``forward(params, inputs) -> (outputs, saved)``,
    ``backward_input(saved, grad_outputs) -> (grad_inputs, saved_for_weight)``,
    ``backward_weight(saved_for_weight) -> param_grads`` (``params`` = params + buffers,
    ``inputs`` = activations + external; see ``passes.stage_graphs``). ``grad_inputs``
    has one entry per activation: None when it is not floating point, zeros when it does
    not reach a differentiated output. Each callable has a flat ``.gm``.

    **Pseudocode**::

        joint = functionalised make_fx(run stage (regions via Fn.apply); autograd.grad(outs, inputs+params))
        split fused masked backward ops into input-grad and weight-grad calls
        F = anc(outputs); I = anc(grad_inputs, backward collectives) - F; W = anc(param_grads) - F - I
        R = F values read by I/W that the recompute policy recomputes (and theirs); I += R
        (under a policy: saved_for_weight = min cut, W recomputes from it; R for I and the cut)
        saved = F values read by I or W; saved_for_weight = values W reads (via I)
        copy F, I, W into three graphs; wrap them in the calling conventions

    Args:
        stage_gm: the stage graph; not mutated.
        index: the stage's index (recorded on the result); default
            ``stage_gm.meta["dpfx_stage"]`` or 0.
        is_last: whether the stage computes the loss (outputs ``(loss, *model_outputs)``,
            only the loss differentiated); inferred from annotations when None.
        recompute: None, ``"full"``, ``"selective"`` or ``policy(node) -> "save" |
            "recompute"`` (see ``passes.recompute``): forward values I recomputes instead
            of F saving them, and W too where that keeps fewer bytes from I to W (see
            ``passes.weight_inputs``); checkpoint regions of the model recompute under any
            policy (with None, W reads them from I).
        joint: ``trace_joint(stage_gm, is_last)`` (or that of a stage graph with the same
            ops, wiring and shapes), traced once for several policies; default: traced here.

    Returns:
        :class:`passes.stage_graphs.StageGraphs`.
    """
    is_last = _infer_is_last(stage_gm) if is_last is None else is_last
    index = stage_gm.meta.get("dpfx_stage", 0) if index is None else index
    traced, (params, bufs, acts, ext, out_args, diff_out, out_vals) = _joint_of(stage_gm, is_last) \
        if joint is None else (joint, _io(stage_gm, is_last))
    return _partition(stage_gm, traced, index, is_last, params, bufs, acts, ext, out_args, diff_out, out_vals,
                      recompute_policy(recompute), bounded=recompute is not None)


def _is_forward(phase):
    return lambda n: phase.get(n) == _F and n.op != "placeholder"


def _handed_backward(graph, phase, body, g_in, g_par, wants):
    """I recomputes what the policy drops of the values I and W read, and hands W the ones W
    reads: ``(I's nodes, saved_for_weight, saved)``."""
    needed = _reads(body[_I] + body[_W], g_in, phase, (_F,))
    redo = recomputed(needed, _is_forward(phase), wants)
    phase = {n: (_I if n in redo else p) for n, p in phase.items()}
    i_body = [n for n in graph.nodes if phase.get(n) == _I and n.op != "placeholder"]
    sfw = _reads(body[_W], g_par, phase, (_F, _G, _I))
    saved = _reads(i_body + body[_W], g_in, phase, (_F,))
    return i_body, sfw, saved + [n for n in sfw if phase[n] == _F and n not in saved]


def _bounded_backward(graph, phase, body, g_in, g_par, wants, free):
    """What I keeps for W is a minimum (``passes.weight_inputs``): W recomputes forward values
    the policy drops, I computes cheap weight-grad work with small results; I recomputes
    what it reads and what it keeps: ``(I's nodes, W's nodes, saved_for_weight, saved)``."""
    plan = weight_inputs(graph, phase, body[_W], g_par, wants, free)
    moved = [n for n in body[_W] if n in plan.moved]
    needed = _reads(body[_I] + moved, list(g_in) + list(plan.keep), phase, (_F,))
    redo = recomputed(needed, _is_forward(phase), wants)
    phase = {n: (_I if n in redo else p) for n, p in phase.items()}
    i_body = [n for n in graph.nodes if n.op != "placeholder" and (phase.get(n) == _I or n in plan.moved)]
    w_body = [n for n in graph.nodes if n in plan.recompute or (phase.get(n) == _W and n not in plan.moved)]
    saved = _reads(i_body, g_in, phase, (_F,))
    saved = saved + [n for n in plan.keep if phase[n] == _F and n not in saved]
    return i_body, w_body, list(plan.keep), saved


def _partition(stage_gm, joint, index, is_last, params, bufs, acts, ext, out_args, diff_out, out_vals, wants,
               bounded=False):
    phs = [n for n in joint.graph.nodes if n.op == "placeholder"]
    n_fwd = len(params) + len(bufs) + len(acts) + len(ext)
    flat_out = list(_output_args(joint))
    n_out = len(out_args)
    outs = flat_out[:n_out]
    g_in = flat_out[n_out: n_out + len(acts)]  # grads of external inputs are not returned
    g_par = flat_out[n_out + len(acts) + len(ext): n_out + len(acts) + len(ext) + len(params)]
    # buffers the forward writes: F writes each new value back into the buffer (copy_)
    writes = [(ph, new) for ph, new in zip(phs[len(params): len(params) + len(bufs)],
                                           flat_out[len(flat_out) - len(bufs):]) if new is not ph]
    phase = _phases(joint.graph, phs[:n_fwd], phs[n_fwd:], outs + [new for _, new in writes], g_in, g_par)
    body = {ph: [n for n in joint.graph.nodes if phase.get(n) == ph and n.op != "placeholder"]
            for ph in (_F, _I, _W)}
    if bounded:
        body[_I], body[_W], sfw, saved = _bounded_backward(joint.graph, phase, body, g_in, g_par, wants,
                                                             set(phs[: len(params) + len(bufs)]))
    else:
        body[_I], sfw, saved = _handed_backward(joint.graph, phase, body, g_in, g_par, wants)
    fwd = _sub_graph(joint, phs[:n_fwd], body[_F], outs + saved, writes)
    bwd_i = _sub_graph(joint, saved + phs[n_fwd:], body[_I], g_in + sfw)
    bwd_w = _sub_graph(joint, sfw, body[_W], g_par)
    used = [len(g.users) > 0 for g in phs[n_fwd:]]
    return StageGraphs(
        index=index,
        **stage_names(stage_gm, is_last),
        forward=StageForward(fwd, n_out),
        backward_input=StageBackwardInput(bwd_i, len(acts), diff_out, used, [out_vals[i] for i in diff_out]),
        backward_weight=StageBackwardWeight(bwd_w),
        is_last=is_last,
    )


def kept_for_weight(stages: Sequence[torch.fx.GraphModule], recompute) -> dict[str, tuple[int, int]]:
    """What I keeps for W under ``recompute``, as the split keeps it, per parameter FQN:
    ``{fqn: (bytes F saves for W, bytes I makes for W)}`` per micro-batch.

    The memory-aware cut (``passes.split_stages``) reads this instead of a second model:
    ``stages`` (stage graphs of some cut, e.g. the time-balanced one) are split by
    ``split_backward`` under the same policy, so the values kept are this module's minimum
    cut (``passes.weight_inputs``). A kept value is charged to the parameter first in its stage's order among those whose
    grads W computes from it (the weight it serves), so a cut moves it with its weight.
    Storages count once; parameters, a stage's inputs and its received grads never (the cut
    counts what crosses a cut on its own).
    """
    out: dict[str, list[int]] = {}
    for index, gm in enumerate(stages):
        sg = split_backward(gm, index=index, is_last=index == len(stages) - 1, recompute=recompute)
        bwd_i, bwd_w = sg.backward_input.gm, sg.backward_weight.gm
        n_saved = len(_graph_outputs(sg.forward.gm)) - sg.forward.num_outputs
        from_f = set(node_storages(_graph_outputs(sg.forward.gm)))  # what F returns (saved, or sent on)
        seen = set(node_storages(_graph_placeholders(sg.forward.gm))) | set(node_storages(_graph_placeholders(bwd_i)[n_saved:]))
        serves = _served(bwd_w, _graph_outputs(bwd_w))
        kept = _graph_outputs(bwd_i)[sg.backward_input.num_grad_inputs:]
        for value, ph in zip(kept, _graph_placeholders(bwd_w)):
            params = serves.get(ph, ()) if isinstance(value, Node) else ()
            if not params:
                continue
            name = sg.param_names[min(params)]
            for key, nbytes in node_storages([value]).items():
                if key not in seen:
                    seen.add(key)
                    out.setdefault(name, [0, 0])[0 if key in from_f else 1] += nbytes
    return {name: (f, i) for name, (f, i) in out.items()}


def _served(gm: torch.fx.GraphModule, grads: Sequence) -> dict[Node, set[int]]:
    """Per node of W's graph: the indices of the param grads computed from it."""
    serves: dict[Node, set[int]] = defaultdict(set)
    for i, g in enumerate(grads):
        if isinstance(g, Node):
            serves[g].add(i)
    for n in reversed(list(gm.graph.nodes)):
        for u in n.all_input_nodes:
            serves[u] |= serves[n]
    return serves


def _graph_placeholders(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _graph_outputs(gm: GraphModule) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]
