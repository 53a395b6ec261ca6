"""``dualpipe_fx.compile``: one call from a model to this rank's pipelined trainer.

**Contract**: ``compile(model, loss_fn, example_inputs, example_target, *, example_kwargs,
schedule, num_microbatches, group, device, param_init_fn, ...) -> Pipeline``, called on every
rank of ``group`` with the same model (same weights, or built on meta and seeded alike) and
example; nothing is communicated until ``step()``.

**Pseudocode**
    check the schedule fits the world size and micro-batch count, and the devices agree
    program = the schedule's per-rank actions (N ranks, C micro-batches)
    split = capture (fake tensors of `device` if anything is on meta) + cut into the
            program's model parts (every rank, same result) + I/W split of this rank's parts
    allocate + initialise this rank's meta params/buffers on `device` (runtime.materialize)
    return build_pipeline(model, split.stages, program, ...)   # keeps this rank's stages
    (a step of new shapes repeats the split at the same cut and the build: _build_shape)
"""
from __future__ import annotations

import dataclasses
import itertools
import weakref
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dualpipe_fx.api import options
from dualpipe_fx.api.autoplan import AUTO, fit_recompute, pick_schedule
from dualpipe_fx.api.options import ActivationBudget, MemoryPolicy, Parallelism
from dualpipe_fx.runtime.agree import (HINTS, agree, as_timeout, call_fields, cut_fields, together, verify_names,
                                       vote_device)
from dualpipe_fx.runtime.build import build_pipeline, local_names, local_parts
from dualpipe_fx.runtime.data_parallel import ExpertParallel, check_expert_parallel, check_groups, dp_fields
from dualpipe_fx.runtime.errors import PeerTimeoutError, check_world  # noqa: F401  re-exported
from dualpipe_fx.runtime.materialize import materialize
from dualpipe_fx.runtime.pipeline import Pipeline
from dualpipe_fx.runtime.programs import Shapes
from dualpipe_fx.runtime.tensor_parallel import is_tensor_parallel, localize
from dualpipe_fx.schedules import generate, get_schedule
from dualpipe_fx.schedules.ir import Program
from dualpipe_fx.api.split import check_mixed_precision, split_for_program
from passes._compat import FLEX_ATTENTION, tree_flatten
from passes.model_call import as_inputs
from passes.cost_model import scalar_costs
from passes.inplace import updating_batch_norms


def _example_tensors(examples: tuple, target, kwargs) -> list[tuple[str, torch.Tensor]]:
    named = [(f"input {i}", t) for i, t in enumerate(examples)]
    if isinstance(kwargs, Mapping):  # non-tensor keyword values are constants: no device
        named += [(f"kwargs[{k!r}]", t) for k, v in kwargs.items() for t in tree_flatten(v)[0]
                  if isinstance(t, torch.Tensor)]
    named += [("target", target)] if target is not None else []
    for what, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"compile(): example {what} is a {type(t).__name__}; expected tensors")
    return named


def _model_devices(model: nn.Module) -> set[torch.device]:
    return {t.device for t in (*model.parameters(), *model.buffers())}


def _resolve(device) -> torch.device:
    """``device`` with an index where the type has one (``cuda`` -> ``cuda:<current>``)."""
    device = torch.device(device)
    if device.index is None and device.type not in ("cpu", "meta"):
        module = torch.get_device_module(device.type)
        device = torch.device(device.type, module.current_device())
    return device


def _check_devices(model: nn.Module, examples: tuple, target, kwargs, device) -> torch.device:
    """Where the stages run; the model's tensors and the examples must be there or on meta."""
    named = _example_tensors(examples, target, kwargs)
    held = _model_devices(model)
    if device is None:
        if any(d.type == "meta" for d in held):
            raise ValueError("compile(): the model's parameters are on meta and device=None; expected the "
                             "device this rank's stages run on. Fix: pass device='cpu' (or 'cuda', ...): "
                             "each rank then allocates only its own stages' parameters there")
        real = sorted(held, key=str) or [t.device for _, t in named if not t.is_meta]
        device = real[0] if real else torch.device("cpu")
    elif torch.device(device).type == "meta":
        raise ValueError("compile(device='meta'): expected the device the stages run on ('cpu', 'cuda', ...)")
    device = _resolve(device)
    found = [("the model's parameters", d) for d in sorted(held, key=str)]
    found += [(f"example {what}", t.device) for what, t in named]
    for what, d in found:
        if d.type != "meta" and d != device:
            raise ValueError(f"compile(): {what} on {d}, but the stages run on {device} (the model's "
                             "device, or device=); expected every tensor there or on meta. Fix: move the "
                             "model and the examples to one device, or pass that device=")
    return device


