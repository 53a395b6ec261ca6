"""dualpipe_fx: automatic DualPipe/DualPipeV pipeline parallelism as torch.fx passes."""
from dualpipe_fx.schedules import Action, Program

__all__ = ["Action", "Program"]
__version__ = "0.1.0"
