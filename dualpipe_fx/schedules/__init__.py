"""Pipeline schedules as plain data: the action IR, the program generators and their registry."""
from dualpipe_fx.schedules.ir import KINDS, Action, Program, F, B, I, W, FB
from dualpipe_fx.schedules.validate import validate_program
from dualpipe_fx.schedules.dualpipev import dualpipev
from dualpipe_fx.schedules.dualpipe import dualpipe
from dualpipe_fx.schedules.baselines import gpipe, interleaved_1f1b, one_f_one_b, zb1p, zbv
from dualpipe_fx.schedules.lowering import to_torch_actions
from dualpipe_fx.schedules.registry import SCHEDULES, ScheduleSpec, generate, get_schedule

__all__ = [
    "KINDS", "Action", "Program", "F", "B", "I", "W", "FB",
    "validate_program", "dualpipev", "dualpipe", "gpipe", "one_f_one_b", "zb1p", "zbv", "interleaved_1f1b", "to_torch_actions",
    "SCHEDULES", "ScheduleSpec", "generate", "get_schedule",
]