def check_compile_stages(compile_stages: bool, gm: torch.fx.GraphModule) -> None:
    """Refuse ``compile_stages=True`` for a model that calls flex attention (every rank alike:
    the captured graph is the same on each)."""
    if compile_stages and any(n.target is FLEX_ATTENTION for n in gm.graph.nodes):
        raise ValueError(
            "compile(compile_stages=True): the model calls flex_attention, and torch.compile (Dynamo) cannot "
            "trace the flex higher-order op again once it is in a traced stage graph (torch 2.13/2.14 expect "
            "its pre-trace arguments, not the lifted mask_mod buffers: 'too many values to unpack'). Fix: "
            "compile_stages=False; the stage graphs then run the flex op as traced")


def _check_mirrored_running_stats(model: nn.Module, program: Program, schedule: str) -> None:
    """Refuse BatchNorm in train mode under a schedule that holds a stage on two ranks (the
    bidirectional DualPipe): each copy would update its running statistics from its half of the
    micro-batches, and the copies would drift apart."""
    if program.num_stages == program.num_model_parts:
        return
    names = [f"{name}.running_mean" for name in updating_batch_norms(model)]
    if names:
        raise ValueError(
            f"compile(schedule={schedule!r}): the schedule holds every stage on two ranks, each running half "
            f"of the micro-batches, and the model's BatchNorm layers update their running statistics in train "
            f"mode ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): the two copies would differ. Fix: "
            "schedule='dualpipev' (or another schedule with one copy of each stage), or those layers in eval() "
            "mode or with track_running_stats=False")


def _check_init_fn(param_init_fn) -> None:
    if param_init_fn is not None and not callable(param_init_fn):
        raise TypeError(f"compile(param_init_fn={param_init_fn!r}): expected a callable fn(module) that "
                        "initialises the module's own parameters and buffers in place, or None")


def _agreed_options(args: Mapping[str, Any], memory: MemoryPolicy) -> dict[str, Any]:
    """compile()'s options every rank must share (callables are compared by their cut instead)."""
    agreed = {k: args[k] for k in ("compile_stages", "overlap", "split_points", "max_programs")}
    agreed.update(balance=memory.balance, memory_budget=memory.budget, optimizer=memory.optimizer)
    for k, value in (("cost", args["cost"]), ("recompute", memory.recompute)):
        if value is None or isinstance(value, str):
            agreed[k] = value
        elif isinstance(value, ActivationBudget):
            agreed[k] = repr(value)
    policy = args["mixed_precision"]
    agreed["mixed_precision"] = None if policy is None else (
        f"param {policy.param_dtype}, reduce {policy.reduce_dtype}, output {policy.output_dtype}, "
        f"cast inputs {policy.cast_forward_inputs}")
    return agreed


class _RankZeroTimings:
    """``cost(node)`` from rank 0's measured op times, broadcast to the group.

    Each rank timing its own ops would cut the model differently (and the first send
    would fail on a size mismatch), so one rank measures and everyone uses its numbers.
    Called for every node in graph order on every rank, so the broadcast lines up.
    """

    def __init__(self, group: Optional[dist.ProcessGroup]) -> None:
        self.group = group
        self._tables: dict[int, dict[str, float]] = {}

    def __call__(self, node: torch.fx.Node) -> float:
        gm = node.graph.owning_module
        if id(gm) not in self._tables:
            local = scalar_costs(gm, "measured")
            names = sorted(local)
            # on the CPU where the group takes CPU tensors; a pure NCCL group takes its device's
            times = torch.tensor([local[n] for n in names], dtype=torch.float64, device=vote_device(self.group))
            dist.broadcast(times, group_src=0, group=self.group)
            self._tables[id(gm)] = dict(zip(names, times.tolist()))
        return self._tables[id(gm)].get(node.name, 0.0)


