"""``dualpipe_fx.split``: capture, stage split and I/W split of a model, checkable in one process.

``split(model, loss_fn, example_inputs, example_target, num_stages=4, example_kwargs=...)``
runs the three passes (``capture`` -> ``split_stages`` -> ``split_backward`` per stage) and
returns a :class:`Split`. ``Split.run(inputs, target, **kwargs)`` executes every stage's
forward, then every ``backward_input`` (last stage first), then every ``backward_weight``,
and returns the loss and a grad per original parameter FQN, which is how a user checks a
split against plain autograd before going distributed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

from dualpipe_fx.api import options
from dualpipe_fx.api.options import MemoryPolicy
from dualpipe_fx.planning.memory import optimizer_bytes, peak_models
from dualpipe_fx.planning.simulate import in_flight_by_part
from dualpipe_fx.schedules.ir import Program
from dualpipe_fx.schedules.lowering import RECV_LOOKAHEAD
from passes.balance import BALANCE_MODES, CUT_FIGURES, MemorySpec, PeakModel
from passes.capture import capture
from passes.cost_model import node_costs, stage_io_bytes
from passes.recompute import Policy, recompute_policy
from passes.split_backward import saved_bytes, split_backward, stage_names, trace_joint
from passes.split_stages import KeptCut, StagePartition, default_placement, split_stages
from passes.stage_graphs import StageGraphs

__all__ = ["Split", "split", "split_for_program"]


@dataclass(frozen=True)
class Split:
    """The result of :func:`split`: per-stage graphs and the partition they came from.

    ``stages[s]`` is None for a stage left out by ``split(..., only_stages=...)``.
    """

    stages: tuple[Optional[StageGraphs], ...]
    partition: StagePartition
    model: nn.Module
    placement: Mapping[int, int]
    mixed_precision: Optional[MixedPrecisionPolicy] = None

    @property
    def balance(self) -> float:
        """Largest stage cost over the mean stage cost (1.0 is perfect)."""
        return self.partition.balance

    @property
    def rank_balance(self) -> dict[str, float]:
        """Per rank of ``placement``: the largest rank's time, memory estimate and parameter
        state over the means (``{"time": ..., "memory": ..., "params": ...}``; 1.0 is perfect;
        see ``passes.balance``)."""
        loads = list(self.partition.rank_loads.values())
        return {what: max(v[i] for v in loads) / (sum(v[i] for v in loads) / len(loads) or 1.0)
                for i, what in enumerate(("time", "memory", "params"))}

    def describe(self) -> str:
        """A table: per stage, its rank, param count (elements), FLOPs, activation bytes in/out
        and the bytes F saves for the backward, per micro-batch."""
        named = dict(self.model.named_parameters())
        rows = [("stage", "rank", "params", "fwd FLOPs", "act in (B)", "act out (B)", "saved (B)")]
        last = len(self.stages) - 1
        for s, (sg, gm) in enumerate(zip(self.stages, self.partition.stages)):
            n_params = sum(named[n].numel() for n in _param_names(gm))
            flops = sum(c.flops for c in node_costs(gm).values())
            a_in, a_out = stage_io_bytes(gm)
            out_desc = "loss" if s == last else f"{a_out:,}"
            saved = "-" if sg is None else f"{saved_bytes(sg):,}"  # not split (only_stages)
            rows.append((str(s), str(self.placement[s]), f"{n_params:,}",
                         f"{flops:,.0f}", f"{a_in:,}", out_desc, saved))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append(f"balance (max/mean cost): {self.balance:.3f}")
        lines.append(self._describe_ranks())
        return "\n".join(lines)

    def _describe_ranks(self) -> str:
        rows = [("rank", "stages", "cost", "memory estimate (B)")]
        for rank, (time, mem, _) in sorted(self.partition.rank_loads.items()):
            stages = ",".join(str(s) for s, r in sorted(self.placement.items()) if r == rank)
            rows.append((str(rank), stages, f"{time:,.0f}", f"{mem:,.0f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        ratio = self.rank_balance
        lines.append(f"per rank, max/mean: cost {ratio['time']:.3f}, memory {ratio['memory']:.3f}, "
                     f"parameter state {ratio['params']:.3f}")
        return "\n".join(lines)

    def _stage_params(self, sg: StageGraphs) -> list[torch.Tensor]:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        bufs = dict(self.model.named_buffers(remove_duplicate=False))
        return [compute_copy(params[n], self.mixed_precision) for n in sg.param_names] + \
            [bufs[n] for n in sg.buffer_names]

    def run(self, inputs=(), /, target=None, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward all stages, then backward_input (last first), then backward_weight.

        Args:
            inputs: a tensor or tuple of tensors: one micro-batch, as ``example_inputs``.
            target: the target, if the loss takes one.
            kwargs: the model's keyword arguments, as ``example_kwargs``: tensors of the
                example's shapes, and the same non-tensor values (they are baked in).

        Returns:
            ``(loss, grads)``: the scalar loss and a grad per original parameter FQN
            (tied aliases included; a shared parameter's grads summed over its stages).

        Raises:
            TypeError/ValueError: other shapes, keywords or non-tensor values than the example's.
        """
        missing = [s for s, sg in enumerate(self.stages) if sg is None]
        if missing:
            raise ValueError(f"Split.run: stages {missing} were not split (only_stages); expected every stage. "
                             "Fix: call dualpipe_fx.split() without only_stages")
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        external = self.partition.captured.call.values(inputs, kwargs, "Split.run",
                                                       "call dualpipe_fx.split() again")
        external["target"] = target
        self._check_shapes(external)
        acts: tuple = ()
        saved = []
        for sg in self.stages:
            ext = tuple(external[n] for n in sg.external_inputs)
            acts, s = sg.forward(self._stage_params(sg), (*acts, *ext))
            saved.append(s)
        loss = acts[0]
        grad_out: tuple = (torch.ones_like(loss),)
        for_weight: list[Any] = [None] * len(self.stages)
        for sg in reversed(self.stages):
            grad_out, for_weight[sg.index] = sg.backward_input(saved[sg.index], grad_out)
            saved[sg.index] = None  # what W needs now lives in for_weight
        grads: dict[str, torch.Tensor] = {}
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for sg in self.stages:
            for name, g in zip(sg.param_names, sg.backward_weight(for_weight[sg.index])):
                g = g.to(params[name].dtype)  # mixed precision: param_dtype grads summed in the parameter's dtype
                grads[name] = g if name not in grads else grads[name] + g
            for_weight[sg.index] = None
        return loss.detach(), self._with_aliases(grads)

    def _check_shapes(self, external: Mapping[str, Any]) -> None:
        """The graphs are specialised to the example micro-batch's shapes and dtypes."""
        for node in self.partition.captured.gm.graph.nodes:
            if node.op != "placeholder" or node.meta["dpfx_kind"] not in ("input", "target"):
                continue
            name, want = node.meta["dpfx_name"], node.meta["val"]
            got = external.get(name)
            if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
                desc = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, torch.Tensor) else repr(got)
                if name.startswith("kwarg:"):
                    name = self.partition.captured.call.label(name)  # kwargs['mask']
                raise ValueError(f"Split.run: {name} is {desc}; expected {tuple(want.shape)} {want.dtype} "
                                 "like the example micro-batch. Fix: pass micro-batches of the example's "
                                 "shape, or call dualpipe_fx.split again with an example of the new shape.")

    def _with_aliases(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for root, aliases in self.partition.captured.param_aliases.items():
            for alias in aliases:
                if root in grads:
                    grads[alias] = grads[root]
        return grads


def _param_names(gm: torch.fx.GraphModule) -> list[str]:
    return [n.meta["dpfx_name"] for n in gm.graph.nodes if n.op == "placeholder" and n.meta.get("dpfx_kind") == "param"]


def _only(only_stages: Optional[Collection[int]], num_stages: int) -> set[int]:
    if only_stages is None:
        return set(range(num_stages))
    wanted = set(only_stages)
    bad = sorted(s for s in wanted if not isinstance(s, int) or not 0 <= s < num_stages)
    if bad:
        raise ValueError(f"only_stages={sorted(wanted, key=str)} names stages {bad} outside 0..{num_stages - 1}; "
                         f"expected stage indices of the {num_stages} stages")
    return wanted


def _check_kwarg_names(example_kwargs: Optional[Mapping[str, Any]]) -> None:
    if example_kwargs is not None and "target" in example_kwargs:
        raise ValueError("example_kwargs has the key 'target', but step() and Split.run take target= for "
                         "the loss's target; expected other names. Fix: pass the model's 'target' in "
                         "example_inputs, or wrap the model so that its keyword has another name.")


def _param_state_bytes(optimizer, master_size: Optional[int] = None) -> Callable[[torch.Tensor], int]:
    """Bytes a parameter costs its rank: value + grad + the optimizer's state for it, counted
    as the memory plan counts it (``dualpipe_fx.planning.memory.optimizer_bytes``). ``master_size``:
    mixed precision, the traced parameter ``p`` is the param_dtype copy of a parameter of
    that many bytes per element (value, grad and state in it), plus the copy itself."""
    optimizer_bytes(optimizer, 0, 0, 0)  # an unknown optimizer fails before the trace

    def cost(p: torch.Tensor) -> int:
        size = master_size if master_size is not None and p.is_floating_point() else p.element_size()
        copy = p.numel() * p.element_size() if size != p.element_size() else 0
        return 2 * p.numel() * size + optimizer_bytes(optimizer, p.numel() * size, p.numel(), 1) + copy
    return cost


def check_mixed_precision(policy) -> Optional[MixedPrecisionPolicy]:
    """``policy`` once it is a ``MixedPrecisionPolicy`` of floating-point dtypes (or None).

    Raises:
        TypeError: another type, or a dtype that is not floating point.
    """
    if policy is None:
        return None
    if not isinstance(policy, MixedPrecisionPolicy):
        raise TypeError(f"mixed_precision={policy!r}; expected a torch.distributed.fsdp.MixedPrecisionPolicy "
                        "(e.g. MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)) "
                        "or None")
    for field in ("param_dtype", "reduce_dtype", "output_dtype"):
        dtype = getattr(policy, field)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"mixed_precision.{field}={dtype!r}; expected a floating-point torch.dtype "
                            "(torch.bfloat16, torch.float16, torch.float32) or None")
    return policy


