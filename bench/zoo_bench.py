"""The architecture matrix: every model of tests/support/hf_zoo.py under dp, tp, pp x dp and the
planner's choice on 4 gloo ranks, next to one device (tests/torchrun/workers/zoo_worker.py).

    .venv/bin/python bench/zoo_bench.py [--groups decoders,encoders,seq2seq,vision] [--plans ...] [--json FILE]

One torchrun per architecture group. Per case: pass when the losses and every parameter and buffer
equal one device's (rtol 1e-4, atol 1e-5) and the state_dict keys are the model's; the table adds the
summed FLOPs of the four ranks' steps and their summed local parameter numel, both over one device's
(dp replicates: numel 4.0; work divided: FLOPs near 1.0). Exit status 0 when every case passes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))

from fxplan.runtime.launch import run_torchrun, tagged  # noqa: E402
import hf_zoo  # noqa: E402

WORKER = os.path.join(ROOT, "tests", "torchrun", "workers", "zoo_worker.py")
# BatchNorm keeps one microbatch (dp synchronises its statistics): its pipelines run one microbatch.
PLANS = {"default": "dp4,tp4,pp2dp2,auto", "resnet18": "dp4,tp4,pp2dp2mb1,pp4mb1,auto"}


def run_group(models: list[str], plans: str | None, timeout_s: float) -> list[dict]:
    results = []
    for plan_set in sorted({plans or PLANS.get(m, PLANS["default"]) for m in models}):
        chosen = [m for m in models if (plans or PLANS.get(m, PLANS["default"])) == plan_set]
        proc = run_torchrun(WORKER, 4, ["--models", ",".join(chosen), "--plans", plan_set], timeout_s=timeout_s)
        got = tagged(proc.stdout)
        if proc.returncode != 0:
            got.append(dict(model=",".join(chosen), plan="(launch)", ok=False, error=proc.stderr[-800:]))
        results += got
    return results


def row(r: dict) -> str:
    if "error" in r:
        return f"{r['model']:<14} {r['plan']:<8} {'REFUSED' if r.get('refused') else 'FAIL':<7} {r['error'][:110]}"
    return (f"{r['model']:<14} {r['plan']:<8} {'pass' if r['ok'] else 'FAIL':<7} pp={r['pp']} mb={r['microbatches']} "
            f"param diff {r['param_diff']:.1e}  flops x{r['flops_ratio']:.2f}  numel x{r['numel_ratio']:.2f}  "
            f"{' '.join(r['strategies'])[:40]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default=",".join(hf_zoo.GROUPS))
    parser.add_argument("--models", default=None, help="comma-separated model names instead of groups")
    parser.add_argument("--plans", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--timeout", type=float, default=1500)
    args = parser.parse_args()
    groups = {"selected": args.models.split(",")} if args.models else {g: hf_zoo.GROUPS[g] for g in args.groups.split(",")}
    results = []
    for name, models in groups.items():
        print(f"== {name}: {', '.join(models)}", flush=True)
        for r in run_group(models, args.plans, args.timeout):
            print(row(r), flush=True)
            results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} cases pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
