"""Microbenchmarks of this host behind `Cluster.local()`: collectives on the real backend, matmul and
elementwise throughput, per-op overhead; fitted into a `fxplan.calibration.Calibration`.

Collectives run on `world_size` processes (spawned here, or the torchrun job's own ranks when
called inside one), on every group size and layout the cost model places groups on, all groups of
a layout at once (as a plan's tp or dp groups run). Each size is repeated; fits and prices use the
lower quartile of the rounds.
Compute is measured on one rank with the others idle, as the fastest of several repeats (the
uncontended speed of one core, robust to a busy host), then divided among the ranks that share the
cores: 4 single-threaded ranks on 2 cores each get half a core.
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist

from fxplan.calibration import AlphaBeta, Calibration, fit_alpha_beta

DEFAULT_SIZES = (1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22)  # bytes of the full buffer
# measured alongside but left out of the fit: how well alpha-beta predicts sizes it never saw
HELD_OUT = (1 << 15, 3 << 18, 2 << 20)
# Rounds per size: at least REPS, then more while the collectives' time budget lasts, up to
# MAX_REPS. A VM's gloo timings spread by ~90 % (median over minimum): the lower quartile of 15
# rounds moved a held-out size by 20-45 % between runs, of 45 rounds by under 20 %.
REPS = 15
MAX_REPS = 60
COLLECTIVE_BUDGET_S = 12.0
# fxplan's launcher runs one thread per rank (runtime/launch.py), so that is what is measured.
THREADS_PER_RANK = 1


def cores_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cores_per_rank(world_size: int, use_cuda: bool) -> float:
    if use_cuda:
        return 1.0
    return min(float(THREADS_PER_RANK), cores_available() / max(world_size, 1))


# ---------------------------------------------------------------- collectives (every rank)


def layouts(world: int) -> list[tuple[str, list[list[int]]]]:
    """(layout, groups) the cost model places collectives on: the whole world, and for each proper
    divisor s > 1, blocks of s adjacent ranks and s ranks world/s apart."""
    out = [("world", [list(range(world))])] if world > 1 else []
    for s in range(2, world):
        if world % s == 0:
            out.append(("adjacent", [list(range(b, b + s)) for b in range(0, world, s)]))
            stride = world // s
            out.append(("strided", [list(range(t, world, stride)) for t in range(stride)]))
    return out


def _one(kind: str, nbytes: int, group, size: int, device, backend: str):
    """A closure running one `kind` collective of an `nbytes` full buffer (cost-model convention)."""
    numel = max(size, nbytes // 4 // size * size)
    full = torch.ones(numel, device=device)
    piece = torch.ones(numel // size, device=device)
    if kind == "all_reduce":
        return lambda: dist.all_reduce(full, group=group)
    if kind == "all_gather":
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return lambda: gather(full, piece, group=group)
    if kind == "reduce_scatter":
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return lambda: scatter(piece, full, group=group)
    # all_to_all of the whole tensor: each rank holds numel/size; gloo has none, so the runtime
    # gathers every piece and keeps its own (runtime/flat_ops.py): measured as it runs
    local = piece
    sub = torch.ones(local.numel() // size or 1, device=device)
    if backend == "gloo":
        parts = [torch.empty_like(local) for _ in range(size)]
        return lambda: torch.cat([*_gathered(parts, local, group)])
    recv = [torch.empty_like(sub) for _ in range(size)]
    send = [sub.clone() for _ in range(size)]
    return lambda: dist.all_to_all(recv, send, group=group)


def _gathered(parts, local, group):
    dist.all_gather(parts, local, group=group)
    return parts


def _time_calls(fn, reps: int, sync) -> list[float]:
    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _interleaved(sizes, calls, reps: int, sync, agree=None, budget_s: float = 0.0) -> list[tuple[float, ...]]:
    """(nbytes, median, min, lower quartile) per size, the sizes taken in turn in every round: a burst
    of load on the host then slows every size a little instead of one size a lot (which would bend
    the fit). After `reps` rounds, more run while `budget_s` lasts (up to MAX_REPS); `agree` turns
    this rank's count of extra rounds into the one its group uses, so every rank runs as many."""
    times: list[list[float]] = [[] for _ in sizes]
    for fn in calls:
        fn()
    sync()
    start = time.perf_counter()

    def rounds(n):
        for _ in range(n):
            for i, fn in enumerate(calls):
                t0 = time.perf_counter()
                fn()
                sync()
                times[i].append(time.perf_counter() - t0)

    rounds(reps)
    if agree is not None and budget_s > 0:
        per_round = (time.perf_counter() - start) / max(reps, 1)
        left = budget_s - (time.perf_counter() - start)
        rounds(agree(max(0, min(MAX_REPS - reps, int(left / max(per_round, 1e-9))))))
    return [(float(b), statistics.median(t), min(t), _low(t)) for b, t in zip(sizes, times)]


