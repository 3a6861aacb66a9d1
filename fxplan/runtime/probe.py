"""The host measurements behind `Cluster.local()`: a calibration (runtime/calibrate.py) cached per
host, backend, world size and torch version in ~/.cache/fxplan/local.json, with its date and noise,
turned into the figures a `Cluster` holds."""

from __future__ import annotations

import json
import os
import socket

from fxplan.calibration import Calibration

CACHE_VERSION = 2
_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fxplan", "local.json")


def cache_path() -> str:
    return os.environ.get("FXPLAN_CALIBRATION_CACHE", _CACHE)


def _use_cuda(world_size: int) -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= world_size


def cache_key(world_size: int) -> str:
    import torch

    backend = "nccl" if _use_cuda(world_size) else "gloo"
    return f"v{CACHE_VERSION}|{socket.gethostname()}|{backend}|{world_size}|{torch.__version__}"


def _read_cache() -> dict:
    try:
        with open(cache_path()) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_calibration(world_size: int) -> Calibration | None:
    entry = _read_cache().get(cache_key(world_size))
    if not isinstance(entry, dict):
        return None
    try:
        return Calibration.from_dict(entry)
    except (TypeError, KeyError, ValueError):
        return None  # written by another version: measure again


def local_calibration(world_size: int, refresh: bool = False) -> Calibration:
    """The cached calibration of this host for `world_size` ranks, measured when absent or `refresh`.

    Inside a torchrun job every rank must call this alike: a missing cache is measured on the job's
    own ranks and rank 0's figures are shared, so the ranks never plan with different figures."""
    from fxplan.runtime.calibrate import calibrate

    cal = None if refresh else cached_calibration(world_size)
    if cal is None:
        cal = calibrate(world_size)
        cache = _read_cache()
        cache[cache_key(world_size)] = cal.to_dict()
        try:
            os.makedirs(os.path.dirname(cache_path()), exist_ok=True)
            tmp = f"{cache_path()}.{os.getpid()}"
            with open(tmp, "w") as fh:
                json.dump(cache, fh, indent=1)
            os.replace(tmp, cache_path())  # ranks writing at once never leave half a file
        except OSError:
            pass
    return cal


def measure_local(world_size: int, refresh: bool = False) -> dict:
    """`Cluster` fields of this host as `world_size` ranks, the calibration among them."""
    cal = local_calibration(world_size, refresh)
    use_cuda = cal.backend == "nccl"
    if use_cuda:
        import torch

        memory = torch.cuda.get_device_properties(0).total_memory * 0.9
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.6 / world_size
    figures = dict(
        memory_bytes=float(memory),
        peak_flops=float(cal.peak_matmul_rate),
        max_efficiency=1.0,
        half_efficiency_dim=_half_efficiency(cal),
        dtype_bytes=2 if use_cuda else 4,
        optimizer_bytes_per_param=12 if use_cuda else 8,
        calibration=cal,
    )
    figures.update(_link_figures(cal))
    return figures


def _link_figures(cal: Calibration) -> dict:
    """Ring-equivalent bandwidth and latency of the world all-reduce: what the figure-based model
    uses for groups the calibration did not measure."""
    fit = cal.fit("all_reduce", cal.world_size)
    if fit is None or cal.world_size < 2:
        return dict(intra_bw=1e10, inter_bw=1e10, intra_latency=10e-6, inter_latency=10e-6)
    n = cal.world_size
    bw = 2 * (n - 1) / n / fit.beta if fit.beta > 0 else 1e12
    latency = fit.alpha / (2 * (n - 1))
    return dict(intra_bw=bw, inter_bw=bw, intra_latency=latency, inter_latency=latency)


def _half_efficiency(cal: Calibration) -> float:
    """The size where the measured curve reaches half its peak (for describe() and the formula
    the presets use), read off the curve."""
    peak = cal.peak_matmul_rate
    for size, rate in cal.matmul_curve:
        if rate >= peak / 2:
            return max(float(size), 1.0)
    return 64.0
