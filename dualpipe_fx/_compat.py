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