def _agree_min(device):
    """The smallest count over the world: every group of a layout measures at once, and groups that
    stopped early would leave the others a quieter host."""
    def agree(n: int) -> int:
        box = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(box, op=dist.ReduceOp.MIN)
        return int(box.item())
    return agree


def _low(times: list[float]) -> float:
    """The lower quartile: what a call takes when the host lets it run (a busy host's bursts make
    the upper half slow, not the lower quarter), yet not the single luckiest call."""
    ordered = sorted(times)
    return ordered[(len(ordered) - 1) // 4]


def collective_points(world: int, sizes=DEFAULT_SIZES, reps: int = REPS, kinds=None,
                      budget_s: float = COLLECTIVE_BUDGET_S) -> dict:
    """On every rank of the default group: {(kind, size, layout): [(nbytes, median s, min s)]}, as
    this rank measured (the caller keeps rank 0's). Collective over the world: every rank calls it."""
    rank = dist.get_rank()
    backend = str(dist.get_backend()).lower()
    use_cuda = "nccl" in backend
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if use_cuda else (lambda: None)
    kinds = kinds or ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
    out: dict = {}
    budget_s = budget_s / (len(layouts(world)) * len(kinds) + 1)  # per measured set, send/recv's too
    for layout, groups in layouts(world):
        handles = [dist.new_group(g) if layout != "world" else None for g in groups]
        mine = next(i for i, g in enumerate(groups) if rank in g)
        group, size = handles[mine], len(groups[mine])
        for kind in kinds:
            calls = [_one(kind, nbytes, group, size, device, backend) for nbytes in sizes]
            out[(kind, size, layout)] = _interleaved(sizes, calls, reps, sync, _agree_min(device), budget_s)
        dist.barrier()
    out.update(_send_recv_points(world, sizes, reps, device, sync, budget_s))
    return out


def _send_recv_points(world: int, sizes, reps: int, device, sync, budget_s: float = 0.0) -> dict:
    """Ping-pong between ranks 2i and 2i+1 (all pairs at once): one message = half a round trip."""
    rank = dist.get_rank()
    if world < 2:
        return {}
    peer = rank ^ 1
    if peer >= world:  # odd world: the last rank sits out
        dist.barrier()
        return {}
    calls = []
    for nbytes in sizes:
        buf = torch.ones(max(1, nbytes // 4), device=device)

        def pingpong(buf=buf):
            if rank % 2 == 0:
                dist.send(buf, peer)
                dist.recv(buf, peer)
            else:
                dist.recv(buf, peer)
                dist.send(buf, peer)
        calls.append(pingpong)
    def agree(n: int) -> int:  # the even rank of each pair decides
        box = torch.tensor([n], dtype=torch.int64, device=device)
        if rank % 2 == 0:
            dist.send(box, peer)
        else:
            dist.recv(box, peer)
        return int(box.item())

    pts = [tuple(x / 2 for x in p[1:]) for p in _interleaved(sizes, calls, reps, sync, agree, budget_s)]
    pts = [(float(b), *p) for b, p in zip(sizes, pts)]
    dist.barrier()
    return {("send_recv", 2, "adjacent"): pts}


def fit_points(points: dict, held_out=()) -> tuple[AlphaBeta, ...]:
    """alpha-beta per (kind, size, layout) on the lower quartiles of the sizes not in `held_out`;
    the held-out ones are kept beside the fit as its check."""
    held = {float(b) for b in held_out}
    fits = []
    for (kind, size, layout), pts in sorted(points.items()):
        alpha, beta = fit_alpha_beta([(p[0], p[3]) for p in pts if p[0] not in held])
        fits.append(AlphaBeta(kind=kind, size=size, layout=layout, alpha=alpha, beta=beta,
                              points=tuple(tuple(p) for p in pts if p[0] not in held),
                              held_out=tuple(tuple(p) for p in pts if p[0] in held)))
    return tuple(fits)


# ---------------------------------------------------------------- compute (one rank)


def _matmul_shapes(use_cuda: bool) -> list[tuple[int, int, int]]:
    if use_cuda:
        squares = (256, 512, 1024, 2048, 4096, 8192)
        rects = ((8192, 1024, 4096), (8192, 4096, 1024), (16384, 8192, 8192))
    else:
        squares = (32, 64, 128, 256, 384, 512)
        rects = ((2048, 256, 256), (2048, 1024, 256), (512, 64, 64), (1024, 128, 512), (4096, 64, 256))
    return [(s, s, s) for s in squares] + list(rects)


def compute_figures(use_cuda: bool, share: float, budget_s: float = 4.0) -> dict:
    """matmul curve, elementwise rate, op overhead for one rank holding `share` of a device."""
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    sync = torch.cuda.synchronize if use_cuda else (lambda: None)
    threads = torch.get_num_threads()
    if not use_cuda:
        torch.set_num_threads(THREADS_PER_RANK)
    spreads = []
    try:
        curve: dict[float, list[float]] = {}
        shapes = _matmul_shapes(use_cuda)
        for m, n, k in shapes:
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            reps = max(3, min(30, int(budget_s / 3 / len(shapes) / max(2 * m * n * k / 5e10, 1e-5))))
            t = _time_calls(lambda: a @ b, reps, sync)
            spreads.append(statistics.median(t) / min(t) - 1)
            curve.setdefault(round((m * n * k) ** (1 / 3)), []).append(2.0 * m * n * k / min(t) * share)
        x = torch.randn(4096, 256, device=device, dtype=dtype)
        y = torch.randn_like(x)
        ln = torch.nn.LayerNorm(256, device=device, dtype=dtype)
        # flops.py's counts: add/mul 1 per element, gelu 4, layer norm 5, softmax 5
        mix = ((lambda: x + y, 1), (lambda: x * y, 1), (lambda: torch.nn.functional.gelu(x), 4),
               (lambda: ln(x), 5), (lambda: torch.softmax(x, -1), 5))
        flops = total = 0.0
        with torch.no_grad():
            for fn, per in mix:
                t = _time_calls(fn, 10, sync)
                spreads.append(statistics.median(t) / min(t) - 1)
                flops += per * x.numel()
                total += min(t)
        overhead = _op_overhead(device, sync)
    finally:
        torch.set_num_threads(threads)
    return dict(matmul_curve=tuple(sorted((float(s), statistics.median(r)) for s, r in curve.items())),
                elementwise_flops=flops / total * share, op_overhead_s=overhead / share, spreads=spreads)


def _op_overhead(device, sync, repeat: int = 4) -> float:
    """Forward + backward of a transformer block's op mix on tiny tensors (linear, layer norm, gelu,
    views, transpose, softmax, residual add, dropout-free), per op and per third (the cost model
    charges an op once in forward and twice in backward): what eager dispatch and autograd cost
    per op when the arithmetic is free."""
    f = torch.nn.functional
    x0 = torch.randn(2, 4, 8, device=device, requires_grad=True)
    w = torch.randn(8, 8, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    g = torch.ones(8, device=device, requires_grad=True)

    def step():
        x = x0
        for _ in range(repeat):
            h = f.layer_norm(x, (8,), g, b)                  # 1
            q = f.linear(h, w, b)                            # 2
            s = q.view(2, 4, 2, 4).transpose(1, 2)           # 3, 4
            a = torch.softmax(s @ s.transpose(-1, -2), -1)   # 5, 6, 7
            o = (a @ s).transpose(1, 2).reshape(2, 4, 8)     # 8, 9, 10
            x = x + f.gelu(f.linear(o, w)) * 0.5             # 11, 12, 13, 14
        x.sum().backward()
    return min(_time_calls(step, 20, sync)) / (3 * 14 * repeat)


# ---------------------------------------------------------------- the whole calibration


def calibrate_in_group(world: int, sizes=DEFAULT_SIZES, reps: int = REPS, held_out=HELD_OUT) -> Calibration:
    """Collective over an initialised default group of `world` ranks; every rank returns rank 0's
    figures (so ranks never diverge)."""
    start = time.perf_counter()
    backend = str(dist.get_backend()).lower()
    use_cuda = "nccl" in backend
    points = collective_points(world, tuple(sorted({*sizes, *held_out})), reps)
    figures = None
    if dist.get_rank() == 0:
        share = cores_per_rank(world, use_cuda)
        figures = compute_figures(use_cuda, share / THREADS_PER_RANK if not use_cuda else 1.0)
        spreads = figures.pop("spreads") + [p[1] / p[2] - 1 for pts in points.values() for p in pts]
        figures = dict(
            host=socket.gethostname(), backend=backend, world_size=world,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            collectives=fit_points(points, held_out), cores_per_rank=share, threads_per_rank=THREADS_PER_RANK,
            noise=statistics.median(spreads) if spreads else 0.0,
            load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
            seconds=time.perf_counter() - start, **figures)
    box = [figures]
    dist.broadcast_object_list(box, src=0)
    return Calibration(**box[0])


def _spawned(rank: int, world: int, port: int, backend: str, queue, sizes, reps, held_out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(THREADS_PER_RANK)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        cal = calibrate_in_group(world, sizes, reps, held_out)
        if rank == 0:
            queue.put(cal.to_dict())
    finally:
        dist.destroy_process_group()


def calibrate(world_size: int, sizes=DEFAULT_SIZES, reps: int = REPS, held_out=HELD_OUT) -> Calibration:
    """Measure this host for `world_size` ranks: inside a torchrun job of that size on its own
    ranks (every rank must call it), otherwise on `world_size` freshly spawned processes."""
    import torch.multiprocessing as mp

    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    backend = "nccl" if use_cuda else "gloo"
    if world_size == 1:
        figures = compute_figures(use_cuda, 1.0 if use_cuda else cores_per_rank(1, False))
        spreads = figures.pop("spreads")
        return Calibration(
            host=socket.gethostname(), backend=backend, world_size=1,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            collectives=(), cores_per_rank=1.0 if use_cuda else cores_per_rank(1, False),
            threads_per_rank=THREADS_PER_RANK, noise=statistics.median(spreads),
            load_average=os.getloadavg()[0], seconds=0.0, **figures)
    from fxplan.runtime.process import in_torchrun, init_default_group

    if in_torchrun() and int(os.environ["WORLD_SIZE"]) == world_size:
        # inside the job: measure on its own ranks (spawning more would oversubscribe the host,
        # and ranks measuring apart could plan with different figures)
        init_default_group()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == world_size:
        return calibrate_in_group(world_size, sizes, reps, held_out)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_spawned, args=(r, world_size, port, backend, queue, sizes, reps, held_out), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        result = queue.get(timeout=180)
    except Exception:  # noqa: BLE001 - queue.Empty: a rank died or hung; reported below
        result = None
    for p in procs:
        p.join(timeout=30 if result is not None else 1)
        if p.is_alive():
            p.kill()
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if result is None:
        from fxplan.errors import ClusterError
        raise ClusterError(f"calibrating {world_size} local ranks failed (ranks {failed} exited abnormally); "
                           f"run `fxplan calibrate --world-size {world_size}` to see the error, or pass an "
                           f"explicit fxplan.Cluster(...)")
    return Calibration.from_dict(result)