def _replica_fields(cut: dict, experts: Optional[ExpertParallel]) -> dict:
    """What data-parallel replicas compare of the cut: all of it, except the checksums of expert
    parameters (peers in other EP ranks hold other experts under the same FQNs); and the EP layout."""
    if experts is None:
        return {**cut, "expert parallel": None}
    sums = {k: v for k, v in cut["parameter checksums"].items() if not experts.is_expert(k)}
    replicas = 1 if experts.replica_group is None else dist.get_world_size(experts.replica_group)
    return {**cut, "parameter checksums": sums,
            "expert parallel": {"EP size": dist.get_world_size(experts.group), "expert replicas": replicas}}


def _localize_tp(model: nn.Module, par: Parallelism):
    """The model's tensor-parallel styles as local forms (``runtime.tensor_parallel``), or None;
    refused beside expert parallelism and sharded data parallelism (not composed yet), on
    every rank alike and before the model is changed (``dp_mode="replicate"`` composes: it
    reduces the local shards' grads)."""
    if not is_tensor_parallel(model):
        return None
    if par.expert_parallel is not None or par.dp_group is not None and par.dp_mode != "replicate":
        raise ValueError("compile(): the model is tensor-parallel (DTensor parameters from parallelize_module) and "
                         f"parallelism has dp_mode={par.dp_mode!r} over a dp_group, expert_parallel="
                         f"{par.expert_parallel!r}; expected the pipeline and TP alone or with dp_mode='replicate': "
                         "TP with sharded data parallelism or expert parallelism is not composed yet. Fix: "
                         "Parallelism(dp_group, 'replicate') or no dp_group / expert_parallel with a TP model")
    return localize(model)


