"""What a Runner measured beside what its plan estimated: step time per rank and the error.

The runner records every train_step's wall time on its rank (forward, backward, gradient
synchronisation: what `estimated_iteration_s` covers; the optimizer step runs outside it). The
report leaves out the first step (it builds pipelines and buffers) and takes the median of the
rest; `report` is collective (every rank calls it, as every rank runs the same script) and every
rank gets the same table.
"""

from __future__ import annotations

import statistics
import time

import torch.distributed as dist


class StepTimes:
    """Wall seconds of each train_step on this rank."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None

    def steady(self) -> float | None:
        """Median step time without the first step (or the only one), None before any step."""
        if not self.seconds:
            return None
        return statistics.median(self.seconds[1:] or self.seconds)


def report(plan, rank: int, times: StepTimes) -> str:
    """Per rank: stage, measured step time, the plan's estimate and the error; then the slowest rank
    (a step ends when its slowest rank does) against the estimate."""
    mine = (rank, times.steady(), len(times.seconds))
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, mine)
    est = plan.estimated_iteration_s
    stage_of = {r: s.index for s in plan.stages for r in s.devices}
    lines = [f"fxplan step report: plan estimate {est * 1e3:.2f} ms per train_step "
             f"(first step left out; median of the rest)",
             f"{'rank':>4} {'stage':>5} {'steps':>5} {'measured ms':>12} {'estimated ms':>13} {'error':>8}"]
    measured = [r for r in rows if r[1] is not None]
    for r, t, n in sorted(rows):
        if t is None:
            lines.append(f"{r:>4} {stage_of.get(r, '?'):>5} {n:>5} {'-':>12} {est * 1e3:>13.2f} {'-':>8}")
        else:
            lines.append(f"{r:>4} {stage_of.get(r, '?'):>5} {n:>5} {t * 1e3:>12.2f} {est * 1e3:>13.2f} "
                         f"{(est - t) / t * 100:>+7.1f}%")
    if measured:
        slowest = max(t for _, t, _ in measured)
        lines.append(f"step (slowest rank): measured {slowest * 1e3:.2f} ms, estimated {est * 1e3:.2f} ms, "
                     f"error {(est - slowest) / slowest * 100:+.1f}%")
    else:
        lines.append("no train_step has run yet: nothing measured")
    return "\n".join(lines)
