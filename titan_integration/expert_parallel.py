"""torchtitan's expert parallelism as part of the traced model: dispatch and combine in the forward.

torchtitan 0.2.2 shards each MoE layer's ``GroupedExperts`` over its ``ep`` mesh with a
``ParallelStyle`` (``torchtitan.distributed.expert_parallel.ExpertParallel``): DTensor
parameters, and the token dispatch / combine ``all_to_all`` in module pre/post hooks. The
stage graphs dualpipe_fx traces never run those hooks, so under ``dualpipe_fx.enable``
:func:`shard_experts` instead turns each ``GroupedExperts`` of the (meta) model, before
tracing, into one whose own ``forward`` does the whole exchange with functional collectives,
which trace into the stage graphs and have autograd (their backward is the reverse
``all_to_all``):

```
x [N, D] sorted by expert, counts [E] (this rank's tokens)
received = all_to_all(counts)                  # [ep, E_local]: what each rank sends me
send[r] = sum(counts[r*E_local:(r+1)*E_local]); recv[r] = sum(received[r])   (.tolist():
                                                 run-time sizes, unbacked SymInts in the trace)
rows = all_to_all(x, recv, send)               # grouped (source rank, local expert)
rows = rows[stable order by local expert]      # grouped by local expert, as the experts take them
out = GroupedExperts.forward(rows, received.sum(0))   # torchtitan's own expert math, local weights
out = all_to_all(out[inverse order], send, recv)      # back to the sender, in its order
```

torchtitan 0.3 keeps ``GroupedExperts`` (``torchtitan.models.common.moe``: ``w1_EFD``,
``w2_EDF``, ``w3_EFD``, the same ``forward(x, counts)``) inside ``RoutedExperts``, between its
token dispatcher's ``dispatch`` and ``combine``; 0.3's own EP gives the dispatcher the ``ep``
mesh, and its dispatch does the exchange above around the experts. Here the dispatcher keeps
no mesh (0.3's EP = 1 path: the local reorder by expert, and the scoring ``scatter_add``
combine) and the experts do the exchange, so 0.3's experts receive the same rows in the same
(local expert, source rank) order as under its ``AllToAllTokenDispatcher``. 0.3 initialises
per module (``_init_self_parameters``), 0.2.2 with ``init_weights``: both keep this rank's rows.

Each EP rank holds rows ``[r*E_local, (r+1)*E_local)`` of ``w1``/``w2``/``w3`` (dim 0 is the
expert), the slice torchtitan's ``Shard(0)`` gives it; the dense reorder-free layout (no
alignment padding: the experts' loop takes any counts) computes each token's output with
the same per-expert math as torchtitan's EP and its unsplit model. Everything before and
after the experts (router, shared experts, load-balancing counts) is the model's own.

**Contract**: ``shard_experts(model, ep_group) -> {FQN}`` of the expert parameters (the model's FQNs, global shapes ``[E, ...]``, local tensors ``[E/ep, ...]``);
:func:`full_experts` lends them full-size stand-ins (on meta: the init's scratch) for a
whole-model init, keeping this rank's rows.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from dualpipe_fx import _compat


# where torchtitan keeps GroupedExperts: 0.2.2, 0.3
_GROUPED_EXPERTS_MODULES = ("torchtitan.models.moe.moe", "torchtitan.models.common.moe")


def _grouped_experts_classes() -> tuple[type, ...]:
    classes = []
    for name in _GROUPED_EXPERTS_MODULES:
        try:
            classes.append(importlib.import_module(name).GroupedExperts)
        except (ImportError, AttributeError):
            continue
    if not classes:
        raise ValueError(f"parallelism.expert_parallel_degree > 1 with dualpipe_fx.enable shards torchtitan's "
                         f"GroupedExperts (in {' or '.join(_GROUPED_EXPERTS_MODULES)}: torchtitan 0.2.2 or 0.3), "
                         f"which this torchtitan lacks; set parallelism.expert_parallel_degree = 1")
    return tuple(classes)


class ExpertParallelGroupedExperts(nn.Module):
    """Mixin base placed before ``GroupedExperts`` (see :func:`shard_experts`): the EP exchange
    around the experts' own forward. ``ep_group_name``, ``ep_size``, ``ep_rank`` and
    ``num_experts`` (the global count) are set on the instance."""

    ep_group_name: str
    ep_size: int
    ep_rank: int

    def init_weights(self, *args, **kwargs) -> None:
        """The experts' own init (0.2.2); inside :func:`full_experts`, on full stand-ins, keeping
        this rank's rows of what it writes."""
        with self._keeping_rows():
            return super().init_weights(*args, **kwargs)

    def _init_self_parameters(self) -> None:
        """0.3's per-module init (``Module.init_states`` calls it), as :meth:`init_weights`."""
        with self._keeping_rows():
            return super()._init_self_parameters()

    def _keeping_rows(self) -> contextlib.AbstractContextManager:
        held = self.__dict__.get("_ep_held")
        if held is None:
            return contextlib.nullcontext()
        n_local = self.num_experts // self.ep_size
        lo = self.ep_rank * n_local
        return _KeepRows([(getattr(self, name), live, lo, lo + n_local) for name, live in held.items()
                          if not live.is_meta])

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        ep, n_local = self.ep_size, self.num_experts // self.ep_size
        with torch.no_grad():
            counts = num_tokens_per_expert.to(torch.int64)
            received = _compat.functional_wait_tensor(_compat.functional_all_to_all_single(
                counts, [n_local] * ep, [n_local] * ep, self.ep_group_name))
            send = counts.view(ep, n_local).sum(1).tolist()
            recv = received.view(ep, n_local).sum(1).tolist()
        rows = _compat.functional_wait_tensor(
            _compat.functional_all_to_all_single(x, recv, send, self.ep_group_name))
        with torch.no_grad():
            # each received row's local expert; rows arrive (source rank, local expert) major
            expert_of_row = torch.repeat_interleave(
                torch.arange(ep * n_local, device=x.device) % n_local, received,
                output_size=rows.shape[0])
            order = torch.argsort(expert_of_row, stable=True)
            inverse = torch.argsort(order)
            local_counts = received.view(ep, n_local).sum(0).to(num_tokens_per_expert.dtype)
        out = super().forward(rows[order], local_counts)
        return _compat.functional_wait_tensor(
            _compat.functional_all_to_all_single(out[inverse], send, recv, self.ep_group_name))