def compile(model: nn.Module, loss_fn: Callable, example_inputs, example_target=None, *,
            example_kwargs: Optional[Mapping[str, Any]] = None, schedule: str = "dualpipev",
            num_microbatches: int, group: Optional[dist.ProcessGroup] = None, device=None,
            parallelism: Optional[Parallelism] = None, memory: Optional[MemoryPolicy] = None,
            mixed_precision=None, param_init_fn: Optional[Callable[[nn.Module], None]] = None,
            compile_stages: bool = False, overlap: bool = True, cost="flops",
            split_points: Optional[Sequence[str]] = None, verify_weights: bool = True,
            timeout: timedelta | float = timedelta(seconds=300), max_programs: int = 8, **deprecated) -> Pipeline:
    """Pipeline ``model`` over the ranks of ``group`` with ``schedule``.

    Args:
        model, loss_fn: the model and ``loss_fn(model_output, target) -> scalar``.
        example_inputs, example_target: ONE micro-batch (a tensor or a tuple of tensors).
        example_kwargs: the model's keyword arguments for that micro-batch,
            ``model(*example_inputs, **example_kwargs)``: tensors (or pytrees of them) are
            split into micro-batches at ``step()`` like ``example_inputs``; other values
            (``use_cache=False``, ``None``) are constants of the trace, and ``step()`` must get
            the same ones.
        schedule: a name from ``dualpipe_fx.schedules.SCHEDULES`` (dualpipev, dualpipe, zbv,
            1f1b, gpipe, interleaved_1f1b, zb1p), or ``"auto"``: the fastest of them (and, when
            ``memory.recompute`` is None or an ``ActivationBudget``, the fastest recompute
            policy within it) for these micro-batches
            that keeps every rank within ``memory.budget`` (or the device's memory), predicted
            by ``dualpipe_fx.autoplan``'s model (``api.autoplan.pick_schedule``; rank 0 logs the
            ranking), with ``parallelism.dp_group``'s replicas counted in its mode. To choose
            ``num_microbatches`` too, call ``dualpipe_fx.autoplan`` with the whole batch.
        num_microbatches: micro-batches per step; ``step`` splits its batch into this many.
        group: the pipeline's process group (default: the world).
        compile_stages: wrap each stage graph in ``torch.compile`` (refused for a model that
            calls flex attention: ``check_compile_stages``).
        timeout: how long a rank waits for a peer before ``PeerTimeoutError``: a
            ``timedelta`` or a number of seconds.
        max_programs: how many programs the pipeline keeps, one per input-shape signature
            (``Pipeline.step`` builds one for a batch of new shapes: another sequence length,
            batch size, or a smaller last batch; the least recently used is evicted first).
        cost, split_points: how to cut the model (see ``dualpipe_fx.split``). With
            ``cost="measured"`` rank 0's timings are broadcast, so every rank cuts alike.
        overlap: run each F&B pair as one multiplexed graph (``passes.multiplex``);
            False runs F then B.
        device: where this rank's stages run (default: the model's and the examples'
            device). Required for a model built under ``torch.device("meta")``: it is traced
            on fake tensors of ``device`` (that device's kernels), and this rank allocates
            there only its own stages' parameters and buffers; the others stay on meta.
            Examples may be on meta or on ``device``.
        memory: a :class:`dualpipe_fx.MemoryPolicy` (default ``MemoryPolicy()``):
            ``recompute``: activation recomputation, as ``dualpipe_fx.split``: None,
            ``"full"``, ``"selective"`` or ``policy(node) -> "save" | "recompute"``; or
            ``ActivationBudget(fraction)``: the least of them whose saved activations stay
            within ``fraction`` x those without recompute on every rank (``Pipeline.recompute``
            says which).
            ``balance``, ``budget``, ``optimizer``: how the cut evens out the ranks (see
            ``dualpipe_fx.split``): ``"both"`` (default) evens the larger of each rank's time
            and memory relative to their means; with ``budget`` (bytes per rank) the least
            time among cuts within it. Activations in flight per stage are read off the
            schedule's program; memory is an estimate (``Pipeline.memory_plan`` has the plan).
        param_init_fn: ``fn(module)``, called (grad off, under a seed from
            ``torch.initial_seed()`` and the module's FQN) for each module owning a meta
            parameter or buffer of this rank, to initialise its own tensors in place.
            Default: ``module.reset_parameters()``. A module with neither gets its values
            from ``Pipeline.load_state_dict``; ``step()`` refuses to run before that. See
            ``dualpipe_fx.runtime.materialize`` for non-persistent buffers.
        verify_weights: checksum every parameter and buffer that has values on this rank
            and compare it with every other rank that has values for it (a model built
            whole on each rank: all of them; built on meta: those the ranks share). False
            compares only the parameters more than one rank reads. Cost: ~2 ms for 34 MB,
            0.2-0.6% of compile time (benchmarks/agreement.py). Uninitialised tensors
            waiting for ``load_state_dict`` are not compared.
        parallelism: a :class:`dualpipe_fx.Parallelism` (default: the pipeline alone).
            ``dp_group``, ``dp_mode``: data parallelism over ``dp_group``, the ranks that hold this
                rank's stages in the other pipeline replicas (``group`` and ``dp_group`` are a
                row and a column of one grid). Each replica steps on its own batch; the grads are
                those of the mean over the replicas. ``"replicate"`` (DDP): each parameter's
                grad is all-reduced as soon as its last W of the step ran, overlapping the rest
                of the step. ``"shard"`` (ZeRO-3, FSDP ``FULL_SHARD``) and ``"shard_grad_op"``
                (ZeRO-2): parameters, grads and optimizer state are sharded by rows;
                ``parameters()`` are ``DTensor`` shards, a stage's parameters are all-gathered
                before its first action of the step (and, with ``"shard"``, freed after its
                last), grads reduce-scattered after its last W. The collectives are torch's
                UNSHARD/RESHARD/REDUCE_GRAD runtime actions (``runtime/data_parallel.py``).
            ``expert_parallel``: an ``ExpertParallel(group, params, replica_group)`` when the model's
                experts are split over an EP group inside ``dp_group`` (each rank holds its slice
                and the model's forward exchanges tokens by all_to_all, traced into the stage
                graphs): those parameters are never sharded over ``dp_group``; their grads are
                reduced over ``replica_group`` only and averaged like the rest (the grads of the
                mean loss over ``dp_group``). In the shard modes they are ``DTensor``
                ``Shard(0)`` parameters on a mesh over the EP group named ``"ep"``.
        Tensor parallelism needs no option: a model parallelised with torch's
            ``parallelize_module(model, tp_mesh, plan)`` (``ColwiseParallel``, ``RowwiseParallel``,
            ``SequenceParallel``, ``PrepareModuleInput``/``Output``) names its 1-D TP mesh in its
            DTensor parameters and hooks. Before tracing, its styles become local shards and traced
            collectives (``runtime.tensor_parallel.localize``; it changes ``model`` in place);
            ``parameters()`` are then ``DTensor`` parameters with the plan's placements and their
            ``.grad`` ``DTensor``. It composes with ``dp_mode="replicate"`` (the local shards' grads
            are all-reduced over ``dp_group``); other styles, TP beside the shard modes or
            ``expert_parallel`` are refused (ValueError, every rank, before any communication).
        mixed_precision: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (FSDP2's), or None
            (compute in the parameters' dtype). The stage graphs are traced with the
            floating-point parameters in ``param_dtype`` (activations, saved tensors, the cut's
            bytes and the memory plan in that dtype) and read copies cast once per stage and
            step, before its first action (``dp_mode="shard"``/``"shard_grad_op"``: each rank
            casts its shard and all-gathers in ``param_dtype``), freed after its last
            (``"shard_grad_op"`` keeps them). W's ``param_dtype`` grads are summed into the
            parameters' own ``.grad``, reduced over ``dp_group`` in ``reduce_dtype`` (None:
            ``param_dtype``, as FSDP2) and stored back in the parameters' dtype: the optimizer
            sees the parameters and ``.grad`` as without the policy. ``cast_forward_inputs``
            casts the model's floating-point inputs to ``param_dtype``, ``output_dtype`` its
            floating-point outputs (before ``loss_fn``), as ``fully_shard(model, mp_policy=...)``
            does. Without ``dp_group`` too (pipeline parallelism alone).
        **deprecated: the 0.1 keywords ``dp_group=``, ``dp_mode=``, ``expert_parallel=``
            (fields of ``parallelism``) and ``recompute=``, ``balance=``, ``memory_budget=``,
            ``optimizer=`` (fields of ``memory``, ``memory_budget`` as ``budget``): they work
            in 0.2 with a ``FutureWarning`` and go in 0.3.

    Returns:
        this rank's ``Pipeline``.

    Raises:
        ValueError: the ranks disagree (the same error on every rank, before any P2P):
            world size, torch/dualpipe_fx versions, schedule, num_microbatches, example
            shapes and dtypes, options, the stage cut, or parameter checksums.
        PeerTimeoutError: a rank did not join that agreement within ``timeout``.
        TypeError: ``parallelism``/``memory`` of another type, or an unknown keyword.
        FutureWarning (a warning): a 0.1 keyword (``dp_group=``, ``dp_mode=``,
            ``expert_parallel=``, ``recompute=``, ``balance=``, ``memory_budget=``,
            ``optimizer=``); it still works in 0.2 (ValueError beside its group object).
        PeerFailedError: another rank raised in the middle of ``compile()`` (its device,
            trace, cut or ``param_init_fn``): raised at once, naming that rank and its
            message; the failing rank raises its own error.
        ValueError: ``dp_group`` does not form a grid with ``group`` (it lacks this rank,
            shares another rank with ``group``, or the grid exceeds the world), or an unknown
            ``dp_mode`` (before any communication); the replicas in ``dp_group`` disagree on
            the call, their place in the pipeline, the cut or the starting weights.
        ValueError: the schedule does not fit the world size / micro-batch count, or the
            examples and the model are on different devices, or the model is on meta and
            ``device`` is None, or a module without an initialiser owns a non-persistent
            buffer on meta, or no cut keeps every rank within ``memory.budget`` (before any
            communication).
    """
    if not dist.is_initialized():
        raise ValueError("compile(): torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group(...) on every rank first")
    groups = options.resolve("compile", deprecated, parallelism=parallelism, memory=memory)
    par, mem = groups["parallelism"], groups["memory"]
    examples = as_inputs(example_inputs)
    world = dist.get_world_size(group)
    timeout = as_timeout(timeout)
    options.check_max_programs(max_programs)
    data_parallel = check_groups(group, par.dp_group, par.dp_mode)
    mixed_precision = check_mixed_precision(mixed_precision)
    experts = check_expert_parallel(par.dp_group, par.expert_parallel)
    tensor_parallel = _localize_tp(model, par)
    call = call_fields(schedule, world, num_microbatches, examples, example_target, example_kwargs,
                       _agreed_options(locals(), mem))
    agree(call, group, timeout, "compile()", HINTS)
    # Each `together` block ends in a vote: an error on one rank (its device, its trace, its
    # init) stops every rank at once instead of leaving them in the next collective.
    with together(group, timeout, "compile()"):
        if schedule != AUTO:
            check_world(schedule, world, num_microbatches, get_schedule(schedule))
        device = _check_devices(model, examples, example_target, example_kwargs, device)
        _check_init_fn(param_init_fn)
    if schedule == AUTO:  # every rank picks alike (api.autoplan)
        schedule, mem = pick_schedule(model, loss_fn, examples, example_target, example_kwargs, group=group,
                                      world=world, num_microbatches=num_microbatches, device=device, memory=mem,
                                      timeout=timeout, dp_group=par.dp_group, dp_mode=par.dp_mode)
    elif isinstance(mem.recompute, ActivationBudget):  # every rank picks alike: from the graphs alone
        with together(group, timeout, "compile()"):
            mem = fit_recompute(model, loss_fn, examples, example_target, example_kwargs, schedule=schedule,
                                world=world, num_microbatches=num_microbatches, device=device, memory=mem)
    with together(group, timeout, "compile()"):
        program = generate(schedule, world, num_microbatches)
        _check_mirrored_running_stats(model, program, schedule)
    if isinstance(cost, str) and cost == "measured" and world > 1:
        cost = _RankZeroTimings(group)
    recipe = _Recipe(lambda: model, loss_fn, schedule, group, timeout, device, cost, split_points, mem,
                     mixed_precision, compile_stages, overlap, data_parallel, experts, par.dp_mode, tensor_parallel)
    pipe, cut = _build(recipe, program, num_microbatches, examples, example_target, example_kwargs, call=call,
                       first=(param_init_fn, verify_weights))
    recipe = dataclasses.replace(recipe, model_ref=_model_ref(model, pipe))
    shapes = Shapes(partial(_build_shape, recipe, cut), schedule, world, num_microbatches, max_programs,
                    refusal=_shape_refusal(par, tensor_parallel))
    pipe.enable_shapes(shapes, _signature(pipe, shapes))
    return pipe


