"""Every private torch API the passes use, in one place, so a torch upgrade breaks one file.

Each name below is re-exported under a stable local name and covered by
``tests/passes/test_compat.py``.
"""
from __future__ import annotations

import contextlib
import logging
import dataclasses
from typing import Any, Mapping

import torch
import torch.utils.checkpoint
from torch.fx.experimental.proxy_tensor import get_proxy_mode as _get_proxy_mode
from torch.fx.experimental.proxy_tensor import get_proxy_slot as _get_proxy_slot
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch._dispatch.python import enable_python_dispatcher as _enable_python_dispatcher
from torch._functorch._aot_autograd.functional_utils import from_fun as _from_fun
from torch._functorch._aot_autograd.functional_utils import to_fun as _to_fun
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch._subclasses.functional_tensor import FunctionalTensorMode as _FunctionalTensorMode
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_unflatten

__all__ = [
    "BlockMask",
    "FLEX_ATTENTION",
    "FLEX_ATTENTION_BACKWARD",
    "block_mask_constants",
    "block_mask_tensor_fields",
    "block_mask_with",
    "flex_backward_on_cpu",
    "lift_flex_backward_check_on_cpu",
    "DATA_DEPENDENT_ERRORS",
    "FakeTensorMode",
    "fake_mode_with_shape_env",
    "current_fx_node",
    "current_tracer_graph",
    "make_fx",
    "make_functional_fx",
    "quiet_fake_kernel_errors",
    "non_persistent_buffers",
    "on_checkpoint_regions",
    "on_function_apply",
    "REENTRANT_CHECKPOINT",
    "SymSizeFacts",
    "sym_size_facts",
    "TreeSpec",
    "tree_flatten",
    "tree_unflatten",
]

# Errors torch raises when Python control flow depends on tensor values during tracing.
DATA_DEPENDENT_ERRORS: tuple[type[BaseException], ...] = (
    GuardOnDataDependentSymNode,
    DataDependentOutputException,
)


def current_tracer_graph() -> "torch.fx.Graph | None":
    """The FX graph that the active make_fx/export tracer is recording into, or None."""
    mode = _get_proxy_mode()
    if mode is None:
        return None
    return mode.tracer.graph


def current_fx_node(t: torch.Tensor) -> "torch.fx.Node | None":
    """The node of the active tracer's graph that produced tensor ``t``, or None."""
    mode = _get_proxy_mode()
    if mode is None or not isinstance(t, torch.Tensor):
        return None
    slot = _get_proxy_slot(t, mode.tracer, default=None)
    return None if slot is None else slot.proxy.node


