"""Clusters: what the planner knows about the hardware (presets, explicit figures, or this host)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

from fxplan.calibration import Calibration
from fxplan.errors import ClusterError

GiB = 1024**3
# Of a card's memory, this much is left to plans: the rest goes to the CUDA context, NCCL buffers,
# cuBLAS workspaces and allocator fragmentation (a plan at 99 % of the card would not run).
USABLE_FRACTION = 0.92

# Public figures: dense bf16 peak, HBM, the bus bandwidth per GPU that a ring all-reduce reaches
# (nccl-tests' busbw, what `intra_bw` means), one InfiniBand NIC per GPU. Efficiency: fraction of
# peak at matmul size s is max_efficiency * s / (s + half_efficiency_dim). H100 fitted to
# measurements on one H100 (bf16, eager, 4 GPT blocks: 386/532/580/598 TFLOP/s at hidden
# 1024..8192 of a 790 TFLOP/s matmul peak: 418/506/547/584 modelled); A100 uses the same shape with
# its own peak (no measurement at hand).
# Links, from public nccl-tests results:
# - A100 SXM4 NVLink3, 8 GPUs: all_reduce busbw 230-250 GB/s at large sizes (reference table in
#   https://docs.alayanew.com/en/docs/tech-blog/2026-05-06-nccl-tests); 230 GB/s taken.
# - H100 SXM5 NVLink4, 8 GPUs: ~370 GB/s busbw with the ring algorithm, ~480 GB/s with NVLink SHARP
#   (NVLS) for all-reduce (NVIDIA's answer in https://github.com/NVIDIA/nccl-tests/issues/212; ring
#   365-370 GB/s for 2..8 GPUs in https://github.com/NVIDIA/nccl/issues/1455). 370 GB/s taken: the
#   ring figure holds for all-gather / reduce-scatter too, which NVLS does not speed up.
# - Inter-node: one 200 Gb/s HDR NIC per GPU = 25 GB/s (A100 DGX), one 400 Gb/s NDR NIC = 50 GB/s
#   (H100 DGX), line rate per direction.
# - Latency per ring step: small all-reduces take ~45-50 us across 2 nodes of 8 GPUs (nccl-tests
#   output in https://github.com/NVIDIA/nccl/issues/1244: 46-48 us at 4 B..1 KB on 16 H20s); with
#   2 (r - 1) intra steps and 2 (N - 1) inter steps that is about 2 us intra, 8-10 us inter.
_PRESETS = {
    "a100-40g": dict(memory_bytes=40 * GiB * USABLE_FRACTION, peak_flops=312e12, intra_bw=230e9, inter_bw=25e9,
                     intra_latency=2e-6, inter_latency=10e-6, max_efficiency=0.75, half_efficiency_dim=1800),
    "a100-80g": dict(memory_bytes=80 * GiB * USABLE_FRACTION, peak_flops=312e12, intra_bw=230e9, inter_bw=25e9,
                     intra_latency=2e-6, inter_latency=10e-6, max_efficiency=0.75, half_efficiency_dim=1800),
    "h100-80g": dict(memory_bytes=80 * GiB * USABLE_FRACTION, peak_flops=989e12, intra_bw=370e9, inter_bw=50e9,
                     intra_latency=2e-6, inter_latency=8e-6, max_efficiency=0.80, half_efficiency_dim=2700),
}


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """A homogeneous cluster of `nodes` x `devices_per_node` devices."""

    nodes: int = 1
    """Number of hosts."""
    devices_per_node: int = 8
    """Devices (GPUs, or CPU processes for a local gloo run) per host."""
    memory_bytes: float
    """Memory of one device that plans may use, bytes (presets keep 8 % of the card free)."""
    peak_flops: float
    """Dense peak throughput of one device in the training precision, FLOP/s."""
    intra_bw: float
    """Bus bandwidth between devices of one host (per device, one direction), bytes/s."""
    inter_bw: float
    """Bandwidth between hosts per device, bytes/s."""
    intra_latency: float = 5e-6
    """Per-message latency inside a host, s (the alpha of alpha-beta)."""
    inter_latency: float = 10e-6
    """Per-message latency across hosts, s."""
    max_efficiency: float = 0.75
    """Fraction of peak reached by large matmuls."""
    half_efficiency_dim: float = 512
    """Matmul size (geometric mean of m, n, k) at which half of max_efficiency is reached."""
    name: str = "custom"
    """Preset name or 'custom' / 'local'."""
    dtype_bytes: int = 2
    """Bytes per element of parameters and activations in the training precision (bf16: 2)."""
    optimizer_bytes_per_param: int = 12
    """Optimizer state plus master weights per parameter (Adam, mixed precision: fp32 m, v, master)."""
    calibration: Calibration | None = None
    """What `Cluster.local()` measured (fitted collectives, matmul curve, elementwise rate); when set,
    the cost model prices with it instead of the figures above (which then only summarise it)."""

    def __post_init__(self):
        for field in ("nodes", "devices_per_node"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ClusterError(f"Cluster.{field} must be a positive integer, got {value!r}")
        for field in ("memory_bytes", "peak_flops", "intra_bw", "inter_bw", "half_efficiency_dim"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ClusterError(f"Cluster.{field} must be a positive finite number, got {value!r}")
        for field in ("intra_latency", "inter_latency"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ClusterError(f"Cluster.{field} must be a non-negative number, got {value!r}")
        if not 0 < self.max_efficiency <= 1:
            raise ClusterError(f"Cluster.max_efficiency must be in (0, 1], got {self.max_efficiency!r}")
        if self.dtype_bytes not in (1, 2, 4, 8):
            raise ClusterError(f"Cluster.dtype_bytes must be 1, 2, 4 or 8, got {self.dtype_bytes!r}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.devices_per_node

    @staticmethod
    def presets() -> list[str]:
        return sorted(_PRESETS)

    @classmethod
    def preset(cls, name: str, nodes: int = 1, devices_per_node: int = 8, **overrides) -> "Cluster":
        """A cluster of a known device type, e.g. Cluster.preset("a100-80g", nodes=4, devices_per_node=8)."""
        key = str(name).lower()
        if key not in _PRESETS:
            raise ClusterError(f"unknown cluster preset {name!r}; known presets: {', '.join(cls.presets())}")
        fields = {**_PRESETS[key], **overrides}
        return cls(nodes=nodes, devices_per_node=devices_per_node, name=key, **fields)

    @classmethod
    def parse(cls, spec: str) -> "Cluster":
        """'a100-80g:4x8' -> 4 nodes of 8 devices (the CLI's --cluster)."""
        name, _, shape = str(spec).partition(":")
        if not shape:
            return cls.preset(name)
        try:
            nodes, devices = (int(part) for part in shape.lower().split("x"))
        except ValueError:
            raise ClusterError(f"bad cluster {spec!r}: write PRESET:NODESxDEVICES, e.g. a100-80g:4x8") from None
        return cls.preset(name, nodes=nodes, devices_per_node=devices)

    @classmethod
    def local(cls, world_size: int = 4, *, refresh: bool = False) -> "Cluster":
        """This host as a cluster of `world_size` processes: its GPUs (NCCL) or CPU processes (gloo).

        Collectives, matmul throughput and elementwise bandwidth are measured on `world_size` ranks
        (runtime/calibrate.py, a few seconds) and cached per host, backend and world size in
        ~/.cache/fxplan/local.json; `refresh=True` (or `fxplan calibrate`) measures again.
        """
        from fxplan.runtime.probe import measure_local

        if not isinstance(world_size, int) or world_size < 1:
            raise ClusterError(f"Cluster.local(world_size=) must be a positive integer, got {world_size!r}")
        figures = measure_local(world_size, refresh=refresh)
        # a cache written by an older version may hold figures this Cluster no longer has
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(nodes=1, devices_per_node=world_size, name="local",
                   **{k: v for k, v in figures.items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Cluster":
        try:
            data = dict(data)
            if isinstance(data.get("calibration"), dict):
                data["calibration"] = Calibration.from_dict(data["calibration"])
            return cls(**data)
        except TypeError as exc:
            raise ClusterError(f"bad cluster description: {exc}") from None

    def describe(self) -> str:
        return (f"{self.name} {self.nodes}x{self.devices_per_node}: {self.memory_bytes / GiB:.1f} GiB, "
                f"{_si(self.peak_flops, 'FLOP/s')}, intra {_si(self.intra_bw, 'B/s')}, "
                f"inter {_si(self.inter_bw, 'B/s')} per device"
                + (f" (calibrated {self.calibration.date}, noise {self.calibration.noise * 100:.0f} %)"
                   if self.calibration is not None else ""))


def _checked_init(init):
    """Cluster(...) with a missing or misspelled field: a ClusterError naming it, not a TypeError."""
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except TypeError as exc:
            import difflib

            known = [f.name for f in dataclasses.fields(Cluster)]
            required = [f.name for f in dataclasses.fields(Cluster) if f.default is dataclasses.MISSING]
            hints = [f"unknown field {k!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(
                k, known, 1)) else "") for k in kwargs if k not in known]
            hints += [f"missing field {k!r}" for k in required if k not in kwargs]
            raise ClusterError(f"bad Cluster(...): {'; '.join(hints) or exc}; fields are keyword-only: "
                               f"{', '.join(known)} (or use Cluster.preset(name, nodes=, devices_per_node=))") from None
    return __init__


Cluster.__init__ = _checked_init(Cluster.__init__)


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"
