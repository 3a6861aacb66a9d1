"""Every pin against the unpinned plan, under one cost model (the full sweep behind
tests/unit/test_global_gap.py, which runs a slice of it).

    flock /tmp/fxplan-dist.lock .venv/bin/python bench/plan_sweep.py            # both models
    flock /tmp/fxplan-dist.lock .venv/bin/python bench/plan_sweep.py --quick    # the 96-layer GPT only
    flock /tmp/fxplan-dist.lock .venv/bin/python bench/plan_sweep.py --big      # GPT-3 175B only
    ... --jobs 2 --pin-limit 20   # two pins at once, each MILP cut at 20 s (a cut pin still reports its time)

For GPT-3 175B on a100-80g 128x8 (batch 1536) and gpt:layers=96,hidden=4096 on 8x8 (batch 512): the
unpinned search (its plan, global gap and counts), then every (pp, microbatches, schedule) solved on
its own. Prints the pins that beat the unpinned plan by more than 0.5 % and any whose reached time lies
below the global lower bound (either would be a bug), and the best pin.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = [("gpt:layers=96,hidden=4096", 512, ("a100-80g", 8, 8)),
         ("gpt:size=gpt3-175b", 1536, ("a100-80g", 128, 8))]


_PIN_SOLVE = None


def _pin(cand):
    return _PIN_SOLVE(cand)


def sweep(spec: str, batch: int, cluster_spec, time_limit_s: float, pin_limit_s: float, jobs: int = 1) -> None:
    import fxplan
    from fxplan.models import build, example_batch
    from fxplan.passes.cost.model import CostModel
    from fxplan.passes.solve.candidate import solve
    from fxplan.passes.solve.search import OUTCOMES, search
    from fxplan.planner import analyse
    from fxplan.search_space import candidates, dominated_by

    preset, nodes, per_node = cluster_spec
    cluster = fxplan.Cluster.preset(preset, nodes=nodes, devices_per_node=per_node)
    print(f"== {spec}, batch {batch}, {preset} {nodes}x{per_node}")
    model = build(spec, device="meta")
    analysis = analyse(model, example_batch(model, batch, device="meta"), cluster, fxplan.Constraints())
    lg = analysis.layer_graph
    costs = CostModel(lg, analysis.space, cluster, lg.batch_size, fxplan.Constraints())
    cands = [c for c in candidates(cluster, batch, len(lg.layers), fxplan.Constraints())
             if costs.bound_problem(*c) is not None]
    start = time.perf_counter()
    res = search(costs.problem, cands, time_limit_s=time_limit_s, mip_gap=5e-3, dominated=dominated_by(cands),
                 bound_problem=costs.bound_problem)
    best = res.best
    print(f"unpinned: {res.candidate} {best.objective:.6f} s, global gap {best.gap:.3%}, floor {res.floor:.6f} s, "
          f"{time.perf_counter() - start:.1f} s; " + ", ".join(f"{res.count(o)} {o}" for o in OUTCOMES))
    beating, below, top, results = [], [], None, []
    global _PIN_SOLVE  # forked workers inherit the cost model (and the tables it has cached so far)
    _PIN_SOLVE = lambda cand: (cand, solve(costs.problem(*cand), time_limit_s=pin_limit_s, mip_gap=5e-3))  # noqa: E731
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for done, (cand, sol) in enumerate(pool.imap_unordered(_pin, cands, chunksize=1), 1):
            print(f"   pin {done:4d}/{len(cands)} {cand}: "
                  + (f"{sol.objective:.6f} s ({sol.status}, gap {sol.gap:.2%}, {sol.seconds:.1f} s; "
                     f"{sol.objective / best.objective - 1:+.3%} vs unpinned)" if sol.stage_of else
                     f"no plan ({sol.status})") + f"  [{time.perf_counter() - started:.0f} s]", flush=True)
            results.append((cand, sol))
    for cand, sol in results:
        if not sol.stage_of:
            continue
        if top is None or sol.objective < top[1]:
            top = (cand, sol.objective)
        if sol.objective < best.objective * (1 - 0.005):
            beating.append((cand, sol.objective))
        if sol.objective < res.floor * (1 - 1e-9):  # the bound's arithmetic rounds at 1e-9 relative
            below.append((cand, sol.objective, res.floor))
    print(f"pins solved: {len(cands)}; best pin {top[0]} {top[1]:.4f} s ({top[1] / best.objective - 1:+.3%} vs unpinned)")
    print(f"pins beating the unpinned plan by > 0.5 %: {beating or 'none'}")
    print(f"pins below the global lower bound: {below or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 96-layer GPT only")
    parser.add_argument("--big", action="store_true", help="GPT-3 175B only")
    parser.add_argument("--time-limit", type=float, default=300.0, help="the unpinned search's budget, s")
    parser.add_argument("--pin-limit", type=float, default=60.0, help="each pinned solve's budget, s")
    parser.add_argument("--jobs", type=int, default=1, help="pins solved at once (forked processes)")
    args = parser.parse_args()
    for spec, batch, cluster in CASES[:1] if args.quick else CASES[1:] if args.big else CASES:
        sweep(spec, batch, cluster, args.time_limit, args.pin_limit, args.jobs)


if __name__ == "__main__":
    main()
