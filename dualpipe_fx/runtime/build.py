"""Build this rank's ``Pipeline`` from the split stage graphs and the schedule's program.

**Contract**: ``build_pipeline(model, parts, program, examples, target, num_microbatches,
group, timeout, compile_stages, overlap, example_kwargs=, call=, outputs=, part_graphs=,
device=, pending=) -> Pipeline``; ``parts[k]`` is model part ``k``'s ``StageGraphs`` (None for
a part this rank does not run); ``part_graphs[k]`` its stage graph from ``split_stages``
(every part; their ``meta["val"]`` give the boundary metas); stage ``s`` of the program runs
``parts[program.model_part(s)]``; ``call``/``outputs`` (from ``passes.capture``) say how the
model was called and what its output looks like (default: positional tensors in, flat out).
``pending``: modules whose tensors wait for ``load_state_dict`` (``runtime.materialize``).

**Pseudocode**
    metas = each part's outputs' meta["val"] in the traced graphs (no forward runs)
    for each stage this rank runs: GraphStage(part graphs, neighbours, model's own params, metas)
    schedules = torch _PipelineScheduleRuntime over those stages, loaded with the program + comms
                (and one with its forwards only, for no_grad steps); handlers registered on both
    return Pipeline(...)
"""
from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any, Collection, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dualpipe_fx import _compat
from dualpipe_fx.runtime.data_parallel import DataParallel
from dualpipe_fx.runtime.executor import Executor
from dualpipe_fx.runtime.lowering import forward_only, load_program
from dualpipe_fx.runtime.materialize import Pending
from dualpipe_fx.runtime.overlap import OverlapRunner
from dualpipe_fx.runtime.pipeline import Pipeline
from dualpipe_fx.runtime.stage import GraphStage, StagePlace, TensorMeta, named_params
from dualpipe_fx.runtime.sync import shared_holders
from dualpipe_fx.schedules.ir import Program
from dualpipe_fx.schedules.lowering import RECV_LOOKAHEAD
from passes.model_call import ModelCall, OutputLayout
from passes.split_backward import compiled
from passes.stage_graphs import StageGraphs



class _GraphSchedule(_compat.PipelineScheduleRuntime):
    """torch's runtime, minus its metadata inference: metas come from the local trace."""

    def _initialize_stages(self, *args, **kwargs) -> None:
        return None


def _meta(t: torch.Tensor) -> TensorMeta:
    return TensorMeta(tuple(t.shape), t.dtype, tuple(t.stride()))


def _outputs(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    args = out.args[0]
    return list(args) if isinstance(args, (tuple, list)) else [args]


def graph_metas(part_graphs: Sequence[torch.fx.GraphModule]
                ) -> tuple[list[tuple[TensorMeta, ...]], tuple[TensorMeta, ...]]:
    """Per part, the metas of its outputs; and the model outputs' metas (last part).

    Read from the traced ``meta["val"]`` (fake tensors): no rank runs a forward with real
    weights, and the strides are those the receiving stage's graphs were traced with.
    """
    metas = [tuple(_meta(v.meta["val"]) for v in _outputs(gm)) for gm in part_graphs]
    return metas, metas[-1][1:]


def _graph_names(gm: torch.fx.GraphModule, kind: str) -> tuple[str, ...]:
    return tuple(n.meta["dpfx_name"] for n in gm.graph.nodes
                 if n.op == "placeholder" and n.meta.get("dpfx_kind") == kind)


def part_params(model: nn.Module, graphs: StageGraphs) -> tuple[torch.Tensor, ...]:
    """The model's own parameters then buffers of one part, in the graphs' order."""
    named = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    return tuple(named[n] for n in graphs.param_names) + tuple(buffers[n] for n in graphs.buffer_names)


def compile_graphs(graphs: StageGraphs) -> StageGraphs:
    """The same stage with each graph's ``.gm`` compiled (``passes.split_backward.compile_graph``:
    one Dynamo cache entry per graph, compiled on first call); ``.gm`` stays the GraphModule."""
    return dataclasses.replace(graphs, forward=compiled(graphs.forward), backward_input=compiled(graphs.backward_input),
                               backward_weight=compiled(graphs.backward_weight))


def _place(program: Program, stage: int, placement: dict[int, int]) -> StagePlace:
    prev, nxt = program.previous_stage(stage), program.next_stage(stage)
    return StagePlace(stage, program.num_stages, prev, nxt,
                      None if prev is None else placement[prev],
                      None if nxt is None else placement[nxt], placement[stage])


def _make_stages(model, parts, program, rank, metas, group, device, compile_stages) -> dict[int, GraphStage]:
    placement = program.stage_to_rank()
    graphs: dict[int, StageGraphs] = {}  # part -> graphs; DualPipe mirrors share one compile
    stages = {}
    for stage in sorted(s for s, r in placement.items() if r == rank):
        k = program.model_part(stage)
        if k not in graphs:
            graphs[k] = compile_graphs(parts[k]) if compile_stages else parts[k]
        place = _place(program, stage, placement)
        in_metas = metas[program.model_part(place.prev_stage)] if place.prev_stage is not None else ()
        out_metas = metas[k] if place.next_stage is not None else ()
        stages[stage] = GraphStage(graphs[k], place, part_params(model, parts[k]), in_metas, out_metas,
                                   group, device, flat_graphs=parts[k], compile_stages=compile_stages)
    return stages


def _device(model: nn.Module, examples: Sequence) -> torch.device:
    """Where the stages run: the examples' device (``compile`` checked they agree with the model's)."""
    for t in examples:
        if isinstance(t, torch.Tensor) and not t.is_meta:
            return t.device
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _names_by_rank(part_graphs, program) -> dict[int, set[str]]:
    names: dict[int, set[str]] = {}
    for stage, rank in program.stage_to_rank().items():
        names.setdefault(rank, set()).update(_graph_names(part_graphs[program.model_part(stage)], "param"))
    return names


def local_parts(program: Program, rank: int) -> set[int]:
    """The model parts ``rank`` runs."""
    return {program.model_part(s) for s, r in program.stage_to_rank().items() if r == rank}


def local_names(part_graphs: Sequence[torch.fx.GraphModule], parts: Collection[int],
                aliases: Mapping[str, Sequence[str]]) -> set[str]:
    """FQNs of the parameters and buffers the given parts read, tied aliases included."""
    names = {n for k in parts for kind in ("param", "buffer") for n in _graph_names(part_graphs[k], kind)}
    return names | {a for n in names for a in aliases.get(n, ())}


def _local_state(model: nn.Module, stages: Mapping[int, GraphStage]) -> dict[str, torch.Tensor]:
    """This rank's params and persistent buffers under every FQN the model's state_dict uses."""
    local = {id(t) for stage in stages.values() for t in stage.params}
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) in local}


