"""The planner table of BENCHMARKS.md: miqp against the grid baseline on large presets.

    .venv/bin/python bench/planner_table.py [--time-limit 10] [--clusters 1x8,4x8,8x8,128x8]

For each model (GPT-3 1.3B/13B/175B, Llama-2 7B/70B, BERT-Huge, ViT-Huge, an uneven MLP) and each
a100-80g cluster, plans with miqp and grid (same cost model, analytic: no calibration) and prints
one markdown row: search seconds, estimated iteration time and peak memory per device, the
solver's global gap, and grid/miqp (>= 1: miqp's plan is estimated faster). Meta models: nothing
is allocated. Small miqp-vs-exhaustive checks are bench/plan_bench.py's section 3.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MODELS = [("gpt3-1.3b", 512), ("gpt3-13b", 512), ("gpt3-175b", 1536), ("llama2-7b", 512), ("llama2-70b", 1024),
          ("bert-huge", 1024), ("vit-huge", 1024), ("uneven", 1024)]


def _model(name: str, batch: int):
    from fxplan.models import build, example_batch

    if name == "uneven":
        from plan_bench import _uneven

        return _uneven([4096, 32768] + [4096] * 7, batch, 1024)
    model = build(name, device="meta")
    return model, example_batch(model, batch, device="meta")


def main(argv=None) -> int:
    import fxplan

    sys.path.insert(0, HERE)
    parser = argparse.ArgumentParser()
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--clusters", default="1x8,4x8,8x8,128x8")
    args = parser.parse_args(argv)
    print("| model | batch | cluster | miqp s | est. iteration ms | est. memory GiB | gap | plan | grid ms | grid/miqp |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, batch in MODELS:
        model, inputs = _model(name, batch)
        for shape in args.clusters.split(","):
            cluster = fxplan.Cluster.parse(f"a100-80g:{shape}")
            row = f"| {name} | {batch} | a100-80g {shape} |"
            try:
                start = time.perf_counter()
                miqp = fxplan.compile(model, inputs, cluster=cluster, time_limit_s=args.time_limit,
                                      verbose=False).plan
                secs = time.perf_counter() - start
            except fxplan.FxplanError as exc:
                print(f"{row} - | {type(exc).__name__}: {str(exc)[:90]} | | | | | |", flush=True)
                continue
            mem = max(s.estimated_memory_bytes for s in miqp.stages) / 2**30
            kinds = sorted({str(v) for s in miqp.stages for v in s.strategies.values()})
            summary = f"pp{miqp.pp} m{miqp.microbatches} {miqp.schedule}: {', '.join(kinds[:3])}"
            try:
                grid = fxplan.compile(model, inputs, cluster=cluster, planner="grid", time_limit_s=args.time_limit,
                                      verbose=False).plan
                g = f"{grid.estimated_iteration_s * 1e3:.1f} | {grid.estimated_iteration_s / miqp.estimated_iteration_s:.3f}"
            except fxplan.FxplanError as exc:
                g = f"{type(exc).__name__} | -"
            print(f"{row} {secs:.1f} | {miqp.estimated_iteration_s * 1e3:.1f} | {mem:.1f} | "
                  f"{miqp.solver.gap * 100:.2f} % | {summary} | {g} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
