"""Runtime benchmark: fxplan's step time against torch's own parallel wrappers (DDP, Schedule1F1B, FSDP2).

    .venv/bin/python bench/runtime_bench.py              # plans, then ONE torchrun of 4 gloo ranks

On one model and one global batch, three pairs, each interleaved step by step after a warm-up:

  dp   : fxplan dp=4                  vs torch DistributedDataParallel
  pp   : fxplan pp=4, 1f1b            vs torch.distributed.pipelining Schedule1F1B (same split, same m)
  fsdp : fxplan dp=4 + fsdp           vs FSDP2 (fully_shard on every block and the root)

Timed: forward + backward + gradient synchronisation of one global batch (fxplan `train_step`), the
slowest rank's time per step, median over the timed steps; the SGD step is not timed (it runs, for
both contenders, after the clock stops). Prints, per pair, both medians, the ratio fxplan/anchor
and pass (ratio <= 1.10) or FAIL, and both contenders' losses at the first and last step (they
train the same model on the same batch, so these agree up to float summation order).
Exit status 0 when every pair passes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

WORKER = os.path.join(HERE, "runtime_bench_worker.py")
# Small enough that one step takes on the order of 100 ms with 4 single-thread ranks on a 2-core host.
# Untied head: the pipelining anchor cannot share the embedding with the last stage.
DEFAULT_MODEL = "gpt:layers=8,hidden=64,heads=4,seq=32,vocab=256,tied=false"
LIMIT, TARGET = 1.10, 1.03
WORLD = 4


def pinned_constraints(pair: str, microbatches: int):
    import fxplan

    common = dict(tp=1, recompute=False)
    if pair == "dp":
        return fxplan.Constraints(pp=1, dp=WORLD, fsdp=False, microbatches=1, **common)
    if pair == "fsdp":
        return fxplan.Constraints(pp=1, dp=WORLD, fsdp=True, microbatches=1, **common)
    return fxplan.Constraints(pp=WORLD, dp=1, fsdp=False, schedule="1f1b", microbatches=microbatches, **common)


def make_plans(model_spec: str, batch: int, microbatches: int, pairs: list[str], folder: str) -> None:
    """Plan each pair once here (the planner honours the pins) and write Plan.to_json() for the ranks."""
    import fxplan

    sys.path.insert(0, HERE)
    from runtime_bench_worker import model_and_batch

    model, example = model_and_batch(model_spec, batch)
    cluster = fxplan.Cluster.local(world_size=WORLD)
    for pair in pairs:
        compiled = fxplan.compile(model, example, cluster=cluster, constraints=pinned_constraints(pair, microbatches),
                                  verbose=False)
        print(f"-- {pair}: " + compiled.plan.summary().replace("\n", "\n   "))
        with open(os.path.join(folder, f"{pair}.json"), "w") as fh:
            fh.write(compiled.plan.to_json())


def print_table(results: list[dict]) -> bool:
    head = (f"{'pair':<6} {'anchor':<20} {'fxplan ms':>10} {'anchor ms':>10} {'ratio':>7}  "
            f"{'vs 1.10':<7} {'loss@0 fxplan / anchor':<26} {'loss@last fxplan / anchor'}")
    print(head)
    print("-" * len(head))
    ok = True
    for r in results:
        ours, theirs = r["results"]["fxplan"], r["results"][r["anchor"]]
        ratio = ours["median_ms"] / theirs["median_ms"]
        passed = ratio <= LIMIT
        ok &= passed
        verdict = ("pass" if passed else "FAIL") + ("*" if ratio <= TARGET else "")
        print(f"{r['pair']:<6} {r['anchor']:<20} {ours['median_ms']:>10.2f} {theirs['median_ms']:>10.2f} "
              f"{ratio:>7.3f}  {verdict:<7} {ours['loss_first']:.6f} / {theirs['loss_first']:.6f}   "
              f"{ours['loss_last']:.6f} / {theirs['loss_last']:.6f}")
    print(f"(median of the timed steps, slowest rank per step; * = within the {TARGET:.2f} target)")
    return ok


def print_profile(results: list[dict]) -> None:
    print("\ntorch.distributed calls per timed step on rank 0 (count, ms spent blocking in them):")
    for r in results:
        for name, res in r["results"].items():
            calls = res.get("rank0_collectives_per_step") or {}
            text = ", ".join(f"{k} {v['calls']:.0f}x {v['ms']:.1f} ms" for k, v in calls.items()) or "none seen"
            print(f"  {r['pair']:<5} {name:<20} step {res['median_ms']:.1f} ms: {text}")
    print("  (torch's wrappers call process groups directly; their collectives are not seen here)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"GPT preset spec (default {DEFAULT_MODEL})")
    parser.add_argument("--batch", type=int, default=32, help="global batch (default 32)")
    parser.add_argument("--microbatches", type=int, default=8, help="microbatches of the pp pair (default 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first (default 3)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per contender (default 15, >= 10)")
    parser.add_argument("--pairs", default="dp,pp,fsdp", help="subset of dp,pp,fsdp (default all)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before torchrun is killed")
    parser.add_argument("--json", help="also write the raw per-step results to this file")
    parser.add_argument("--profile", action="store_true",
                        help="also count and time the torch.distributed calls fxplan makes per step (rank 0)")
    args = parser.parse_args(argv)
    pairs = [p for p in args.pairs.split(",") if p]
    if not pairs or set(pairs) - {"dp", "pp", "fsdp"}:
        parser.error(f"--pairs takes a subset of dp,pp,fsdp, got {args.pairs!r}")

    from fxplan.runtime.launch import run_torchrun, tagged

    print(f"== fxplan runtime bench: {args.model}, global batch {args.batch}, {WORLD} gloo ranks x 1 thread, "
          f"{args.warmup} warm-up + {args.steps} timed steps per contender, interleaved")
    with tempfile.TemporaryDirectory() as folder:
        make_plans(args.model, args.batch, args.microbatches, pairs, folder)
        worker_args = ["--model", args.model, "--batch", args.batch, "--plans", folder, "--pairs", ",".join(pairs),
                       "--warmup", args.warmup, "--steps", args.steps] + (["--profile"] if args.profile else [])
        start = time.perf_counter()
        proc = run_torchrun(WORKER, WORLD, worker_args, timeout_s=args.timeout,
                            env={"OMP_NUM_THREADS": "1", "FXPLAN_TIMEOUT_S": "120"})
        wall = time.perf_counter() - start
    results = tagged(proc.stdout)
    if proc.returncode != 0 or len(results) != len(pairs):
        # Every rank's traceback matters (the first failing rank is rarely the last lines): keep it all.
        log = os.path.join(tempfile.gettempdir(), "fxplan_runtime_bench.log")
        with open(log, "w") as fh:
            fh.write(proc.stdout + "\n" + proc.stderr)
        print(proc.stderr[-4000:], file=sys.stderr)
        print(f"runtime bench: torchrun failed (exit {proc.returncode}) after {wall:.1f} s; full log in {log}",
              file=sys.stderr)
        return 2
    print(f"== torchrun finished in {wall:.1f} s\n")
    ok = print_table(results)
    if args.steps < 10:
        print(f"note: {args.steps} timed steps (< 10): a smoke run, not an acceptance measurement")
    if args.profile:
        print_profile(results)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
