"""A host's measured cost table: what `Cluster.local()` measured and the cost model prices with.

Collectives are fitted as alpha + beta * bytes per (collective, group size), on the same byte
convention as the cost model (`nbytes` = the full buffer: the all-reduced tensor, the all-gather's
output, the reduce-scatter's input, the all-to-all's whole tensor; a send's message). Compute is a
matmul throughput curve over matmul size (geometric mean of m, n, k), an elementwise rate in the
FLOPs that `passes/cost/flops.py` counts for non-matmul ops, and a per-op dispatch overhead.
Everything is hashable (tuples), so a `Cluster` holding one stays a frozen, hashable value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import cached_property

COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


@dataclass(frozen=True)
class AlphaBeta:
    """One fitted collective on `size` ranks laid out as `layout` ("adjacent": ranks next to each
    other, "strided": ranks apart, "world": every rank).

    `alpha` + `beta` * nbytes is the fit over every measured size: the latency and bandwidth the
    table prints. Backends switch algorithm with the message size (gloo's ring vs. direct sends,
    cache-resident vs. streaming buffers), so one line misses the middle sizes by 15-25 % on a
    quiet VM. `time` therefore prices piecewise: between two measured sizes the segment's own
    alpha-beta (the line through their lower quartiles), at or below the smallest size its time
    (latency-bound), above the largest the tail's bandwidth."""

    kind: str
    size: int
    layout: str
    alpha: float  # s
    beta: float  # s per byte
    points: tuple[tuple[float, ...], ...] = ()  # fitted on: (nbytes, median s, min s, lower quartile s)
    held_out: tuple[tuple[float, ...], ...] = ()  # measured alike, left out of the fit: its check

    def time(self, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        knots = self._knots
        if len(knots) < 2:
            return self.alpha + self.beta * nbytes
        if nbytes <= knots[0][0]:
            return knots[0][1]
        for (x0, t0), (x1, t1) in zip(knots, knots[1:]):
            if nbytes <= x1:
                return t0 + (t1 - t0) * (nbytes - x0) / (x1 - x0)
        x_last, t_last = knots[-1]
        return t_last + self._tail_beta * (nbytes - x_last)

    @cached_property
    def _knots(self) -> tuple[tuple[float, float], ...]:
        """(nbytes, lower-quartile s) of the fitted sizes, made non-decreasing from the top: a small
        message is never priced above a larger one (the smallest size, measured right after the
        largest in each round, reads slow on a CPU host; its latency is the next size's)."""
        knots: list[tuple[float, float]] = []
        for x, t in sorted(((p[0], p[3]) for p in self.points if p[3] > 0), reverse=True):
            if not knots or x < knots[-1][0]:
                knots.append((x, min(t, knots[-1][1]) if knots else t))
        return tuple(reversed(knots))

    @cached_property
    def _tail_beta(self) -> float:
        """Seconds per byte beyond the largest size: the fit over the three largest sizes (the
        bandwidth-bound end), or the overall beta when that fit is degenerate."""
        _, beta = fit_alpha_beta(list(self._knots[-3:]))
        return beta if beta > 0 else self.beta

    def held_out_errors(self) -> tuple[float, ...]:
        """|fitted - measured| / measured (lower quartiles) at each held-out size."""
        return tuple(abs(self.time(p[0]) - p[3]) / p[3] for p in self.held_out if p[3] > 0)

    @property
    def bandwidth(self) -> float:
        return 1.0 / self.beta if self.beta > 0 else math.inf


@dataclass(frozen=True)
class Calibration:
    """What one host measured: per-collective fits, the matmul curve, elementwise and op overhead."""

    host: str
    backend: str
    world_size: int
    date: str  # ISO 8601, UTC
    collectives: tuple[AlphaBeta, ...]
    matmul_curve: tuple[tuple[float, float], ...]  # (size, FLOP/s per rank), sorted by size
    elementwise_flops: float  # non-matmul FLOP/s per rank (flops.py's counting)
    op_overhead_s: float  # dispatch time of one tiny op, per rank
    cores_per_rank: float  # CPU cores (or GPUs) one rank has to itself; < threads: oversubscribed
    threads_per_rank: int
    noise: float  # median over all measurements of (median - min) / min: 0 on a quiet host
    load_average: float  # 1-minute load average while measuring (CPU hosts)
    seconds: float  # how long the measurement took
    notes: tuple[str, ...] = field(default=())

    # ------------------------------------------------------------ lookups
    def fit(self, kind: str, size: int) -> AlphaBeta | None:
        """The slowest fit of `kind` on groups of `size` ranks (the cost model prices the slowest group)."""
        fits = [f for f in self.collectives if f.kind == kind and f.size == size]
        if not fits:
            return None
        return max(fits, key=lambda f: f.time(1 << 20))

    def matmul_rate(self, size: float) -> float:
        """FLOP/s per rank of a matmul of `size` (geometric mean of m, n, k): log-log interpolation of
        the measured curve, flat beyond its ends."""
        curve = self.matmul_curve
        if not curve:
            return 0.0
        x = math.log(max(size, 1.0))
        if x <= math.log(curve[0][0]):
            return curve[0][1]
        for (s0, r0), (s1, r1) in zip(curve, curve[1:]):
            if x <= math.log(s1):
                w = (x - math.log(s0)) / max(math.log(s1) - math.log(s0), 1e-12)
                return math.exp(math.log(r0) * (1 - w) + math.log(r1) * w)
        return curve[-1][1]

    @property
    def peak_matmul_rate(self) -> float:
        return max((r for _, r in self.matmul_curve), default=0.0)

    # ------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        data = dict(data)
        data["collectives"] = tuple(
            AlphaBeta(**{**f, "points": tuple(tuple(p) for p in f.get("points", ())),
                          "held_out": tuple(tuple(p) for p in f.get("held_out", ()))}) for f in data["collectives"])
        data["matmul_curve"] = tuple(tuple(p) for p in data["matmul_curve"])
        data["notes"] = tuple(data.get("notes", ()))
        return cls(**data)

    def table(self) -> str:
        """The fitted table, as `fxplan calibrate` prints it."""
        lines = [f"calibration of {self.host} ({self.backend}, {self.world_size} ranks) at {self.date}, "
                 f"{self.seconds:.1f} s; noise {self.noise * 100:.1f} % (median (median-min)/min), "
                 f"load average {self.load_average:.2f}",
                 f"cores per rank {self.cores_per_rank:.2f} ({self.threads_per_rank} thread(s) per rank)",
                 f"{'collective':<15} {'ranks':>5} {'layout':<9} {'alpha us':>9} {'bw GB/s':>9} "
                 f"{'held-out err':>12}  measured (lower quartile) / fitted at each size, * held out"]
        for f in sorted(self.collectives, key=lambda f: (f.kind, f.size, f.layout)):
            pts = "  ".join(f"{_kib(p[0])}{'*' if p in f.held_out else ''}:{p[3] / f.time(p[0]):.2f}"
                            for p in sorted(f.points + f.held_out))
            errs = f.held_out_errors()
            err = f"{max(errs) * 100:>11.0f}%" if errs else f"{'-':>12}"
            lines.append(f"{f.kind:<15} {f.size:>5} {f.layout:<9} {f.alpha * 1e6:>9.1f} "
                         f"{f.bandwidth / 1e9:>9.3f} {err}  {pts}")
        curve = "  ".join(f"{s:.0f}:{r / 1e9:.1f}" for s, r in self.matmul_curve)
        lines.append(f"matmul GFLOP/s per rank by size (geomean m,n,k): {curve}")
        lines.append(f"elementwise {self.elementwise_flops / 1e9:.2f} GFLOP/s per rank; "
                     f"op overhead {self.op_overhead_s * 1e6:.1f} us")
        lines.extend(self.notes)
        return "\n".join(lines)


def _kib(nbytes: float) -> str:
    return f"{nbytes / 1024:.0f}K" if nbytes < 1 << 20 else f"{nbytes / (1 << 20):.0f}M"


def fit_alpha_beta(points: list[tuple[float, float]]) -> tuple[float, float]:
    """alpha, beta of time = alpha + beta * bytes, least squares on RELATIVE error (so small messages
    count as much as large ones); both kept non-negative."""
    if not points:
        return 0.0, 0.0
    # minimise sum ((a + b x - t) / t)^2: weighted least squares with weights 1/t^2
    sw = swx = swxx = swt = swxt = 0.0
    for x, t in points:
        w = 1.0 / max(t, 1e-12) ** 2
        sw += w
        swx += w * x
        swxx += w * x * x
        swt += w * t
        swxt += w * x * t
    det = sw * swxx - swx * swx
    if det <= 0:
        return max(points[0][1], 0.0), 0.0
    b = (sw * swxt - swx * swt) / det
    a = (swt - b * swx) / sw
    if b < 0:
        return sum(t for _, t in points) / len(points), 0.0
    if a < 0:
        b = swxt / swxx if swxx > 0 else 0.0
        return 0.0, max(b, 0.0)
    return a, b
