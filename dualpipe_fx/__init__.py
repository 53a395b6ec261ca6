"""dualpipe_fx: automatic DualPipe/DualPipeV pipeline parallelism as torch.fx passes."""
from dualpipe_fx.schedules import Action, Program
from dualpipe_fx.schedules import SCHEDULES, ScheduleSpec, generate, get_schedule, validate_program  # noqa: F401
from dualpipe_fx.api.split import Split, split  # noqa: F401
from dualpipe_fx.planning.simulate import Costs, SimResult, simulate  # noqa: F401
from dualpipe_fx.planning.memory import MemoryPlan  # noqa: F401
from dualpipe_fx.api.plan import plan  # noqa: F401
from dualpipe_fx.api.autoplan import autoplan  # noqa: F401
from dualpipe_fx.ui.visualize import visualize  # noqa: F401
from dualpipe_fx.api.compile import compile, Pipeline, PeerTimeoutError  # noqa: F401,A001
from dualpipe_fx.api.options import ActivationBudget, MemoryPolicy, Parallelism  # noqa: F401
from dualpipe_fx.runtime.data_parallel import ExpertParallel  # noqa: F401
from dualpipe_fx.runtime.errors import PeerFailedError, PipelineBrokenError, PipelineStepError  # noqa: F401
from passes.capture import TraceError  # noqa: F401  (raised by compile/split for untraceable models)

__all__ = ["Action", "Program"]
__version__ = "0.2.0"
