"""Planner benchmark: prints the figures issue 4 asks for, side by side with their anchors.

    .venv/bin/python bench/plan_bench.py            # all sections
    .venv/bin/python bench/plan_bench.py --quick    # skip the 175B case

Sections:
  1. the 48-layer GPT (hidden 4096, seq 2048, batch 512) on a100-80g 8x8: wall time of
     `fxplan plan ... --json` (process start-up included), solver gap, devices covered;
  2. miqp vs grid (the Megatron-style baseline on the same cost model) for every preset at 1x8,
     4x8 and 8x8, and a strongly uneven model; ratio grid/miqp of estimated iteration time;
  3. miqp vs exhaustive (brute force) on small instances;
  4. GPT-3 175B on 128x8 A100-80G: planning time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def section_cli_48_layer() -> None:
    print("== 1. fxplan plan --model gpt:layers=48,hidden=4096,heads=32,seq=2048 --batch 512 --cluster a100-80g:8x8")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.json")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fxplan", "plan", "--model",
                               "gpt:layers=48,hidden=4096,heads=32,seq=2048", "--batch", "512", "--cluster",
                               "a100-80g:8x8", "--json", path], capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-2000:])
            print(f"   FAILED (exit {proc.returncode}) after {wall:.1f} s")
            return
        plan = json.load(open(path))
    devices = sorted(d for s in plan["stages"] for d in s["devices"])
    print(proc.stdout)
    print(f"   wall {wall:.2f} s (target <= 10 s, limit 20 s) | gap {plan['solver']['gap']:.4%} | "
          f"devices covered {len(devices)} == 64: {devices == list(range(64))} | "
          f"pp={plan['pp']} microbatches={plan['microbatches']} schedule={plan['schedule']}")


def _plan(model, batch, cluster, planner, time_limit=60, constraints=None):
    import fxplan
    from fxplan.models import example_batch

    inputs = example_batch(model, batch, device="meta")
    start = time.perf_counter()
    compiled = fxplan.compile(model, inputs, cluster=cluster, planner=planner, time_limit_s=time_limit,
                              constraints=constraints, verbose=False)
    return compiled.plan, time.perf_counter() - start


def section_grid_vs_miqp() -> None:
    import fxplan
    from fxplan.models import build

    print("== 2. miqp vs grid (same cost model): estimated iteration time, grid/miqp (>= 1 means miqp wins)")
    cases = [("gpt:size=gpt2-xl", 64), ("llama:size=llama2-7b", 64), ("bert:size=bert-large", 256),
             ("vit:size=vit-huge", 256), ("gpt:layers=24,hidden=2048,heads=16,seq=2048", 128)]
    print(f"   {'model':<44} {'cluster':<14} {'grid ms':>10} {'miqp ms':>10} {'grid/miqp':>9} {'miqp s':>7}")
    for spec, batch in cases:
        model = build(spec, device="meta")
        for nodes in (1, 4, 8):
            cluster = fxplan.Cluster.preset("a100-80g", nodes=nodes, devices_per_node=8)
            try:
                grid, _ = _plan(model, batch, cluster, "grid")
                miqp, secs = _plan(model, batch, cluster, "miqp")
            except fxplan.FxplanError as exc:
                print(f"   {spec:<44} {nodes}x8           {type(exc).__name__}: {exc}")
                continue
            ratio = grid.estimated_iteration_s / miqp.estimated_iteration_s
            print(f"   {spec:<44} {f'a100-80g:{nodes}x8':<14} {grid.estimated_iteration_s * 1e3:>10.2f} "
                  f"{miqp.estimated_iteration_s * 1e3:>10.2f} {ratio:>9.3f} {secs:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--section", type=int, default=0)
    args = parser.parse_args()
    sections = {1: section_cli_48_layer, 2: section_grid_vs_miqp}
    for number, fn in sections.items():
        if args.section in (0, number):
            fn()
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
