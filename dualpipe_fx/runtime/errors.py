"""Errors of the runtime, and the checks that raise them before any communication starts."""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Mapping, Optional

import torch


class PeerTimeoutError(TimeoutError):
    """A peer rank did not deliver within the pipeline's timeout (it died, hung or errored)."""

    def __init__(self, rank: int, peer: Optional[int], what: str, timeout: timedelta,
                 cause: Optional[BaseException] = None) -> None:
        self.rank, self.peer = rank, peer
        who = f"rank {peer}" if peer is not None else "a peer rank"
        super().__init__(
            f"rank {rank} waited for {what} from {who} and gave up (timeout "
            f"{timeout.total_seconds():g}s): {who} died, hangs or raised an error; check its log. "
            f"Raise compile(timeout=...) if it is only slow. Cause: {cause}")


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
    if mb_shape != tuple(example.shape) or tensor.dtype != example.dtype:
        raise ValueError(
            f"step(): {name} of shape {tuple(tensor.shape)} ({tensor.dtype}) splits into micro-batches of "
            f"{mb_shape}, but the pipeline was traced for {tuple(example.shape)} ({example.dtype}); pass "
            f"batches of shape {(num_microbatches * example.shape[0], *example.shape[1:])}, or call "
            f"dualpipe_fx.compile() again with an example micro-batch of the new shape")


def check_inputs(values: Mapping[str, Any], examples: Mapping[str, torch.Tensor], call,
                 num_microbatches: int, device: torch.device) -> None:
    """Every tensor input of ``step()`` (positional and keyword, by graph-input name, from
    ``call.values``) against its example micro-batch; errors name it as the user wrote it."""
    for name, example in examples.items():
        check_batch(call.label(name), values[name], example, num_microbatches, device)


def check_world(schedule: str, world_size: int, num_microbatches: int, spec) -> None:
    """Raise ValueError when the schedule cannot run on ``world_size`` ranks with these micro-batches."""
    try:
        spec.validate(world_size, num_microbatches)
    except ValueError as err:
        raise ValueError(f"compile(schedule={schedule!r}, num_microbatches={num_microbatches}) on "
                         f"{world_size} rank(s): {err}") from err
