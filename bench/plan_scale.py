"""Planner at scale: irregular models and the largest presets, against the targets they are held to.

    .venv/bin/python bench/plan_scale.py              # all sections (about 6 minutes on an idle host)
    .venv/bin/python bench/plan_scale.py --section 1  # irregular models only

Sections:
  1. 49 linear layers of seeded random widths (log-uniform 64..16384, seeds 0-2), batch 512 x 64 rows,
     on a100-80g 4x8, time limit 20 s: global gap reached and wall time of compile() (target <= 1 %
     within 20 s);
  2. 21 such layers with pp pinned to 4 and to 8: wall time of compile(), median of 5 runs (target <= 20 s),
     and the gap;
  3. whole CLI runs in a fresh process (start-up included): llama2-70b on h100-80g 128x8 (batch 1024), a
     126-layer 405B-shaped Llama on h100-80g 2048x8 (batch 2048, seq 4096), the 48-layer GPT on
     a100-80g 8x8 (batch 512): wall, peak RSS, global gap (targets: <= 60 s, < 2 GiB, <= 1 %; the 48-layer
     GPT <= 5 s).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)


def _irregular(layers: int, seed: int):
    import numpy as np

    from plan_bench import _uneven

    rng = np.random.default_rng(seed)
    widths = [int(w) for w in np.exp(rng.uniform(np.log(64), np.log(16384), layers + 1)).round()]
    return _uneven(widths, 512, 64)


def _compile(layers: int, seed: int, pp: int | None, time_limit_s: float):
    import fxplan

    model, inputs = _irregular(layers, seed)
    cluster = fxplan.Cluster.preset("a100-80g", nodes=4, devices_per_node=8)
    start = time.perf_counter()
    plan = fxplan.compile(model, inputs, cluster=cluster, constraints=fxplan.Constraints(pp=pp),
                          time_limit_s=time_limit_s, verbose=False).plan
    return plan, time.perf_counter() - start


def _describe(plan) -> str:
    s = plan.solver
    return (f"est {plan.estimated_iteration_s * 1e3:8.3f} ms, gap {s.gap:6.2%} ({s.status}), pp={plan.pp} "
            f"mb={plan.microbatches} {plan.schedule}; solved {s.solved}, pruned {s.pruned}, cut {s.cut}")


def section_irregular_49() -> None:
    print("== 1. 49 irregular layers on a100-80g 4x8, time limit 20 s (target: gap <= 1 % within 20 s)")
    for seed in range(3):
        plan, secs = _compile(49, seed, None, 20.0)
        print(f"   seed {seed}: {secs:5.1f} s, {_describe(plan)}")


def section_irregular_21_pinned(runs: int = 5) -> None:
    print(f"== 2. 21 irregular layers, pp pinned, median of {runs} (target <= 20 s)")
    for pp in (4, 8):
        for seed in range(2):
            times, plan = [], None
            for _ in range(runs):
                plan, secs = _compile(21, seed, pp, 60.0)
                times.append(secs)
            print(f"   pp={pp} seed {seed}: median {statistics.median(times):5.1f} s (min {min(times):.1f}, max "
                  f"{max(times):.1f}), {_describe(plan)}")


CLI_CASES = [("llama:size=llama2-70b", 1024, "h100-80g:128x8", 60.0),
             ("llama:layers=126,hidden=16384,heads=128,kv_heads=8,ffn=53248,seq=4096", 2048, "h100-80g:2048x8", 60.0),
             ("gpt:layers=48,hidden=4096,heads=32,seq=2048", 512, "a100-80g:8x8", 5.0)]


def section_cli_scale() -> None:
    print("== 3. whole CLI in a fresh process (start-up included)")
    # main() reading sys.argv, as the `fxplan` console script calls it
    code = ("import resource, sys; from fxplan.cli import main\n"
            "sys.argv = ['fxplan', 'plan', '--model', sys.argv[1], '--batch', sys.argv[2], '--cluster', sys.argv[3]]\n"
            "rc = main()\n"
            # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark across fork and exec
            "print('RSS', int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))))\n"
            "sys.exit(rc or 0)")
    for spec, batch, cluster, target in CLI_CASES:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, spec, str(batch), cluster], capture_output=True,
                              text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"   {spec} on {cluster}: FAILED (exit {proc.returncode}): {proc.stderr[-500:]}")
            continue
        rss = int(re.search(r"RSS (\d+)", proc.stdout).group(1)) / 1024
        summary = next(line for line in proc.stdout.splitlines() if line.startswith("estimated iteration"))
        print(f"   {spec} batch {batch} on {cluster}: wall {wall:5.1f} s (target <= {target:g} s), peak RSS "
              f"{rss:.0f} MiB\n      {summary.strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", type=int, default=0)
    args = parser.parse_args()
    sections = {1: section_irregular_49, 2: section_irregular_21_pinned, 3: section_cli_scale}
    for number, fn in sections.items():
        if args.section in (0, number):
            fn()


if __name__ == "__main__":
    main()
