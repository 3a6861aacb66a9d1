"""Memory bench: each rank's measured peak beside the plan's `stage.estimated_memory_bytes`.

    .venv/bin/python bench/memory_bench.py                  # the check shape (not calibrated on)
    .venv/bin/python bench/memory_bench.py --model CALIB    # the shape the cost model was fitted on

Per model ONE torchrun of 4 gloo ranks runs every plan family, one after the other (so load on a
shared host cannot favour one), then torch's DDP and FSDP2 on the same model as checks of the
measuring method. A family is a set of pins; the planner picks the rest on this host's cluster
(`Cluster.local(4)`: fp32 training, Adam, 8 optimizer bytes per parameter). The measured peak is
the most live tensor bytes during `--steps` training steps (forward, backward, gradient sync,
Adam step, zero_grad), from torch.profiler's allocation events: bench/memory_probe.py says why.

Printed per family and rank: the peak, the estimate of the rank's stage, the error
(estimate / measured - 1; negative = under-estimate), then the median and the largest |error|
and the number of under-estimates (the goal: |error| <= 15 %, never under by more than 10 %).
Exit status 0 when every row is within those bounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

WORKER = os.path.join(HERE, "memory_bench_worker.py")
WORLD = 4
CALIB = "gpt:layers=4,hidden=128,heads=4,seq=64,vocab=1024"
CHECK = "gpt:layers=6,hidden=96,heads=6,seq=32,vocab=3000,tied=false"
LIMIT, UNDER = 0.15, 0.10

# name -> pins; a family whose pins this version does not know is skipped (e.g. FSDP's reshard
# policy, `Constraints(reshard=False)`, keep-gathered).
FAMILIES = {
    "dp": dict(pp=1, dp=4, tp=1, fsdp=False, recompute=False, microbatches=1),
    "fsdp": dict(pp=1, dp=4, tp=1, fsdp=True, reshard=True, recompute=False, microbatches=1),
    "fsdp-keep": dict(pp=1, dp=4, tp=1, fsdp=True, reshard=False, recompute=False, microbatches=1),
    "tp": dict(pp=1, dp=1, tp=4, fsdp=False, recompute=False, microbatches=1),
    "dp2xtp2": dict(pp=1, dp=2, tp=2, fsdp=False, recompute=False, microbatches=1),
    "pp2xdp2-gpipe": dict(pp=2, dp=2, tp=1, fsdp=False, recompute=False, schedule="gpipe", microbatches=4),
    "pp2xdp2-1f1b": dict(pp=2, dp=2, tp=1, fsdp=False, recompute=False, schedule="1f1b", microbatches=4),
    "pp2xfsdp2": dict(pp=2, dp=2, tp=1, fsdp=True, recompute=False, schedule="1f1b", microbatches=4),
    "recompute": dict(pp=1, dp=4, tp=1, fsdp=False, recompute=True, microbatches=1),
    "pp2xtp2": dict(pp=2, dp=1, tp=2, fsdp=False, recompute=False, schedule="1f1b", microbatches=4),
    # sequence parallelism: the tp families with their activations cut along the sequence
    "sp": dict(pp=1, dp=1, tp=4, fsdp=False, recompute=False, microbatches=1, sp=True),
    "dp2xsp2": dict(pp=1, dp=2, tp=2, fsdp=False, recompute=False, microbatches=1, sp=True),
}


def make_plans(spec: str, batch: int, folder: str) -> tuple[list[str], dict]:
    import dataclasses

    import fxplan
    from fxplan.models import build

    known = {f.name for f in dataclasses.fields(fxplan.Constraints)}
    model = build(spec, device="meta")
    example = model.example_batch(batch, device="meta")
    cluster = fxplan.Cluster.local(world_size=WORLD)
    names, estimates = [], {}
    for name, pins in FAMILIES.items():
        if set(pins) - known:
            print(f"-- {name}: skipped (this version has no Constraints field {sorted(set(pins) - known)})")
            continue
        plan = fxplan.compile(model, example, cluster=cluster, constraints=fxplan.Constraints(**pins),
                              verbose=False).plan
        with open(os.path.join(folder, f"{name}.json"), "w") as fh:
            fh.write(plan.to_json())
        names.append(name)
        estimates[name] = {r: st.estimated_memory_bytes for st in plan.stages for r in st.devices}
    params = [p.numel() * 4 for p in model.parameters()]
    blocks = [sum(p.numel() * 4 for p in b.parameters()) for b in model.blocks]
    return names, dict(estimates=estimates, param_bytes=sum(params), block_bytes=max(blocks))


def mb(x: float) -> str:
    return f"{x / 2**20:8.2f}"


def print_table(results: list[dict], facts: dict) -> bool:
    print(f"{'family':<15} {'rank':>4} {'measured MiB':>12} {'estimate MiB':>12} {'error':>8}")
    errors = []
    for r in results:
        est = facts["estimates"].get(r["name"])
        if est is None:
            continue
        for rank, peak in enumerate(r["peaks"]):
            e = est[rank] / peak["peak"] - 1
            errors.append(e)
            print(f"{r['name']:<15} {rank:>4} {mb(peak['peak']):>12} {mb(est[rank]):>12} {e:>+8.1%}")
    worst = max(errors, key=abs)
    under = [e for e in errors if e < 0]
    ok = all(abs(e) <= LIMIT and e >= -UNDER for e in errors)
    print(f"summary: {len(errors)} rows, median error {statistics.median(errors):+.1%}, median |error| "
          f"{statistics.median(abs(e) for e in errors):.1%}, largest |error| {worst:+.1%}, "
          f"{len(under)} under-estimates (worst {min(errors):+.1%}) -> {'pass' if ok else 'FAIL'}")
    P, U = facts["param_bytes"], facts["block_bytes"]
    print(f"\nmethod check on torch's wrappers (P = {mb(P).strip()} MiB of fp32 parameters, "
          f"largest block {mb(U).strip()} MiB):")
    known = {"torch DDP": ("params + grads + DDP buckets + Adam m, v + Adam step temporaries = 6 P", 6 * P),
             "torch FSDP2": (f"(params + grads + Adam + its temporaries) / {WORLD} + 2 blocks gathered (prefetch)",
                             5 * P / WORLD + 2 * U)}
    for r in results:
        if r["name"] in known:
            text, state = known[r["name"]]
            peak = max(p["peak"] for p in r["peaks"])
            print(f"  {r['name']:<12} measured {mb(peak)} MiB; known state {text} = {mb(state)} MiB; "
                  f"the rest (activations, transients) {mb(peak - state)} MiB")
    return ok


def print_breakdown(results: list[dict], facts: dict) -> None:
    for r in results:
        est = facts["estimates"].get(r["name"])
        if est is None:
            continue
        rank = min(range(len(r["peaks"])), key=lambda i: est[i] / r["peaks"][i]["peak"])
        peak = r["peaks"][rank]
        print(f"\n{r['name']} rank {rank}: peak {mb(peak['peak']).strip()} MiB, estimate {mb(est[rank]).strip()} MiB; "
              f"live at the peak by allocating op:")
        for label, nbytes in peak.get("breakdown", []):
            print(f"  {mb(nbytes)}  {label}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=CHECK, help=f"GPT preset spec (default {CHECK}; calibrated on {CALIB})")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--breakdown", action="store_true",
                        help="per family, at the worst rank's peak: live MiB by the ops that allocated them")
    args = parser.parse_args(argv)
    from fxplan.runtime.launch import run_torchrun, tagged

    print(f"== fxplan memory bench: {args.model}, global batch {args.batch}, {WORLD} gloo ranks, Adam, "
          f"{args.steps} steps per contender")
    with tempfile.TemporaryDirectory() as folder:
        names, facts = make_plans(args.model, args.batch, folder)
        names = [n for n in names if n in args.families.split(",")]
        proc = run_torchrun(WORKER, WORLD, ["--model", args.model, "--batch", args.batch, "--plans", folder,
                                            "--families", ",".join(names), "--steps", args.steps]
                            + (["--breakdown"] if args.breakdown else []),
                            timeout_s=args.timeout, env={"OMP_NUM_THREADS": "1", "FXPLAN_TIMEOUT_S": "120"})
    results = tagged(proc.stdout)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        print(f"memory bench: torchrun failed (exit {proc.returncode})", file=sys.stderr)
        return 2
    ok = print_table(results, facts)
    if args.breakdown:
        print_breakdown(results, facts)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
