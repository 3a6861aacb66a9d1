"""Accuracy of the cost model against real runs: every plan's estimate written down first, then
measured on N gloo ranks of this host.

    .venv/bin/python bench/accuracy.py --nproc 2          # or --nproc 4; --refresh re-calibrates first
    .venv/bin/python bench/accuracy.py --nproc 4 --shapes compute --rounds 7

Per model shape (one compute-heavy, one communication-heavy GPT), ≥ 12 pinned plans (dp, tp,
dp x tp, fsdp, recompute, pp x {dp, tp, fsdp}, gpipe / 1f1b, several microbatch counts) and the
planner's own choice ("auto") are planned on `Cluster.local(world_size=N)` (the cached calibration;
`--refresh` measures it again) with the analytic cost model (profile=False). Every estimate goes to
predictions.json BEFORE any plan runs; then ONE torchrun per shape measures them all
(bench/accuracy_worker.py). Prints each plan's estimate, measurement and error, then per shape the
median and max |error|, Spearman's rank correlation, and where the planner's choice ranks among the
measured plans (and its time over the fastest's). --json FILE writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

WORKER = os.path.join(HERE, "accuracy_worker.py")
SHAPES = {
    # matmuls dominate: 2k tokens through 256-wide blocks
    "compute": ("gpt:layers=4,hidden=256,heads=8,seq=64,vocab=1024", 32),
    # small blocks, small batch: collectives' latency and per-op overhead dominate
    "comm": ("gpt:layers=4,hidden=64,heads=4,seq=16,vocab=256", 16),
}


def plan_pins(nproc: int) -> dict[str, dict]:
    """Named pins; each fixes the whole plan (the planner only places layers)."""
    base = dict(recompute=False, fsdp=False)
    if nproc == 2:
        return {
            "dp2": dict(pp=1, dp=2, tp=1, microbatches=1, **base),
            "dp2-m2": dict(pp=1, dp=2, tp=1, microbatches=2, **base),
            "tp2": dict(pp=1, dp=1, tp=2, microbatches=1, **base),
            "tp2-m2": dict(pp=1, dp=1, tp=2, microbatches=2, **base),
            "dp2-fsdp": dict(pp=1, dp=2, tp=1, microbatches=1, recompute=False, fsdp=True),
            "dp2-fsdp-keep": dict(pp=1, dp=2, tp=1, microbatches=1, recompute=False, fsdp=True, reshard=False),
            "dp2-recompute": dict(pp=1, dp=2, tp=1, microbatches=1, recompute=True, fsdp=False),
            "tp2-recompute": dict(pp=1, dp=1, tp=2, microbatches=1, recompute=True, fsdp=False),
            "pp2-1f1b-m2": dict(pp=2, dp=1, tp=1, microbatches=2, schedule="1f1b", **base),
            "pp2-1f1b-m4": dict(pp=2, dp=1, tp=1, microbatches=4, schedule="1f1b", **base),
            "pp2-gpipe-m4": dict(pp=2, dp=1, tp=1, microbatches=4, schedule="gpipe", **base),
            "pp2-gpipe-m8": dict(pp=2, dp=1, tp=1, microbatches=8, schedule="gpipe", **base),
        }
    return {
        "dp4": dict(pp=1, dp=4, tp=1, microbatches=1, **base),
        "tp4": dict(pp=1, dp=1, tp=4, microbatches=1, **base),
        "dp2tp2": dict(pp=1, dp=2, tp=2, microbatches=1, **base),
        "dp4-fsdp": dict(pp=1, dp=4, tp=1, microbatches=1, recompute=False, fsdp=True),
        "dp4-recompute": dict(pp=1, dp=4, tp=1, microbatches=1, recompute=True, fsdp=False),
        "dp2tp2-m2": dict(pp=1, dp=2, tp=2, microbatches=2, **base),
        "pp2dp2-1f1b-m4": dict(pp=2, dp=2, tp=1, microbatches=4, schedule="1f1b", **base),
        "pp2tp2-1f1b-m2": dict(pp=2, dp=1, tp=2, microbatches=2, schedule="1f1b", **base),
        "pp2dp2-fsdp-m2": dict(pp=2, dp=2, tp=1, microbatches=2, schedule="1f1b", recompute=False, fsdp=True),
        "pp2dp2-gpipe-m2": dict(pp=2, dp=2, tp=1, microbatches=2, schedule="gpipe", **base),
        "pp4-1f1b-m4": dict(pp=4, dp=1, tp=1, microbatches=4, schedule="1f1b", **base),
        "pp4-gpipe-m4": dict(pp=4, dp=1, tp=1, microbatches=4, schedule="gpipe", **base),
        "pp4-1f1b-m8": dict(pp=4, dp=1, tp=1, microbatches=8, schedule="1f1b", **base),
    }


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(order):  # ties share their mean rank
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / den if den else 0.0


def predict(shape: str, nproc: int, folder: str, time_limit: float) -> dict:
    """Plan every pinned plan and the planner's choice; write the plans and index.json to `folder`."""
    import fxplan

    sys.path.insert(0, HERE)
    from accuracy_worker import model_and_batch

    spec, batch = SHAPES[shape]
    model, example = model_and_batch(spec, batch)
    cluster = fxplan.Cluster.local(world_size=nproc)
    predictions = {}
    for name, pins in {**plan_pins(nproc), "auto": None}.items():
        try:
            compiled = fxplan.compile(model, example, cluster=cluster,
                                      constraints=fxplan.Constraints(**pins) if pins else None,
                                      time_limit_s=time_limit, verbose=False)
        except fxplan.FxplanError as exc:
            print(f"  {name}: not planned ({type(exc).__name__}: {exc})")
            continue
        plan = compiled.plan
        with open(os.path.join(folder, f"{name}.json"), "w") as fh:
            fh.write(plan.to_json())
        first = next(iter(plan.stages[0].strategies.values()))
        predictions[name] = dict(estimated_s=plan.estimated_iteration_s, pp=plan.pp, microbatches=plan.microbatches,
                                 schedule=plan.schedule, strategy=str(first))
    with open(os.path.join(folder, "index.json"), "w") as fh:
        json.dump(list(predictions), fh)
    return predictions


