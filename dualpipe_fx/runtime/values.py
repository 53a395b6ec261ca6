"""Which step values a stage takes as external inputs."""
from __future__ import annotations

from typing import Any, Mapping

from passes.stage_graphs import StageGraphs


def external_values(graphs: StageGraphs, values: Mapping[str, Any]) -> tuple:
    """A stage's external inputs, picked by name from ``values``: ``input:i`` (positional model
    input ``i``), ``kwarg:name`` (a tensor keyword argument, see ``passes.capture.ModelCall``)
    and ``target``."""
    return tuple(values[name] for name in graphs.external_inputs)
