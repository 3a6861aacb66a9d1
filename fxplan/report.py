"""Pictures of plans (matplotlib, headless)."""

from __future__ import annotations

from fxplan.plan import Plan


def draw_plan(plan: Plan, path: str) -> None:
    """One row per stage, one box per layer, coloured by its strategy; written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({str(s) for stage in plan.stages for s in stage.strategies.values()})
    colours = {label: plt.cm.tab20(i % 20) for i, label in enumerate(labels)}
    n_layers = max(len(plan.layers), 1)
    fig, ax = plt.subplots(figsize=(min(max(8, 4 + n_layers * 0.25), 24), 1.8 + 0.6 * len(plan.stages)))
    x = 0
    for stage in plan.stages:
        for name in stage.layers:
            label = str(stage.strategies[name])
            ax.barh(stage.index, 1, left=x, color=colours[label], edgecolor="black", linewidth=0.3)
            x += 1
    for label, colour in colours.items():
        ax.barh(0, 0, color=colour, label=label)
    ax.set_yticks(range(len(plan.stages)))
    ax.set_yticklabels([f"stage {s.index}\nranks {s.devices[0]}-{s.devices[-1]}" for s in plan.stages])
    ax.invert_yaxis()
    ax.set_xlabel("layers in pipeline order")
    chunks = f" x {plan.chunks} chunks per rank" if plan.chunks > 1 else ""
    ax.set_title(f"pp={plan.pp}{chunks}, {plan.microbatches} microbatches, {plan.schedule}: "
                 f"{plan.estimated_iteration_s * 1e3:.2f} ms / iteration (estimated)", fontsize=10)
    rows = (len(labels) + 3) // 4
    fig.legend(loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.06 * rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
