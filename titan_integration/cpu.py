"""Run torchtitan 0.2.2's trainer on CPU with gloo when no GPU is present.

torchtitan assumes CUDA in these places; :func:`use_cpu_when_no_gpu` handles each one:

1. ``torchtitan.tools.utils.device_type`` falls back to ``"cuda"`` when no accelerator is
   found, and ``device_module`` to ``torch.cuda``. The trainer builds
   ``torch.device(f"{device_type}:{LOCAL_RANK}")`` and calls ``device_module.set_device``.
   -> ``"cpu"`` and :class:`CpuDeviceModule`, in every module that imported them by name
   (``tools.utils``, ``distributed.utils``, ``distributed.parallel_dims``,
   ``components.metrics``, ``tools.profiling``).
2. The process-group backend comes from that ``device_type`` (``nccl`` for cuda).
   -> with ``"cpu"`` torch's default map gives ``gloo``.
3. The device mesh is built on ``device_type``. -> ``"cpu"`` mesh (gloo groups).
4. ``DeviceMemoryMonitor`` calls ``torch.cuda.get_device_name / get_device_properties /
   memory_stats / reset_peak_memory_stats / empty_cache``. -> :class:`CpuDeviceModule`
   answers with the machine's RAM and this process's peak resident set size.
5. ``set_pg_timeouts`` calls ``barrier(device_ids=[current_device()])`` and
   ``torch.cuda.synchronize()``. -> ``current_device() == 0``, ``synchronize`` a no-op.
6. Single-device runs autocast the forward to ``training.mixed_precision_param`` (bf16 by
   default) on ``device_type``. -> :func:`disable_cpu_autocast` (the trainer calls it): CPU
   runs in ``training.dtype`` (fp32), so a 1-rank baseline and a pipelined run (which
   torchtitan never autocasts) compute the same thing. FSDP/HSDP runs (``dp_shard > 1``) are
   not autocast: torchtitan's ``fully_shard`` applies ``mixed_precision_param`` there, on CPU
   too, and the pipelined run the same policy (``compile(mixed_precision=)``, from
   ``titan_integration.pipelining.fsdp_mixed_precision``).
7. Memory snapshots (``profiling.enable_memory_snapshot``) use ``torch.cuda.memory``.
   -> rejected on CPU by :func:`check_cpu_config`, naming the key.
8. ``checkpoint.async_mode = "async_with_pinned_mem"`` pins host memory for a GPU copy.
   -> rejected on CPU by :func:`check_cpu_config`, naming the key.

9. torchtitan's FSDP sets a gradient divide factor of 1 (its loss is already divided by the
   global token count), which FSDP2 runs as a ``PREMUL_SUM`` reduce-scatter; gloo has none.
   -> on CPU, ``set_gradient_divide_factor`` also forces SUM reductions (FSDP2 then divides
   by the factor itself): the same grads, so torchtitan's own FSDP runs (as the reference
   for dualpipe_fx's ``dp_shard``).
10. The MoE router and reorderer count tokens per expert with ``torch.histc`` on the int64
    expert indices; CUDA's ``histc`` takes integers, CPU's only floating point
    (``"histogram_cpu" not implemented for 'Long'``). -> :class:`IntHistcTorch` stands in for
    ``torch`` in ``torchtitan.models.moe.moe`` alone: ``histc`` of an integer tensor counts
    it as float and returns the input's dtype, as CUDA does (exact below 2**24 per bin); the
    model is unchanged, and the unpipelined baseline runs the same stand-in.
11. torchtitan's own expert parallelism (``expert_parallel_degree > 1``, the reference run
    without PP) permutes the dispatched tokens with ``generate_permute_indices``, a Triton
    kernel unless ``use_cpu=True`` (``0 active drivers`` on a CPU-only machine).
    -> :func:`use_cpu_permute_indices`: ``torchtitan.models.moe.utils`` calls it with
    ``use_cpu=True``, torchtitan's own CPU implementation of the same indices.

12. Flex attention (``attn_type = "flex"``): torch refuses its backward on CPU in the Python
    wrapper (``_validate_device``: "FlexAttention does not support backward on CPU"), although
    the higher-order op's dense backward is exact. -> ``passes._compat.lift_flex_backward_check_on_cpu``
    lifts that one check (the version difference lives there); the model, its masks and the
    op are unchanged, for the unpipelined baseline and the pipeline alike.

13. Flex models build their masks with ``create_attention_mask``, a ``torch.compile`` of
    ``create_block_mask`` without a device, and attend through ``FlexAttentionWrapper``'s
    ``torch.compile(flex_attention)``. Without a GPU, a CUDA build of torch still names
    ``cuda`` as its accelerator (the mask lands there), and Inductor has no CPU kernel for
    flex's backward. -> :func:`use_eager_flex_on_cpu`: ``create_block_mask(..., device="cpu")``
    and ``flex_attention`` run eagerly (the same mask, the same higher-order op and its dense
    CPU implementation), in the baseline and the pipeline alike.

14. Planning only (``benchmarks/autoplan_big.py``, never applied by ``use_cpu_when_no_gpu``):
    with ``use_grouped_mm`` (what torchtitan builds on SM90, e.g. the H100 a plan is for),
    the experts' token padding fills its indices in a Python loop over ``.item()`` values
    (``fill_indices_cpu``), which a graph cannot trace on fake tensors.
    -> :func:`use_traceable_permute_indices`: the same indices from tensor ops of static
    shape (``static_fill_indices``; equal to ``fill_indices_cpu``, tests/titan).
15. torchtitan 0.3's own expert parallelism (the reference run without PP) exchanges tokens
    through ``spmd_types``' uneven ``all_to_all``, which calls ``torch.distributed.all_to_all``
    on lists of chunks of different sizes; gloo's list ``alltoall`` takes equal sizes only
    (``ProcessGroupGloo::alltoall: invalid tensor size``). -> :func:`use_uneven_all_to_all_on_gloo`:
    through spmd_types' own seam for its ``torch.distributed`` (``spmd_types._dist.set_dist``),
    :class:`GlooAllToAllDist` runs a list ``all_to_all`` as one ``all_to_all_single`` with the
    chunks' sizes as splits (gloo takes uneven splits there): the same rows to the same
    ranks; every other name is ``torch.distributed``'s.

MFU uses a GPU peak-FLOPs table (CPU falls back to A100 with a warning): ignore ``mfu`` on CPU.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import resource
import socket
from types import SimpleNamespace

import torch

from passes._compat import lift_flex_backward_check_on_cpu

# Modules that did `from torchtitan.tools.utils import device_type, device_module`.
_DEVICE_IMPORTERS = ("torchtitan.tools.utils", "torchtitan.distributed.utils",
                     "torchtitan.distributed.parallel_dims", "torchtitan.components.metrics",
                     "torchtitan.tools.profiling")

# Modules that did `from torchtitan.models.attention import create_attention_mask`.
_FLEX_MASK_IMPORTERS = ("torchtitan.models.attention", "torchtitan.models.llama3.model.model",
                        "torchtitan.models.deepseek_v3.model.model")


class CpuDeviceModule:
    """The subset of the ``torch.cuda`` API torchtitan calls, answered for the CPU."""

    def set_device(self, device) -> None:
        return None

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        return 1

    def synchronize(self, device=None) -> None:
        return None

    def get_device_name(self, device=None) -> str:
        return "CPU"

    def get_device_properties(self, device=None) -> SimpleNamespace:
        return SimpleNamespace(total_memory=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    def memory_stats(self, device=None) -> dict[str, int]:
        # ru_maxrss is in KiB on Linux; the closest CPU analogue of CUDA's peak reserved bytes.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak,
                "num_alloc_retries": 0, "num_ooms": 0}

    def reset_peak_memory_stats(self, device=None) -> None:
        return None

    def empty_cache(self) -> None:
        return None


class IntHistcTorch:
    """``torch`` with CUDA's integer ``histc`` (item 10 above); every other name is torch's."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def histc(input, bins=100, min=0, max=0, *, out=None):  # noqa: A002 - torch's signature
        if input.is_floating_point() or input.is_complex():
            return torch.histc(input, bins=bins, min=min, max=max, out=out)
        counts = torch.histc(input.float(), bins=bins, min=min, max=max).to(input.dtype)
        return counts if out is None else out.copy_(counts)


