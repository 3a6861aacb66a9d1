"""Quick measurements of this host for Cluster.local(), cached per host and world size."""

from __future__ import annotations

import json
import os
import time

_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fxplan", "local.json")



def measure_local(world_size: int, refresh: bool = False) -> dict:
    import torch

    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    key = f"{'cuda' if use_cuda else 'cpu'}:{world_size}:{torch.__version__}"
    cache = {}
    if os.path.exists(_CACHE):
        try:
            with open(_CACHE) as fh:
                cache = json.load(fh)
        except (OSError, ValueError):
            cache = {}
    if key in cache and not refresh:
        return cache[key]
    if use_cuda:
        dev = torch.device("cuda", 0)
        memory = torch.cuda.get_device_properties(0).total_memory * 0.9
        dtype = torch.bfloat16
    else:
        dev = torch.device("cpu")
        page = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory = page * 0.6 / world_size
        dtype = torch.float32
    n = 1024 if use_cuda else 512
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    threads = torch.get_num_threads()
    if not use_cuda:
        # Each gloo rank gets a share of the cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    for _ in range(2):
        a @ b
    if use_cuda:
        torch.cuda.synchronize()
    reps = 20 if use_cuda else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if use_cuda:
        torch.cuda.synchronize()
    flops = 2 * n**3 * reps / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    # Memory copy bandwidth stands in for the interconnect of local processes (shared memory).
    x = torch.empty(16 * 1024 * 1024 // 4, device=dev)
    y = torch.empty_like(x)
    start = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    if use_cuda:
        torch.cuda.synchronize()
    copy_bw = 5 * x.numel() * 4 / (time.perf_counter() - start)
    figures = dict(
        memory_bytes=float(memory),
        peak_flops=float(flops),
        intra_bw=float(copy_bw / (4 if not use_cuda else 1)),
        inter_bw=float(copy_bw / (4 if not use_cuda else 1)),
        intra_latency=50e-6 if not use_cuda else 10e-6,
        inter_latency=50e-6 if not use_cuda else 10e-6,
        max_efficiency=1.0,
        half_efficiency_dim=64.0,
        dtype_bytes=2 if use_cuda else 4,
        optimizer_bytes_per_param=12 if use_cuda else 8,
    )
    cache[key] = figures
    try:
        os.makedirs(os.path.dirname(_CACHE), exist_ok=True)
        with open(_CACHE, "w") as fh:
            json.dump(cache, fh, indent=1)
    except OSError:
        pass
    return figures
