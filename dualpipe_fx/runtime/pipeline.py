"""``Pipeline``: one rank's share of a pipelined model, trained with ``step()``.

The loss rule: ``step`` returns the mean of the micro-batch losses,
``sum(loss_fn(model(x_i), y_i)) / C`` over the ``C`` micro-batches, and every grad is the
grad of that mean. For a mean-reduced ``loss_fn`` and equal micro-batches this equals
``loss_fn(model(x), y)`` on the whole batch, so the step matches single-process training.
A sum-reduced ``loss_fn`` gives ``1/C`` of the whole-batch sum: scale it by ``C`` yourself.

Failures (every rank raises, and none hangs):
- a bad call on any rank (``check_inputs``): the ranks vote before any P2P, and each raises
  the failing rank's ``ValueError``/``TypeError``, prefixed with that rank;
- an error in a compute action on one rank (a bad token id, an OOM, a NaN check): that
  rank finishes the step on stand-ins (``Executor``), the ranks vote after the schedule,
  and every rank raises ``PipelineStepError`` naming the rank and the action. The step's
  state is dropped and every local grad set to None (the failed step's partial grads
  cannot be told apart from earlier accumulated ones); the next step runs normally;
- a lost peer (died, hung, closed its connection): ``PeerTimeoutError``, and the group is
  aborted so that every rank learns at once; later calls raise ``PipelineBrokenError``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from datetime import timedelta
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from dualpipe_fx.planning.memory import pipeline_plan
from dualpipe_fx.runtime.agree import StepFailure, agree, together, vote, vote_keyed
from dualpipe_fx.runtime.errors import (PeerTimeoutError, PipelineBrokenError, PipelineStepError, check_batch,
                                        check_inputs)
from dualpipe_fx.runtime.materialize import copy_into
from dualpipe_fx.runtime.profile import profile_pipeline
from dualpipe_fx.runtime.programs import Shapes, Signature, first_microbatch, microbatch_count
from dualpipe_fx.runtime.stage import named_params
from dualpipe_fx.runtime.sync import exchange, set_aside_shared_grads, sum_shared_grads, sync_shared_grads
from dualpipe_fx.runtime.values import external_values, micro_batches
from passes._compat import tree_map


_RECOMPILE = "call dualpipe_fx.compile() again"
_log = logging.getLogger(__name__)
_TORCH_RUNTIME_LOG = "torch.distributed.pipelining.schedules"
# What one input-shape signature's program holds (``runtime.programs``): a step at other shapes
# swaps them for that program's. Parameters, checkpoint state and the group are the pipeline's own.
_PER_SHAPE = ("program", "stages", "schedule", "_schedules", "_executor", "examples", "example_kwargs",
              "example_target", "_call", "_example_values", "_outputs", "num_microbatches", "_holders",
              "_output_metas", "_data_parallel", "_loss_ranks", "_grad_loss")


class Pipeline:
    """This rank's stages of a pipelined model, run by torch.distributed.pipelining.

    Built by ``dualpipe_fx.compile``. Call ``step(*inputs, target=y, **kwargs)`` with the
    full batch on every rank (each rank checks it the same way, so a bad call fails on every
    rank before any communication); it returns the loss on the ranks that hold a last stage
    and ``None`` elsewhere. Tensors among ``inputs`` and ``kwargs`` are split along dim 0
    into micro-batches, and so is a flex-attention ``BlockMask`` with the tensors its
    ``mask_mod`` closes over (``passes.block_masks`` gives the rule); other keyword values must equal the example's (they are baked into
    the trace). Under ``torch.no_grad()`` ``step`` runs forward only and returns the model's
    own output structure (dict, dataclass, ``ModelOutput``, tensor), each tensor
    concatenated over micro-batches along dim 0 (0-dim ones stacked), instead of the loss.

    Shapes (``runtime.programs``): a batch of other shapes than the traced ones (another
    sequence length, batch size, or a smaller last batch) gets its own program, traced, cut
    at the first program's cut and built on every rank at its first step, and kept in an LRU
    of ``compile(max_programs=)``; the ranks agree on the shapes before any P2P. The
    attributes in ``_PER_SHAPE`` (``program``, ``stages``, ``num_microbatches``, ...) are those
    of the program of the latest step; the parameters and their ``.grad`` are the same objects
    for every program, so grads accumulate across steps of different shapes.
    """

    def __init__(self, *, state, program, stages, schedules, executor, examples, example_target,
                 num_microbatches, group, timeout, holders, output_metas, call, device,
                 example_kwargs=None, outputs=None, pending=None, data_parallel=None,
                 tensor_parallel=None) -> None:
        # No reference to the model or the examples: their shapes are all a step needs, and
        # holding them would keep the other ranks' parameters of a real model alive.
        self._state_tensors = dict(state)  # FQN -> this rank's param/persistent buffer (aliases too)
        self._pending = dict(pending or {})  # module FQN -> materialize.Pending: no values yet
        self.program = program  # program.name: the schedule (the one chosen, under schedule="auto")
        self.recompute = None  # the recompute policy the stage graphs were split with (set by compile())
        self.stages = stages
        self.schedule = schedules[False]  # torch's runtime, loaded with this rank's program
        self._schedules = schedules
        self._executor = executor
        self.examples = tuple(_shape_only(t) for t in examples)
        self.example_kwargs = tree_map(_shape_only, dict(example_kwargs or {}))
        self.example_target = _shape_only(example_target)
        self._call = call  # passes.model_call.ModelCall: how step()'s arguments map to graph inputs
        self._example_values = call.values(self.examples, self.example_kwargs, "compile()", "")
        self._outputs = outputs  # passes.model_call.OutputLayout, or None: a tensor or a flat tuple
        self.num_microbatches = num_microbatches
        self.group = group
        self.timeout: timedelta = timeout
        self.rank = dist.get_rank(group)
        self.device = device
        self._holders = holders
        self._output_metas = output_metas
        # runtime.data_parallel.DataParallel or None; in its shard modes _params are its DTensor shards
        self._data_parallel = data_parallel
        self._params = data_parallel.params if data_parallel is not None else named_params(stages)
        # the tensors whose .grad the step writes and syncs; _params shows them to the user
        self._grad_params = self._params
        # runtime.tensor_parallel.TensorParallel or None: _params are then its DTensor parameters
        self._tensor_parallel = tensor_parallel
        if tensor_parallel is not None:
            self._params = tensor_parallel.public(self._params)
        self._loss_ranks = tuple(sorted({program.stage_to_rank()[c[-1]] for c in program.chains}))
        self._broken: Optional[str] = None  # why the group cannot be used again
        self._grad_loss: Optional[torch.Tensor] = None  # d(step loss)/d(micro-batch loss) = 1/C, made once
        self._shapes: Optional[Shapes] = None  # other shapes refused (check_inputs) until enable_shapes()
        self._signature: Optional[Signature] = None  # the active program's

    # -- programs per shape ----------------------------------------------------------------

    def enable_shapes(self, shapes: Shapes, signature: Signature) -> None:
        """Run batches of other shapes through ``shapes`` (``compile()`` calls it); this
        pipeline's own program is the one of ``signature``."""
        self._shapes, self._signature = shapes, signature
        shapes.add(signature, self._program_state())

    def microbatches(self, batch_size: int) -> int:
        """How many micro-batches a step of ``batch_size`` samples runs (``runtime.programs``:
        ``num_microbatches``, or fewer for a smaller last batch where the schedule allows it).

        Raises:
            ValueError: the batch does not divide into any count the schedule accepts.
        """
        if self._shapes is None:
            return self.num_microbatches
        shapes = self._shapes
        return microbatch_count(batch_size, shapes.num_microbatches, shapes.schedule, shapes.world)

    def _program_state(self) -> dict:
        return {name: self.__dict__[name] for name in _PER_SHAPE}

    def _activate(self, signature: Signature) -> None:
        if signature != self._signature:
            if self._signature in self._shapes.programs:  # not when the build just evicted it
                self._shapes.programs[self._signature] = self._program_state()  # keeps _grad_loss
            self.__dict__.update(self._shapes.programs[signature])
            self._signature = signature

    def _program_for(self, inputs: tuple, target, forward_only: bool,
                     kwargs: dict) -> tuple[Optional[Signature], bool]:
        """The step's signature (None without ``_shapes``), and whether a cached program serves
        it (then made active).

        Raises ValueError/TypeError for a batch no program can take (before any P2P).
        """
        if self._shapes is None:
            return None, True
        values = self._call.values(inputs, kwargs, "step()", _RECOMPILE)
        shared = {n: tuple(self._example_values[n].shape) for n in self._call.mask_names}
        wanted = self._shapes.signature(values, target, self._call, shared, self.device)
        found = self._shapes.find(wanted)
        if found is not None:
            self._activate(found)
            return wanted, True
        traced = {label: dtype for label, _, dtype in self._signature.inputs}
        for label, _, dtype in wanted.inputs:  # a dtype change is a mistake more often than a new program
            if traced.get(label, dtype) != dtype:
                raise ValueError(f"step(): {label} has dtype torch.{dtype}, but the pipeline was traced for "
                                 f"torch.{traced[label]}; pass {label}.to(torch.{traced[label]})")
        if self._shapes.refusal is not None:
            raise ValueError(f"step(): a batch of new shapes ({wanted.describe()}; traced: "
                             f"{self._signature.describe()}), but {self._shapes.refusal}")
        if self._call.mask_names:
            raise ValueError(f"step(): a batch of new shapes ({wanted.describe()}; traced: "
                             f"{self._signature.describe()}) with a flex-attention BlockMask: a new shape's "
                             "mask is not traced again yet. Fix: pad the batch to the traced shapes")
        if wanted.target is None and self.example_target is not None and not forward_only:
            raise ValueError("step(): target=None, but the loss takes a target; pass target= (the full batch of "
                             "targets) on every rank")
        if wanted.target is None and self.example_target is not None:
            raise ValueError(f"step() under torch.no_grad(): a batch of new shapes ({wanted.describe()}) and no "
                             "target=: the loss is part of the traced program, and the target's shape at these "
                             "shapes is not known. Fix: pass target= (the full batch of targets)")
        return wanted, False

    def _build_program(self, signature: Signature, inputs: tuple, target, kwargs: dict) -> None:
        """Trace, cut and build ``signature``'s program on every rank (a miss: one log line)."""
        count, shapes = signature.num_microbatches, self._shapes
        start = time.perf_counter()
        with together(self.group, self.timeout, "step()'s build for new shapes"):
            try:
                built = shapes.build(tuple(first_microbatch(x, count) for x in inputs),
                                     first_microbatch(target, count),
                                     tree_map(lambda v: first_microbatch(v, count), kwargs), count)
            except Exception as err:
                text = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise ValueError(f"step(): a batch of new shapes ({signature.describe()}; traced: "
                                 f"{self._signature.describe()}), and building its program failed: "
                                 f"{type(err).__name__}: {text[:500]}. Fix: pass batches the model takes (or "
                                 "of the traced shapes)") from err
            if {k: id(v) for k, v in built._params.items()} != {k: id(v) for k, v in self._params.items()}:
                raise AssertionError("a new shape's program must hold this rank's parameters and no others")
        shapes.builds += 1
        evicted = shapes.add(signature, built._program_state())
        self._activate(signature)
        _log.info("rank %d: step() traced, cut and built a program for %s in %.2f s (%d of max_programs=%d "
                  "kept%s)", self.rank, signature.describe(), time.perf_counter() - start, len(shapes.programs),
                  shapes.max_programs, f"; evicted {evicted[0].describe()}" if evicted else "")

    def _shape_disagreement(self, signature: Optional[Signature]) -> str:
        """The ranks' step shapes differ (their digests did, in the input vote): the text of the
        ValueError every rank raises, naming each rank's shapes (one gather)."""
        try:
            agree({"step() input shapes": None if signature is None else signature.describe()}, self.group,
                  self.timeout, "step()", {"step() input shapes": "pass the same batch (the same shapes) to "
                                           "step() on every rank of the pipeline: each rank splits the whole batch"})
        except ValueError as err:
            return str(err)
        raise AssertionError("the shape digests differed but the shapes agree")

    # -- parameters and checkpoints ------------------------------------------------------

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under their original FQNs: the model's own objects, or with
        ``compile(dp_mode="shard" | "shard_grad_op")`` their ``DTensor`` shards over ``dp_group``
        (what an optimizer steps on; the stage graphs read gathered copies); for a tensor-parallel
        model, ``DTensor`` parameters with the plan's placements around the local shards the
        stage graphs read (``runtime.tensor_parallel``)."""
        yield from self._params.items()

    def parameters(self) -> Iterator[nn.Parameter]:
        yield from self._params.values()

    def full_parameters(self):
        """Context manager: this rank's parameters whole, to write in place (e.g. a whole-model
        init after ``compile()``). Without sharded data parallelism the parameters are whole
        already; with ``dp_mode="shard"``/``"shard_grad_op"`` they are gathered on entry and
        each rank keeps its rows of what was written on exit (a collective over ``dp_group``)."""
        if self._data_parallel is None:
            return contextlib.nullcontext()
        return self._data_parallel.full_parameters()

    def memory_plan(self, optimizer="adamw"):
        """This rank's ``dualpipe_fx.planning.memory.MemoryPlan`` (one row): params, grads, optimizer
        state (``"adamw"``, ``"sgd"``, ... or bytes per element) and the step's peak bytes,
        from its own stages' graphs; nothing runs."""
        return pipeline_plan(self, optimizer)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self._params.values():
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's share of ``model.state_dict()``; the union over ranks is all of it.

        Keys are the model's own FQNs, so ``torch.distributed.checkpoint`` can save it from
        every rank and load it into the unsplit model or another pipeline layout. Under
        ``dp_mode="shard"``/``"shard_grad_op"`` parameters are ``DTensor`` shards (global
        shapes; ``.full_tensor()`` gathers one), which DCP saves and reshards as they are.
        """
        self._check_initialised("state_dict()")
        return {k: v.detach().clone() for k, v in self._state_tensors.items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy this rank's entries from ``state_dict`` (a full or a per-rank checkpoint).

        Only this rank's keys are read: of a full ``torch.load(path, mmap=True)`` checkpoint
        a rank reads (and keeps resident, one tensor at a time) only its own pages. Keys of
        other ranks' parameters are ignored; with ``strict`` a missing local key raises
        ``KeyError`` naming it.
        """
        missing = sorted(k for k in self._state_tensors if k not in state_dict)
        if strict and missing:
            raise KeyError(f"load_state_dict: rank {self.rank} needs {missing} but the checkpoint lacks "
                           f"them; pass a checkpoint from this model or strict=False")
        self._check_shapes(state_dict)
        targets, sources = self._state_tensors, state_dict
        if self._data_parallel is not None:  # sharded: my rows of each full (or DTensor) entry
            targets, sources = self._data_parallel.load_targets(targets, state_dict)
        if self._tensor_parallel is not None:  # TP: my part of each full (or DTensor) entry
            targets, sources = self._tensor_parallel.load_targets(targets, sources)
        loaded = copy_into(targets, sources)
        for module, pending in list(self._pending.items()):
            left = tuple(n for n in pending.names if n not in loaded)
            if left:
                self._pending[module] = dataclasses.replace(pending, names=left)
            else:
                del self._pending[module]

    def _check_shapes(self, state_dict: Mapping[str, Any]) -> None:
        """Every entry this rank reads has the model's (global) shape; checked before any copy,
        so a bad checkpoint leaves the weights as they were."""
        bad = []
        for key, target in self._state_tensors.items():
            source = state_dict.get(key)
            shapes = {tuple(target.shape)}  # a DTensor shard's .shape is the global one
            if self._data_parallel is not None:
                shapes |= self._data_parallel.loadable_shapes(key)
            if isinstance(source, torch.Tensor) and tuple(source.shape) not in shapes:
                bad.append(f"size mismatch for {key}: copying a param with shape {tuple(source.shape)} from "
                           f"checkpoint, the shape in current model is {tuple(target.shape)}")
        if bad:
            raise ValueError(f"load_state_dict: rank {self.rank}: " + "; ".join(bad) + ". Fix: load a "
                             "checkpoint of this model's configuration; nothing was copied")

    def _check_initialised(self, where: str) -> None:
        """Refuse to use tensors that neither an initialiser nor a checkpoint gave values."""
        if not self._pending:
            return
        first = next(iter(self._pending.values()))
        more = f" (and {len(self._pending) - 1} more modules)" if len(self._pending) > 1 else ""
        raise ValueError(
            f"{where}: on rank {self.rank}, module {first.module!r} ({first.kind}) holds {list(first.names)}"
            f"{more} without values: the model was built on meta, {first.kind} has no reset_parameters(), "
            "compile() got no param_init_fn, and load_state_dict() has not provided them. Fix: call "
            f"pipe.load_state_dict(checkpoint) first, give {first.kind} a reset_parameters(), or pass "
            "compile(..., param_init_fn=fn)")

    # -- step ------------------------------------------------------------------------------

    def _has(self, first: bool) -> list:
        """This rank's stages that start (``first``) or end a chain."""
        return [s for s in self.stages.values()
                if (s.place.prev_stage if first else s.place.next_stage) is None]

    def _check(self, inputs: tuple, target, forward_only: bool, kwargs: Optional[dict] = None) -> dict:
        """The step's tensor inputs by graph-input name, once they are checked.

        The same rule on every rank, so that a bad call fails everywhere before any send.
        """
        values = self._call.values(inputs, kwargs or {}, "step()", _RECOMPILE)
        check_inputs(values, self._example_values, self._call, self.num_microbatches, self.device)
        if self.example_target is not None and target is None and not forward_only:
            raise ValueError("step(): target=None, but the loss takes a target; pass target= (the full "
                             "batch of targets) on every rank")
        if target is not None and self.example_target is not None:
            check_batch("target", target, self.example_target, self.num_microbatches, self.device)
        return values

    def _data_index(self, stage: int, mb: int) -> int:
        """Micro-batch ``mb`` of ``stage``'s chain, as an index into the step's batch."""
        chain = next(i for i, c in enumerate(self.program.chains) if stage in c)
        return chain * self.program.num_microbatches + mb

    def _feed(self, values: dict, target) -> None:
        n = self.num_microbatches
        input_mbs = micro_batches(values, self._example_values, self._call.mask_names, n)
        if target is None and self.example_target is not None:  # forward only: the loss is ignored
            target = torch.zeros((n * self.example_target.shape[0], *self.example_target.shape[1:]),
                                 dtype=self.example_target.dtype, device=self.device)
        target_mbs = target.tensor_split(n) if target is not None else None
        if self._grad_loss is None:  # once: a host-to-device copy of a Python float syncs the stream
            self._grad_loss = torch.full((), 1.0 / n, device=self.device)
        for stage in self.stages.values():
            stage.clear_runtime_states()
            stage.grad_loss = self._grad_loss
            for mb in range(self.program.num_microbatches):
                i = self._data_index(stage.stage_index, mb)
                mb_values = {name: parts[i] for name, parts in input_mbs.items()}
                mb_values["target"] = target_mbs[i] if target_mbs is not None else None
                stage.external[mb] = external_values(stage.graphs, mb_values)

    def _run(self, forward_only: bool) -> None:
        self._executor.forward_only = forward_only
        self._executor.failure = None
        try:
            with torch.no_grad(), _one_line_errors(self.rank):
                self._schedules[forward_only]._step_microbatches()
            for stage in self.stages.values():
                stage.finish_sends(self.timeout)  # those released only at the step's end
        except PeerTimeoutError as err:
            self._break(err)
            raise
        except RuntimeError as err:
            if not _is_comm_error(err):
                self._break(err)  # out of the schedule part-way: the peers' P2P cannot match any more
                raise
            peers = sorted({r for s in self.stages.values() for r in (s.place.prev_rank, s.place.next_rank)
                            if r is not None and r != self.rank})
            timeout_error = PeerTimeoutError(self.rank, peers[0] if len(peers) == 1 else None,
                                             f"a send or receive (peers {peers})", self.timeout, err)
            self._break(timeout_error)
            raise timeout_error from err
        except BaseException as err:
            self._break(err)
            raise

    def _break(self, err: BaseException) -> None:
        """Mark the group unusable, and abort it so that peers waiting on this rank fail now."""
        if self._broken is None:
            self._broken = f"{type(err).__name__} on rank {self.rank}: {str(err).splitlines()[0][:300]}"
            _abort(self.group)

    def _agree(self, error: Optional[Exception], phase: str, where: str = "",
               signature: Optional[Signature] = None) -> None:
        """Every rank learns whether any rank failed ``phase``; if one did, all raise its error.
        With ``signature`` (the input phase under ``_shapes``) the same vote compares the ranks'
        step shapes."""
        try:
            key = 0 if signature is None else signature.key
            failure, same = vote_keyed(error, key, self.group, self.timeout, f"the step's {phase} vote", where)
            disagreement = self._shape_disagreement(signature) if failure is None and not same else None
            if disagreement is not None:  # the replicas drop the step too
                self._agree_replicas(StepFailure(self.rank, "ValueError", disagreement), phase)
            else:
                failure = self._agree_replicas(failure, phase)
        except PeerTimeoutError as err:
            self._break(err)
            raise
        if disagreement is not None:
            for stage in self.stages.values():
                stage.clear_runtime_states()
            raise ValueError(disagreement)
        if failure is None:
            return
        for stage in self.stages.values():
            stage.clear_runtime_states()
        for works in (*self.schedule.fwd_recv_ops.values(), *self.schedule.bwd_recv_ops.values()):
            assert not works, "a step that failed here was finished on stand-ins: no receive left"
        if phase == "inputs":  # nothing ran: earlier grads stay
            raise _input_error(failure) from error
        self.zero_grad(set_to_none=True)
        if self._data_parallel is not None:
            self._data_parallel.drop_step()
        raise PipelineStepError(failure.rank, failure.where, failure.kind, failure.message) from error

    def _agree_replicas(self, failure: Optional[StepFailure], phase: str) -> Optional[StepFailure]:
        """With data parallelism, the replicas vote too (over ``dp_group``, after each pipeline's
        own vote): a step one replica drops, every replica drops, since the others' collectives
        over ``dp_group`` would wait on it. Returns this pipeline's failure, else a replica's."""
        if self._data_parallel is None or self._data_parallel.group is None:  # no replicas
            return failure
        relay = None if failure is None else RuntimeError(f"pipeline rank {failure.rank}: {failure.message}")
        across = vote(relay, self._data_parallel.group, self.timeout, f"the step's {phase} vote across replicas",
                      "" if failure is None else failure.where, kind=None if failure is None else failure.kind)
        if failure is not None or across is None:
            return failure
        rank = dist.get_global_rank(self._data_parallel.group, across.rank)
        return StepFailure(rank, across.kind, f"in the data-parallel replica of global rank {rank}, {across.message}",
                           across.where)

    def step(self, *inputs: torch.Tensor, target: Optional[torch.Tensor] = None, **kwargs):
        """One pipelined step of ``model(*inputs, **kwargs)`` on the full batch; see the class docstring.

        Raises:
            ValueError/TypeError: before any communication, for a batch that divides into no
                micro-batch count the schedule accepts, ranks passing different shapes, a
                dtype other than the example's, a batch of new shapes under data parallelism
                or with a BlockMask, inputs on another device, a missing target, other
                keywords than ``example_kwargs`` or a non-tensor keyword value other than the
                traced one; or, after the ranks agreed on new shapes, a model that cannot be
                traced or built at them (every rank; the pipeline keeps its programs).
            PeerTimeoutError: a peer rank died or did not answer within ``timeout``.
            PipelineStepError: an action raised on some rank (named); every rank dropped the step.
            PipelineBrokenError: an earlier step lost a peer; the process group must be rebuilt.
        """
        if self._broken is not None:
            raise PipelineBrokenError(self.rank, self._broken)
        forward_only = not torch.is_grad_enabled()
        error, signature, cached = None, None, True
        try:
            self._check_initialised("step()")
            signature, cached = self._program_for(inputs, target, forward_only, kwargs or {})
            if cached:
                self._feed(self._check(inputs, target, forward_only, kwargs), target)
        except Exception as err:  # noqa: BLE001 - every rank raises it, after the vote
            error = err
        self._agree(error, "inputs", signature=signature)
        if cached and signature is not None:
            self._shapes.used(self._signature)
        if not cached:  # the same miss on every rank: they agreed on the shapes
            self._build_program(signature, inputs, target, kwargs)
            try:
                self._feed(self._check(inputs, target, forward_only, kwargs), target)
            except Exception as err:  # noqa: BLE001 - every rank raises it, after the vote
                error = err
            self._agree(error, "inputs")
        dp = self._data_parallel
        if dp is not None:
            dp.begin_step(forward_only)  # earlier grads set aside: they are reduced already
        earlier = {} if forward_only or dp else set_aside_shared_grads(self._grad_params, self._holders,
                                                                                 self.rank)
        self._run(forward_only)
        reduced = self._finish_data_parallel()
        action, error = self._executor.failure or (None, None)
        tp = self._tensor_parallel
        if tp is not None and (error is not None or forward_only):
            tp.drop_step()
        self._agree(error, "outcome", f"action {action}" if action is not None else "")
        try:
            if forward_only:
                return self._gather_outputs()
            if dp is not None:  # reduced over dp per holder, then summed over the holders (data_parallel.py)
                reduced.update(sum_shared_grads(reduced, self._holders, self.group, self.rank, self.timeout)
                               if self._holders else {})
                dp.assign(reduced)
            elif self._holders:
                sync_shared_grads(self._grad_params, self._holders, self.group, self.rank, self.timeout, earlier)
            if tp is not None:  # partial grads all-reduced over TP; .grad of the DTensor parameters
                tp.finish_step()
            return self._gather_loss()
        except PeerTimeoutError as err:
            self._break(err)
            raise

    def _finish_data_parallel(self) -> dict:
        """Wait for the step's data-parallel collectives: ``{FQN: reduced grad}`` ({} without)."""
        if self._data_parallel is None:
            return {}
        try:
            return self._data_parallel.finish_step()
        except PeerTimeoutError as err:
            self._break(err)
            raise

    def _chain_last_mbs(self) -> list[tuple[int, object]]:
        """(data index, stage) of each micro-batch that ends on this rank, in data order."""
        ends = self._has(first=False)
        return sorted((self._data_index(s.stage_index, mb), s) for s in ends
                      for mb in range(self.program.num_microbatches))

    def _peer_loss_ranks(self) -> list[int]:
        return [r for r in self._loss_ranks if r != self.rank]

    def _gather_loss(self) -> Optional[torch.Tensor]:
        if self.rank not in self._loss_ranks:
            return None
        parts = {self.rank: sum(s.losses[i % self.program.num_microbatches].detach()
                                for i, s in self._chain_last_mbs())}
        for peer in self._peer_loss_ranks():  # DualPipe: two ranks each hold half the losses
            (parts[peer],) = exchange([parts[self.rank]], peer, self.group, self.rank, self.timeout, "loss")
        return sum(parts[r] for r in sorted(parts)) / self.num_microbatches

    def _gather_outputs(self):
        if self.rank not in self._loss_ranks:
            return None
        per_mb = {i: s.model_outputs[i % self.program.num_microbatches] for i, s in self._chain_last_mbs()}
        mine = sorted(per_mb)
        for peer in self._peer_loss_ranks():
            flat = [t for i in mine for t in per_mb[i]]
            got = exchange(flat, peer, self.group, self.rank, self.timeout, "model outputs")
            width = len(self._output_metas)
            theirs = [i for i in range(self.num_microbatches) if i not in mine]
            for j, i in enumerate(theirs):
                per_mb[i] = tuple(got[j * width:(j + 1) * width])
        outs = tuple(_concat([per_mb[i][k] for i in sorted(per_mb)]) for k in range(len(self._output_metas)))
        if self._outputs is not None:
            return self._outputs.rebuild(outs)
        return outs[0] if len(outs) == 1 else outs

    def profile(self, *inputs, target=None, steps: int = 3):
        """Measure ``steps`` steps; see ``dualpipe_fx.runtime.profile.profile_pipeline``. At
        shapes whose program a ``step()`` built earlier (the same cache on every rank)."""
        if self._shapes is not None and not self._program_for(inputs, target, False, {})[1]:
            raise ValueError("profile(): no program for these shapes yet (profiling measures a built program); "
                             "run one step() at them first, then profile")
        return profile_pipeline(self, inputs, target, steps)