@dataclass(frozen=True)
class _Recipe:
    """What ``compile()`` settled once (options, device, groups) and every shape's program reuses."""

    # how the pipeline holds the model for later shapes' traces (_model_ref: weakly when it holds
    # other ranks' real tensors)
    model_ref: Callable[[], Optional[nn.Module]]
    loss_fn: Callable
    schedule: str
    group: Optional[dist.ProcessGroup]
    timeout: timedelta
    device: torch.device
    cost: Any
    split_points: Optional[Sequence[str]]
    memory: MemoryPolicy
    mixed_precision: Any
    compile_stages: bool
    overlap: bool
    data_parallel: Any
    experts: Optional[ExpertParallel]
    dp_mode: str
    tensor_parallel: Any = None  # runtime.tensor_parallel.TensorParallel


def _build(recipe: _Recipe, program: Program, num_microbatches: int, examples: tuple, target, kwargs, *,
           call: Optional[dict] = None, first: Optional[tuple] = None, keep=None,
           where: str = "compile()") -> tuple[Pipeline, Any]:
    """One shape's pipeline: capture + cut (``keep``: at that cut) + I/W split of this rank's
    parts, the cut agreed, then built. ``first``: ``(param_init_fn, verify_weights)`` at
    ``compile()``, which also allocates this rank's parameters and agrees on their checksums
    (and the replicas on the call and the cut); later shapes reuse those parameters. ``where``
    names the call in the ranks' agreement errors."""
    r, pending = recipe, None
    mine = local_parts(program, dist.get_rank(r.group))
    with together(r.group, r.timeout, where):
        model = _model(r, where)
        cost = r.cost if keep is None else "flops"  # a kept cut is not chosen: no measured timings
        parts = split_for_program(program, model, r.loss_fn, examples, target, cost=cost,
                                  split_points=r.split_points, example_kwargs=kwargs, device=r.device,
                                  only_stages=mine, memory=r.memory, mixed_precision=r.mixed_precision,
                                  keep_cut=keep)
        partition = parts.partition
        if r.tensor_parallel is not None:
            r.tensor_parallel.check_traced()
        check_compile_stages(r.compile_stages, partition.captured.gm)
        state, verify = model.state_dict(keep_vars=True), []
        if first is not None:
            names = local_names(partition.stages, mine, partition.captured.param_aliases)
            pending = materialize(model, names, r.device, first[0])
            state = model.state_dict(keep_vars=True)
            verify = verify_names(state, partition.stages, program, first[1],
                                  skip=[n for p in pending.values() for n in p.names])
    cut = cut_fields(partition.stages, state, verify)
    agree(cut, r.group, r.timeout, where, HINTS)
    if r.data_parallel is not None and call is not None:  # the replicas: the same call, place, cut and weights
        agree({**call, **dp_fields(r.group, r.dp_mode), **_replica_fields(cut, r.experts)},
              r.data_parallel[0], r.timeout, "compile()", HINTS)
    with together(r.group, r.timeout, where):
        pipe = build_pipeline(model, parts.stages, program, examples, target, num_microbatches,
                              r.group, r.timeout, r.compile_stages, r.overlap, example_kwargs=kwargs,
                              call=partition.captured.call, outputs=partition.captured.output_layout,
                              part_graphs=partition.stages, device=r.device, pending=pending,
                              data_parallel=r.data_parallel, experts=r.experts, mixed_precision=r.mixed_precision,
                              tensor_parallel=r.tensor_parallel)
    pipe.recompute = r.memory.recompute  # the policy the stage graphs were split with (ActivationBudget: chosen)
    return pipe, partition.kept


