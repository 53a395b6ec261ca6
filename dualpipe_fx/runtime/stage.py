"""One pipeline stage on torch.distributed.pipelining, running the split graphs.

**Contract**: ``GraphStage(graphs, place, params, ...)`` is a ``_PipelineStageBase`` whose
compute is ``StageGraphs.forward / backward_input / backward_weight`` (no autograd), and
whose ``get_{fwd,bwd}_{send,recv}_ops`` give torch's runtime the P2P ops for its SEND_*/
RECV_* actions. Param grads accumulate into the model's own ``nn.Parameter.grad``.

**Pseudocode**
    forward(mb):   inputs = received or handed-over tensors + external inputs
                   outputs, saved[mb] = graphs.forward(params, inputs)
    backward_input(mb):  grad_inputs, saved_w[mb] = graphs.backward_input(saved[mb], grad_out[mb])
    backward_weight(mb): param.grad += graphs.backward_weight(saved_w[mb])
                         (in place, fused into the GEMM; a missing .grad is zeroed first,
                         so no micro-batch's grad is ever a second grad-sized tensor)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dualpipe_fx._compat import PipelineStageBase
from dualpipe_fx.runtime.clock import HostClock
from dualpipe_fx.runtime.errors import PeerTimeoutError
from dualpipe_fx.runtime.sync import wait
from passes.accumulate_grads import accumulate_grads, accumulated_positions
from passes.split_backward import compile_graph
from passes.stage_graphs import StageGraphs


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one tensor crossing a stage boundary (one micro-batch)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    stride: Optional[tuple[int, ...]] = None  # the layout the stage graphs were traced with

    @property
    def differentiable(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex

    def empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=device)

    def restride(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``t`` in the traced layout. Received buffers are dense, but a graph traced on a
        transposed view may ``view`` it in a way that only that layout allows."""
        if t is None or self.stride is None or t.stride() == self.stride:
            return t
        return with_strides(t, self.stride)


