"""``torch.export`` of ``loss_fn(model(*args, **kwargs), target)``: the step ``capture`` post-processes.

``export_with_loss`` wraps model and loss in one module whose positional tensors are the
graph inputs (``ModelCall`` rebuilds the call around them), records custom Function regions
and checkpoint regions while export traces it, traces on fake tensors of a device when
anything is on meta (or in a mixed-precision ``param_dtype``), holds torch's own log output
of a failed trace, and turns any failure into a ``TraceError`` naming the user's line.
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from passes import _compat
from passes.model_call import ModelCall, OutputLayout
from passes.regions import Holder, RegionRecorder, mark_recompute
from passes.trace_error import TraceError, trace_error


class _WithLoss(nn.Module):
    """``forward(*tensor_inputs[, target]) -> (loss, *tensor leaves of model(*args, **kwargs))``.

    Export sees positional tensors only: ``call`` rebuilds the model's ``(args, kwargs)``
    around them, so every non-tensor keyword is a Python constant of the trace.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, call: ModelCall, has_target: bool, precision=None):
        super().__init__()
        self.model = model
        # Not a submodule: a loss module's tensors must not become "model" params/buffers.
        object.__setattr__(self, "_loss_fn", loss_fn)
        object.__setattr__(self, "_call", call)
        object.__setattr__(self, "_has_target", has_target)
        object.__setattr__(self, "_precision", precision)
        object.__setattr__(self, "out_spec", Holder())
        # The graph export records into: a custom Function traced into another graph (a
        # flex_attention mask_mod's subgraph, which indexes through torch's own Function) is
        # part of that higher-order op, not a region of the model.
        object.__setattr__(self, "graph", Holder())

    def forward(self, *tensors):
        self.graph.value = _compat.current_tracer_graph()
        n = len(self._call.names)
        # a BlockMask's tensors are not cast (FSDP2 casts the call's tensors, not a mask's insides)
        cast = _cast_inputs(self._precision, tensors[:n])
        cast = [t if name in self._call.mask_names else c
                for name, t, c in zip(self._call.names, tensors[:n], cast)]
        args, kwargs = self._call.rebuild(cast)
        out = _cast_output(self._precision, self.model(*args, **kwargs))
        loss = self._loss_fn(out, tensors[-1]) if self._has_target else self._loss_fn(out)
        layout, leaves = OutputLayout.of(out)
        self.out_spec.value = layout
        return (loss, *leaves)


def _cast_inputs(precision, tensors: Sequence[torch.Tensor]) -> tuple:
    """FSDP2's ``cast_forward_inputs``: the model's floating-point inputs in ``param_dtype``."""
    dtype = getattr(precision, "param_dtype", None)
    if dtype is None or not precision.cast_forward_inputs:
        return tuple(tensors)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def _cast_output(precision, out: Any) -> Any:
    """FSDP2's ``output_dtype``: the model's floating-point outputs in that dtype (the loss sees them)."""
    dtype = getattr(precision, "output_dtype", None)
    if dtype is None:
        return out
    return _compat.tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                            out)


