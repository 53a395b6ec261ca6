"""The one place dualpipe_fx imports private torch APIs, so a torch upgrade breaks one file.

Keep this a flat list of imports, one comment per name (what it is, who uses it);
tests/test_compat.py checks each still exists and behaves as we rely on.
"""
# _Action(stage_index, computation_type, microbatch_index, sub_actions): one entry of a
# torch pipeline_order; schedules/lowering.py builds these from our Actions.
from torch.distributed.pipelining.schedules import _Action  # noqa: F401
# _ComputationType: the enum of action kinds ("F", "B", "I", "W", "OVERLAP_F_B", comms...).
from torch.distributed.pipelining.schedules import _ComputationType  # noqa: F401
# FORWARD / FULL_BACKWARD / BACKWARD_INPUT / BACKWARD_WEIGHT / OVERLAP_F_B: the compute
# kinds our F / B / I / W / FB lower to (schedules/lowering.py).
from torch.distributed.pipelining.schedules import FORWARD  # noqa: F401
from torch.distributed.pipelining.schedules import FULL_BACKWARD  # noqa: F401
from torch.distributed.pipelining.schedules import BACKWARD_INPUT  # noqa: F401
from torch.distributed.pipelining.schedules import BACKWARD_WEIGHT  # noqa: F401
from torch.distributed.pipelining.schedules import OVERLAP_F_B  # noqa: F401
# --- runtime entries (restored after a write race; names as tests/test_compat.py uses them) ---
# TorchAction: the same _Action, under the name the runtime uses.
from torch.distributed.pipelining.schedules import _Action as TorchAction  # noqa: F401
# TorchComputationType: the same _ComputationType, incl. SEND_F/RECV_F/SEND_B/RECV_B/REDUCE_GRAD.
from torch.distributed.pipelining.schedules import _ComputationType as TorchComputationType  # noqa: F401
# PipelineScheduleRuntime: torch's runtime that executes a pipeline_order with comms (runtime/).
from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime as PipelineScheduleRuntime  # noqa: F401
# PipelineStageBase: base of torch's pipeline stages; the runtime's stage subclasses it.
from torch.distributed.pipelining.stage import _PipelineStageBase as PipelineStageBase  # noqa: F401
# add_send_recv(actions, stage_to_rank, num_stages): inserts SEND/RECV actions into a compute-only order.
from torch.distributed.pipelining.schedules import _add_send_recv as add_send_recv  # noqa: F401
# --- expert-parallel entries (examples.moe, runtime/overlap) ---
# Importing torch's functional collectives registers the autograd of the
# _c10d_functional ops (all_to_all_single's backward is the reverse all_to_all).
import torch.distributed._functional_collectives  # noqa: F401,E402
import torch as _torch  # noqa: E402


def functional_all_to_all_single(x, output_split_sizes, input_split_sizes, group_name):
    """``_c10d_functional.all_to_all_single``: issue an async all_to_all, traceable into FX."""
    return _torch.ops._c10d_functional.all_to_all_single(x, output_split_sizes, input_split_sizes, group_name)


def functional_all_gather(x, group_size, group_name):
    """``_c10d_functional.all_gather_into_tensor``: ranks' ``x`` stacked along dim 0 (async)."""
    return _torch.ops._c10d_functional.all_gather_into_tensor(x, group_size, group_name)


def functional_reduce_scatter(x, group_size, group_name):
    """``_c10d_functional.reduce_scatter_tensor`` (sum): this rank's dim-0 chunk of the sum (async)."""
    return _torch.ops._c10d_functional.reduce_scatter_tensor(x, "sum", group_size, group_name)


def functional_all_reduce(x, group_name):
    """``_c10d_functional.all_reduce`` (sum), out of place (async)."""
    return _torch.ops._c10d_functional.all_reduce(x, "sum", group_name)


def functional_wait_tensor(x):
    """``_c10d_functional.wait_tensor``: block until the collective producing ``x`` is done."""
    return _torch.ops._c10d_functional.wait_tensor(x)
# TorchDispatchMode: a mode that sees every ATen op with its tensor arguments (the same Python
# objects); titan_integration/expert_parallel.py keeps this rank's rows of each full expert
# stand-in a whole-model init writes.
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: F401,E402
# --- data-parallel entries (runtime/data_parallel.py, runtime/lowering.py) ---
# add_unshard_reshard(actions, max_active_stages=3): one rank's compute actions with an
# UNSHARD before a stage's first use (prefetched up to 3 stages ahead) and a RESHARD after
# its last; torch's own lowering runs it on single-chain programs, we run it on the others.
from torch.distributed.pipelining.schedules import _add_unshard_reshard as add_unshard_reshard  # noqa: F401,E402
# add_reduce_grad(actions, n_microbatches): REDUCE_GRAD(stage) right after the stage's last W or B.
from torch.distributed.pipelining.schedules import _add_reduce_grad as add_reduce_grad  # noqa: F401,E402
# --- tensor-parallel entries (runtime/tensor_parallel.py) ---
# parallelize_module installs each ParallelStyle as forward (pre-)hooks: distribute_module's
# lambdas close over input_fn/output_fn (functools.partial of the style's staticmethod with
# its layouts) and device_mesh; PrepareModuleInput/Output's lambdas close over the style
# itself (`self`) and device_mesh. Their closures are read here and nowhere else.
import inspect as _inspect  # noqa: E402
import os as _os  # noqa: E402

_DTENSOR_DIR = _os.path.dirname(_inspect.getfile(_torch.distributed.tensor._api))


def tp_style_hooks(module):
    """``[(hooks dict, hook id, closure variables)]`` for each forward (pre-)hook of ``module``
    defined inside ``torch.distributed.tensor`` (what ``parallelize_module`` installed)."""
    found = []
    for table in (module._forward_pre_hooks, module._forward_hooks):
        for hook_id, hook in table.items():
            code = getattr(hook, "__code__", None)
            if code is not None and _os.path.abspath(code.co_filename).startswith(_DTENSOR_DIR):
                found.append((table, hook_id, _inspect.getclosurevars(hook).nonlocals))
    return found