def with_strides(t: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """A tensor equal to ``t`` with strides ``stride`` (storage offset 0, as traced).

    ``t``'s values must fit the layout: where two indices share a storage element in it
    (stride 0, overlapping windows) they hold equal values, as they do when ``t`` is a
    dense copy of a tensor that had that layout.
    """
    shape, stride = tuple(t.shape), tuple(stride)
    expanded = [d for d, (n, st) in enumerate(zip(shape, stride)) if st == 0 and n > 1]
    if expanded:
        # copy_ refuses to write through stride 0; keep one copy (index 0 along the expanded
        # dims: no memory blow-up for a [b, 1, s, s] mask) and expand it, which gives stride 0
        base = t[tuple(slice(0, 1) if d in expanded else slice(None) for d in range(t.dim()))]
        return with_strides(base, stride).expand(shape)
    if not _may_overlap(shape, stride):
        return torch.empty_strided(shape, stride, dtype=t.dtype, device=t.device).copy_(t)
    # Overlapping windows (unfold): torch only refuses stride 0, but copy_ into any
    # overlapping view is unsupported; write the storage by offset instead. Repeated
    # offsets carry equal values, so whichever write lands last is right.
    size = 1 + sum((n - 1) * st for n, st in zip(shape, stride))
    offsets = torch.arange(size, device=t.device).as_strided(shape, stride)
    storage = torch.empty(size, dtype=t.dtype, device=t.device)
    storage[offsets.reshape(-1)] = t.reshape(-1)
    return storage.as_strided(shape, stride)


def _may_overlap(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """False when no two indices of the layout share a storage element: each dim (by
    increasing stride) steps past everything the smaller dims reach. Conservative: an
    interleaved layout that does not overlap may answer True (the offset path suits it too)."""
    if 0 in shape:
        return False
    reach = 0  # the largest offset the dims seen so far address
    for n, st in sorted(((n, st) for n, st in zip(shape, stride) if n > 1), key=lambda ns: ns[1]):
        if st <= reach:
            return True
        reach += (n - 1) * st
    return False


def pipeline_tag(sender_stage: int, kind: str, index: int) -> int:
    """The P2P tag of tensor ``index`` that stage ``sender_stage`` sends forward (``"F"``:
    its outputs) or backward (``"B"``: its grad_inputs). Tag 0 stays free for other traffic."""
    return 1 + (2 * sender_stage + (kind == "B")) * _TAGS_PER_STREAM + index


_TAGS_PER_STREAM = 1 << 12  # tensors per stage boundary; far more than any stage sends


@dataclass(frozen=True)
class StagePlace:
    """Where a stage sits: its neighbours in its chain and the ranks that hold them."""

    stage: int
    num_stages: int
    prev_stage: Optional[int]
    next_stage: Optional[int]
    prev_rank: Optional[int]  # group rank; None when there is no previous stage
    next_rank: Optional[int]
    rank: int


class GraphStage(PipelineStageBase):
    """A pipeline stage whose F, I and W run ``StageGraphs`` callables.

    Args:
        graphs: the stage's three graphs (maybe compiled).
        place: the stage's neighbours and their ranks.
        params: the model's own parameters then buffers, in ``graphs.param_names`` then
            ``graphs.buffer_names`` order.
        input_metas: one ``TensorMeta`` per received input (the previous stage's outputs).
        output_metas: one ``TensorMeta`` per output sent on (empty for a chain's last stage).
        group: the pipeline's process group; device: where tensors live.
        flat_graphs: the same stage's uncompiled graphs (with flat ``.gm``), when ``graphs``
            are compiled; the overlapped and accumulating graphs are built from them.
        compile_stages: compile the accumulating W graph too (its in-place sums as custom
            ops, ``accumulate_grads(opaque=True)``, so that it compiles as one graph).
    """

    def __init__(self, graphs: StageGraphs, place: StagePlace, params: Sequence[torch.Tensor],
                 input_metas: Sequence[TensorMeta], output_metas: Sequence[TensorMeta],
                 group: Optional[dist.ProcessGroup], device: torch.device,
                 flat_graphs: Optional[StageGraphs] = None, compile_stages: bool = False) -> None:
        super().__init__(nn.Module(), place.stage, place.num_stages, device, group)
        self.graphs = graphs
        self.flat_graphs = graphs if flat_graphs is None else flat_graphs
        self._own_weight = graphs.backward_weight
        self._accumulating_weight = None  # built on first use; False when there is no flat graph
        self._run_accumulating_weight: Optional[Callable] = None  # it, or its compiled forward
        self.compile_stages = compile_stages
        self.early_sends = False  # send_early starts sends (only where P2P matches by tag: gloo)
        self._sent_early: set[tuple[str, int, int]] = set()  # (kind, mb, index) already sent
        # ("F"|"B", mb) -> the works of the sends of that micro-batch's outputs / grad_inputs, each
        # holding its tensor until waited for (wait_sends, at the release point the executor knows)
        self._sends: dict[tuple[str, int], list] = {}
        # while profiling: (stage, "F"|"B", mb, time) per early send, (stage, "recvF"|"recvB", ...) per receive
        self.comm_log: Optional[list] = None
        self.clock = HostClock()  # the profile's timing source (runtime.clock): CUDA events on a GPU
        self.place = place
        self.params = tuple(params)
        # what the graphs read: the params themselves, or (mixed precision) their param_dtype
        # copies, which runtime.data_parallel casts or gathers once per step
        self.compute = self.params
        self.num_params = len(graphs.param_names)
        self.input_metas = tuple(input_metas)
        self.output_metas = tuple(output_metas)
        self.external: dict[int, tuple] = {}   # mb -> external inputs, set by the pipeline each step
        self.grad_loss: Optional[torch.Tensor] = None  # d(step loss)/d(micro-batch loss)
        self.losses: dict[int, torch.Tensor] = {}
        self.model_outputs: dict[int, tuple] = {}
        self._inputs: dict[int, tuple] = {}
        self._outputs: dict[int, tuple] = {}
        self._saved: dict[int, tuple] = {}
        self._saved_w: dict[int, tuple] = {}
        self._grad_out: dict[int, tuple] = {}
        self._grad_in: dict[int, tuple] = {}

    @property
    def is_chain_last(self) -> bool:
        return self.place.next_stage is None

    # -- compute -------------------------------------------------------------------

    def run_forward(self, mb: int, keep_saved: bool = True) -> tuple:
        """Run F for micro-batch ``mb``; returns the outputs (sent on, or the loss...)."""
        received = tuple(m.restride(t) for m, t in zip(self.input_metas, self._inputs.pop(mb, ())))
        inputs = received + tuple(self.external.get(mb, ()))
        outputs, saved = self.graphs.forward(self.compute, inputs)
        outputs = tuple(outputs)
        if keep_saved:
            self._saved[mb] = saved
        if self.is_chain_last:
            self.losses[mb] = outputs[0]
            if not keep_saved:  # forward-only steps return the model's outputs; training drops them here
                self.model_outputs[mb] = outputs[1:]
        else:
            self._outputs[mb] = outputs
        return outputs

    def run_backward_input(self, mb: int) -> tuple:
        """Run I for ``mb``: input grads (kept for the send / hand-over) and W's saved values."""
        # the loss seed in the loss's dtype (a bf16 loss under mixed precision)
        grad_out = (self.grad_loss.to(self.losses[mb].dtype),) if self.is_chain_last else self._grad_out.pop(mb)
        grad_inputs, saved_w = self.graphs.backward_input(self._saved.pop(mb), grad_out)
        self._saved_w[mb] = saved_w
        grad_inputs = tuple(grad_inputs)
        if self.place.prev_stage is not None:
            self._grad_in[mb] = grad_inputs
        return grad_inputs

    def run_backward_weight(self, mb: int) -> None:
        """Run W for ``mb``: accumulate its param grads into the parameters' ``.grad``.

        The grads are summed in place by the accumulating graph (``passes.accumulate_grads``:
        ``grad.addmm_(a, b)``, no new buffer, no separate add), on the step's first W too:
        ``grad_buffers`` zeroes a missing ``.grad`` first.
        """
        saved_w = self._saved_w.pop(mb)
        own = self.graphs.backward_weight is self._own_weight  # not an overlap runner's stand-in
        gm = self.accumulating_weight() if own else None
        accs = self.grad_buffers(accumulated_positions(gm)) if gm is not None else None
        if accs is not None:
            with torch.no_grad():
                grads = self._run_accumulating_weight(*saved_w, *accs)
        else:
            grads = self.graphs.backward_weight(saved_w)
        # an F&B pair's W ran inside the pair: saved_w are its grads, ``shared`` what they may alias
        self.accumulate(grads, getattr(saved_w, "shared", saved_w))

    def accumulating_weight(self) -> Optional[torch.fx.GraphModule]:
        """``backward_weight`` as an ``accumulate_grads`` graph (None without a flat graph)."""
        if self._accumulating_weight is None:
            gm = getattr(self.flat_graphs.backward_weight, "gm", None)
            if not isinstance(gm, torch.fx.GraphModule):
                self._accumulating_weight = False
                return None
            gm = accumulate_grads(gm, range(self.num_params), opaque=self.compile_stages, cast=self.cast_positions())
            self._accumulating_weight = gm
            self._run_accumulating_weight = compile_graph(gm) if self.compile_stages else gm
        return self._accumulating_weight or None

    def cast_positions(self) -> tuple[int, ...]:
        """Mixed precision: the parameters whose graphs read a ``param_dtype`` copy, so that W's
        grad (in ``param_dtype``) is summed into a ``.grad`` of another dtype."""
        return tuple(i for i in range(self.num_params) if self.compute[i].dtype != self.params[i].dtype)

    def grad_buffers(self, positions) -> Optional[list[torch.Tensor]]:
        """The ``.grad`` of the parameters at ``positions``, when each can take an in-place sum;
        a missing one is made (zeros, laid out like the parameter, as autograd's AccumulateGrad
        lays it out) so that the step's first micro-batch sums into it too. Without it the
        first W would return fresh grads, and one that is laid out otherwise than its
        parameter, or (mixed precision) in another dtype, would be copied: two grads at once."""
        params = [self.params[i] for i in positions]
        for param in params:
            grad = param.grad
            if grad is not None and (grad.requires_grad or grad.layout != torch.strided or grad.shape != param.shape
                                     or grad.dtype != param.dtype or grad.device != param.device):
                return None
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param, requires_grad=False)
        return [param.grad for param in params]

    def accumulate(self, grads: Sequence[Optional[torch.Tensor]], saved_w: Sequence) -> None:
        """``param.grad += grad`` for each param; a grad that *is* ``param.grad`` was summed in place.
        Mixed precision: a param_dtype grad is summed into the parameter's own dtype."""
        keep = {t.untyped_storage().data_ptr() for t in saved_w if isinstance(t, torch.Tensor)}
        for param, grad in zip(self.params[: self.num_params], grads):
            if grad is None or grad is param.grad:
                continue
            if param.grad is None:
                storage = grad.untyped_storage().data_ptr()
                # Later micro-batches add into this buffer in place: it must be ours alone and
                # laid out like the parameter (as autograd's AccumulateGrad makes it).
                if grad.dtype != param.dtype:
                    grad = torch.empty_like(param, dtype=param.dtype).copy_(grad)
                elif storage in keep or grad.stride() != param.stride():
                    grad = grad.clone(memory_format=torch.contiguous_format)
                keep.add(grad.untyped_storage().data_ptr())
                param.grad = grad.detach()
            else:
                param.grad.add_(grad)

    # -- hand-over between two stages on the same rank -------------------------------

    def take_outputs(self, mb: int) -> tuple:
        return self._outputs.pop(mb)

    def take_grad_inputs(self, mb: int) -> tuple:
        grads = self._grad_in.pop(mb)
        return tuple(g for g, m in zip(grads, self.input_metas) if m.differentiable)

    def set_inputs(self, mb: int, tensors: tuple) -> None:
        self._inputs[mb] = tuple(tensors)

    def set_grad_outputs(self, mb: int, grads: tuple) -> None:
        it = iter(grads)
        self._grad_out[mb] = tuple(next(it) if m.differentiable else None for m in self.output_metas)

    # -- stand-ins, once this rank's step failed: no compute, zeros for what peers wait for --

    def _zeros(self, metas: Sequence[TensorMeta], only_differentiable: bool = False) -> tuple:
        return tuple(torch.zeros(m.shape, dtype=m.dtype, device=self.device)
                     if m.differentiable or not only_differentiable else None for m in metas)

    def stand_in_forward(self, mb: int) -> None:
        """F of a failed step: drop ``mb``'s inputs; zero outputs to send or hand over."""
        self._inputs.pop(mb, None)
        if not self.is_chain_last:
            self._outputs[mb] = self._zeros(self.output_metas)

    def stand_in_backward(self, mb: int, weight: bool) -> None:
        """I/B (``weight``: also W) of a failed step: drop ``mb``'s saved values; zero grad_inputs."""
        self._saved.pop(mb, None)
        self._grad_out.pop(mb, None)
        if weight:
            self._saved_w.pop(mb, None)
        if self.place.prev_stage is not None:
            self._grad_in[mb] = self._zeros(self.input_metas, only_differentiable=True)

    # -- P2P ops for torch's SEND_*/RECV_* actions ------------------------------------
    # Each (sending stage, direction, tensor index) is its own tagged stream, so a send
    # started early (inside an F&B pair) cannot be matched with another stream's receive.
    # The stage issues its sends itself, in the order torch's SEND_F/SEND_B actions would (so
    # NCCL's by-order matching is unchanged), and returns torch no op: torch would keep every
    # send's work, and so its tensor, until the step's end. Here each is waited for and dropped
    # at its release point (schedules.release; the executor calls wait_sends there).

    def _op(self, op, tensor: torch.Tensor, peer: int, tag: int) -> dist.P2POp:
        return dist.P2POp(op, tensor, group=self.group, group_peer=peer, tag=tag)

    def _isend(self, kind: str, mb: int, index: int, tensor: torch.Tensor) -> None:
        """Send output (``"F"``) or grad_input (``"B"``) ``index`` of ``mb``; keep its work."""
        peer = self.place.next_rank if kind == "F" else self.place.prev_rank
        # gloo sends only contiguous tensors; a cut can fall on a view (e.g. a transpose)
        work = dist.isend(tensor.contiguous(), group=self.group, group_dst=peer,
                          tag=pipeline_tag(self.stage_index, kind, index))
        if work is not None:
            self._sends.setdefault((kind, mb), []).append(work)

    def send_early(self, kind: str, mb: int, index: int, tensor: torch.Tensor) -> None:
        """Start sending output (``"F"``) or grad_input (``"B"``) ``index`` of ``mb`` now,
        while the rest of its F&B pair computes; the SEND_F/SEND_B action then skips it."""
        if not self.sends_early(kind):
            return
        if kind == "B" and not self.input_metas[index].differentiable:
            return
        self._isend(kind, mb, index, tensor)
        self._sent_early.add((kind, mb, index))
        if self.comm_log is not None:  # profiling: when this result left the rank
            self.comm_log.append((self.stage_index, kind, mb, self.clock.mark()))

    def sends_early(self, kind: str) -> bool:
        """Whether ``send_early`` can start a send of outputs (``"F"``) or grad_inputs (``"B"``):
        not without a peer, nor to a same-rank hand-over, nor on a backend that matches P2P
        by order (``early_sends`` off)."""
        peer = self.place.next_rank if kind == "F" else self.place.prev_rank
        return self.early_sends and peer is not None and peer != self.place.rank

    def _unsent(self, kind: str, mb: int, index: int) -> bool:
        if (kind, mb, index) in self._sent_early:
            self._sent_early.remove((kind, mb, index))
            return False
        return True

    @property
    def pending_sends(self) -> int:
        """How many sends this stage has started and not yet waited for (each holds its tensor)."""
        return sum(len(works) for works in self._sends.values())

    def wait_sends(self, kind: str, mb: int, timeout) -> None:
        """Wait for the sends of ``mb``'s outputs (``"F"``) or grad_inputs (``"B"``) and drop
        them, and with them their tensors. Call it only where the peer is known to have posted
        the receives (``schedules.release``): a gloo send waits for its receive."""
        peer = self.place.next_rank if kind == "F" else self.place.prev_rank
        for work in self._sends.pop((kind, mb), ()):
            try:
                wait(work, timeout, self.device)
            except RuntimeError as err:
                what = (f"the receive of stage {self.stage_index}'s {'activations' if kind == 'F' else 'gradients'}"
                        f" of micro-batch {mb} (a send)")
                raise PeerTimeoutError(self.place.rank, peer, what, timeout, err) from err

    def finish_sends(self, timeout) -> None:
        """Wait for every send still pending (those whose release point is the step's end)."""
        for kind, mb in list(self._sends):
            self.wait_sends(kind, mb, timeout)

    def _log_recv(self, kind: str, mb: int) -> None:
        if self.comm_log is not None:  # profiling: when the receive was posted (gloo moves data after)
            self.comm_log.append((self.stage_index, "recv" + kind, mb, self.clock.mark()))

    def get_fwd_recv_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        self._log_recv("F", fwd_chunk_id)
        bufs = tuple(m.empty(self.device) for m in self.input_metas)
        self._inputs[fwd_chunk_id] = bufs
        return [self._op(dist.irecv, b, self.place.prev_rank, pipeline_tag(self.place.prev_stage, "F", i))
                for i, b in enumerate(bufs)]

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        """SEND_F: sends the outputs itself (see above); torch gets no op to keep."""
        for i, t in enumerate(self._outputs.pop(fwd_chunk_id)):
            if self._unsent("F", fwd_chunk_id, i):
                self._isend("F", fwd_chunk_id, i, t)
        return []

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        self._log_recv("B", bwd_chunk_id)
        bufs = tuple(m.empty(self.device) if m.differentiable else None for m in self.output_metas)
        self._grad_out[bwd_chunk_id] = bufs
        return [self._op(dist.irecv, b, self.place.next_rank, pipeline_tag(self.place.next_stage, "B", i))
                for i, b in enumerate(bufs) if b is not None]

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        """SEND_B: sends the grad_inputs itself (see above); torch gets no op to keep."""
        grads = self._grad_in.pop(bwd_chunk_id)
        for i, (grad, meta) in enumerate(zip(grads, self.input_metas)):
            if meta.differentiable and self._unsent("B", bwd_chunk_id, i):
                grad = torch.zeros(meta.shape, dtype=meta.dtype, device=self.device) if grad is None else grad
                self._isend("B", bwd_chunk_id, i, grad)
        return []

    # -- torch's metadata inference: not needed, metas come from the local trace -----

    def _prepare_forward_infra(self, num_microbatches, args, kwargs=None, has_backward=False):
        self.chunks = num_microbatches
        return None

    def _prepare_backward_infra(self, num_microbatches, loss_fn=None, target=None,
                                received_grad_meta=None, loss_kwargs=None):
        return None

    def _create_grad_recv_info(self, act_send_info):
        return ()

    def clear_runtime_states(self) -> None:
        """Drop every per-micro-batch value of the last step (after an error, for one)."""
        for store in (self._inputs, self._outputs, self._saved, self._saved_w, self._grad_out,
                      self._grad_in, self.losses, self.model_outputs, self.external, self._sent_early,
                      self._sends):
            store.clear()


def named_params(stages) -> dict:
    """This rank's parameters by FQN (``{stage: GraphStage}``), once each, sorted by FQN."""
    named: dict = {}
    for stage in stages.values():
        for name, param in zip(stage.graphs.param_names, stage.params):
            named.setdefault(name, param)
    return dict(sorted(named.items()))