def build_pipeline(model: nn.Module, parts: Sequence[StageGraphs], program: Program, examples: tuple,
                   target: Optional[torch.Tensor], num_microbatches: int,
                   group: Optional[dist.ProcessGroup], timeout: timedelta,
                   compile_stages: bool = False, overlap: bool = True, *,
                   example_kwargs: Optional[Mapping[str, Any]] = None, call: Optional[ModelCall] = None,
                   outputs: Optional[OutputLayout] = None,
                   part_graphs: Sequence[torch.fx.GraphModule], device: Optional[torch.device] = None,
                   pending: Optional[Mapping[str, Pending]] = None,
                   data_parallel: Optional[tuple[dist.ProcessGroup, str]] = None, experts=None,
                   mixed_precision=None, tensor_parallel=None) -> Pipeline:
    """This rank's pipeline (see the module docstring); ``data_parallel``: (group, mode) for
    ``runtime.data_parallel.DataParallel``, or None; ``mixed_precision``: a
    ``MixedPrecisionPolicy`` (the stages then read param_dtype copies that ``DataParallel``,
    over no group without data parallelism, casts or gathers once per stage and step)."""
    rank = dist.get_rank(group)
    example_kwargs = dict(example_kwargs or {})
    call = ModelCall.of(examples, example_kwargs) if call is None else call
    example_values = call.values(examples, example_kwargs, "compile()", "")
    device = _device(model, [*example_values.values(), target]) if device is None else device
    metas, output_metas = graph_metas(part_graphs)
    stages = _make_stages(model, parts, program, rank, metas, group, device, compile_stages)
    # gloo matches P2P by tag and moves data in the background: F&B pairs may send from
    # inside, and receives go two actions ahead. NCCL matches by order per peer (and runs
    # P2P in stream order), so there sends and receives keep torch's places.
    by_tag = dist.get_backend(group) == "gloo"
    for stage in stages.values():
        stage.early_sends = by_tag
    executor = Executor(stages, rank, timeout)
    dp = None
    if data_parallel is not None or mixed_precision is not None:
        dp_group, dp_mode = data_parallel if data_parallel is not None else (None, "replicate")
        dp = DataParallel(dp_mode, dp_group, stages, named_params(stages), timeout, experts, mixed_precision)
        executor.data_parallel = dp
        for stage in stages.values():
            stage.compute = dp.compute_tensors(stage.params)
    if overlap:
        executor.overlap = OverlapRunner(compile_graphs=compile_stages)  # every FB action: one merged graph
    schedules = {}
    lookahead = RECV_LOOKAHEAD if by_tag else 0
    for forwards in (False, True):  # training, and forward-only (no_grad) steps
        schedules[forwards] = _GraphSchedule(list(stages.values()), program.num_microbatches,
                                             loss_fn=None, scale_grads=False)
        load_program(schedules[forwards], forward_only(program) if forwards else program, forwards, lookahead,
                     data_parallel=dp is not None)
        executor.register(schedules[forwards])
    state = _local_state(model, stages)
    state = dp.public(state) if dp is not None else state
    state = tensor_parallel.public(state) if tensor_parallel is not None else state
    return Pipeline(state=state, program=program, stages=stages, schedules=schedules,
                    executor=executor, examples=examples, example_target=target, example_kwargs=example_kwargs,
                    call=call, outputs=outputs, device=device, num_microbatches=num_microbatches,
                    group=group, timeout=timeout, holders=shared_holders(_names_by_rank(part_graphs, program)),
                    output_metas=output_metas, pending=pending, data_parallel=dp,
                    tensor_parallel=tensor_parallel)
