"""Errors of the runtime, and the checks that raise them before any communication starts."""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Mapping, Optional

import torch


_CLOSED = ("Connection closed", "Connection reset", "connection reset", "pair closure", "Broken pipe",
           "closed by peer", "Socket closed")


class PeerTimeoutError(TimeoutError):
    """A peer rank did not deliver: it closed the connection (died or raised), or it did not
    answer within the pipeline's timeout (hung or slow). ``reason`` is ``"closed"`` or
    ``"timeout"``; ``peer`` the rank waited for (None when not one rank)."""

    def __init__(self, rank: int, peer: Optional[int], what: str, timeout: timedelta,
                 cause: Optional[BaseException] = None) -> None:
        self.rank, self.peer = rank, peer
        self.reason = "closed" if any(k in str(cause) for k in _CLOSED) else "timeout"
        who = f"rank {peer}" if peer is not None else "a peer rank"
        if self.reason == "closed":
            text = (f"rank {rank}: {who} closed the connection while rank {rank} waited for {what}: it died "
                    f"or raised; see its log")
        else:
            text = (f"rank {rank} waited for {what} from {who} and gave up (timeout "
                    f"{timeout.total_seconds():g}s): {who} hangs, is stopped or is slow; check its log, "
                    f"and raise compile(timeout=...) if it is only slow")
        super().__init__(f"{text}. The process group cannot be used again (later steps raise "
                         f"PipelineBrokenError). Cause: {_first_line(cause)}")


class PipelineBrokenError(RuntimeError):
    """The pipeline's process group broke in an earlier step (a peer died, hung or closed
    its connection); no later step can run on it."""

    def __init__(self, rank: int, cause: str) -> None:
        self.rank = rank
        super().__init__(
            f"rank {rank}: the pipeline's process group broke in an earlier step ({cause}), and gloo/NCCL "
            "cannot resume on a group with a lost peer. Rebuild it: end every rank's process and start them "
            "again (torchrun --max-restarts=N restarts all of them when one fails), call "
            "init_process_group and dualpipe_fx.compile() again, and resume from your last checkpoint "
            "(save pipe.state_dict() with torch.distributed.checkpoint each few steps; load it with "
            "pipe.load_state_dict)")


class PipelineStepError(RuntimeError):
    """A step failed on one rank (``rank``) after its P2P started; every rank raises this.

    The failing rank's peers finished the step on stand-in zeros, so the group stays
    healthy; every rank dropped the step (its grads set to None) and can run the next one.
    """

    def __init__(self, rank: int, where: str, kind: str, message: str) -> None:
        self.rank, self.kind = rank, kind
        super().__init__(
            f"rank {rank} raised {kind} in {where or 'its step'}: {message}. Every rank dropped this step: its grads are "
            "None (the failed step's partial grads and any accumulated since zero_grad()); the pipeline can "
            "run the next step")


class PeerFailedError(RuntimeError):
    """Another rank (``rank``) raised ``kind`` during a collective phase (``where``, e.g.
    ``compile()``); this rank stopped there too instead of waiting for it. The failing rank
    raises its own error."""

    def __init__(self, me: int, rank: int, where: str, kind: str, message: str) -> None:
        self.rank, self.kind = rank, kind
        super().__init__(f"rank {me}: {where} stopped because rank {rank} raised {kind}: {message} "
                         f"(the full error and its traceback are in rank {rank}'s log)")


def _first_line(err: Optional[BaseException]) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


def check_batch(name: str, tensor, example: torch.Tensor, num_microbatches: int,
                device: torch.device) -> None:
    """Raise ValueError/TypeError unless ``tensor`` is ``num_microbatches`` example-shaped micro-batches."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"step(): {name} is a {type(tensor).__name__}; expected a torch.Tensor like the "
                        f"example passed to compile()")
    if tensor.device != device:
        raise ValueError(f"step(): {name} is on {tensor.device}, but the pipeline's stages are on {device}; "
                         f"move it with .to({str(device)!r})")
    if tensor.dim() == 0 or tensor.shape[0] % num_microbatches:
        batch = tensor.shape[0] if tensor.dim() else "a scalar"
        raise ValueError(f"step(): {name} has batch size {batch}, which does not divide into "
                         f"num_microbatches={num_microbatches}; pass a batch that is a multiple of "
                         f"{num_microbatches} (e.g. {num_microbatches * example.shape[0]})")
    mb_shape = (tensor.shape[0] // num_microbatches, *tensor.shape[1:])
    if mb_shape == tuple(example.shape) and tensor.dtype != example.dtype:
        raise ValueError(
            f"step(): {name} has dtype {tensor.dtype}, but the pipeline was traced for {example.dtype} (its "
            f"shape is right); pass {name}.to({example.dtype}), or call dualpipe_fx.compile() again with an "
            f"example micro-batch of dtype {tensor.dtype}")
    if mb_shape != tuple(example.shape):
        dtype = f" ({tensor.dtype}; traced for {example.dtype})" if tensor.dtype != example.dtype else ""
        raise ValueError(
            f"step(): {name} of shape {tuple(tensor.shape)}{dtype} splits into micro-batches of "
            f"{mb_shape}, but the pipeline was traced for {tuple(example.shape)}; pass "
            f"batches of shape {(num_microbatches * example.shape[0], *example.shape[1:])}, or call "
            f"dualpipe_fx.compile() again with an example micro-batch of the new shape")


def check_inputs(values: Mapping[str, Any], examples: Mapping[str, torch.Tensor], call,
                 num_microbatches: int, device: torch.device) -> None:
    """Every tensor input of ``step()`` (positional and keyword, by graph-input name, from
    ``call.values``) against its example micro-batch; errors name it as the user wrote it.
    A BlockMask's tensor (``call.mask_names``) may also have the example's own shape: it is
    then shared by every micro-batch (``runtime.values.micro_batches``)."""
    shared_ok = getattr(call, "mask_names", frozenset())
    for name, example in examples.items():
        value = values[name]
        if (name in shared_ok and isinstance(value, torch.Tensor) and value.device == device
                and tuple(value.shape) == tuple(example.shape) and value.dtype == example.dtype):
            continue
        check_batch(call.label(name), value, example, num_microbatches, device)


def check_world(schedule: str, world_size: int, num_microbatches: int, spec) -> None:
    """Raise ValueError when the schedule cannot run on ``world_size`` ranks with these micro-batches."""
    try:
        spec.validate(world_size, num_microbatches)
    except ValueError as err:
        raise ValueError(f"compile(schedule={schedule!r}, num_microbatches={num_microbatches}) on "
                         f"{world_size} rank(s): {err}") from err