_SUBCLASSES: dict[type, type] = {}


def _ep_class(cls: type) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (ExpertParallelGroupedExperts, cls), {})
    return _SUBCLASSES[cls]


def shard_experts(model: nn.Module, ep_group: dist.ProcessGroup) -> set[str]:
    """Give every ``GroupedExperts`` of ``model`` this EP rank's experts and the in-forward exchange.

    The module keeps its FQNs (its class becomes a subclass, its parameters are re-registered
    with ``E / ep`` rows); call it on the meta model, before ``dualpipe_fx.compile``.

    Returns:
        the FQNs of the expert parameters.

    Raises:
        ValueError: a layer's expert count does not split over the EP group, or an experts
            module holds DTensors already (torchtitan's own EP was applied).
    """
    ep_size, ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    grouped = _grouped_experts_classes()
    sharded: set[str] = set()
    for prefix, module in model.named_modules():
        if not isinstance(module, grouped) or isinstance(module, ExpertParallelGroupedExperts):
            continue
        if module.num_experts % ep_size:
            raise ValueError(f"{prefix}: {module.num_experts} experts do not split over "
                             f"expert_parallel_degree = {ep_size}; pick a degree that divides the "
                             f"number of experts")
        n_local = module.num_experts // ep_size
        for name, param in list(module.named_parameters(recurse=False)):
            if param.shape[0] != module.num_experts or type(param) is not nn.Parameter:
                raise ValueError(f"{prefix}.{name}: expected a plain parameter with the experts along "
                                 f"dim 0 ({module.num_experts}); got {type(param).__name__} of shape "
                                 f"{tuple(param.shape)}")
            rows = param.detach()[ep_rank * n_local:(ep_rank + 1) * n_local]
            module.register_parameter(name, nn.Parameter(rows.clone(), param.requires_grad))
            sharded.add(f"{prefix}.{name}")
        module.__class__ = _ep_class(type(module))
        module.ep_group_name, module.ep_size, module.ep_rank = ep_group.group_name, ep_size, ep_rank
    return sharded


class _KeepRows(_compat.TorchDispatchMode):
    """After every op that takes a full stand-in, this rank's rows of it into the live tensor:
    the last write wins, so the live tensor ends with the rows of the stand-in's final values
    (an init writes whole tensors: ``trunc_normal_`` draws into it, or into a float32 copy
    that it copies back)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor, int, int]]) -> None:
        super().__init__()
        self.pairs = pairs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        touched = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        for standin, live, lo, hi in self.pairs:
            if any(a is standin for a in touched):
                live.copy_(standin[lo:hi])
        return out


@contextlib.contextmanager
def full_experts(model: nn.Module) -> Iterator[None]:
    """Inside, each EP experts module holds full ``[E, ...]`` stand-ins ON META, so that a
    whole-model init (:func:`titan_integration.init.init_like_unsplit`) draws as in the unsplit
    model into its one shared scratch buffer; while the module's own ``init_weights`` runs, each
    op that writes a stand-in copies this rank's rows into the tensor the rank holds. No rank
    allocates more than the init's scratch (the largest tensor it does not hold, here a full
    expert weight). On exit the held tensors are put back."""
    modules = [m for m in model.modules() if isinstance(m, ExpertParallelGroupedExperts)]
    for module in modules:
        module._ep_held = dict(module.named_parameters(recurse=False))
        for name, param in module._ep_held.items():
            full = torch.empty((module.num_experts, *param.shape[1:]), dtype=param.dtype, device="meta")
            setattr(module, name, nn.Parameter(full, param.requires_grad))
    try:
        yield
    finally:
        for module in modules:
            for name, param in module.__dict__.pop("_ep_held").items():
                setattr(module, name, param)