def held(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def fake_device(model: nn.Module, named_inputs: Sequence[tuple[str, Any]], device) -> Optional[torch.device]:
    """The device to trace on with fake tensors, or None to trace the real ones.

    A tensor on meta runs meta kernels (``scaled_dot_product_attention`` becomes bmm +
    softmax there), so a model or example on meta is traced on fake tensors of ``device``.
    """
    named = list(held(model)) + [(n, t) for n, t in named_inputs if isinstance(t, torch.Tensor)]
    on_meta = [n for n, t in named if t.is_meta]
    if not on_meta:
        return None
    if device is None:
        raise ValueError(f"capture(): {on_meta[:3]} {'is' if len(on_meta) == 1 else 'are'} on meta and "
                         "device=None; expected the device the graphs will run on. Fix: pass device='cpu' "
                         "(or 'cuda', ...), so that the trace uses that device's kernels")
    return torch.device(device)


def _fake_like(mode, t: torch.Tensor, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    with mode:
        return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=dtype or t.dtype, device=device)


@contextlib.contextmanager
def _fake_model(model: nn.Module, mode, device: torch.device, param_dtype=None) -> Iterator[None]:
    """While active, every parameter and buffer of ``model`` is a fake tensor of ``device``
    (tied tensors stay tied; floating-point parameters in ``param_dtype`` when given, as FSDP2
    casts them); the model's own tensors are put back after."""
    fakes: dict[int, torch.Tensor] = {}
    undo: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        for module in model.modules():
            for name, t in [*module.named_parameters(recurse=False, remove_duplicate=False),
                            *module.named_buffers(recurse=False, remove_duplicate=False)]:
                if id(t) not in fakes:
                    cast = param_dtype if isinstance(t, nn.Parameter) and t.is_floating_point() else None
                    fake = _fake_like(mode, t, device, cast)
                    fakes[id(t)] = nn.Parameter(fake, t.requires_grad) if isinstance(t, nn.Parameter) else fake
                undo.append((module, name, t))
                setattr(module, name, fakes[id(t)])
        yield
    finally:
        for module, name, t in reversed(undo):
            setattr(module, name, t)


class _HeldLogs(logging.Filter):
    """Holds the records one of torch's log handlers gets while it exports (on a failure, ~25
    lines of warnings and graph code per process before our message); ``release`` hands
    them on to that handler, or, after a failure, to this module's debug log."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def release(self, failed: bool) -> None:
        self.handler.removeFilter(self)
        for record in self.records:
            if not failed:
                self.handler.handle(record)
            elif record.levelno >= logging.INFO:  # our TraceError says what failed
                logging.getLogger(__name__).debug("torch while exporting: %s", record.getMessage())


@contextlib.contextmanager
def _torch_logs_held():
    # torch gives each of its loggers its own handler (propagate=False)
    loggers = [lg for name, lg in logging.root.manager.loggerDict.items()
               if (name == "torch" or name.startswith("torch.")) and isinstance(lg, logging.Logger)]
    held = [_HeldLogs(h) for h in {id(h): h for lg in loggers for h in lg.handlers}.values()]
    for hold in held:
        hold.handler.addFilter(hold)
    failed, printed = True, io.StringIO()  # export prints a failed trace's partial graph to stderr
    try:
        with contextlib.redirect_stderr(printed):
            yield
        failed = False
    finally:
        for hold in held:
            hold.release(failed)
        if failed and printed.getvalue():
            logging.getLogger(__name__).debug("torch while exporting (stderr): %s", printed.getvalue())
        elif printed.getvalue():
            sys.stderr.write(printed.getvalue())


def export_with_loss(model, loss_fn, call: ModelCall, tensors, target, device: Optional[torch.device] = None,
                     precision=None):
    """``(ExportedProgram, OutputLayout)`` of ``loss_fn(model(*call.rebuild(tensors)), target)``,
    on fake tensors of ``device`` when given; any failure is a ``TraceError``."""
    wrapper = _WithLoss(model, loss_fn, call, target is not None, precision)
    args = (*tensors, target) if target is not None else tuple(tensors)
    recorder = RegionRecorder(wrapper.graph)
    try:
        with contextlib.ExitStack() as fake, _torch_logs_held():
            if device is not None:
                # torch.export takes fake inputs under an active fake mode; constants made
                # in forward (torch.tensor(...)) stay real, hence non-fake inputs are allowed
                mode = _compat.FakeTensorMode(allow_non_fake_inputs=True)
                args = tuple(_fake_like(mode, a, device) for a in args)
                fake.enter_context(_fake_model(model, mode, device, getattr(precision, "param_dtype", None)))
                fake.enter_context(mode)
            with recorder.patched(), _compat.on_checkpoint_regions(mark_recompute):
                ep = torch.export.export(wrapper, args, strict=False)
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised as TraceError naming the user's line
        raise trace_error(model, exc) from exc
    return ep, wrapper.out_spec.value
