"""The contract between the passes and the runtime: one pipeline stage as three graphs.

Calling conventions (all arguments and results are tuples of tensors, flat):

- ``forward(params, inputs) -> (outputs, saved)``
- ``backward_input(saved, grad_outputs) -> (grad_inputs, saved_for_weight)``
- ``backward_weight(saved_for_weight) -> param_grads``

``params`` are the stage's parameters then its buffers, in ``param_names`` then
``buffer_names`` order. ``inputs`` are the previous stage's outputs (in its
``output_names`` order) followed by this stage's ``external_inputs`` (model inputs for
the first stage, the target for the last). ``outputs`` go to the next stage; the last
stage's outputs are ``(loss, *model_outputs)``: the scalar loss of one micro-batch,
then the model's own outputs (for forward-only use); its ``backward_input`` takes
``grad_outputs=(grad_loss,)`` only. ``grad_inputs`` has one
entry per non-external input (``None`` where the input is not differentiable, e.g.
token ids). ``param_grads`` has one entry per ``param_names`` entry. Nothing here
touches ranks or processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class StageGraphs:
    index: int
    param_names: tuple[str, ...]
    buffer_names: tuple[str, ...]
    input_names: tuple[str, ...]
    external_inputs: tuple[str, ...]
    output_names: tuple[str, ...]
    forward: Callable
    backward_input: Callable
    backward_weight: Callable
    is_last: bool = False