def use_int_histc_on_cpu() -> None:
    """Item 10: torchtitan's MoE module counts tokens per expert with :class:`IntHistcTorch`."""
    moe = importlib.import_module("torchtitan.models.moe.moe")
    if not isinstance(moe.torch, IntHistcTorch):
        moe.torch = IntHistcTorch()


def use_cpu_permute_indices() -> None:
    """Item 11: torchtitan's EP token permutation through its CPU path (no Triton)."""
    kernels = importlib.import_module("torchtitan.models.moe.kernels")
    utils = importlib.import_module("torchtitan.models.moe.utils")
    if not getattr(utils.generate_permute_indices, "dualpipe_fx_cpu", False):
        cpu_indices = functools.partial(kernels.generate_permute_indices, use_cpu=True)
        cpu_indices.dualpipe_fx_cpu = True
        utils.generate_permute_indices = cpu_indices


def static_fill_indices(tokens_per_expert_group: torch.Tensor, start_index_values: torch.Tensor,
                        write_offsets: torch.Tensor, experts_per_rank: int, num_ranks: int,
                        max_len: int) -> torch.Tensor:
    """Item 14: ``torchtitan.models.moe.kernels.fill_indices_cpu`` without a Python loop: output
    position ``p`` belongs to the (expert, rank) group whose write range ``[start, end)``
    holds it (groups in expert-major order, their ranges ascending), and reads that group's
    source index ``start_index + p - start``; -1 (padding) where no group holds it."""
    counts = tokens_per_expert_group.view(num_ranks, experts_per_rank).t()      # [expert, rank]
    sources = start_index_values.view(num_ranks, experts_per_rank).t().reshape(-1)
    starts = (write_offsets.view(-1, 1) + counts.cumsum(1) - counts).reshape(-1)
    ends = starts + counts.reshape(-1)
    pos = torch.arange(max_len, device=tokens_per_expert_group.device)
    group = torch.searchsorted(ends.contiguous(), pos, right=True).clamp(max=ends.numel() - 1)
    start = starts[group]
    inside = (pos >= start) & (pos < ends[group])
    return torch.where(inside, sources[group] + pos - start, -1).to(torch.int32)


