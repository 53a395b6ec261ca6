"""Run a model's own whole-model init on a rank that holds only part of it: unsplit values.

After ``dualpipe_fx.compile`` on a meta-built model, a rank's own parameters and buffers
are allocated (titan_integration fills them with zeros) and every other tensor is still on
meta. torchtitan's ``model.init_weights()`` walks the whole model drawing from one RNG
stream, so the values a parameter gets depend on every draw made before it.
:func:`init_like_unsplit` calls that init on the whole model with a view of ONE scratch
buffer standing in for each meta tensor: each draw happens as in the unsplit run (the
same ops, shapes, strides and dtypes, value-dependent rejection loops included), so this
rank's tensors get bitwise the values a non-pipelined run gives them under the same seed,
and the other tensors' values are written into the scratch and dropped. Afterwards the meta tensors are put back.

**Contract**: ``init_like_unsplit(model, init, seed=, device=, init_device=) -> None``;
``model``'s non-meta tensors hold the values ``init()`` gives them on an unsplit model
allocated on ``init_device`` under ``torch.manual_seed(seed)`` (then copied to ``device``
where the two differ); meta tensors are meta again; the caller's RNG state is unchanged;
every tensor object the model held is the one it holds after (the stage graphs read them).

Memory: the scratch is as large as the largest tensor this rank does not hold (tensors
take turns in it), plus whatever the init allocates for one tensor at a time
(``trunc_normal_``'s float32 copy and rejection buffers), as in the unsplit run.

The scratch is shared: a value the init reads from ANOTHER tensor that this rank does not
hold (copying one weight into another) may have been overwritten by a later draw. Inits
that fill each tensor from the RNG or constants (torchtitan's llama3, qwen3) are exact.

An init that REASSIGNS a tensor (torchtitan's ``self.freqs_cis = _precompute_freqs_cis()``)
has its new values copied into the tensor the model held, which is put back.

**Pseudocode**
    scratch = empty(bytes of the largest meta tensor, init_device)
    every meta tensor -> a view of scratch with its shape, strides, dtype (a Parameter stays one)
    with init_device copies of this rank's tensors when init_device != device
    fork RNG; manual_seed(seed); no_grad: init()
    each slot: values into the tensor held before (copy if reassigned or moved); meta ones back
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class _Slot:
    """One parameter or buffer attribute of one module, and the tensor it held before."""

    module: nn.Module
    attr: str
    fqn: str
    held: torch.Tensor


def _slots(model: nn.Module) -> list[_Slot]:
    slots = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        tensors = [*module.named_parameters(recurse=False, remove_duplicate=False),
                   *module.named_buffers(recurse=False, remove_duplicate=False)]
        slots += [_Slot(module, name, dot + name, t) for name, t in tensors if t is not None]
    return slots


def _extent(t: torch.Tensor) -> int:
    """Bytes from the start of ``t``'s storage to its last element (0 when empty)."""
    if t.numel() == 0:
        return 0
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def _like(t: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``data`` as a Parameter when ``t`` is one (same requires_grad), else as is."""
    return nn.Parameter(data, t.requires_grad) if isinstance(t, nn.Parameter) else data


def _stand_ins(slots: list[_Slot], device: torch.device, init_device: torch.device) -> dict[int, torch.Tensor]:
    """``{id(held tensor): what the init works on}``: scratch views for meta tensors, ``init_device``
    copies for this rank's tensors elsewhere; tied tensors get one stand-in."""
    metas = {id(s.held): s.held for s in slots if s.held.is_meta}
    size = max((_extent(t) for t in metas.values()), default=0)
    scratch = torch.empty(size, dtype=torch.uint8, device=init_device)
    stand_in = {}
    for key, t in metas.items():
        flat = scratch[:_extent(t)].view(t.dtype) if t.numel() else scratch[:0].view(t.dtype)
        stand_in[key] = _like(t, flat.as_strided(t.shape, t.stride(), t.storage_offset()))
    if init_device != device:
        for s in slots:
            if not s.held.is_meta and id(s.held) not in stand_in:
                stand_in[id(s.held)] = _like(s.held, torch.empty_like(s.held, device=init_device))
    return stand_in


@contextlib.contextmanager
def _seeded(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """``torch.manual_seed(seed)`` (CPU and every ``device`` of its type) inside; the caller's RNG after."""
    if device.type == "cpu":
        rng = torch.random.fork_rng(devices=[])
    else:
        count = torch.get_device_module(device.type).device_count()
        rng = torch.random.fork_rng(devices=list(range(count)), device_type=device.type)
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        yield


def _settle(slot: _Slot) -> None:
    """Put ``slot.held`` back in its slot, with the values the init left there."""
    now = getattr(slot.module, slot.attr, None)
    if slot.held.is_meta or now is slot.held or now is None:
        setattr(slot.module, slot.attr, slot.held)
        return
    if now.shape != slot.held.shape or now.dtype != slot.held.dtype:
        raise ValueError(f"the init replaced {slot.fqn!r} ({tuple(slot.held.shape)}, {slot.held.dtype}) by a "
                         f"tensor of {tuple(now.shape)}, {now.dtype}; expected the same shape and dtype, whose "
                         "values are copied into the tensor the pipeline's stages read")
    with torch.no_grad():
        slot.held.copy_(now)
    setattr(slot.module, slot.attr, slot.held)


def init_like_unsplit(model: nn.Module, init: Callable[[], None], *, seed: Optional[int],
                      device, init_device=None) -> None:
    """Run ``init()`` (a whole-model init, e.g. ``model.init_weights``) on a partly-meta model.

    Args:
        model: this rank's tensors on ``device`` (allocated), every other tensor on meta.
        init: called once, with grad off, on ``model`` whose meta tensors stand in as scratch views.
        seed: ``torch.manual_seed`` before ``init`` (None: the current RNG state, restored after).
        device: where this rank's tensors live.
        init_device: where the unsplit run initialises (torchtitan's CPU offload: ``"cpu"``);
            default ``device``. This rank's tensors are initialised there and copied to ``device``.

    Raises:
        ValueError: the init replaced one of this rank's tensors by one of another shape or dtype.
    """
    device = torch.device(device)
    init_device = device if init_device is None else torch.device(init_device)
    slots = _slots(model)
    stand_in = _stand_ins(slots, device, init_device)
    try:
        for s in slots:
            if id(s.held) in stand_in:
                setattr(s.module, s.attr, stand_in[id(s.held)])
        with _seeded(seed, init_device), torch.no_grad():
            init()
    except BaseException:
        for s in slots:
            setattr(s.module, s.attr, s.held)
        raise
    refused = []
    for s in slots:
        try:
            _settle(s)
        except ValueError as err:
            setattr(s.module, s.attr, s.held)
            refused.append(err)
    if refused:
        raise refused[0]