def fake_mode_with_shape_env() -> FakeTensorMode:
    """A fake mode whose tensors keep static shapes but whose ``.item()``/``.tolist()`` give
    data-dependent (unbacked) SymInts, as export's do: an MoE's per-expert token counts trace
    instead of raising ``DataDependentOutputException``."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(), static_shapes=True)


def make_functional_fx(fn):
    """``make_fx(fn, tracing_mode="fake")`` with functionalization, as AOTAutograd traces joints.

    Every in-place op and every write through a view (in the forward and in the autograd
    backward that ``fn`` runs) is traced as its out-of-place form, so each node of the
    graph computes a fresh value and partitioning it by dataflow cannot reorder a read
    after a write. Writes into ``fn``'s own inputs are not replayed on them: outputs
    aliasing an input see the written value, the input itself is left as it was.
    """
    def functional(*args):
        # Python functionalization below the tracer, C++ functionalization off above it
        # (torch's Note [Disabling Functionalize TLS Above Python Functionalization]).
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.Functionalize)):
            outs = fn(*tree_map(_to_fun, args))
        return tree_map(_from_fun, outs)

    def trace(*args):
        with _enable_python_dispatcher(), _FunctionalTensorMode(_allow_token_discovery=True):
            return make_fx(functional, tracing_mode="fake")(*args)

    return trace


# torch.utils.checkpoint(..., use_reentrant=True) runs as this autograd.Function, whose
# backward re-runs the forward under autograd: nothing a graph pass can replay.
REENTRANT_CHECKPOINT = torch.utils.checkpoint.CheckpointFunction


@contextlib.contextmanager
def on_function_apply(wrapper):
    """While active, every ``torch.autograd.Function`` call runs as
    ``wrapper(run, cls, args, kwargs)``, where ``run(cls, *args, **kwargs)`` is torch's own apply.

    No public hook sees these calls under make_fx (Dynamo has its own), so this patches
    ``Function.apply``: a Python ``classmethod`` up to torch 2.13, the C ``_FunctionBase.apply``
    (a ``classmethod_descriptor``, no ``__func__``) from 2.14. Binding through ``__get__``
    calls either form the same way.
    """
    function = torch.autograd.Function
    original = function.__dict__["apply"]

    def run(cls, *args, **kwargs):
        return original.__get__(None, cls)(*args, **kwargs)

    def apply(cls, *args, **kwargs):
        return wrapper(run, cls, args, kwargs)

    function.apply = classmethod(apply)
    try:
        yield
    finally:
        function.apply = original


@contextlib.contextmanager
def on_checkpoint_regions(callback):
    """While active, ``callback(first_node_before, graph)`` runs after every
    ``torch.utils.checkpoint(..., use_reentrant=False)`` call traced into ``graph``, with
    the graph's last node from before the call (the region's nodes come after it).

    Export inlines such calls and keeps no trace of the checkpoint; the callback is how
    ``capture`` marks the region's nodes for recomputation.
    """
    module = torch.utils.checkpoint
    # torch 2.14 moved the body into ``..._impl`` (the old name is a shim that checkpoint()
    # no longer calls); 2.13 has the old name only.
    name = next(n for n in ("_checkpoint_without_reentrant_generator_impl",
                            "_checkpoint_without_reentrant_generator") if hasattr(module, n))
    original = getattr(module, name)

    def generator(*args, **kwargs):
        graph = current_tracer_graph()
        mark = next(iter(reversed(graph.nodes))) if graph is not None else None
        yield from original(*args, **kwargs)
        if graph is not None:
            callback(mark, graph)

    setattr(module, name, generator)
    try:
        yield
    finally:
        setattr(module, name, original)


def decomposes_implicitly(op) -> bool:
    """True when ATen ``op`` is CompositeImplicitAutograd: it runs as other ATen ops.

    The cost model only runs such ops (and ops with a FLOP formula) through the FLOP
    counter; every other op is a leaf kernel whose FLOPs the counter does not count.
    """
    has_kernel = getattr(op, "has_kernel_for_dispatch_key", None)
    if has_kernel is None:
        return True  # not an OpOverload (higher-order op, Python callable): run it to see
    return bool(has_kernel(torch._C.DispatchKey.CompositeImplicitAutograd))


# --- multiplex entries: functional collectives ---
# Functional collectives live in private op namespaces; a node calling one of them issues
# an asynchronous collective, and `_c10d_functional.wait_tensor` waits for it.
_COLLECTIVE_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd")


def is_functional_wait(node: "torch.fx.Node") -> bool:
    """Whether ``node`` calls ``_c10d_functional.wait_tensor``."""
    return node.op == "call_function" and node.target is torch.ops._c10d_functional.wait_tensor.default


def is_functional_collective(node: "torch.fx.Node") -> bool:
    """Whether ``node`` issues a functional collective (all_to_all_single, all_gather, ...)."""
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and target.namespace in _COLLECTIVE_NAMESPACES and not is_functional_wait(node))


# --- capture on fake tensors (meta-device models) ---

def non_persistent_buffers(module: torch.nn.Module) -> frozenset[str]:
    """Names of ``module``'s own buffers that ``state_dict()`` leaves out (``persistent=False``)."""
    return frozenset(module._non_persistent_buffers_set)


# --- data-dependent (unbacked) sizes ---

