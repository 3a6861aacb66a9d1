"""The fxplan command line (README.md "Command line"). Bad arguments exit non-zero with one line."""

from __future__ import annotations

import argparse
import sys

from fxplan.constraints import RUNNABLE_SCHEDULES, SCHEDULES

EPILOG = """examples:
  fxplan plan --model gpt:layers=48,hidden=4096,heads=32,seq=2048 --batch 512 --cluster a100-80g:8x8 --json p.json
  fxplan plan --model llama:size=llama2-7b --batch 64 --cluster h100-80g:2x8 --pin pp=2,tp=4
  fxplan schedule --name zb-h2 --stages 4 --microbatches 8
  fxplan demo
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr, not usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fxplan",
        description="Automatic hybrid-parallel training plans for PyTorch models: trace, coarsen into layers, "
                    "enumerate shardings (dp, tensor parallel, FSDP, recompute), solve one MIQP for pipeline "
                    "stages and shardings together, and run the plan under torchrun.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    plan = sub.add_parser(
        "plan", help="plan a model preset for a cluster and print the plan",
        description="Plan a model preset (built on the meta device, so any size plans on a laptop) for a cluster "
                    "and print the plan table.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="model presets: gpt, llama, bert, vit, mlp; sizes e.g. gpt:size=gpt3-175b, llama:size=llama2-70b\n"
               "cluster presets: a100-40g, a100-80g, h100-80g (PRESET:NODESxDEVICES)")
    plan.add_argument("--model", required=True, metavar="NAME[:k=v,...]",
                      help="model preset with size overrides, e.g. gpt:layers=48,hidden=4096,heads=32,seq=2048")
    plan.add_argument("--batch", required=True, type=int, metavar="N", help="global batch size (samples)")
    plan.add_argument("--cluster", required=True, metavar="PRESET:NODESxDEVICES", help="e.g. a100-80g:4x8")
    plan.add_argument("--pin", default="", metavar="k=v,...",
                      help="pin search fields: pp, dp, tp, fsdp, reshard, schedule, microbatches, recompute (e.g. pp=2,tp=4)")
    plan.add_argument("--planner", default="miqp", choices=["miqp", "grid", "exhaustive"],
                      help="miqp (unified MIQP, default), grid (Megatron-style baseline), exhaustive (brute force)")
    plan.add_argument("--time-limit", type=float, default=60.0, metavar="S", help="solver budget in seconds")
    plan.add_argument("--json", metavar="FILE", help="write Plan.to_json() to FILE")
    plan.add_argument("--png", metavar="FILE", help="draw the plan's stages and strategies to FILE")
    plan.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    sched = sub.add_parser("schedule", help="simulate a pipeline schedule and report its bubble",
                           description="Simulate a pipeline schedule's per-rank action lists.")
    sched.add_argument("--name", required=True, help=" | ".join(SCHEDULES))
    sched.add_argument("--stages", required=True, type=int)
    sched.add_argument("--microbatches", required=True, type=int)
    sched.add_argument("--png", metavar="FILE")
    sched.add_argument("--trace", metavar="FILE", help="write a chrome trace")
    sched.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    demo = sub.add_parser("demo", help="plan a small model for this machine and train it under torchrun",
                          description="Plan a small GPT for this host (4 gloo processes), print the plan and a "
                                      "rank's graph, train a few steps under torchrun and compare each step's loss "
                                      "with single-device training.")
    demo.add_argument("--nproc", type=int, default=4, help="processes (default 4)")
    demo.add_argument("--steps", type=int, default=3, help="training steps (default 3)")
    demo.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def cmd_plan(args) -> int:
    import fxplan

    cluster = fxplan.Cluster.parse(args.cluster)
    constraints = fxplan.Constraints.parse(args.pin)
    if args.batch < 1:
        raise fxplan.ConstraintError(f"--batch must be a positive integer, got {args.batch}")
    from fxplan.models import build, example_batch

    model = build(args.model, device="meta")
    inputs = example_batch(model, args.batch, device="meta")
    compiled = fxplan.compile(model, inputs, cluster=cluster, constraints=constraints, planner=args.planner,
                              time_limit_s=args.time_limit)
    plan = compiled.plan
    print(plan.summary())
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(plan.to_json())
        print(f"wrote {args.json}")
    if args.png:
        from fxplan.report import draw_plan

        draw_plan(plan, args.png)
        print(f"wrote {args.png}")
    return 0


def cmd_schedule(args) -> int:
    from fxplan.errors import FxplanError

    try:
        from fxplan import schedules  # noqa: F401
    except ImportError:
        raise FxplanError("the schedule simulator (fxplan.schedules) is not built yet in this version; "
                          f"`fxplan plan` already plans {' and '.join(RUNNABLE_SCHEDULES)}") from None
    r = schedules.simulate(args.name, stages=args.stages, microbatches=args.microbatches)
    print(f"{args.name}: stages={args.stages} microbatches={args.microbatches} bubble_rate={r.bubble_rate:.4f} "
          f"iteration_time={r.iteration_time:.3f} peak_activations={list(r.peak_activations)}")
    return 0


def cmd_demo(args) -> int:
    from fxplan.demo import run_demo

    return run_demo(nproc=args.nproc, steps=args.steps)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from fxplan.errors import FxplanError

    try:
        return {"plan": cmd_plan, "schedule": cmd_schedule, "demo": cmd_demo}[args.command](args)
    except FxplanError as exc:
        if args.debug:
            raise
        print(f"fxplan {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
