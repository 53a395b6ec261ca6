"""Device and network models for planning: one small table, and short probes of the local ones.

**Contract**: ``device_model(name_or_device)`` -> ``DeviceModel`` (achieved matmul FLOP/s per
dtype, memory bandwidth, per-kernel and per-action overhead); ``network_model(name)`` ->
``NetworkModel`` (point-to-point bandwidth and latency); ``probe_device(device)`` measures
the local device in about a second, ``probe_network(group)`` a process group's links. ``node_seconds(cost, dtype, device)`` is the roofline
time of one graph node: the larger of its FLOPs over the achieved FLOP/s of its dtype and
its bytes over the bandwidth, plus the per-kernel overhead. Pure data and arithmetic apart
from the probe; nothing here knows the API or the runtime.

Where the table's figures come from (``source`` of each row): the vendors' datasheets give
peak dense FLOP/s and bandwidth; ``efficiency`` scales a peak to what a large GEMM achieves
(0.7 for NVIDIA's tensor cores and 0.6 for MI300X, the fractions their own GEMM libraries
report for large bf16 shapes; memory-bound kernels reach ``bandwidth_efficiency`` of the
datasheet bandwidth). They are starting points: a probe on the device replaces them.

**Pseudocode**
    node_seconds = max(flops / (peak[dtype] * efficiency), bytes / (bandwidth * bw_efficiency))
                   + kernel_overhead_s
    action_seconds = sum(node_seconds) + action_overhead_s + p2p_overhead_s * transfers it posts
    p2p_seconds(bytes) = latency_s + bytes / bandwidth
    ring_seconds(bytes, n) = passes * ((n - 1) / n * bytes / bandwidth + (n - 1) * latency_s)
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Mapping, Optional, Union

import torch

__all__ = ["DeviceModel", "NetworkModel", "DEVICES", "NETWORKS", "device_model", "network_model",
           "probe_device", "probe_network", "node_seconds"]

TFLOPS = 1e12
GBPS = 1e9


@dataclass(frozen=True)
class DeviceModel:
    """One device kind. ``peak_flops`` maps a dtype's name (``"float32"``, ``"bfloat16"``,
    ``"float16"``) to its dense matmul peak; ``efficiency`` is the fraction a large GEMM
    achieves; ``bandwidth`` is bytes/s of device memory, ``bandwidth_efficiency`` the
    fraction a streaming kernel achieves. ``kernel_overhead_s`` is paid per graph node,
    ``action_overhead_s`` per pipeline action (the runtime's Python between graphs), and
    ``p2p_overhead_s`` per transfer to or from another rank that an action posts and waits
    on (the rank's own time for it, beside the link's latency, which the peer waits)."""

    name: str
    peak_flops: Mapping[str, float]
    bandwidth: float
    memory_bytes: int
    efficiency: float = 1.0
    bandwidth_efficiency: float = 1.0
    kernel_overhead_s: float = 0.0
    action_overhead_s: float = 0.0
    p2p_overhead_s: float = 0.0
    source: str = ""
    # shape classes: (the GEMM's smallest dimension up to, the fraction of the large-GEMM rate);
    # a probe measures them, the GPU rows know large GEMMs only (an empty tuple: every shape alike)
    small_gemms: tuple[tuple[int, float], ...] = ()

    def flops_per_s(self, dtype: torch.dtype, smallest_dim: Optional[int] = None) -> float:
        """Achieved matmul FLOP/s for ``dtype`` (a dtype missing from the table: float32's), on a
        GEMM whose smallest dimension is ``smallest_dim`` (None: a large one)."""
        name = str(dtype).replace("torch.", "")
        peak = self.peak_flops.get(name, self.peak_flops["float32"])
        fraction = next((f for bound, f in self.small_gemms if smallest_dim is not None and smallest_dim <= bound),
                        1.0)
        return peak * self.efficiency * fraction


@dataclass(frozen=True)
class NetworkModel:
    """Point-to-point links between pipeline ranks: bytes/s one way, and seconds per message."""

    name: str
    bandwidth: float
    latency_s: float
    source: str = ""

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth

    def ring_seconds(self, nbytes: float, ranks: int, passes: int = 2) -> float:
        """A ring collective of ``nbytes`` over ``ranks``: ``passes`` rounds (an all-reduce 2, a
        reduce-scatter or an all-gather 1) of ``ranks - 1`` hops, each with ``1 / ranks`` of it."""
        return passes * ((ranks - 1) / ranks * nbytes / self.bandwidth + (ranks - 1) * self.latency_s)


def _device(name, fp32, tf32, bf16, bandwidth_gbps, memory_gib, efficiency, source) -> DeviceModel:
    return DeviceModel(name, MappingProxyType({"float32": tf32 * TFLOPS, "float32_ieee": fp32 * TFLOPS,
                                               "bfloat16": bf16 * TFLOPS, "float16": bf16 * TFLOPS}),
                       bandwidth_gbps * GBPS, memory_gib << 30, efficiency=efficiency, bandwidth_efficiency=0.8,
                       kernel_overhead_s=5e-6, action_overhead_s=50e-6, p2p_overhead_s=20e-6, source=source)


# float32 matmuls run as TF32 on the tensor cores (torch.backends.cuda.matmul.allow_tf32 or
# set_float32_matmul_precision("high"), as torchtitan sets); "float32_ieee" is the CUDA-core rate.
DEVICES: Mapping[str, DeviceModel] = MappingProxyType({
    "h100": _device("h100", 67, 494.5, 989.5, 3350, 80, 0.7,
                    "NVIDIA H100 SXM5 datasheet (dense: FP32 67, TF32 494.5, BF16 989.5 TFLOP/s; HBM3 3.35 TB/s)"),
    "h200": _device("h200", 67, 494.5, 989.5, 4800, 141, 0.7,
                    "NVIDIA H200 SXM datasheet (dense FLOP/s as H100; HBM3e 4.8 TB/s, 141 GB)"),
    "a100": _device("a100", 19.5, 156, 312, 2039, 80, 0.7,
                    "NVIDIA A100 SXM4 80GB datasheet (dense: FP32 19.5, TF32 156, BF16 312 TFLOP/s; 2.039 TB/s)"),
    "mi300x": _device("mi300x", 163.4, 653.7, 1307.4, 5300, 192, 0.6,
                      "AMD Instinct MI300X datasheet (dense: FP32 163.4, TF32 653.7, BF16 1307.4 TFLOP/s; 5.3 TB/s)"),
})

NETWORKS: Mapping[str, NetworkModel] = MappingProxyType({
    "nvlink": NetworkModel("nvlink", 450 * GBPS * 0.8, 10e-6,
                           "NVLink 4 (H100): 900 GB/s both ways, 450 one way; 80% achieved; ~10 us a message"),
    "ib-400g": NetworkModel("ib-400g", 50 * GBPS * 0.9, 20e-6, "NDR InfiniBand 400 Gb/s = 50 GB/s; 90% achieved"),
    "ib-200g": NetworkModel("ib-200g", 25 * GBPS * 0.9, 20e-6, "HDR InfiniBand 200 Gb/s = 25 GB/s; 90% achieved"),
    "ethernet-100g": NetworkModel("ethernet-100g", 12.5 * GBPS * 0.8, 50e-6, "100 GbE = 12.5 GB/s; 80% achieved"),
    # gloo between processes of one host (CPU ranks): ping-pongs on the 2-core dev machine
    # with two other jobs running, 2026-12-07: 16 MiB at 0.96 GB/s one way, 1 byte in 2.5 ms
    # (probe_network measures the group at hand instead)
    "localhost": NetworkModel("localhost", 0.96 * GBPS, 2.5e-3,
                              "gloo over TCP on one loaded 2-core host, ping-pong measured 2026-12-07"),
})


def device_model(device: Union[str, torch.device, DeviceModel]) -> DeviceModel:
    """A ``DeviceModel`` by table name (``"h100"``, ...), as given, or probed (``"cpu"``)."""
    if isinstance(device, DeviceModel):
        return device
    key = str(device).lower()
    if key in DEVICES:
        return DEVICES[key]
    if key == "cpu":
        return probe_device("cpu")
    raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}, 'cpu' (probed here) or a "
                     "DeviceModel. Fix: pass a known name, or build a DeviceModel with your device's figures")


def network_model(network: Union[str, NetworkModel, None], device: DeviceModel) -> NetworkModel:
    """A ``NetworkModel`` by table name, as given, or the default for ``device`` (NVLink within
    a node for a GPU, ``localhost`` for a probed CPU)."""
    if isinstance(network, NetworkModel):
        return network
    if network is None:
        return NETWORKS["localhost" if device.name.startswith("cpu") else "nvlink"]
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; expected one of {', '.join(NETWORKS)} or a "
                         "NetworkModel(name, bandwidth, latency_s)")
    return NETWORKS[network]


def _timed(fn, min_s: float = 0.1) -> float:
    """Seconds per call of ``fn``: the median call, repeated until ``min_s`` has passed (after
    one warm-up); the median, not the mean, so that another process's burst on a shared
    machine does not become the device's rate."""
    fn()
    calls, start = [], time.perf_counter()
    while time.perf_counter() - start < min_s or len(calls) < 3:
        begin = time.perf_counter()
        fn()
        calls.append(time.perf_counter() - begin)
    return statistics.median(calls)


# The runtime's own time per pipeline action (its Python between graphs: the executor, torch's
# schedule runtime) and per transfer an action posts to or waits on from another rank (the P2P
# call and, on gloo, the rank's copy into the socket), beyond the graphs' kernels and the link's
# latency. cpu: fitted to benchmarks/autoplan.py --width 8 (2 gloo ranks, kernels next to free)
# on the quiet 2-core dev machine, 2026-12-07: 1f1b with 16 micro-batches 27.0 ms for 32 actions
# and 32 transfers a rank, gpipe 24.2 ms for the same, zbv 59.6 ms for 96 actions and 64
# transfers: 0.26 ms an action and 0.54 ms a transfer (a grid of 0.1-0.4 x 0.2-0.8 ms over the
# 12 configurations of 2026-12-08's --width 8 run kept these: median error 9.7%, the rest
# 12-48%; docs/schedules.md, "Validation on CPU"). A merged F&B pair is one action that
# posts both parts' transfers. cuda: the same Python per action, and a NCCL launch per
# transfer, assumed until a GPU run measures them.
ACTION_OVERHEAD_S = MappingProxyType({"cpu": 0.26e-3, "cuda": 0.26e-3})
P2P_OVERHEAD_S = MappingProxyType({"cpu": 0.54e-3, "cuda": 20e-6})

PROBE_SMALL_DIMS = (4, 16, 64)  # the shape classes probe_device measures below a large GEMM


def probe_device(device: Union[str, torch.device] = "cpu", size: int = 512) -> DeviceModel:
    """Measure this machine's device: a ``size``-square GEMM per dtype (float32, bfloat16) and,
    in float32, ``(m, size) @ (size, size)`` for each ``m`` of ``PROBE_SMALL_DIMS`` (the shape
    classes), a large copy for the bandwidth, a tiny op for the per-kernel overhead. About a second."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def gemm_rate(m: int, dtype: torch.dtype) -> float:
        a = torch.randn(m, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        return 2 * m * size * size / _timed(lambda: (torch.mm(a, b), sync()))

    peaks = {str(dtype).replace("torch.", ""): gemm_rate(size, dtype) for dtype in (torch.float32, torch.bfloat16)}
    small = tuple((m, min(1.0, gemm_rate(m, torch.float32) / peaks["float32"])) for m in PROBE_SMALL_DIMS)
    src = torch.empty(16 << 20, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / _timed(lambda: (dst.copy_(src), sync()))  # read + write
    tiny = torch.ones(1, device=device)
    overhead = _timed(lambda: (tiny.add(1), sync()), min_s=0.02)
    return DeviceModel(f"{device.type} (probed)", MappingProxyType(peaks), bandwidth, 0,
                       kernel_overhead_s=overhead, action_overhead_s=ACTION_OVERHEAD_S.get(device.type, 0.0),
                       p2p_overhead_s=P2P_OVERHEAD_S.get(device.type, 0.0),
                       small_gemms=small,
                       source=f"probe_device({str(device)!r}) on this machine, {time.strftime('%Y-%m-%d')}")


def probe_network(group=None, nbytes: int = 4 << 20, repeats: int = 9, device="cpu") -> NetworkModel:
    """Ping-pong between ranks 0 and 1 of ``group`` (every rank must call it; the others
    wait at the barrier): one byte for the latency, ``nbytes`` for the bandwidth, with tensors
    on ``device`` (the group's: a pure NCCL group takes no CPU tensor). Every rank returns
    rank 0's figures (broadcast)."""
    import torch.distributed as dist

    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rank = dist.get_rank(group)
    figures = torch.zeros(2, dtype=torch.float64, device=device)
    for k, n in enumerate((1, nbytes)):
        t = torch.zeros(n, dtype=torch.uint8, device=device)
        dist.barrier(group)
        trips = []
        for _ in range(repeats):
            start = time.perf_counter()
            if rank == 0:
                dist.send(t, group_dst=1, group=group)
                dist.recv(t, group_src=1, group=group)
            elif rank == 1:
                dist.recv(t, group_src=0, group=group)
                dist.send(t, group_dst=0, group=group)
            sync()
            trips.append(time.perf_counter() - start)
        figures[k] = statistics.median(trips) / 2  # one way; the median round trip, as _timed
    dist.broadcast(figures, group_src=0, group=group)
    latency, big = figures.tolist()
    return NetworkModel("probed", nbytes / max(big - latency, 1e-9), latency,
                        f"probe_network() on this group, {time.strftime('%Y-%m-%d')}")


def node_seconds(flops: float, nbytes: int, dtype: torch.dtype, device: DeviceModel,
                 smallest_dim: Optional[int] = None) -> float:
    """Roofline time of one graph node on ``device`` (see the module docstring);
    ``smallest_dim``: a GEMM's smallest dimension (its shape class), None for a large one."""
    compute = flops / device.flops_per_s(dtype, smallest_dim) if flops else 0.0
    memory = nbytes / (device.bandwidth * device.bandwidth_efficiency)
    return max(compute, memory) + device.kernel_overhead_s


def with_memory(device: DeviceModel, memory_bytes: int) -> DeviceModel:
    """``device`` with another memory size (a probed CPU has none of its own)."""
    return replace(device, memory_bytes=memory_bytes)

