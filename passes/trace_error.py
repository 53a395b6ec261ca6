"""``TraceError`` and its message: a failed trace names the user's source line and the usual fix.

``trace_error(model, exc)`` walks the exception chain to the innermost frame in user code (not
torch, not ``passes``), tells data-dependent control flow from other export failures, and adds
the advice of a known library pattern (transformers' MoE expert loops, LayerDrop,
``Module.to()`` in forward) when one matches.
"""
from __future__ import annotations

import linecache
import os
import traceback
import types
from typing import Optional

import torch
from torch import nn

from passes import _compat


_TORCH_DIR = os.path.dirname(torch.__file__)
_PASSES_DIR = os.path.dirname(os.path.abspath(__file__))


class TraceError(ValueError):
    """The model (with its loss) cannot be captured as one static FX graph."""


def _user_frame(exc: BaseException) -> Optional[traceback.FrameSummary]:
    """The innermost traceback frame in user code (not torch, not passes), over the chain."""
    seen, best = set(), None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for fs in traceback.extract_tb(exc.__traceback__):
            path = os.path.abspath(fs.filename)
            if path.startswith(_TORCH_DIR) or path.startswith(_PASSES_DIR):
                continue
            if "/lib/python3" in path and "site-packages" not in path:
                continue  # standard library (contextlib, functools)
            best = fs
        if best is not None:
            return best
        exc = exc.__cause__ or exc.__context__
    return None


def _is_data_dependent(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _compat.DATA_DEPENDENT_ERRORS) or "data-dependent" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# Known library patterns: (a test of the failing user frame) -> the usual way out. Each
# hint gets the FrameSummary and, when the traceback still holds it, the live frame (for
# ``self``); it returns the advice, or None when the pattern is not its own.


def _live_frame(exc: BaseException, fs: traceback.FrameSummary) -> Optional[types.FrameType]:
    """The frame behind ``fs`` (its locals name the module), searched over the exception chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == fs.filename and tb.tb_lineno == fs.lineno:
                return tb.tb_frame
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return None


def _frame_self(frame: Optional[types.FrameType]) -> Optional[nn.Module]:
    module = frame.f_locals.get("self") if frame is not None else None
    return module if isinstance(module, nn.Module) else None


def _in_transformers(fs: traceback.FrameSummary) -> bool:
    return f"{os.sep}transformers{os.sep}" in os.path.abspath(fs.filename)


def _hint_hf_eager_experts(fs, frame) -> Optional[str]:
    """transformers' eager MoE experts (``@use_experts_implementation`` classes): one matmul
    per expert that received tokens, looped over ``nonzero()``, a count known only at run time."""
    module = _frame_self(frame)
    # use_experts_implementation's __init__ sets these on the experts module
    decorated = all(hasattr(module, a) for a in ("config", "is_concatenated", "has_gate"))
    if (not _in_transformers(fs) or not decorated
            or getattr(module.config, "_experts_implementation", None) != "eager"):
        return None
    return (f"This is transformers' eager MoE experts loop ({type(module).__name__} with "
            'experts_implementation="eager"): one matmul per expert that received tokens. Fix: '
            'use the default experts_implementation="grouped_mm" (one grouped GEMM over all '
            'experts, traceable; "batched_mm" works too): build the config with '
            'experts_implementation="grouped_mm", or call '
            'model.set_experts_implementation("grouped_mm") before compile()/split().')


def _hint_hf_expert_loop(fs, frame) -> Optional[str]:
    """A transformers MoE whose only experts code is that loop (DBRX, SwitchTransformers, NLLB-MoE)."""
    line = fs.line or linecache.getline(fs.filename, fs.lineno)
    if not _in_transformers(fs) or "expert" not in line:
        return None
    module = _frame_self(frame)
    name = type(module).__name__ if module is not None else "this MoE layer"
    return (f"This is a transformers MoE experts loop ({name}): one matmul per expert that "
            "received tokens. Fix: if the model takes experts_implementation, use the default "
            '"grouped_mm"; models without it (DBRX, SwitchTransformers, NLLB-MoE) cannot be '
            f"captured as they are: replace {name}.forward by a static form (sort the tokens by "
            "expert and call torch.nn.functional.grouped_mm with offsets, as Mixtral, Qwen2-MoE, "
            "Qwen3-MoE, OLMoE and DeepSeek-V3 do by default).")


def _hint_layerdrop(fs, frame) -> Optional[str]:
    """LayerDrop (transformers encoders/decoders in train mode): ``if torch.rand([]) < self.layerdrop``."""
    line = fs.line or linecache.getline(fs.filename, fs.lineno)
    if "layerdrop" not in line:
        return None
    module = _frame_self(frame)
    what = (f"{type(module).__name__}.layerdrop = {module.layerdrop}"
            if hasattr(module, "layerdrop") else "layerdrop > 0")
    return (f"This is LayerDrop ({what} in train mode): every call skips layers at random, "
            "which one static graph per stage cannot express. Fix: build the config with "
            "encoder_layerdrop=0.0 and decoder_layerdrop=0.0 (layerdrop=0.0 where the model has "
            "one stack), or set .layerdrop = 0.0 on its encoder and decoder modules, or trace in "
            "eval() mode for inference.")


_DATA_DEPENDENT_HINTS = (_hint_hf_eager_experts, _hint_hf_expert_loop, _hint_layerdrop)


def _hint_module_to(exc: BaseException) -> Optional[str]:
    """``Module.to()``/``.float()`` in forward: export's fake parameters cannot be swapped."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if "Couldn't swap" in str(exc):
            return ("forward() converts a module's parameters (Module.to(), .float(), .half(), "
                    "...) while it runs, even to the dtype they have; torch.export cannot swap "
                    "parameters during a trace. Fix: convert the model once before "
                    "compile()/split() and take the call out of forward().")
        exc = exc.__cause__ or exc.__context__
    return None


def _first_hint(hints, fs, frame) -> Optional[str]:
    return next((h for h in (hint(fs, frame) for hint in hints) if h is not None), None)


def trace_error(model: nn.Module, exc: BaseException) -> TraceError:
    fs = _user_frame(exc)
    where = "an unknown location"
    if fs is not None:
        line = (fs.line or linecache.getline(fs.filename, fs.lineno)).strip()
        where = f"{fs.filename}:{fs.lineno} (`{line}`)"
    name = type(model).__name__
    if _is_data_dependent(exc):
        hint = None if fs is None else _first_hint(_DATA_DEPENDENT_HINTS, fs, _live_frame(exc, fs))
        return TraceError(
            f"cannot capture {name}: Python control flow at {where} depends on tensor "
            "values, which a static graph cannot express. " + (hint or
            "Fix: replace the branch by `torch.where(cond, a, b)` or `torch.cond(...)`, or "
            "move it out of forward().")
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TraceError(
        f"cannot capture {name}: torch.export failed at {where}: {type(exc).__name__}: "
        f"{first}. " + (_hint_module_to(exc) or
                        "Fix: make forward() traceable by torch.export(strict=False).")
    )
