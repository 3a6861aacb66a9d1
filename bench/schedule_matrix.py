"""The full zero-bubble runtime matrix (tests/torchrun/test_schedule_matrix.py runs a slice of it).

    .venv/bin/python bench/schedule_matrix.py [--models gpt,custom-tied,llama]

Per model ONE torchrun of 4 gloo ranks runs every layout x schedule: pp4, pp2xtp2, pp2xdp2,
pp2xdp2-fsdp (ZeRO-3) and pp2xdp2-fsdp-keep, each with zb-h1, zb-h2 and zb-auto; prints per plan
whether losses and all parameters equal one device after 3 SGD steps and whether the loaded
actions equal the simulated lists. Exit status 0 when every plan passes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from fxplan.runtime.launch import run_torchrun  # noqa: E402

WORKER = os.path.join(ROOT, "tests", "torchrun", "workers", "schedule_matrix_worker.py")
LAYOUTS = ("pp4", "pp2xtp2", "pp2xdp2", "pp2xdp2-fsdp", "pp2xdp2-fsdp-keep")
SCHEDULES = ("zb-h1", "zb-h2", "zb-auto", "zbv", "interleaved-1f1b")
SPLIT = ("zb-h1", "zb-h2", "zb-auto", "zbv")  # the schedules whose backward runs as I and W


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="gpt,custom-tied,llama,custom")
    args = parser.parse_args()
    plans = [f"{layout}-{s}" for layout in LAYOUTS for s in SCHEDULES]
    failures = 0
    for model in args.models.split(","):
        proc = run_torchrun(WORKER, 4, ["--model", model, "--plans", ",".join(plans)], timeout_s=1800,
                            env={"OMP_NUM_THREADS": "1", "FXPLAN_TIMEOUT_S": "120"})
        results = {r["plan"]: r for r in (json.loads(line[7:]) for line in proc.stdout.splitlines()
                                          if line.startswith("RESULT "))}
        for plan in plans:
            r = results.get(plan)
            if r is None or "error" in r:
                failures += 1
                print(f"{model:<12} {plan:<26} FAIL {r['error'] if r else 'no result (an earlier plan failed)'}")
                continue
            good = (r["param_close"] and r["keys_equal"] and r["actions_equal_simulated"]
                    and r["split_backward"] == (r["schedule"] in SPLIT)
                    and all(abs(a - b) <= 1e-5 + 1e-4 * abs(b) for a, b in zip(r["losses"], r["reference"])))
            failures += not good
            print(f"{model:<12} {plan:<26} {'pass' if good else 'FAIL'}  max |param - one device| "
                  f"{r['max_param_diff']:.2e}  actions == simulated: {r['actions_equal_simulated']}")
    print(f"{failures} failing plan(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
