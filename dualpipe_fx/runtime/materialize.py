"""Give a rank's parameters and buffers storage and values; copy checkpoints into them.

A model built under ``torch.device("meta")`` holds no data. ``compile()`` cuts it into
stages; each rank then allocates on its device only the tensors its own stages read and
fills them module by module. Everything else stays on meta.

**Contract**: ``materialize(model, names, device, param_init_fn) -> {module FQN: Pending}``.
Every meta tensor named in ``names`` (FQNs, tied aliases included) is replaced, in the
module that owns it, by a tensor on ``device``; the owning module is then initialised by
``param_init_fn(module)``, else by ``module.reset_parameters()``. Where a module has
neither, its persistent tensors are returned as ``Pending``: they hold no values until
``Pipeline.load_state_dict`` fills them (the pipeline refuses to step before that).

The rule for values (the README states it for users):

- a module's own parameters and buffers get their values from ``param_init_fn(module)``,
  or ``module.reset_parameters()``, or a checkpoint (``load_state_dict``);
- non-persistent buffers (RoPE tables computed in ``__init__``) are in no checkpoint: their
  module must compute them in ``reset_parameters()`` or ``param_init_fn``, or they must be
  created on a real device; otherwise ``materialize`` raises ``ValueError`` naming it;
- each module is initialised under its own seed, drawn from ``torch.initial_seed()`` and
  its FQN, so its values do not depend on which rank holds it or on the pipeline layout
  (and ranks seeded alike give a parameter held by two ranks the same values).

**Pseudocode**
    for module in model.named_modules() owning a meta tensor in names:
        allocate its own meta tensors on device (tied ones once)
        seeded(module FQN): param_init_fn(module) or module.reset_parameters(), else Pending
        its tensors of other ranks go back to meta
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
import zlib
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Mapping, Optional

import torch
from torch import nn

from passes._compat import non_persistent_buffers


@dataclass(frozen=True)
class Pending:
    """A module whose tensors on this rank have storage but no values yet (no init for it)."""

    module: str  # FQN ("" for the root)
    kind: str  # class name
    names: tuple[str, ...]  # FQNs of its tensors a checkpoint must provide


@dataclass(frozen=True)
class _Own:
    """One parameter or buffer a module holds directly."""

    attr: str
    fqn: str
    tensor: torch.Tensor
    persistent: bool


def _own(module: nn.Module, prefix: str) -> list[_Own]:
    dot = f"{prefix}." if prefix else ""
    transient = non_persistent_buffers(module)
    own = [_Own(n, dot + n, t, True) for n, t in module.named_parameters(recurse=False, remove_duplicate=False)]
    own += [_Own(n, dot + n, t, n not in transient)
            for n, t in module.named_buffers(recurse=False, remove_duplicate=False)]
    return own


def _allocate(module: nn.Module, own: list[_Own], device: torch.device, made: dict[int, torch.Tensor]) -> None:
    """Every meta tensor of ``module`` becomes an uninitialised one on ``device`` (tied: once)."""
    for o in own:
        if not o.tensor.is_meta:
            continue
        if id(o.tensor) not in made:
            data = torch.empty_like(o.tensor, device=device)
            is_param = isinstance(o.tensor, nn.Parameter)
            made[id(o.tensor)] = nn.Parameter(data, o.tensor.requires_grad) if is_param else data
        setattr(module, o.attr, made[id(o.tensor)])


def _initializer(module: nn.Module, param_init_fn: Optional[Callable]) -> Optional[Callable[[], None]]:
    if param_init_fn is not None:
        return lambda: param_init_fn(module)
    reset = getattr(module, "reset_parameters", None)
    return reset if callable(reset) else None


@contextlib.contextmanager
def _seeded(base: int, prefix: str, device: torch.device) -> Iterator[None]:
    """The RNG of the CPU and ``device`` seeded for module ``prefix``; the caller's state restored after."""
    seed = zlib.crc32(f"{base}/{prefix}".encode())
    if device.type in ("cpu", "meta"):
        rng = torch.random.fork_rng(devices=[])
    else:
        count = torch.get_device_module(device.type).device_count()
        rng = torch.random.fork_rng(devices=list(range(count)), device_type=device.type)
    with rng:
        torch.manual_seed(seed)
        yield


def _settle(module: nn.Module, prefix: str, device: torch.device, names: Collection[str],
            originals: Mapping[str, torch.Tensor]) -> None:
    """After init: this rank's tensors on ``device`` (an init may compute buffers elsewhere),
    the other ranks' ones back on meta."""
    for o in _own(module, prefix):
        if o.fqn not in names:
            if o.attr in originals:
                setattr(module, o.attr, originals[o.attr])
            continue
        if o.tensor.is_meta:
            raise ValueError(f"the initialiser of module {prefix!r} ({type(module).__name__}) left {o.fqn!r} on "
                             f"meta; expected values on {device}. Fix: compute it on a real device")
        if o.tensor.device != device:
            moved = o.tensor.to(device)
            setattr(module, o.attr, nn.Parameter(moved, o.tensor.requires_grad)
                    if isinstance(o.tensor, nn.Parameter) else moved)


