"""Data parallelism over a second process group, run as the schedule's own actions.

**Contract**: ``DataParallel(mode, group, stages, named, timeout)`` replicates or shards this
rank's parameters (``named``: FQN -> the tensor the stage graphs read) over ``group`` (the
ranks that hold the same pipeline stages in other replicas). Its handlers run torch's
runtime actions, which the lowering places per stage (``runtime/lowering.py``):

- ``UNSHARD s``: start an all-gather of stage ``s``'s parameters (shard modes);
  ``ready(s)``, called by the executor before each compute action of ``s``, waits for it;
- ``REDUCE_GRAD s``, right after ``s``'s last W (or B) of the step: start the reduction of
  the grads of ``s``'s parameters that no later local stage still adds to: an all-reduce
  (``replicate``) or a reduce-scatter (shard modes), asynchronous, overlapping the
  remaining actions; ``finish_step()`` waits for them and divides by the group size (gloo
  has no AVG or PREMUL_SUM: SUM, then divide);
- ``RESHARD s``, after ``s``'s last action: free its gathered parameters (``shard`` only).

Modes (FSDP's names for the two sharding strategies):

- ``"replicate"`` (DDP): every rank holds the full parameters; ``params`` are the model's own.
- ``"shard"`` (ZeRO-3, FSDP ``FULL_SHARD``): each rank keeps 1/N of every parameter (rows of
  dim 0, ``torch.chunk`` order) and of the grads and optimizer state; a stage's parameters
  exist in full only from its UNSHARD to its RESHARD.
- ``"shard_grad_op"`` (ZeRO-2, FSDP ``SHARD_GRAD_OP``): as ``shard``, but the gathered
  parameters stay allocated between steps (refreshed by each step's all-gather).

In the shard modes ``params`` are ``DTensor`` parameters (``Shard(0)`` on a 1-D mesh over
``group``; a 0-dim parameter is ``Replicate()`` and all-reduced): a torch optimizer steps on
the local shards, ``state_dict()`` keeps the model's FQNs and global shapes, and
``torch.distributed.checkpoint`` saves and reshards them.

**Pseudocode**
    begin_step:  earlier grads set aside (they are reduced already); counters reset
    UNSHARD s:   flat = my shards of s's params (padded rows) -> all_gather async
    ready(s):    wait; copy each param's rows out of the gathered flat
    REDUCE_GRAD s: params whose local users are all done -> flat of grads -> all_reduce /
                 reduce_scatter async; full grads dropped (shard modes)
    finish_step: wait; flat / N -> {FQN: this step's grad (full, or my shard)}
    assign:      (after the pipeline sums shared parameters' grads) grad = earlier + this step's

**Expert parallelism** (``ExpertParallel``): an MoE's experts are split over an EP group inside
``dp_group`` (its ranks read different batches and exchange tokens by all_to_all in the stage
graphs), so each rank holds its own slice of the expert parameters. Those are never sharded
or gathered over ``dp_group``: their grads (already summed over the EP ranks' losses by the
reverse all_to_all) are all-reduced over ``replica_group`` alone (the ranks holding the same
slice; none when EP spans ``dp_group``) and divided by the size of ``dp_group`` like every
other grad: the grads of the mean loss over ``dp_group``. In the shard modes they are
``DTensor`` parameters ``Shard(0)`` on a 1-D mesh over the EP group named ``"ep"`` (global
shapes for checkpoints; torchtitan's grad clipping tells them apart by that name).

Order for shared parameters (a tied weight on two pipeline ranks, DualPipe's mirrors): each
holder's partial grad is reduced over the data-parallel group once, at its last W, and the
pipeline then sums the reduced partials across holders (``sync.sum_shared_grads``). Sums
commute, so this equals summing over the holders first and reducing once; the bytes reduced
are the same (every holder needs the full result either way), but the reduction starts as
soon as the holder's own backward is done instead of after the step. Copies stay bitwise
equal: every data-parallel rank gets the same reduced bytes, and every holder adds the same
partials in the same (rank) order. Earlier steps' grads (accumulation) are set aside before
the step and added back once, so they are never reduced twice.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from dualpipe_fx import _compat
from dualpipe_fx.runtime.errors import PeerTimeoutError
from dualpipe_fx.runtime.sync import wait

MODES = ("replicate", "shard", "shard_grad_op")


@dataclass(frozen=True)
class ExpertParallel:
    """Which of this rank's parameters are its expert-parallel slice, and over which groups.

    ``compile(..., dp_group=, expert_parallel=ExpertParallel(group, params, replica_group))``:

    - ``group``: the EP group, ranks of ``dp_group`` that split the experts and exchange tokens
      (the model's own forward runs the all_to_all, e.g. ``examples.moe.MoEFeedForward``);
    - ``params``: the expert parameters' FQNs, or a predicate ``fqn -> bool``; this rank's
      tensors hold its ``1/|group|`` of the experts along dim 0 (rank ``r``: rows
      ``[r*n, (r+1)*n)`` of the global tensor);
    - ``replica_group``: the ranks of ``dp_group`` holding the same slice (one per EP group);
      None when the EP group is the whole ``dp_group``.
    """

    group: dist.ProcessGroup
    params: object  # Collection[str] | Callable[[str], bool]
    replica_group: Optional[dist.ProcessGroup] = None

    def is_expert(self, name: str) -> bool:
        return bool(self.params(name)) if callable(self.params) else name in self.params


@dataclass
class _Layout:
    """One parameter over the data-parallel ranks: rows ``[start, stop)`` of dim 0 are mine."""

    name: str
    full: torch.Tensor  # the whole parameter in its own dtype; its .grad takes the stage grads
    sharded: bool       # False: every rank holds it whole (replicate mode, or 0-dim)
    chunk: int = 0      # elements per rank in the padded flat layout (sharded)
    start: int = 0
    stop: int = 0
    compute: Optional[torch.Tensor] = None  # what the stage graphs read: full, or its param_dtype copy

    def __post_init__(self) -> None:
        if self.compute is None:
            self.compute = self.full

    @property
    def cast(self) -> bool:
        return self.compute is not self.full

    @property
    def row(self) -> int:
        return math.prod(self.full.shape[1:])

    @property
    def local_shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.full.shape[1:])

    @property
    def local_numel(self) -> int:
        return (self.stop - self.start) * self.row


@dataclass
class _Pending:
    """A collective in flight and the parameters it moves."""

    work: object
    layouts: list[_Layout]
    flat: torch.Tensor  # all-gather/reduce-scatter output, or the all-reduced buffer
    kind: str           # "gather" | "reduce"
    done: bool = False
    offsets: list[int] = field(default_factory=list)
    keep: Optional[torch.Tensor] = None  # the send buffer, alive until the wait
    into_full: bool = False  # a gather into the parameters' own dtype (full_parameters), not the copies


def _layout(name: str, full: torch.Tensor, size: int, index: int, sharded: bool,
            param_dtype: Optional[torch.dtype]) -> _Layout:
    compute = None
    if param_dtype is not None and full.is_floating_point() and full.dtype != param_dtype:
        compute = torch.empty(full.shape, dtype=param_dtype, device=full.device)
        _free(compute)  # allocated by the stage's cast (or gather), each step
    if not sharded or full.dim() == 0:
        return _Layout(name, full, False, compute=compute)
    rows = full.shape[0]
    per = -(-rows // size)  # torch.chunk's (and DTensor Shard(0)'s) rows per rank
    start, stop = min(rows, index * per), min(rows, (index + 1) * per)
    return _Layout(name, full, True, per * math.prod(full.shape[1:]), start, stop, compute)


class DataParallel:
    """This rank's parameters over the data-parallel ``group``; see the module docstring."""

    def __init__(self, mode: str, group: Optional[dist.ProcessGroup], stages: Mapping[int, object],
                 named: Mapping[str, torch.Tensor], timeout: timedelta,
                 experts: Optional[ExpertParallel] = None, precision=None) -> None:
        assert mode in MODES and (group is not None or mode == "replicate"), (mode, group)
        self.mode = mode
        self.group = group  # None: no data parallelism, mixed precision's casts alone
        self.size = 1 if group is None else dist.get_world_size(group)
        self.index = 0 if group is None else dist.get_rank(group)
        self.timeout = timeout
        param_dtype = None if precision is None else precision.param_dtype
        # FSDP2's rule: without reduce_dtype the reduction runs in param_dtype
        self.reduce_dtype = None if precision is None else precision.reduce_dtype or param_dtype
        by_id = {id(t): n for n, t in named.items()}
        # stage -> the FQNs of its parameters (once each); a name's number of local stages
        self.stage_names = {s: list(dict.fromkeys(by_id[id(p)] for p in st.params[: st.num_params]))
                            for s, st in stages.items()}
        self.users: dict[str, int] = {}
        for names in self.stage_names.values():
            for n in names:
                self.users[n] = self.users.get(n, 0) + 1
        shard = mode != "replicate"
        self.experts = experts
        self.expert_names = {n for n in self.users if experts is not None and experts.is_expert(n)}
        # experts: over the ranks holding the same slice (None: no one else holds it)
        replicas = experts.replica_group if experts is not None else None
        self.expert_group = replicas if replicas is not None and dist.get_world_size(replicas) > 1 else None
        self.layouts = {n: _layout(n, named[n], self.size, self.index, shard and n not in self.expert_names,
                                   param_dtype) for n in self.users}
        self.casts = {n for n, lay in self.layouts.items() if lay.cast}
        self.mesh = None
        self.ep_mesh = None
        self.params: dict[str, nn.Parameter] = dict(named)  # what an optimizer steps on
        if shard:
            self._shard_params()
        self._left: dict[str, int] = {}
        self._active: dict[str, int] = {}
        self._gathering: dict[str, _Pending] = {}
        self._gathered: set[str] = set()
        self._reducing: list[_Pending] = []
        self._earlier: dict[str, torch.Tensor] = {}

    # -- shards ----------------------------------------------------------------------------

    def _shard_params(self) -> None:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Replicate, Shard

        some = next(iter(self.layouts.values()), None)
        device_type = some.full.device.type if some is not None else "cpu"
        self.mesh = DeviceMesh.from_group(self.group, device_type)
        if self.expert_names:
            self.ep_mesh = DeviceMesh.from_group(self.experts.group, device_type, mesh_dim_names=("ep",))
        for name, lay in self.layouts.items():
            full = lay.full
            if name in self.expert_names:  # the DTensor's local tensor is the one the graphs read
                self.params[name] = nn.Parameter(self._dtensor(lay, full.detach()), requires_grad=full.requires_grad)
                continue
            local = full.detach()[lay.start:lay.stop].clone() if lay.sharded else full.detach().clone()
            placement = Shard(0) if lay.sharded else Replicate()
            dt = DTensor.from_local(local, self.mesh, [placement], run_check=False,
                                    shape=full.shape, stride=full.stride())
            self.params[name] = nn.Parameter(dt, requires_grad=full.requires_grad)
            # the full tensor gets storage of its own, so freeing it frees nothing else
            full.data = full.detach().clone(memory_format=torch.contiguous_format)
            if self.mode == "shard" or lay.cast:  # mixed precision: the graphs read the param_dtype copy
                _free(full)

    def _dtensor(self, lay: _Layout, local: torch.Tensor):
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if lay.name in self.expert_names:
            ep = self.ep_mesh.size()
            shape = (lay.full.shape[0] * ep, *lay.full.shape[1:])
            return DTensor.from_local(local, self.ep_mesh, [Shard(0)], run_check=False, shape=shape,
                                      stride=torch.empty(shape, device="meta").stride())
        return DTensor.from_local(local, self.mesh, [Shard(0) if lay.sharded else Replicate()],
                                  run_check=False, shape=lay.full.shape, stride=lay.full.stride())

    def compute_tensors(self, tensors) -> tuple[torch.Tensor, ...]:
        """What the stage graphs read for each parameter (or buffer) of ``tensors``: its
        param_dtype copy under mixed precision, else the tensor itself."""
        by_id = {id(lay.full): lay.compute for lay in self.layouts.values()}
        return tuple(by_id.get(id(t), t) for t in tensors)

    def public(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` (FQN -> tensor) with each full parameter replaced by what ``params`` holds."""
        by_id = {id(lay.full): self.params[n] for n, lay in self.layouts.items()}
        return {k: by_id.get(id(v), v) for k, v in state.items()}

    def loadable_shapes(self, name: str) -> set[tuple[int, ...]]:
        """Shapes a checkpoint entry ``name`` may have besides the parameter's own: an expert
        slice also loads from the whole experts (its EP group's slices stacked on dim 0)."""
        lay = self.layouts.get(name)
        if lay is None or name not in self.expert_names:
            return set()
        rows, *rest = lay.full.shape
        return {(rows * dist.get_world_size(self.experts.group), *rest)}

    def load_targets(self, state: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor]):
        """(targets, sources) for ``copy_into``: a sharded entry takes my rows of a full source
        (or the local part of a DTensor); other entries pass through."""
        from torch.distributed.tensor import DTensor

        by_id = {id(p): self.layouts[n] for n, p in self.params.items()}
        targets, sources = {}, {}
        for k, t in state.items():
            lay = by_id.get(id(t))
            if lay is None or self.mesh is None:
                targets[k] = t
                if k in source:
                    sources[k] = source[k]
                continue
            targets[k] = t.to_local()
            if k in source:
                s = source[k]
                s = s.full_tensor() if isinstance(s, DTensor) else s
                if lay.name in self.expert_names and s.shape[0] != lay.full.shape[0]:  # global: my rows
                    n = lay.full.shape[0]
                    s = s[dist.get_rank(self.experts.group) * n:][:n]
                sources[k] = s[lay.start:lay.stop] if lay.sharded else s
        return targets, sources

    # -- the step ----------------------------------------------------------------------------

    def begin_step(self, forward_only: bool) -> None:
        self._left = dict(self.users)
        self._active = {}
        self._gathered = set(self.expert_names) if self.mesh is not None else set(self.layouts)
        self._gathered -= self.casts  # mixed precision: each step casts (or gathers) the copies anew
        self._earlier = {}
        if forward_only:
            return
        for name, param in self.params.items():
            if param.grad is not None:
                self._earlier[name], param.grad = param.grad, None
            self.layouts[name].full.grad = None

    def on_unshard(self, action, ctx=None) -> None:
        self._unshard(action.stage_index)

    def _unshard(self, stage_index: int) -> None:
        names = self.stage_names[stage_index]
        for n in names:
            self._active[n] = self._active.get(n, 0) + 1
        todo = [self.layouts[n] for n in names if n not in self._gathered and n not in self._gathering]
        # whole on this rank (no sharding, or its expert slice): mixed precision's cast alone
        local = [lay for lay in todo if self.mesh is None or lay.name in self.expert_names]
        for lay in local:
            _fill(lay.compute, lay.full)
            self._gathered.add(lay.name)
        for group in _by_dtype([lay for lay in todo if lay not in local], compute=True):
            self._gather(group)

    def _gather(self, layouts: list[_Layout], into_full: bool = False) -> None:
        """All-gather ``layouts`` into the tensors the graphs read (mixed precision: my shards
        cast to param_dtype, then gathered in it), or with ``into_full`` into the parameters."""
        def target(lay: _Layout) -> torch.Tensor:
            return lay.full if into_full else lay.compute

        if not any(lay.sharded for lay in layouts):  # 0-dim replicated: my copy is the value
            for lay in layouts:
                _fill(target(lay), self.params[lay.name].detach().to_local())
                self._gathered.add(lay.name)
            return
        offsets, total = _offsets([lay.chunk if lay.sharded else lay.full.numel() for lay in layouts])
        dtype, device = target(layouts[0]).dtype, layouts[0].full.device
        mine = torch.zeros(total, dtype=dtype, device=device)
        for lay, off in zip(layouts, offsets):
            local = self.params[lay.name].detach().to_local().reshape(-1)
            mine[off: off + local.numel()] = local
        out = torch.empty(self.size * total, dtype=dtype, device=device)
        work = dist.all_gather_single(out, mine, group=self.group, async_op=True)
        pending = _Pending(work, layouts, out, "gather", offsets=offsets, into_full=into_full)
        for lay in layouts:
            self._gathering[lay.name] = pending

    def ready(self, stage_index: int) -> None:
        """Wait until stage ``stage_index``'s parameters are gathered (no-op when replicated)."""
        if self.mesh is None:
            return
        for n in self.stage_names[stage_index]:
            pending = self._gathering.get(n)
            if pending is not None:
                self._finish_gather(pending)
            assert n in self._gathered, f"stage {stage_index} computes before its UNSHARD gathered {n}"

    def _finish_gather(self, pending: _Pending) -> None:
        self._wait(pending.work, "the all-gather of parameters", pending.flat.device)
        total = pending.flat.numel() // self.size
        rows = pending.flat.view(self.size, total)
        for lay, off in zip(pending.layouts, pending.offsets):
            if lay.sharded:
                full = rows[:, off: off + lay.chunk].reshape(-1)[: lay.full.numel()].view(lay.full.shape)
            else:
                full = self.params[lay.name].detach().to_local()
            _fill(lay.full if pending.into_full else lay.compute, full)
            self._gathered.add(lay.name)
            del self._gathering[lay.name]

    def on_reshard(self, action, ctx=None) -> None:
        for n in self.stage_names[action.stage_index]:
            self._active[n] = self._active.get(n, 1) - 1
            if self._active[n] > 0 or n not in self._gathered:
                continue
            lay = self.layouts[n]
            # "shard" frees what it gathered; mixed precision frees its copies ("shard_grad_op" keeps
            # them, as it keeps its gathered parameters)
            if (self.mode == "shard" and n not in self.expert_names) or (lay.cast and self.mode != "shard_grad_op"):
                _free(lay.compute)
                self._gathered.discard(n)

    def on_reduce_grad(self, action, ctx=None) -> None:
        if self.group is None:  # no data parallelism: the grads stay on the parameters (finish_step)
            return
        ready = []
        for n in self.stage_names[action.stage_index]:
            self._left[n] -= 1
            if self._left[n] == 0 and self.layouts[n].full.grad is not None:
                ready.append(self.layouts[n])
        experts = [lay for lay in ready if lay.name in self.expert_names]
        for group in _by_dtype(experts):
            self._reduce(group, self.expert_group)
        for sharded in (False, True):
            for group in _by_dtype([lay for lay in ready if lay.sharded == sharded and lay not in experts]):
                self._reduce(group, self.group)

    def _reduce(self, layouts: list[_Layout], over: Optional[dist.ProcessGroup]) -> None:
        """Start reducing ``layouts``' grads over ``over`` (None: nothing to reduce with, the
        expert slice no other rank holds: only ``finish_step``'s division)."""
        sizes = [lay.chunk if lay.sharded else lay.full.numel() for lay in layouts]
        offsets, total = _offsets(sizes)
        grad, send = layouts[0].full.grad, None
        dtype = self.reduce_dtype or grad.dtype  # mixed precision: reduced in reduce_dtype
        if not layouts[0].sharded:
            flat = torch.cat([lay.full.grad.reshape(-1) for lay in layouts]).to(dtype)
            work = None if over is None else dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=over, async_op=True)
        else:
            send = torch.zeros(self.size, total, dtype=dtype, device=grad.device)
            for lay, off in zip(layouts, offsets):
                padded = send.new_zeros(self.size * lay.chunk)
                padded[: lay.full.numel()] = lay.full.grad.reshape(-1)
                send[:, off: off + lay.chunk] = padded.view(self.size, lay.chunk)
            flat = torch.empty(total, dtype=dtype, device=grad.device)
            work = dist.reduce_scatter_single(flat, send.view(-1), op=dist.ReduceOp.SUM, group=self.group,
                                              async_op=True)
        if self.mesh is not None:
            for lay in layouts:
                lay.full.grad = None  # ZeRO-2/3: the full grad is gone once it is in the flat
        self._reducing.append(_Pending(work, layouts, flat, "reduce", offsets=offsets, keep=send))

    def finish_step(self) -> dict[str, torch.Tensor]:
        """Wait for the step's collectives; ``{FQN: this step's reduced grad}`` (full, or my shard),
        in each parameter's dtype."""
        for pending in list({id(p): p for p in self._gathering.values()}.values()):
            self._finish_gather(pending)  # a gather whose stage never computed (a failed step)
        grads: dict[str, torch.Tensor] = {}
        if self.group is None:
            for name, lay in self.layouts.items():
                if lay.full.grad is not None:
                    grads[name], lay.full.grad = lay.full.grad, None
            return grads
        reducing, self._reducing = self._reducing, []
        for pending in reducing:
            if pending.work is not None:
                self._wait(pending.work, "the reduction of grads", pending.flat.device)
            pending.flat.div_(self.size)
            for lay, off in zip(pending.layouts, pending.offsets):
                if lay.sharded:
                    piece = pending.flat[off: off + lay.local_numel].view(lay.local_shape)
                    grads[lay.name] = piece.to(lay.full.dtype)
                else:
                    grads[lay.name] = _like(pending.flat[off: off + lay.full.numel()].to(lay.full.dtype), lay.full)
        return grads

    def assign(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Set each parameter's grad: earlier steps' (set aside) plus this step's ``grads``."""
        for name, grad in grads.items():
            if self.mesh is not None:
                grad = self._dtensor(self.layouts[name], grad)
            earlier = self._earlier.pop(name, None)
            self.params[name].grad = grad if earlier is None else earlier.add_(grad)
        for name, earlier in self._earlier.items():  # no grad this step
            self.params[name].grad = earlier
        self._earlier = {}

    def drop_step(self) -> None:
        """A failed step: no grad is kept (as without data parallelism), full grads freed."""
        self._earlier = {}
        for lay in self.layouts.values():
            lay.full.grad = None

    @contextlib.contextmanager
    def full_parameters(self):
        """This rank's full parameters (gathered) to write whole, e.g. by a whole-model init
        after ``compile()``; on exit each rank's shards take their rows of what was written
        (every replica must write the same values) and ``"shard"`` frees the full copies."""
        if self.mesh is None:
            yield
            return
        self.begin_step(forward_only=True)
        todo = [lay for n, lay in self.layouts.items() if n not in self.expert_names]
        for group in _by_dtype(todo):
            self._gather(group, into_full=True)
        for pending in list({id(p): p for p in self._gathering.values()}.values()):
            self._finish_gather(pending)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, lay in self.layouts.items():
                    if name in self.expert_names:  # never gathered: the tensor written is the one kept
                        continue
                    self.params[name].to_local().copy_(lay.full[lay.start:lay.stop] if lay.sharded else lay.full)
                    if self.mode == "shard" or lay.cast:
                        _free(lay.full)
            self._gathered = set()

    def register(self, schedule) -> None:
        ct = _compat.TorchComputationType
        schedule.register_custom_function(ct.UNSHARD, self.on_unshard)
        schedule.register_custom_function(ct.RESHARD, self.on_reshard)
        schedule.register_custom_function(ct.REDUCE_GRAD, self.on_reduce_grad)

    def _wait(self, work, what: str, device: torch.device) -> None:
        try:
            wait(work, self.timeout, device)
        except RuntimeError as err:
            raise PeerTimeoutError(dist.get_rank(), None, f"{what} over the data-parallel group",
                                   self.timeout, err) from err


def _by_dtype(layouts: list[_Layout], compute: bool = False) -> list[list[_Layout]]:
    """``layouts`` by the dtype of their parameters (or, ``compute``, of the tensors the graphs read)."""
    groups: dict[str, list[_Layout]] = {}
    for lay in layouts:
        groups.setdefault(str((lay.compute if compute else lay.full).dtype), []).append(lay)
    return [groups[k] for k in sorted(groups)]


def _offsets(sizes: list[int]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += n
    return offsets, total


def _like(flat: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``flat`` as a grad for ``param`` (same shape and strides)."""
    if param.is_contiguous():
        return flat.view(param.shape)
    return torch.empty_strided(param.shape, param.stride(), dtype=flat.dtype,
                               device=flat.device).copy_(flat.view(param.shape))


def _free(t: torch.Tensor) -> None:
    """Release ``t``'s memory, keeping its shape (FSDP's way: the storage resized to 0)."""
    t.untyped_storage().resize_(0)


def _fill(t: torch.Tensor, values: torch.Tensor) -> None:
    """Copy ``values`` into ``t``, re-allocating its storage first if it was freed."""
    storage = t.untyped_storage()
    need = t.numel() * t.element_size()
    if storage.nbytes() < need:
        storage.resize_(need)
    with torch.no_grad():
        t.copy_(values)


def check_groups(group: Optional[dist.ProcessGroup], dp_group: Optional[dist.ProcessGroup],
                 dp_mode: str) -> Optional[tuple[dist.ProcessGroup, str]]:
    """``(dp_group, dp_mode)`` once they fit the pipeline ``group``, or None without data
    parallelism; the local checks, before any communication.

    The pipeline group and the data-parallel group must meet in this rank alone (a grid:
    every pipeline replica holds each stage once), and together fit in the world.

    Raises:
        ValueError: an unknown ``dp_mode``; ``dp_group`` without this rank; the two groups
            sharing another rank; more ranks in the grid than in the world.
    """
    if dp_mode not in MODES:
        raise ValueError(f"compile(dp_mode={dp_mode!r}): expected one of {MODES} ('replicate': DDP, "
                         "'shard': ZeRO-3 / FSDP FULL_SHARD, 'shard_grad_op': ZeRO-2)")
    if dp_group is None:
        return None
    me = dist.get_rank()
    dp_ranks = dist.get_process_group_ranks(dp_group) if dist.get_rank(dp_group) >= 0 else []
    if me not in dp_ranks:
        raise ValueError(f"compile(dp_group=...): global rank {me} is not in dp_group; expected the "
                         "group of ranks that hold this rank's pipeline stages in the other replicas "
                         "(the one this rank created it for with dist.new_group)")
    pp_ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    both = sorted(set(pp_ranks) & set(dp_ranks))
    if both != [me]:
        raise ValueError(f"compile(): the pipeline group {pp_ranks} and dp_group {dp_ranks} share ranks "
                         f"{both}; expected only this rank ({me}) in both: each data-parallel peer holds "
                         "the same stages in another pipeline replica. Fix: build the groups as the rows "
                         "and columns of one grid, e.g. pp group = ranks [r*P, (r+1)*P), dp group = "
                         "ranks {i, i+P, i+2P, ...}")
    world = dist.get_world_size()
    if len(pp_ranks) * len(dp_ranks) > world:
        raise ValueError(f"compile(): pipeline group of {len(pp_ranks)} x dp_group of {len(dp_ranks)} ranks "
                         f"> world size {world}; expected the grid to fit in the world")
    return dp_group, dp_mode


def check_expert_parallel(dp_group: Optional[dist.ProcessGroup],
                          experts: Optional[ExpertParallel]) -> Optional[ExpertParallel]:
    """``experts`` once its groups fit ``dp_group`` (local checks, before any communication).

    Raises:
        ValueError: ``expert_parallel`` without ``dp_group``; the EP group or ``replica_group``
            lacks this rank or reaches outside ``dp_group``; the two do not tile ``dp_group``
            (EP size x replica size != dp size, or they share another rank).
    """
    if experts is None:
        return None
    if not isinstance(experts, ExpertParallel):
        raise ValueError(f"compile(expert_parallel={experts!r}): expected a dualpipe_fx.ExpertParallel")
    if dp_group is None:
        raise ValueError("compile(expert_parallel=...) needs dp_group: the EP ranks read different batches, "
                         "so every non-expert parameter is data-parallel over (at least) the EP group; pass "
                         "dp_group = the ranks holding this rank's stages in the other pipeline replicas")
    me = dist.get_rank()
    dp = set(dist.get_process_group_ranks(dp_group))

    def ranks(g, what):
        members = dist.get_process_group_ranks(g) if dist.get_rank(g) >= 0 else []
        if me not in members or not set(members) <= dp:
            raise ValueError(f"compile(expert_parallel=...): {what} {sorted(members)} must contain this rank "
                             f"({me}) and lie within dp_group {sorted(dp)}")
        return set(members)

    ep = ranks(experts.group, "the EP group")
    replicas = ranks(experts.replica_group, "replica_group") if experts.replica_group is not None else {me}
    if len(ep) * len(replicas) != len(dp) or ep & replicas != {me}:
        hint = "None (the EP group spans dp_group)" if len(ep) == len(dp) else \
            "the ranks of dp_group with this rank's EP index (one per EP group)"
        raise ValueError(f"compile(expert_parallel=...): the EP group {sorted(ep)} and replica_group "
                         f"{sorted(replicas)} do not tile dp_group {sorted(dp)}; expected |EP| x |replicas| = "
                         f"|dp_group| meeting in this rank alone: set replica_group to {hint}")
    return experts


def dp_fields(group: Optional[dist.ProcessGroup], dp_mode: str) -> dict[str, object]:
    """What every data-parallel peer must share beyond compile()'s call: its place in its pipeline."""
    return {"pipeline group size": dist.get_world_size(group), "pipeline rank": dist.get_rank(group),
            "dp_mode": dp_mode}
