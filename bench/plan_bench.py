"""Planner benchmark: prints the planner's figures side by side with their anchors.

    .venv/bin/python bench/plan_bench.py            # all sections
    .venv/bin/python bench/plan_bench.py --quick    # skip the 175B case

Sections:
  1. the 48-layer GPT (hidden 4096, seq 2048, batch 512) on a100-80g 8x8: wall time of
     `fxplan plan ... --json` (process start-up included), solver gap, devices covered;
  2. miqp vs grid (the Megatron-style baseline on the same cost model) for every preset at 1x8,
     4x8 and 8x8, and a strongly uneven model; ratio grid/miqp of estimated iteration time;
  3. miqp vs exhaustive (brute force) on small instances;
  5. memory pressure: the plan as device memory shrinks, and the infeasible message;
  6. GPT-3 175B on 128x8 A100-80G: planning time and peak RSS.
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
    # strongly uneven: two heavy layers, seven light ones, 4 stages pinned
    model, inputs = _uneven([4096, 32768] + [4096] * 7, 64, 1024)
    cluster = fxplan.Cluster.preset("a100-80g", nodes=4, devices_per_node=8)
    pins = fxplan.Constraints(pp=4)
    grid = fxplan.compile(model, inputs, cluster=cluster, planner="grid", constraints=pins, verbose=False).plan
    miqp = fxplan.compile(model, inputs, cluster=cluster, constraints=pins, verbose=False).plan
    print(f"   {'uneven mlp 4096/32768/4096x7, pp=4':<44} {'a100-80g:4x8':<14} {grid.estimated_iteration_s * 1e3:>10.2f} "
          f"{miqp.estimated_iteration_s * 1e3:>10.2f} {grid.estimated_iteration_s / miqp.estimated_iteration_s:>9.3f}")
    print(f"      layers per stage: grid {[len(s.layers) for s in grid.stages]}, miqp {[len(s.layers) for s in miqp.stages]}")


def _uneven(widths, batch, seq):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Uneven(nn.Module):
        def __init__(self):
            super().__init__()
            self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

        def forward(self, x, y):
            for i, fc in enumerate(self.fcs):
                x = fc(x) if i == len(self.fcs) - 1 else F.relu(fc(x))
            return F.mse_loss(x, y)

    with torch.device("meta"):
        model = Uneven()
    return model, (torch.empty(batch, seq, widths[0], device="meta"), torch.empty(batch, seq, widths[-1], device="meta"))


def section_exhaustive() -> None:
    import dataclasses

    import fxplan
    from fxplan.models import build, example_batch

    print("== 3. miqp vs exhaustive (brute force) on small instances: estimated iteration time")
    two = fxplan.Cluster(nodes=2, devices_per_node=2, memory_bytes=80 * 2**30, peak_flops=312e12, intra_bw=240e9,
                         inter_bw=25e9, half_efficiency_dim=1800)
    a14 = fxplan.Cluster.preset("a100-80g", nodes=1, devices_per_node=4)
    cases = [("mlp:layers=2,hidden=2048 b256", lambda: _preset("mlp:layers=2,hidden=2048", 256), a14, None),
             ("uneven 1024/16384/1024 b256", lambda: _uneven([1024, 16384, 1024], 256, 1), a14, None),
             ("uneven 1024/16384/1024 b256", lambda: _uneven([1024, 16384, 1024], 256, 1), two, None),
             ("uneven 256/8192/256/8192, 0.6 GiB", lambda: _uneven([256, 8192, 256, 8192], 512, 64),
              dataclasses.replace(two, memory_bytes=0.6 * 2**30), fxplan.Constraints(schedule="1f1b")),
             ("gpt:layers=2,hidden=1024 b16", lambda: _preset("gpt:layers=2,hidden=1024,heads=8,seq=256", 16), two,
              fxplan.Constraints(schedule="1f1b", microbatches=4)),
             ("llama:layers=2,hidden=1024 b16", lambda: _preset("llama:layers=2,hidden=1024,heads=8,seq=256", 16),
              a14, fxplan.Constraints(schedule="1f1b", microbatches=4, recompute=False))]
    for name, make, cluster, pins in cases:
        model, inputs = make()
        out = {}
        for planner in ("miqp", "exhaustive"):
            out[planner] = fxplan.compile(model, inputs, cluster=cluster, planner=planner, constraints=pins,
                                          verbose=False).plan.estimated_iteration_s
        print(f"   {name:<36} {cluster.nodes}x{cluster.devices_per_node}  miqp {out['miqp'] * 1e3:10.5f} ms  "
              f"exhaustive {out['exhaustive'] * 1e3:10.5f} ms  rel diff {abs(out['miqp'] / out['exhaustive'] - 1):.1e}")


def _preset(spec, batch):
    from fxplan.models import build, example_batch

    model = build(spec, device="meta")
    return model, example_batch(model, batch, device="meta")


def section_memory() -> None:
    import dataclasses

    import fxplan

    print("== 5. memory pressure: gpt:layers=8,hidden=2048,seq=1024 batch 32 on a100 1x8 with shrinking memory")
    model, inputs = _preset("gpt:layers=8,hidden=2048,heads=16,seq=1024", 32)
    base = fxplan.Cluster.preset("a100-80g", nodes=1, devices_per_node=8)
    for gib in (80, 4, 2, 1.2, 0.3):
        cluster = dataclasses.replace(base, memory_bytes=gib * 2**30)
        try:
            p = fxplan.compile(model, inputs, cluster=cluster, verbose=False).plan
        except fxplan.InfeasiblePlanError as exc:
            print(f"   {gib:>5} GiB: InfeasiblePlanError: {exc}")
            continue
        kinds = sorted({str(s).split("[")[0] for st in p.stages for s in st.strategies.values()})
        print(f"   {gib:>5} GiB: pp={p.pp} mb={p.microbatches} {p.estimated_iteration_s * 1e3:9.2f} ms  {kinds}")


def section_175b() -> None:
    print("== 6. fxplan plan --model gpt:size=gpt3-175b --batch 1536 --cluster a100-80g:128x8")
    code = ("import resource, sys, time; t = time.perf_counter(); from fxplan.cli import main\n"
            "rc = main(['plan', '--model', 'gpt:size=gpt3-175b', '--batch', '1536', '--cluster', 'a100-80g:128x8'])\n"
            "r = resource.getrusage(resource.RUSAGE_SELF)\n"
            "hwm = int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
            "print(f'   wall {time.perf_counter() - t:.1f} s, cpu {r.ru_utime + r.ru_stime:.1f} s, peak RSS {hwm / 1024:.0f} MiB')")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    print(proc.stdout[:400].rstrip() + "\n   ...\n" + proc.stdout.strip().splitlines()[-1] if proc.stdout else proc.stderr[-2000:])
    print(f"   process wall incl. start-up {time.perf_counter() - start:.1f} s (limit 60 s, < 2 GiB RSS)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--section", type=int, default=0)
    args = parser.parse_args()
    sections = {1: section_cli_48_layer, 2: section_grid_vs_miqp, 3: section_exhaustive, 5: section_memory}
    if not args.quick:
        sections[6] = section_175b
    for number, fn in sections.items():
        if args.section in (0, number):
            fn()
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