def _shape_only(t):
    """A meta tensor of ``t``'s shape, dtype and strides (other values as they are)."""
    if not isinstance(t, torch.Tensor):
        return t
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta")


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """One output over the micro-batches: along dim 0, or stacked for 0-dim (per-micro-batch) values."""
    return torch.stack(parts) if parts[0].dim() == 0 else torch.cat(parts)


_INPUT_ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError}


def _input_error(failure: StepFailure) -> Exception:
    """The failing rank's check error, raised alike on every rank (``.rank`` names it)."""
    err = _INPUT_ERRORS.get(failure.kind, RuntimeError)(f"rank {failure.rank}: {failure.message}")
    err.rank = failure.rank
    return err


def _abort(group) -> None:
    """Abort ``group``'s backend: every P2P a peer has pending on this rank fails at once."""
    try:
        (group if group is not None else dist.group.WORLD).abort()
    except Exception as err:  # noqa: BLE001 - best effort: the group is unusable anyway
        _log.debug("could not abort the process group: %s", err)


class _ErrorOnce(logging.Filter):
    """Drops torch's runtime error records (the action, then a ~40-line "Full Schedule"
    table) and logs one line instead; the table goes to this module's debug log."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if "caught exception" in str(record.msg) and record.args:
            _log.error("rank %d: the step stopped at action %s (time step %s)", self.rank,
                       record.args[1] if len(record.args) > 1 else "?", record.args[0])
        else:
            _log.debug("torch's runtime: %s", record.getMessage())
        return False


@contextlib.contextmanager
def _one_line_errors(rank: int):
    torch_log = logging.getLogger(_TORCH_RUNTIME_LOG)
    quiet = _ErrorOnce(rank)
    torch_log.addFilter(quiet)
    try:
        yield
    finally:
        torch_log.removeFilter(quiet)


def _is_comm_error(err: RuntimeError) -> bool:
    text = str(err)
    return any(k in text for k in ("gloo", "Connection", "Timed out", "closed", "timeout", "NCCL"))