def compute_copy(param: torch.Tensor, policy: Optional[MixedPrecisionPolicy]) -> torch.Tensor:
    """What the stage graphs read for ``param``: its value in ``policy.param_dtype`` (floating
    point parameters), as FSDP2 casts it; the parameter itself without a cast."""
    dtype = None if policy is None else policy.param_dtype
    if dtype is None or not param.is_floating_point() or param.dtype == dtype:
        return param
    return param.detach().to(dtype)


def master_size(model: nn.Module, policy: Optional[MixedPrecisionPolicy]) -> Optional[int]:
    """Bytes per element of the model's floating-point parameters when ``policy`` casts them
    (what value, grad and optimizer state take), else None."""
    if policy is None or policy.param_dtype is None:
        return None
    return max((p.element_size() for p in model.parameters() if p.is_floating_point()), default=None)


def memory_spec(optimizer="adamw", in_flight: Optional[Mapping[int, int]] = None,
                memory_budget: Optional[int] = None, recompute: Policy = None,
                master: Optional[int] = None, peaks: Optional[Mapping[int, PeakModel]] = None) -> MemorySpec:
    """The stage cut's memory model (``passes.balance.MemorySpec``) from user-facing options
    (``master``: see ``master_size``)."""
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget <= 0):
        raise ValueError(f"MemoryPolicy(budget={memory_budget!r}); expected bytes per rank as an int > 0 "
                         "(e.g. 80 * 2**30), or None")
    return MemorySpec(param_bytes=_param_state_bytes(optimizer, master), in_flight=dict(in_flight or {}),
                      budget=memory_budget, inputs_only=isinstance(recompute, str) and recompute == "full",
                      selective=isinstance(recompute, str) and recompute == "selective", peaks=peaks,
                      recompute=recompute if isinstance(recompute, str) or callable(recompute) else None)


