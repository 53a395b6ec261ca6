"""Tensor and sequence parallelism beside the pipeline: a model parallelised with
``torch.distributed.tensor.parallel.parallelize_module`` runs as local shards and traced collectives.

``torch.export`` cannot trace DTensor parameters (pytorch #147172), and DTensor's backward
is not the adjoint of its forward collectives, so differentiating a traced local forward
would give wrong grads. :func:`localize` therefore turns the user's applied ParallelStyles
into local computation before the capture, as ``titan_integration/expert_parallel.py`` turns
EP into functional collectives: every DTensor parameter becomes its local shard (a plain
``nn.Parameter``, same FQN), and every style's DTensor hooks become local forms whose
redistributions are ``runtime.tp_ops`` (forward collective in F, adjoint collective in I,
W local):

```
ColwiseParallel  Linear/Embedding  in: P -> Replicate into the sharded matmul (all_reduce, or
                                   all_gather/reduce_scatter under SP, in backward)
                                   out: Shard(-1) -> output_layouts
RowwiseParallel  Linear            in: P -> Shard(-1); matmul -> Partial -> output_layouts
                                   (all_reduce, or reduce_scatter under SP), then + bias
                 Embedding         vocab rows: masked local lookup -> Partial -> output_layouts
SequenceParallel                   in: P -> Shard(sequence_dim); the module runs on its rows
PrepareModuleInput / Output        each declared input / output: P -> desired
```

``P`` is the placement the value has: the one a style gave it when that style's output was a
DTensor (``use_local_output=False``: recorded per tensor), else the style's declared
``input_layouts``, as torch does for a plain tensor. Values between styles and across the
pipeline's cuts are local tensors in that placement (the residual stream under SP: ``Shard(1)``,
``[batch, seq / tp, dim]``).

Parameters whose local grads are partial sums (the replicated parameters of
``SequenceParallel`` modules, a ``RowwiseParallel`` bias with a sharded output) are
all-reduced over the TP group once per step, after the schedule (:meth:`TensorParallel.finish_step`).
The pipeline's ``parameters()`` are ``DTensor`` parameters with the user's placements,
wrapping the very local tensors the stage graphs read, and their ``.grad`` are ``DTensor``.

Refused (every rank alike, before any communication): a style or hook of
``torch.distributed.tensor`` other than those above (a user ParallelStyle subclass, Float8
styles), DTensor parameters on a module without a supported style, a TP mesh that is not
1-D, or several meshes, dims the TP degree does not divide. After the trace
(:meth:`TensorParallel.check_traced`): a model output that is a sharded DTensor (loss parallel).
Not detected: a DTensor output (``use_local_output=False``) that the model's own code
reshapes or reduces over its sharded dim before a style reads it (local here, global there).

**Contract**: ``localize(model) -> TensorParallel | None`` (None: no DTensor parameter);
mutates ``model`` in place (local parameters, local-form classes and hooks) and remembers
the layout on it, so a second ``compile()`` of the same model finds it again.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from dualpipe_fx import _compat
from dualpipe_fx.runtime.tp_ops import TPGroup, into_sharded_matmul, redistribute

_SUPPORTED = "ColwiseParallel, RowwiseParallel (nn.Linear, nn.Embedding), SequenceParallel, " \
             "PrepareModuleInput, PrepareModuleOutput, PrepareModuleInputOutput"


def _placements():
    from torch.distributed.tensor import Partial, Replicate, Shard
    return Partial, Replicate, Shard


@dataclass(frozen=True)
class ParamSpec:
    """A DTensor parameter as the user's plan made it: mesh, placements, global shape and
    stride, and whether its local grad is a partial sum over the TP group."""

    mesh: object
    placements: tuple
    shape: torch.Size
    stride: tuple
    partial_grad: bool


class Layouts:
    """What the traced forward knows of values that were DTensors between styles: tensor ->
    placement, and the replicated input a sharded matmul made of it (shared, so that wq/wk/wv
    reading one tensor reduce their input grads once)."""

    def __init__(self, tp: TPGroup) -> None:
        self.tp = tp
        self.placed = WeakIdKeyDictionary()
        self.matmul_inputs = WeakIdKeyDictionary()
        # a replicated tensor gathered from shards -> (the shards, their placement): a sharded
        # matmul gathers those again with a reduce_scatter backward (Megatron's SP) instead of
        # an all_reduce after the gather's slice; the first gather is then dead code if unused
        self.gathered_from = WeakIdKeyDictionary()
        self.refusals: list[str] = []  # what a trace met that the local form cannot run

    def of(self, t, declared):
        return self.placed.get(t, declared) if isinstance(t, torch.Tensor) else declared

    def record(self, t, placement, local: bool):
        if not local and isinstance(t, torch.Tensor):
            self.placed[t] = placement
        return t

    def redistribute(self, x, src, dst) -> torch.Tensor:
        out = redistribute(x, src, dst, self.tp)
        if src.is_shard() and dst.is_replicate() and x.is_floating_point():
            self.gathered_from[out] = (x, src)
        return out

    def matmul_input(self, x: torch.Tensor, declared) -> torch.Tensor:
        src = self.of(x, declared)
        if src.is_replicate() and x in self.gathered_from:
            x, src = self.gathered_from[x]
        made = self.matmul_inputs.setdefault(x, {})  # by placement: two styles may declare two
        if repr(src) not in made:
            made[repr(src)] = into_sharded_matmul(x, src, self.tp)
        return made[repr(src)]


# --- the local forms of ColwiseParallel / RowwiseParallel (the module's class is swapped) ----

class _LocalStyle(nn.Module):
    """Mixin placed before nn.Linear / nn.Embedding; ``_tp_layouts`` (Layouts), ``_tp_in``,
    ``_tp_out`` (placements) and ``_tp_local_out`` are set on the instance."""

    def _tp_finish(self, y):
        """``y`` (placed as this style makes it: ``_tp_made``) placed ``output_layouts``."""
        y = redistribute(y, self._tp_made, self._tp_out, self._tp_layouts.tp)
        return self._tp_layouts.record(y, self._tp_out, self._tp_local_out)


class ColwiseLinear(_LocalStyle):
    def forward(self, x):
        x = self._tp_layouts.matmul_input(x, self._tp_in)
        return self._tp_finish(F.linear(x, self.weight, self.bias))


class RowwiseLinear(_LocalStyle):
    def forward(self, x):
        _, _, Shard = _placements()
        lay = self._tp_layouts
        x = redistribute(x, lay.of(x, self._tp_in), Shard(-1), lay.tp)
        y = self._tp_finish(F.linear(x, self.weight))  # Partial -> output_layouts
        return y if self.bias is None else y + self.bias


class ColwiseEmbedding(_LocalStyle):
    def forward(self, ids):
        _, Replicate, _ = _placements()
        lay = self._tp_layouts
        ids = redistribute(ids, lay.of(ids, self._tp_in), Replicate(), lay.tp)
        return self._tp_finish(F.embedding(ids, self.weight, self.padding_idx, None, 2.0,
                                           self.scale_grad_by_freq, self.sparse))


class RowwiseEmbedding(_LocalStyle):
    def forward(self, ids):
        _, Replicate, _ = _placements()
        lay = self._tp_layouts
        ids = redistribute(ids, lay.of(ids, self._tp_in), Replicate(), lay.tp)
        rows = self.weight.shape[0]
        lo = lay.tp.rank * rows  # torch.chunk's rows: the global count divides (checked)
        outside = (ids < lo) | (ids >= lo + rows)
        pad = self.padding_idx - lo if self.padding_idx is not None and lo <= self.padding_idx < lo + rows else None
        out = F.embedding((ids - lo).masked_fill(outside, 0), self.weight, pad, None, 2.0,
                          self.scale_grad_by_freq, self.sparse)
        return self._tp_finish(out.masked_fill(outside.unsqueeze(-1), 0.0))  # Partial -> output_layouts


_LOCAL_CLASSES = {("ColwiseParallel", nn.Linear): ColwiseLinear, ("RowwiseParallel", nn.Linear): RowwiseLinear,
                  ("ColwiseParallel", nn.Embedding): ColwiseEmbedding,
                  ("RowwiseParallel", nn.Embedding): RowwiseEmbedding}


@functools.lru_cache(maxsize=None)
def _local_class(mixin: type, cls: type) -> type:
    return type(f"{mixin.__name__}_{cls.__name__}", (mixin, cls), {})


# --- the local forms of the hook styles ----------------------------------------------------

def _sequence_pre(layouts: Layouts, sharding, module, inputs):
    x = inputs[0]
    return (redistribute(x, layouts.of(x, sharding), sharding, layouts.tp), *inputs[1:])


def _sequence_post(layouts: Layouts, sharding, local: bool, module, inputs, output):
    return layouts.record(output, sharding, local)


def _prepare(layouts: Layouts, value, layout, desired, local: bool):
    if layout is None or not isinstance(value, torch.Tensor):
        return value
    src = layouts.of(value, layout)
    out = layouts.redistribute(value, src, desired) if desired is not None else value
    return layouts.record(out, desired if desired is not None else src, local)


def _prepare_input_pre(layouts: Layouts, style, module, inputs, kwargs=None):
    if style.input_layouts is not None:
        if len(inputs) != len(style.input_layouts):
            raise ValueError(f"{style}: the module got {len(inputs)} positional inputs; expected "
                             f"{len(style.input_layouts)} (one layout each)")
        inputs = tuple(_prepare(layouts, x, lay, want, style.use_local_output)
                       for x, lay, want in zip(inputs, style.input_layouts, style.desired_input_layouts))
    if kwargs is None:
        return inputs
    kwargs = {k: _prepare(layouts, v, style.input_kwarg_layouts.get(k), style.desired_input_kwarg_layouts.get(k),
                          style.use_local_output) for k, v in kwargs.items()}
    return inputs, kwargs


def _prepare_output_post(layouts: Layouts, style, module, inputs, outputs):
    single = not isinstance(outputs, tuple)
    outs = (outputs,) if single else outputs
    if len(outs) != len(style.output_layouts):
        raise ValueError(f"{style}: the module returned {len(outs)} outputs; expected {len(style.output_layouts)}")
    outs = tuple(_prepare(layouts, o, lay, want, style.use_local_output)
                 for o, lay, want in zip(outs, style.output_layouts, style.desired_output_layouts))
    return outs[0] if single else outs


# --- reading the applied styles ---------------------------------------------------------------

def _refuse(fqn: str, module: nn.Module, what: str):
    return ValueError(
        f"tensor parallelism: module {fqn or '<root>'!r} ({type(module).__name__}) has {what}; dualpipe_fx "
        f"traces {_SUPPORTED} as local collectives and refuses other styles (a ParallelStyle subclass, Float8 "
        "styles, loss parallel). Fix: parallelize that module with one of those styles, or leave it unsharded")


def _owner(fn) -> str:
    """The class a style's hook function was defined in: ``ColwiseParallel._prepare_input_fn`` ->
    ColwiseParallel; ``f.<locals>.MyStyle._apply.<locals>.<lambda>`` -> MyStyle."""
    parts = [p for p in getattr(fn, "__qualname__", type(fn).__name__).split(".") if p != "<locals>"]
    methods = [i for i, p in enumerate(parts) if p.startswith("_") or p == "<lambda>"]
    return parts[methods[0] - 1] if methods and methods[0] > 0 else ".".join(parts)


def _style_of(closure: Mapping) -> tuple[str, object]:
    """(style class name, its partial's args or the style instance) of one hook's closure."""
    for key in ("input_fn", "output_fn"):
        fn = closure.get(key)
        if isinstance(fn, functools.partial):
            return _owner(fn.func), fn.args
        if fn is not None:
            return _owner(fn), None
    style = closure.get("self")
    return type(style).__name__, style


class TensorParallel:
    """This rank's TP layout: the local form's specs, and the DTensor parameters it shows."""

    def __init__(self, mesh, specs: Mapping[str, ParamSpec], layouts: Layouts) -> None:
        self.mesh = mesh
        self.layouts = layouts
        self.group = mesh.get_group()
        self.specs = dict(specs)
        self._public: dict[str, nn.Parameter] = {}
        self._local: dict[str, torch.Tensor] = {}

    def check_traced(self) -> None:
        """Raise what the traces met that the local form cannot run (every rank traces alike).

        Raises:
            ValueError: a sharded DTensor model output.
        """
        if self.layouts.refusals:
            raise ValueError(self.layouts.refusals[0])

    @property
    def size(self) -> int:
        return self.mesh.size()

    def _dtensor(self, name: str, local: torch.Tensor):
        from torch.distributed.tensor import DTensor
        spec = self.specs[name]
        return DTensor.from_local(local, spec.mesh, spec.placements, run_check=False, shape=spec.shape,
                                  stride=spec.stride)

    def public(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` (FQN -> tensor) with each TP parameter as a ``DTensor`` parameter whose
        local tensor is the one the stage graphs read (an optimizer's in-place step reaches them)."""
        out = {}
        for name, t in state.items():
            if name not in self.specs:
                out[name] = t
                continue
            if name not in self._public:
                tied = next((k for k, v in self._local.items() if v is t), None)  # one DTensor per local tensor
                self._local[name] = t
                self._public[name] = self._public[tied] if tied is not None else \
                    nn.Parameter(self._dtensor(name, t.detach()), requires_grad=t.requires_grad)
            out[name] = self._public[name]
        return out

    def finish_step(self) -> None:
        """Move this step's local grads into the DTensor parameters' ``.grad`` (added to what
        they hold), all-reducing the partial ones over the TP group first."""
        for name, local in self._local.items():
            grad, local.grad = local.grad, None
            if grad is None:  # none this step, or a tied name whose grad the first name moved
                continue
            if self.specs[name].partial_grad:
                dist.all_reduce(grad, group=self.group)
            public = self._public[name]
            dt = self._dtensor(name, grad)
            if public.grad is None:
                public.grad = dt
            else:
                public.grad.add_(dt)

    def drop_step(self) -> None:
        """A failed (or forward-only) step: no local grad is kept."""
        for local in self._local.values():
            local.grad = None

    def load_targets(self, targets: Mapping[str, torch.Tensor], sources: Mapping[str, torch.Tensor]):
        """(targets, sources) for ``copy_into``: a TP entry takes this rank's part of a full
        tensor or of a DTensor (resharded if its placements differ)."""
        from torch.distributed.tensor import DTensor
        tgt, src = {}, {}
        for k, t in targets.items():
            if k not in self.specs:
                tgt[k] = t
                if k in sources:
                    src[k] = sources[k]
                continue
            tgt[k] = t.to_local() if isinstance(t, DTensor) else t
            if k in sources:
                s = sources[k]
                spec = self.specs[k]
                if isinstance(s, DTensor):
                    s = s.to_local() if tuple(s.placements) == spec.placements else s.full_tensor()
                    if tuple(sources[k].placements) == spec.placements:
                        src[k] = s
                        continue
                src[k] = self._my_part(s, spec)
        return tgt, src

    def _my_part(self, full: torch.Tensor, spec: ParamSpec) -> torch.Tensor:
        part = full
        for placement in spec.placements:
            if placement.is_shard():
                part = part.chunk(self.size, dim=placement.dim)[self.mesh.get_local_rank()]
        return part


def _mesh_of(meshes: dict) -> object:
    if len(meshes) != 1:
        raise ValueError(f"tensor parallelism: DTensor parameters on {len(meshes)} device meshes; expected one "
                         "1-D TP mesh. Fix: parallelize_module(model, tp_mesh, plan) with one mesh (a 2-D mesh's "
                         "mesh['tp'] slice)")
    mesh = next(iter(meshes.values()))
    if mesh.ndim != 1:
        raise ValueError(f"tensor parallelism: parameters on a {mesh.ndim}-D mesh {mesh}; expected the 1-D TP "
                         "mesh (pass mesh['tp'] to parallelize_module; the pipeline takes group=, data "
                         "parallelism Parallelism(dp_group=...))")
    return mesh


def _check_params(fqn: str, module: nn.Module, style: str, kind: type, mesh) -> None:
    """The parameters a style made: DTensors of the placements torch's style gives them, with
    dims that split evenly (the local collectives gather equal chunks)."""
    _, Replicate, Shard = _placements()
    expected = {("ColwiseParallel", nn.Linear): {"weight": Shard(0), "bias": Shard(0)},
                ("RowwiseParallel", nn.Linear): {"weight": Shard(1), "bias": Replicate()},
                ("ColwiseParallel", nn.Embedding): {"weight": Shard(1)},
                ("RowwiseParallel", nn.Embedding): {"weight": Shard(0)}}[(style, kind)]
    for name, p in module.named_parameters(recurse=False):
        want = expected.get(name)
        if tuple(getattr(p, "placements", ())) != (want,):
            raise _refuse(fqn, module, f"parameter {name} placed {getattr(p, 'placements', 'as a plain tensor')} "
                                       f"under {style} (expected {want})")
        if want.is_shard() and p.shape[want.dim] % mesh.size():
            raise ValueError(f"tensor parallelism: {fqn}.{name} of shape {tuple(p.shape)} is sharded on dim "
                             f"{want.dim} over {mesh.size()} TP ranks, which do not divide it; expected equal "
                             "shards. Fix: a size that the TP degree divides")
    if kind is nn.Embedding and module.max_norm is not None:
        raise _refuse(fqn, module, f"{style} with max_norm={module.max_norm} (it renormalises rows in place)")


def _install_module_style(module, hooks, layouts: Layouts) -> set[str]:
    """Swap a Colwise/Rowwise-parallel Linear or Embedding for its local form."""
    Partial, _, Shard = _placements()
    (style, in_args), (_, out_args) = hooks["input_fn"], hooks["output_fn"]
    kind = nn.Linear if isinstance(module, nn.Linear) else nn.Embedding
    module.__class__ = _local_class(_LOCAL_CLASSES[(style, kind)], type(module))
    module._tp_layouts = layouts
    module._tp_in = in_args[0][0]
    module._tp_out = out_args[0][0]
    module._tp_local_out = out_args[1]
    module._tp_made = Shard(-1) if style == "ColwiseParallel" else Partial()
    # a replicated bias added to a sequence-sharded output sees only this rank's rows
    return {"bias"} if style == "RowwiseParallel" and kind is nn.Linear and module._tp_out.is_shard() else set()


def _styles(module: nn.Module, meshes: dict) -> dict[str, tuple]:
    """The applied hook styles of ``module``: key -> (style name, args/instance, hooks dict, id);
    the meshes they name go into ``meshes``."""
    found = {}
    for table, hook_id, closure in _compat.tp_style_hooks(module):
        name, what = _style_of(closure)
        key = "input_fn" if "input_fn" in closure else "output_fn" if "output_fn" in closure else name
        found[key] = (name, what, table, hook_id)
        if closure.get("device_mesh") is not None:
            meshes[closure["device_mesh"]] = closure["device_mesh"]
    return found


def is_tensor_parallel(model: nn.Module) -> bool:
    """Whether ``model`` has DTensor parameters, or had them before an earlier :func:`localize`."""
    from torch.distributed.tensor import DTensor
    return "_dpfx_tensor_parallel" in model.__dict__ or any(isinstance(p, DTensor) for p in model.parameters())


def localize(model: nn.Module) -> Optional[TensorParallel]:
    """Turn ``model``'s applied tensor-parallel styles into local computation (module docstring).

    Raises:
        ValueError: an unsupported style or hook (naming the module's FQN and the style),
            DTensor parameters outside a supported style, several or multi-dim meshes.
    """
    from torch.distributed.tensor import DTensor
    done = model.__dict__.get("_dpfx_tensor_parallel")
    if done is not None:  # localized by an earlier compile(): its parameters are local shards now
        return TensorParallel(*done)
    # every FQN, tied ones included (a tied embedding and head: one DTensor under two names)
    dparams = {n: p for n, p in model.named_parameters(remove_duplicate=False) if isinstance(p, DTensor)}
    meshes = {p.device_mesh: p.device_mesh for p in dparams.values()}  # DeviceMesh hashes by layout
    styled = {fqn: _styles(m, meshes) for fqn, m in model.named_modules()}
    if not meshes:
        return None
    mesh = _mesh_of(meshes)
    group = mesh.get_group()
    layouts = Layouts(TPGroup(group.group_name, mesh.size(), mesh.get_local_rank()))
    for fqn, module in model.named_modules():
        _check_module(fqn, module, styled[fqn], mesh)
    partial: set[str] = set()
    for fqn, module in model.named_modules():
        partial |= {f"{fqn}.{n}" if fqn else n for n in _localize_module(fqn, module, styled[fqn], layouts, mesh)}
    partial_ids = {id(dparams[n]) for n in partial if n in dparams}
    specs = {n: ParamSpec(p.device_mesh, tuple(p.placements), p.shape, p.stride(), id(p) in partial_ids)
             for n, p in dparams.items()}
    local_of: dict[int, nn.Parameter] = {}  # a tied DTensor becomes ONE local parameter, still tied
    for fqn, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if isinstance(p, DTensor):
                if id(p) not in local_of:
                    local_of[id(p)] = nn.Parameter(p.to_local().detach(), requires_grad=p.requires_grad)
                module.register_parameter(name, local_of[id(p)])
    model.register_forward_hook(functools.partial(_check_outputs, layouts))
    model.__dict__["_dpfx_tensor_parallel"] = (mesh, specs, layouts)
    return TensorParallel(mesh, specs, layouts)


def _check_outputs(layouts: Layouts, module, inputs, output) -> None:
    """Note a model output that is a sharded DTensor (``use_local_output=False`` on the last
    style, e.g. for loss parallelism): the loss would see DTensor's global values, the local
    form only this rank's part. ``TensorParallel.check_traced`` raises it after the trace
    (raised here, torch.export would wrap it in its own advice)."""
    from torch.utils._pytree import tree_leaves
    for leaf in tree_leaves(output):
        placement = layouts.of(leaf, None)
        if placement is not None and not placement.is_replicate():
            layouts.refusals.append(
                f"tensor parallelism: the model returns a DTensor placed {placement!r} (a style with "
                "use_local_output=False, e.g. for loss parallelism); expected replicated outputs: dualpipe_fx "
                "runs the styles as local tensors, and the loss would see this rank's part only. Fix: give the "
                "last style output_layouts=Replicate() (e.g. ColwiseParallel(output_layouts=Replicate()) on the "
                "head), or use_local_output=True if the loss is meant for the local part")
            return


_KNOWN = {"ColwiseParallel", "RowwiseParallel", "SequenceParallel", "PrepareModuleInput", "PrepareModuleOutput"}


def _check_module(fqn: str, module: nn.Module, hooks: dict, mesh) -> None:
    """Refuse what ``_localize_module`` cannot turn local; called for every module before
    any is changed, so a refused model is left as it was."""
    from torch.distributed.tensor import DTensor
    names = {h[0] for h in hooks.values()}
    own = [n for n, p in module.named_parameters(recurse=False) if isinstance(p, DTensor)]
    if not hooks and own:
        raise _refuse(fqn, module, f"DTensor parameters {own} but no ParallelStyle dualpipe_fx reads")
    unknown = names - _KNOWN
    if unknown:
        raise _refuse(fqn, module, f"the style {sorted(unknown)[0]}")
    if names & {"ColwiseParallel", "RowwiseParallel"}:
        if "input_fn" not in hooks or "output_fn" not in hooks or len(hooks) != 2:
            raise _refuse(fqn, module, f"styles {sorted(names)} together")
        style = hooks["input_fn"][0]
        kind = next((k for k in (nn.Linear, nn.Embedding) if isinstance(module, k)), None)
        if kind is None:
            raise _refuse(fqn, module, f"{style} on a {type(module).__name__} (torch's style takes nn.Linear "
                                       "and nn.Embedding)")
        _check_params(fqn, module, style, kind, mesh)
    elif own and "SequenceParallel" not in names:
        raise _refuse(fqn, module, f"DTensor parameters {own} under {sorted(names)}")


def _localize_module(fqn: str, module: nn.Module, hooks: dict, layouts: Layouts, mesh) -> set[str]:
    """Install the local form of ``module``'s styles (checked by ``_check_module``); returns
    its parameters with partial grads."""
    from torch.distributed.tensor import DTensor
    names = {h[0] for h in hooks.values()}
    for _, _, table, hook_id in hooks.values():
        del table[hook_id]
        module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    if names & {"ColwiseParallel", "RowwiseParallel"}:
        return _install_module_style(module, {k: (v[0], v[1]) for k, v in hooks.items()}, layouts)
    partial: set[str] = set()
    if "SequenceParallel" in names:
        sharding = hooks["input_fn"][1][0][0]
        local = hooks["output_fn"][1][0]
        module.register_forward_pre_hook(functools.partial(_sequence_pre, layouts, sharding))
        module.register_forward_hook(functools.partial(_sequence_post, layouts, sharding, local))
        partial = {n for n, p in module.named_parameters(recurse=False) if isinstance(p, DTensor)}
    for name, style, _, _ in hooks.values():
        if name == "PrepareModuleInput":
            module.register_forward_pre_hook(functools.partial(_prepare_input_pre, layouts, style),
                                             with_kwargs=style.with_kwargs)
        elif name == "PrepareModuleOutput":
            module.register_forward_hook(functools.partial(_prepare_output_post, layouts, style))
    return partial
