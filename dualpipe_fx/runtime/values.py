"""Which step values a stage takes as external inputs."""
from __future__ import annotations

from passes.stage_graphs import StageGraphs


def external_values(graphs: StageGraphs, inputs: tuple, target) -> tuple:
    """A stage's external inputs by name: ``input:i`` is model input ``i``, ``target`` the target."""
    values = {f"input:{i}": x for i, x in enumerate(inputs)}
    values["target"] = target
    return tuple(values[name] for name in graphs.external_inputs)