def use_traceable_permute_indices() -> None:
    """Item 14: torchtitan's expert token padding from :func:`static_fill_indices` (planning)."""
    kernels = importlib.import_module("torchtitan.models.moe.kernels")
    utils = importlib.import_module("torchtitan.models.moe.utils")
    if getattr(utils.generate_permute_indices, "dualpipe_fx_static", False):
        return

    def indices(*args, **kwargs):
        with _patched(kernels, "fill_indices_cpu", static_fill_indices):
            return kernels.generate_permute_indices(*args, **{**kwargs, "use_cpu": True})
    indices.dualpipe_fx_static = True
    utils.generate_permute_indices = indices


@contextlib.contextmanager
def _patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def use_eager_flex_on_cpu() -> None:
    """Item 13: torchtitan's flex masks on the CPU and its flex attention uncompiled."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    attention = importlib.import_module("torchtitan.models.attention")
    cpu_masks = functools.partial(create_block_mask, device="cpu")
    for name in _FLEX_MASK_IMPORTERS:
        importlib.import_module(name).create_attention_mask = cpu_masks
    attention.FlexAttentionWrapper._compiled_flex_attn = flex_attention


class GlooAllToAllDist:
    """``torch.distributed`` with a list ``all_to_all`` that takes uneven chunks on gloo (item 15)."""

    def __getattr__(self, name):
        return getattr(torch.distributed, name)

    @staticmethod
    def all_to_all(output_tensor_list, input_tensor_list, group=None, async_op=False):
        if async_op:
            raise ValueError("GlooAllToAllDist.all_to_all(async_op=True): the CPU stand-in runs "
                             "synchronously; call it with async_op=False")
        flat_in = torch.cat([t.reshape(t.shape[0], -1) for t in input_tensor_list])
        flat_out = flat_in.new_empty((sum(t.shape[0] for t in output_tensor_list), flat_in.shape[1]))
        torch.distributed.all_to_all_single(flat_out, flat_in, [t.shape[0] for t in output_tensor_list],
                                            [t.shape[0] for t in input_tensor_list], group=group)
        for out, rows in zip(output_tensor_list, flat_out.split([t.shape[0] for t in output_tensor_list])):
            out.copy_(rows.view_as(out))


def use_uneven_all_to_all_on_gloo() -> None:
    """Item 15: spmd_types' collectives (torchtitan 0.3) call :class:`GlooAllToAllDist`."""
    spmd_dist = importlib.import_module("spmd_types._dist")
    if not isinstance(spmd_dist.dist, GlooAllToAllDist):
        spmd_dist.set_dist(GlooAllToAllDist())


def use_cpu_when_no_gpu() -> bool:
    """Point torchtitan at the CPU (and gloo) when ``torch.cuda`` has no device.

    Returns:
        True when the CPU path was set up, False when a GPU is present (nothing changed).
    """
    if torch.cuda.is_available():
        return False
    device_module = CpuDeviceModule()
    for name in _DEVICE_IMPORTERS:
        module = importlib.import_module(name)
        module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = device_module
    _fsdp_sums_on_gloo()
    use_int_histc_on_cpu()
    use_cpu_permute_indices()
    lift_flex_backward_check_on_cpu()
    use_eager_flex_on_cpu()
    return True


def _fsdp_sums_on_gloo() -> None:
    """Item 9: FSDP2's divide factor as SUM + its own division (gloo has no PREMUL_SUM)."""
    from torch.distributed.fsdp import FSDPModule

    original = FSDPModule.set_gradient_divide_factor
    if getattr(original, "dualpipe_fx_cpu", False):
        return

    def set_gradient_divide_factor(self, factor: float) -> None:
        original(self, factor)
        self.set_force_sum_reduction_for_comms(True)

    set_gradient_divide_factor.dualpipe_fx_cpu = True
    FSDPModule.set_gradient_divide_factor = set_gradient_divide_factor


def check_cpu_config(job_config) -> None:
    """Reject the options that need a GPU, naming the key (items 7 and 8 above)."""
    if job_config.profiling.enable_memory_snapshot:
        raise ValueError("profiling.enable_memory_snapshot = true needs CUDA (torch.cuda.memory); "
                         "set it to false for CPU runs")
    if job_config.checkpoint.async_mode == "async_with_pinned_mem":
        raise ValueError("checkpoint.async_mode = \"async_with_pinned_mem\" needs CUDA; use "
                         "\"disabled\" or \"async\" on CPU")


def disable_cpu_autocast(trainer) -> None:
    """Item 6: run CPU training in ``training.dtype`` instead of a bf16 autocast."""
    trainer.maybe_enable_amp = contextlib.nullcontext()


def single_process_env() -> None:
    """Without torchrun, run as a 1-rank job (torchtitan reads these variables)."""
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)