def _check_balance(balance) -> None:
    if balance not in BALANCE_MODES:
        raise ValueError(f"balance={balance!r}; expected one of {', '.join(map(repr, BALANCE_MODES))}")


def split(model: nn.Module, loss_fn: Callable, example_inputs, example_target=None, num_stages: int = 4,
          *, example_kwargs: Optional[Mapping[str, Any]] = None, cost="flops",
          split_points: Optional[Sequence[str]] = None,
          placement: Optional[Mapping[int, int]] = None, device=None,
          only_stages: Optional[Collection[int]] = None, in_flight: Optional[Mapping[int, int]] = None,
          peaks: Optional[Mapping[int, PeakModel]] = None,
          memory: Optional[MemoryPolicy] = None, mixed_precision: Optional[MixedPrecisionPolicy] = None,
          captured=None, backward_cache: Optional[dict] = None, keep_cut: Optional[KeptCut] = None,
          **deprecated) -> Split:
    """Capture ``model`` + ``loss_fn``, cut it into stages, split each stage's backward.

    **Contract**: ``(model, loss_fn, one example micro-batch) -> Split`` with
    ``Split.stages[s]`` a ``StageGraphs`` (``forward``, ``backward_input``,
    ``backward_weight``), ``Split.partition`` the ``StagePartition``.

    **Pseudocode**::

        captured = capture(model, loss_fn, example_inputs, example_target, example_kwargs=..., device=device)
        partition = split_stages(captured, num_stages, cost, split_points, placement, memory.balance, ...)
        stages = [split_backward(gm, index=s, is_last=s == S-1, recompute=memory.recompute) if s in only_stages
                  else None for s, gm in enumerate(partition.stages)]

    Args:
        model, loss_fn, example_inputs, example_target, example_kwargs: as
            ``passes.capture.capture``: ``model(*example_inputs, **example_kwargs)``; tensors
            in ``example_kwargs`` are inputs, other values constants of the graphs.
        num_stages: number of pipeline stages ``S``.
        cost: ``"flops"``, ``"measured"`` or ``cost(node) -> float`` (see ``split_stages``).
        split_points: module FQNs where a stage must start (e.g. ``["layers.4"]``).
        placement: ``{stage: rank}``; default DualPipeV (rank r holds stages r and S-1-r)
            when S is even, else one rank per stage. A parameter may be used by stages on
            several ranks: each holds it and the runtime sums their grads after the step.
        device: where the graphs will run; needed for a model built under
            ``torch.device("meta")`` (traced on fake tensors of ``device``, see
            ``passes.capture.capture``).
        only_stages: the stages whose I/W split runs (default: all); the others are None in
            ``Split.stages``. A pipeline rank splits only the stages it runs.
        in_flight: ``{stage: micro-batches of activations held at once}`` (``compile()``
            reads it off the schedule); default 1 per stage.
        peaks: ``{rank: passes.balance.PeakModel}``, each rank's step peak as the memory plan
            walks the schedule (``planning.memory.peak_models``; ``compile()`` and
            ``dualpipe_fx.plan`` pass it): the cut then scores a rank's memory the way
            ``plan()`` counts it (``in_flight`` only seeds its exact search).
        memory: a :class:`dualpipe_fx.MemoryPolicy` (default ``MemoryPolicy()``):
            ``recompute``: activation recomputation: None (save what backward reads, except
            ``torch.utils.checkpoint(..., use_reentrant=False)`` regions), ``"full"`` (save
            stage inputs only; I recomputes the forward once, W reads it from I),
            ``"selective"`` (save matmul and attention outputs, recompute the rest) or
            ``policy(node) -> "save" | "recompute"`` (see ``passes.recompute``).
            ``balance``: what the cut evens out per rank of ``placement`` (a rank's load is
            the sum over its stages): ``"time"`` (cost), ``"memory"`` (parameters + grads +
            optimizer state + activations in flight, estimated; see ``passes.balance``) or
            ``"both"`` (default: the larger of time and memory, each relative to its mean;
            with ``budget``: the least time among cuts within the budget).
            ``budget``: bytes per rank no rank's memory estimate may exceed, or None.
            ``optimizer``: ``"adamw"`` (two states in the parameter's dtype), ``"sgd"``
            (none), ``"sgd_momentum"`` (one) or state bytes per parameter element.
        mixed_precision: a ``torch.distributed.fsdp.MixedPrecisionPolicy``, or None: the
            model is traced with its floating-point parameters in ``param_dtype`` (see
            ``passes.capture.capture``), so activations, saved tensors and the bytes on each
            cut are in that dtype; the memory model counts each parameter's value, grad and
            optimizer state in its own dtype plus its ``param_dtype`` copy. ``Split.run``
            casts the parameters and returns grads in the parameters' dtype.
        captured: ``passes.capture.capture``'s result for this very model, examples and
            ``mixed_precision``, to cut again without tracing again (``dualpipe_fx.autoplan``
            cuts one capture for every candidate); None traces.
        backward_cache: a dict kept between calls on one capture: a stage whose graph, index
            role and recompute policy were split before is not split again (autoplan's cuts
            share most of their stages).
        keep_cut: ``Split.partition.kept`` of an earlier split of this model at other input
            shapes: cut at the same ops (``passes.split_stages``' ``keep``), so each parameter
            stays in its stage (``Pipeline.step`` builds a new shape's program this way).
        **deprecated: ``recompute=``, ``balance=``, ``memory_budget=``, ``optimizer=``: the
            fields of ``memory`` as 0.1 took them; they warn (``FutureWarning``) and go in 0.3.

    Returns:
        :class:`Split`.

    Raises:
        passes.capture.TraceError: the model cannot be traced (names the source line).
        ValueError: an invalid ``num_stages``/``split_points``/``placement``/``only_stages``/
            ``memory`` field, or a keyword ``target``; a tensor on meta and ``device=None``; no
            cut within the memory budget (names the rank); a deprecated keyword beside ``memory``.
        TypeError: ``memory`` is not a ``MemoryPolicy``, or an unknown keyword.
    """
    policy = options.resolve("split", deprecated, allowed=("memory",), memory=memory)["memory"]
    _check_kwarg_names(example_kwargs)
    recompute_policy(policy.recompute)  # an unknown policy fails before the trace
    _check_balance(policy.balance)
    mixed_precision = check_mixed_precision(mixed_precision)
    spec = memory_spec(policy.optimizer, in_flight, policy.budget, policy.recompute,
                       master_size(model, mixed_precision), peaks)
    if captured is None:
        captured = capture(model, loss_fn, example_inputs, example_target, example_kwargs=example_kwargs,
                           device=device, mixed_precision=mixed_precision)
    placement = default_placement(num_stages) if placement is None else dict(placement)
    partition = split_stages(captured, num_stages, cost=cost, split_points=split_points, placement=placement,
                             balance=policy.balance, memory=spec, keep=keep_cut)
    last = len(partition.stages) - 1
    wanted = _only(only_stages, len(partition.stages))
    stages = tuple(_split_backward(gm, s, s == last, policy.recompute, backward_cache) if s in wanted
                   else None for s, gm in enumerate(partition.stages))
    return Split(stages=stages, partition=partition, model=model, placement=placement,
                 mixed_precision=mixed_precision)