def _model_ref(model: nn.Module, pipe: Pipeline) -> Callable[[], Optional[nn.Module]]:
    """How the pipeline keeps ``model`` for later shapes' traces: strongly when the model holds
    nothing but this rank's tensors and meta ones (a meta-built model: keeping it costs
    nothing), else weakly, so that dropping a fully built model frees the other ranks'
    parameters (then a step at new shapes needs the caller to keep it)."""
    mine = {id(t) for t in pipe._state_tensors.values()} | {id(t) for s in pipe.stages.values() for t in s.params}
    tensors = itertools.chain(model.parameters(), model.buffers())
    if any(t.device.type != "meta" and id(t) not in mine for t in tensors):
        return weakref.ref(model)
    return lambda: model


def _model(recipe: _Recipe, where: str) -> nn.Module:
    model = recipe.model_ref()
    if model is None:
        raise ValueError(f"{where}: the model passed to compile() is gone (garbage-collected), and a batch of new "
                         "shapes traces it again; the pipeline holds a fully built model weakly so that dropping it "
                         "frees the other ranks' parameters. Fix: keep a reference to the model while stepping at "
                         "other shapes, build it on meta (compile(device=...)), or pad batches to the compiled "
                         "shapes")
    return model


def _build_shape(recipe: _Recipe, keep, examples: tuple, target, kwargs, num_microbatches: int) -> Pipeline:
    """A later shape's pipeline (``runtime.programs.Shapes.build``): the first cut, no allocation."""
    program = generate(recipe.schedule, dist.get_world_size(recipe.group), num_microbatches)
    return _build(recipe, program, num_microbatches, examples, target, kwargs, keep=keep,
                  where="step()'s build for new shapes")[0]


