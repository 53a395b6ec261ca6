"""Pipeline schedules as plain data: the action IR and the program generators."""
from dualpipe_fx.schedules.ir import KINDS, Action, Program, F, B, I, W, FB

__all__ = ["KINDS", "Action", "Program", "F", "B", "I", "W", "FB"]
