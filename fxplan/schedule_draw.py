"""Pictures of a simulated pipeline schedule: a PNG timeline (matplotlib, headless) and a chrome trace.

One row per pipeline rank, one box per action of one iteration at its simulated start and length,
coloured by pass (F, I, W, fused B), the microbatch number inside (chunk.microbatch with several
chunks per rank), a legend, and the bubble in the title. The first stage's I passes take no time
(its whole backward runs in W): they show as thin ticks without a number.
"""

from __future__ import annotations

import json

from fxplan.errors import FxplanError
from fxplan.schedules import SimResult

COLOURS = {"F": "#4c78a8", "I": "#f58518", "B": "#e45756", "W": "#54a24b"}
LABELS = {"F": "F forward", "I": "I input gradient", "W": "W weight gradient", "B": "B fused backward"}


def _label(result: SimResult, event) -> str:
    a = event.action
    if result.chunks == 1:
        return str(a.microbatch)
    chunk = result.schedule.placement.stages_of(event.rank).index(a.stage)
    return f"{chunk}.{a.microbatch}"


def timeline_figure(result: SimResult, title: str | None = None, unit: str = ""):
    """(figure, axes) of the timeline; drawn, not saved."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise FxplanError("drawing a schedule needs matplotlib: pip install matplotlib") from None
    end = max(e.end for e in result.events)
    fig, ax = plt.subplots(figsize=(min(max(8.0, 0.35 * len(result.events) / result.stages), 26),
                                    1.3 + 0.55 * result.stages))
    for e in result.events:
        empty = e.end - e.start <= 1e-9 * end  # the first stage's I: a tick in its colour, no number
        ax.broken_barh([(e.start, e.end - e.start)], (e.rank - 0.4, 0.8), facecolors=COLOURS[e.action.kind],
                       edgecolors=COLOURS[e.action.kind] if empty else "black", linewidth=1.5 if empty else 0.4)
        if not empty:
            ax.text(e.start + (e.end - e.start) / 2, e.rank, _label(result, e), ha="center", va="center",
                    fontsize=7, color="white")
    ax.set_yticks(range(result.stages))
    ax.set_yticklabels([f"stage {r}" if result.chunks == 1 else f"rank {r}" for r in range(result.stages)])
    ax.set_ylim(result.stages - 0.5, -0.5)
    ax.set_xlim(0, end * 1.01)
    ax.set_xlabel(f"time{f' ({unit})' if unit else ''}")
    kinds = [k for k in ("F", "I", "W", "B") if any(e.action.kind == k for e in result.events)]
    ax.legend(handles=[Patch(facecolor=COLOURS[k], edgecolor="black", label=LABELS[k]) for k in kinds],
              loc="upper center", bbox_to_anchor=(0.5, -0.28 if result.stages < 4 else -0.16), ncol=len(kinds),
              fontsize=8, frameon=False)
    ax.set_title(title or (f"{result.name}: {result.stages} stages, {result.microbatches} microbatches"
                           f"{f', {result.chunks} chunks per rank' if result.chunks > 1 else ''} — "
                           f"bubble {result.bubble_rate:.1%}, steady-state iteration {result.iteration_time:.4g}"
                           f"{f' {unit}' if unit else ''}"), fontsize=10)
    fig.tight_layout()
    return fig, ax


def draw_timeline(result: SimResult, path: str, title: str | None = None, unit: str = "") -> None:
    import matplotlib.pyplot as plt

    fig, _ = timeline_figure(result, title, unit)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def chrome_trace(result: SimResult, scale_to_us: float = 1e6) -> dict:
    """Chrome trace JSON (chrome://tracing, Perfetto): one thread per rank, one complete event per
    action; times are taken as seconds and written in microseconds."""
    events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": f"{result.name} (simulated)"}}]
    events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"stage {r}"}}
               for r in range(result.stages)]
    for e in result.events:
        a = e.action
        events.append({"name": f"{a.kind}{a.microbatch}", "cat": a.kind, "ph": "X", "pid": 0, "tid": e.rank,
                       "ts": e.start * scale_to_us, "dur": (e.end - e.start) * scale_to_us,
                       "args": {"stage": a.stage, "microbatch": a.microbatch}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"bubble_rate": result.bubble_rate, "iteration_time": result.iteration_time}}


def write_chrome_trace(result: SimResult, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(chrome_trace(result), fh)


def draw_plan_schedule(plan, path: str) -> None:
    """A plan's schedule at its estimated pass times (ms), as its ranks will run it."""
    from fxplan import schedules

    times = dict(plan.assumptions.get(schedules.TIMES_KEY) or {})
    ms = lambda v: [x * 1e3 for x in v] if isinstance(v, (list, tuple)) else v * 1e3
    r = schedules.simulate(plan.schedule, plan.pp, plan.microbatches, t_f=ms(times.get("t_f", 1e-3)),
                           t_b=ms(times.get("t_b", 1e-3)), t_w=ms(times.get("t_w", 1e-3)),
                           t_comm=ms(times.get("t_comm", 0.0)), memory_limit=times.get("memory_limit"))
    draw_timeline(r, path, unit="ms", title=(
        f"plan pp={plan.pp}, {plan.microbatches} microbatches, {plan.schedule} at estimated pass times: "
        f"bubble {r.bubble_rate:.1%}, iteration {r.iteration_time:.3g} ms"))