def summarise(shape: str, rows: dict) -> dict:
    names = [n for n in rows if "measured_s" in rows[n]]
    errors = {n: (rows[n]["estimated_s"] - rows[n]["measured_s"]) / rows[n]["measured_s"] for n in names}
    print(f"\n== {shape}: {SHAPES[shape][0]}, batch {SHAPES[shape][1]}")
    print(f"{'plan':<18} {'first layer':<22} {'estimated ms':>12} {'measured ms':>12} {'error':>8} {'spread':>7}")
    for n in sorted(names, key=lambda n: rows[n]["measured_s"]):
        r = rows[n]
        spread = (max(r["rounds"]) - min(r["rounds"])) / r["measured_s"]
        print(f"{n:<18} {r['strategy'][:22]:<22} {r['estimated_s'] * 1e3:>12.2f} {r['measured_s'] * 1e3:>12.2f} "
              f"{errors[n] * 100:>+7.1f}% {spread * 100:>6.0f}%")
    pinned = [n for n in names if n != "auto"]
    abs_err = [abs(errors[n]) for n in pinned]
    rho = spearman([rows[n]["estimated_s"] for n in pinned], [rows[n]["measured_s"] for n in pinned])
    by_time = sorted(names, key=lambda n: rows[n]["measured_s"])
    fastest = rows[by_time[0]]["measured_s"]
    summary = dict(plans=len(pinned), median_abs_error=statistics.median(abs_err), max_abs_error=max(abs_err),
                   spearman=rho)
    line = (f"{shape}: {len(pinned)} pinned plans, median |error| {summary['median_abs_error'] * 100:.1f} %, "
            f"max {summary['max_abs_error'] * 100:.1f} %, Spearman {rho:.3f}")
    if "auto" in names:
        summary["auto_rank"] = by_time.index("auto") + 1
        summary["auto_over_fastest"] = rows["auto"]["measured_s"] / fastest
        line += (f"; planner's choice ranks {summary['auto_rank']} of {len(names)} measured, "
                 f"{summary['auto_over_fastest']:.3f}x the fastest ({by_time[0]})")
    print(line)
    return summary


def main(argv=None) -> int:
    from fxplan.runtime.launch import run_torchrun

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=4, choices=(2, 4))
    parser.add_argument("--shapes", default="compute,comm")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--refresh", action="store_true", help="calibrate again before planning")
    parser.add_argument("--time-limit", type=float, default=20.0)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    import fxplan

    cluster = fxplan.Cluster.local(world_size=args.nproc, refresh=args.refresh)
    cal = cluster.calibration
    print(f"calibration: {cal.host} {cal.backend} x{cal.world_size} at {cal.date}, noise {cal.noise * 100:.0f} %, "
          f"load average {cal.load_average:.2f}, {cal.cores_per_rank:.2f} cores per rank")
    results = {"nproc": args.nproc, "calibration": {"date": cal.date, "noise": cal.noise,
                                                    "load_average": cal.load_average}, "shapes": {}}
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            folder = os.path.join(tmp, shape)
            os.makedirs(folder)
            start = time.perf_counter()
            rows = predict(shape, args.nproc, folder, args.time_limit)
            with open(os.path.join(folder, "predictions.json"), "w") as fh:
                json.dump(rows, fh, indent=1)  # written down before anything runs
            print(f"{shape}: {len(rows)} plans estimated in {time.perf_counter() - start:.1f} s; measuring ...",
                  flush=True)
            spec, batch = SHAPES[shape]
            out = os.path.join(folder, "measured.json")
            proc = run_torchrun(WORKER, args.nproc, ["--model", spec, "--batch", batch, "--plans", folder, "--out", out,
                                                     "--rounds", args.rounds, "--steps", args.steps],
                                timeout_s=1500, env={"OMP_NUM_THREADS": "1", "FXPLAN_TIMEOUT_S": "300"})
            if proc.returncode != 0 or not os.path.exists(out):
                print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
                status = 1
                continue
            with open(out) as fh:
                for name, value in json.load(fh).items():
                    rows[name].update(value)
            results["shapes"][shape] = {"plans": rows, "summary": summarise(shape, rows)}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