@contextlib.contextmanager
def quiet_fake_kernel_errors():
    """Inside, a fake (meta) kernel that raises is not also logged at ERROR by torch's fake
    tensor module: the cost model runs ops on guessed data-dependent sizes, which may not fit
    together (a split whose guessed sizes do not sum to the guessed length), and catches it."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclasses.dataclass(frozen=True)
class SymSizeFacts:
    """What torch's ShapeEnv knows about a size: its sympy ``expr``, the values of the
    backed symbols (``hints``), the ``(lower, upper)`` range of each unbacked symbol
    (``ranges``; ``None`` for an unbounded side) and the relations asserted at run time
    (``asserts``: sympy booleans such as ``u0 + ... + u7 <= 48``)."""

    expr: Any
    hints: Mapping[Any, int]
    ranges: Mapping[Any, tuple]
    asserts: tuple


def sym_size_facts(size: "torch.SymInt") -> SymSizeFacts:
    """The :class:`SymSizeFacts` of ``size`` (a SymInt from a traced graph's meta["val"])."""
    import sympy

    node = size.node
    env = node.shape_env
    expr = node.expr
    symbols = expr.free_symbols
    backed = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val  # torch 2.13 name
    hints = {s: int(backed[s]) for s in symbols if isinstance(backed.get(s), (int, sympy.Integer))}

    def bound(b):
        return int(b) if isinstance(b, (int, sympy.Integer)) else None  # torch's int_oo: None

    ranges = {s: (bound(env.var_to_range[s].lower), bound(env.var_to_range[s].upper))
              for s in symbols if s in env.var_to_range}
    asserts = tuple(ra.expr for ras in env.deferred_runtime_asserts.values() for ra in ras)
    return SymSizeFacts(expr, hints, ranges, asserts)


# --- flex attention: BlockMask fields, torch's CPU refusal of its backward ---
# BlockMask is public, its field list (``_TENSOR_ATTRS``) is not: 2.14 added the dq_* fields.
from torch.nn.attention import flex_attention as _flex  # noqa: E402

BlockMask = _flex.BlockMask
# The higher-order ops a traced flex_attention call becomes (forward; its backward).
FLEX_ATTENTION = torch.ops.higher_order.flex_attention
FLEX_ATTENTION_BACKWARD = torch.ops.higher_order.flex_attention_backward


def block_mask_tensor_fields(mask: "BlockMask") -> tuple[str, ...]:
    """The names of ``mask``'s tensor fields that hold a tensor (``kv_num_blocks``, ...), in
    torch's order; the fields left None are not named."""
    return tuple(a for a in BlockMask._TENSOR_ATTRS if isinstance(getattr(mask, a, None), torch.Tensor))


def block_mask_constants(mask: "BlockMask") -> tuple:
    """``mask``'s non-tensor fields other than ``mask_mod`` (sequence lengths, block size, ...)."""
    skip = {"mask_mod", *BlockMask._TENSOR_ATTRS}
    return tuple((k, v) for k, v in sorted(vars(mask).items()) if k not in skip)


def block_mask_with(mask: "BlockMask", tensors: Mapping[str, torch.Tensor], mask_mod) -> "BlockMask":
    """A copy of ``mask`` with the tensor fields ``tensors`` and ``mask_mod`` replaced."""
    import copy

    new = copy.copy(mask)
    for name, value in tensors.items():
        setattr(new, name, value)
    new.mask_mod = mask_mod
    return new


def _flex_cpu_lenient(check):
    def validate_device(query, key, value):
        # torch refuses requires_grad inputs on CPU here; its dense HOP backward is exact.
        return check(query.detach(), key.detach(), value.detach())

    validate_device.dualpipe_fx_original = check
    return validate_device


@contextlib.contextmanager
def flex_backward_on_cpu():
    """While active, ``flex_attention`` on CPU tensors that require grad runs instead of raising
    "FlexAttention does not support backward on CPU": the check lives in the Python wrapper
    (``_validate_device``, torch 2.13 and 2.14), and the higher-order op's dense backward is
    exact (float64: forward and grads equal SDPA with the same dense mask to 1e-15). A
    CPU-only stand-in: callers apply it only where ``torch.cuda.is_available()`` is false,
    to the baseline and the pipeline alike. Other device checks stay."""
    original = _flex._validate_device
    if hasattr(original, "dualpipe_fx_original"):  # already lifted (nested, or for the process)
        yield
        return
    _flex._validate_device = _flex_cpu_lenient(original)
    try:
        yield
    finally:
        _flex._validate_device = original


def lift_flex_backward_check_on_cpu() -> None:
    """:func:`flex_backward_on_cpu` for the rest of the process (torchtitan's CPU runs)."""
    if not hasattr(_flex._validate_device, "dualpipe_fx_original"):
        _flex._validate_device = _flex_cpu_lenient(_flex._validate_device)