def _shape_refusal(par: Parallelism, tensor_parallel) -> Optional[str]:
    """Why a pipeline cannot build programs for other shapes, or None."""
    if tensor_parallel is not None:
        return ("the model is tensor-parallel: each shape's program would need the TP layouts traced again, "
                "which dualpipe_fx does not do yet. Fix: pad every batch to the traced shapes (e.g. the "
                "dataset's longest sequence)")
    if par.dp_group is None:
        return None
    return ("this pipeline has data parallelism (parallelism.dp_group, and with it any expert_parallel): its "
            "replicas would have to build and agree on each new shape too, which dualpipe_fx does not do yet. Fix: pad every batch to the traced shapes "
            "(e.g. the dataset's longest sequence), or compile() without dp_group")


def _signature(pipe: Pipeline, shapes: Shapes):
    """The signature of ``compile()``'s own program: its example micro-batch, C times."""
    c = pipe.num_microbatches
    values = {name: torch.empty((c * t.shape[0], *t.shape[1:]), dtype=t.dtype, device="meta")
              for name, t in pipe._example_values.items()}
    shared = {n: tuple(pipe._example_values[n].shape) for n in pipe._call.mask_names}
    values.update({n: pipe._example_values[n] for n in shared})
    target = pipe.example_target
    target = None if target is None else torch.empty((c * target.shape[0], *target.shape[1:]),
                                                     dtype=target.dtype, device="meta")
    return shapes.signature(values, target, pipe._call, shared)