def _stage_key(gm: torch.fx.GraphModule) -> tuple:
    """What a stage's backward split depends on: its ops and their wiring, its constants (by
    identity) and checkpoint marks, and its values' shapes and dtypes; not its names, so the
    stages of identical layers share one split (each keeps its own names: ``stage_names``)."""
    number: dict[torch.fx.Node, int] = {}
    key = []
    for n in gm.graph.nodes:
        number[n] = len(number)
        if n.op == "placeholder":
            what = n.meta.get("dpfx_kind")
        elif n.op == "get_attr":
            what = id(_attr(gm, n.target))
        else:
            what = str(n.target)
        val = n.meta.get("val")
        # symbolic sizes (data-dependent ones, e.g. the tokens an expert gets) by their names
        shape = (tuple(map(str, val.shape)), val.dtype) if isinstance(val, torch.Tensor) else repr(val)
        args = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: f"%{number[a]}")
        key.append((n.op, what, repr(args), shape, n.meta.get("dpfx_recompute")))
    return tuple(key)


def _attr(gm: torch.fx.GraphModule, target: str):
    for name in target.split("."):
        gm = getattr(gm, name)
    return gm


def _split_backward(gm, index: int, is_last: bool, recompute, cache: Optional[dict]) -> StageGraphs:
    if cache is None or not (recompute is None or isinstance(recompute, str)):
        return split_backward(gm, index=index, is_last=is_last, recompute=recompute)
    stage = (_stage_key(gm), is_last)  # the joint graph is the policies' common part: traced once
    if (stage, recompute) not in cache:
        if (stage, "joint") not in cache:
            cache[stage, "joint"] = trace_joint(gm, is_last)
        cache[stage, recompute] = split_backward(gm, index=0, is_last=is_last, recompute=recompute,
                                                 joint=cache[stage, "joint"])
    return dataclasses.replace(cache[stage, recompute], index=index, **stage_names(gm, is_last))


def part_placement(program: Program) -> dict[int, int]:
    """Rank of each model part (mirrors: the first copy): whose loads the per-rank cut evens out."""
    placement: dict[int, int] = {}
    for stage, rank in sorted(program.stage_to_rank().items()):
        placement.setdefault(program.model_part(stage), rank)
    return placement


def split_for_program(program: Program, model: nn.Module, loss_fn: Callable, examples: tuple, example_target,
                      **options) -> Split:
    """The cut ``compile()`` makes for ``program`` (and ``dualpipe_fx.plan`` repeats): one stage per
    model part, balanced per rank of the program's placement with its activations in flight;
    ``options`` as ``dualpipe_fx.split`` (``only_stages``, ``balance``, ``recompute``, ...)."""
    device = options.get("device")
    lookahead = RECV_LOOKAHEAD if device is None or torch.device(device).type == "cpu" else 0
    peaks = peak_models(program, dict.fromkeys(range(program.num_model_parts), CUT_FIGURES), lookahead)
    return split(model, loss_fn, examples, example_target, program.num_model_parts,
                 placement=part_placement(program), in_flight=in_flight_by_part(program), peaks=peaks, **options)