def _refuse_lost_buffers(prefix: str, module: nn.Module, local: list[_Own]) -> None:
    lost = [o.attr for o in local if not o.persistent]
    if lost:
        kind = type(module).__name__
        raise ValueError(
            f"module {prefix!r} ({kind}) has non-persistent buffers {lost} on meta that this rank's stages "
            f"read; no checkpoint holds them, and {kind} has no reset_parameters() to compute them. Fix: "
            f"compute them in {kind}.reset_parameters(), pass compile(..., param_init_fn=fn) that sets them, "
            "or create them on a real device (outside the `with torch.device('meta')` block)")


def materialize(model: nn.Module, names: Collection[str], device, param_init_fn: Optional[Callable] = None,
                ) -> dict[str, Pending]:
    """Allocate and initialise the meta tensors named in ``names``; see the module docstring.

    Args:
        model: modified in place: its modules hold the new tensors.
        names: FQNs of this rank's parameters and buffers (every alias of a tied tensor).
        device: where they live.
        param_init_fn: ``fn(module)`` called per module owning one of them (under the
            module's seed, with grad off); default ``module.reset_parameters()``.

    Returns:
        ``{module FQN: Pending}`` for modules without an initialiser.

    Raises:
        ValueError: a module without an initialiser owns a non-persistent buffer on meta, or
            an initialiser leaves a tensor on meta.
    """
    device, names = torch.device(device), set(names)
    base = torch.initial_seed()
    made: dict[int, torch.Tensor] = {}  # id(meta tensor) -> its replacement; tied tensors stay tied
    pending: dict[str, Pending] = {}
    for prefix, module in model.named_modules():
        own = _own(module, prefix)
        local = [o for o in own if o.fqn in names and o.tensor.is_meta]
        if not local:
            continue
        originals = {o.attr: o.tensor for o in own if o.tensor.is_meta}
        _allocate(module, own, device, made)
        init = _initializer(module, param_init_fn)
        if init is None:
            _refuse_lost_buffers(prefix, module, local)
            pending[prefix] = Pending(prefix, type(module).__name__, tuple(o.fqn for o in local))
        else:
            with _seeded(base, prefix, device), torch.no_grad():
                init()
        _settle(module, prefix, device, names, originals)
    return pending


# --------------------------------------------------------------------------------------
# Loading: a full checkpoint costs a rank its own pages, one tensor at a time


def copy_into(targets: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> set[str]:
    """``targets[k].copy_(state_dict[k])`` for every key both hold; returns the keys copied.

    Only ``targets``' keys are read from ``state_dict``, so of a ``torch.load(path,
    mmap=True)`` checkpoint only their pages are read; and each piece is paged out again
    once copied (:class:`FilePages`), so the mapping holds at most ``_CHUNK`` bytes at once.
    """
    copied = set()
    pages = FilePages()
    with torch.no_grad():
        for key, target in targets.items():
            if key in state_dict:
                _copy(target, state_dict[key], pages)
                copied.add(key)
    return copied


_CHUNK = 16 << 20  # bytes of an mmap'd source copied before their pages are released


def _copy(target: torch.Tensor, source, pages: "FilePages") -> None:
    chunked = (pages.active and isinstance(source, torch.Tensor) and source.device.type == "cpu"
               and source.shape == target.shape and source.is_contiguous() and target.is_contiguous()
               and source.numel() * source.element_size() > _CHUNK)
    if not chunked:
        target.copy_(source)
        pages.release(source)
        return
    flat_target, flat_source = target.view(-1), source.view(-1)
    step = _CHUNK // source.element_size()
    for start in range(0, flat_source.numel(), step):
        piece = flat_source[start:start + step]
        flat_target[start:start + step].copy_(piece)
        pages.release(piece)


class FilePages:
    """Pages out the file-backed pages of CPU tensors (an mmap'd checkpoint) after use: they
    leave this process's RSS and are read from the file again if touched. Only a hint to the
    kernel (``madvise(MADV_PAGEOUT)``, Linux >= 5.4, contents kept); anything that is not a
    file mapping, and other platforms, are left alone."""

    _MADV_PAGEOUT = 21

    def __init__(self) -> None:
        self._ranges = _file_mappings()
        self._madvise = None
        if self._ranges:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._madvise = libc.madvise

    @property
    def active(self) -> bool:
        return self._madvise is not None

    def release(self, tensor) -> None:
        """Page out the whole pages of ``tensor``'s bytes (its storage's, when not contiguous)."""
        if not self.active or not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
            return
        if tensor.is_contiguous():
            start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        else:
            start, size = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
        end = start + size
        if not any(lo <= start and end <= hi for lo, hi in self._ranges):
            return
        lo, hi = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:  # whole pages only: a neighbour's data stays resident
            self._madvise(lo, hi - lo, self._MADV_PAGEOUT)


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges this process maps from files (Linux; empty elsewhere)."""
    if not sys.platform.startswith("linux"):
        return []
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):  # a path: file-backed
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges
