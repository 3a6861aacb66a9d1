"""The fxplan command line (README.md "Command line"). Bad arguments exit non-zero with one line."""

from __future__ import annotations

import argparse
import gc
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
    plan.add_argument("--time-limit", type=float, default=60.0, metavar="S",
                      help="planning budget in seconds, hard: tracing, cost tables and search")
    plan.add_argument("--json", metavar="FILE", help="write Plan.to_json() to FILE")
    plan.add_argument("--png", metavar="FILE", help="draw the plan's stages and strategies to FILE")

    sched = sub.add_parser("schedule", help="simulate a pipeline schedule and report its bubble",
                           description="Simulate a pipeline schedule's per-rank action lists.")
    sched.add_argument("--name", required=True, help=" | ".join(SCHEDULES))
    sched.add_argument("--stages", required=True, type=int)
    sched.add_argument("--microbatches", required=True, type=int)
    sched.add_argument("--chunks", type=int, default=None, help="model chunks per rank (interleaved-1f1b, zbv)")
    sched.add_argument("--t-f", type=float, default=1.0, help="forward time of one microbatch on a stage")
    sched.add_argument("--t-b", type=float, default=1.0, help="input-gradient backward time (B)")
    sched.add_argument("--t-w", type=float, default=1.0, help="weight-gradient backward time (W)")
    sched.add_argument("--t-comm", type=float, default=0.0, help="point-to-point latency between stages")
    sched.add_argument("--memory-limit", type=float, default=None, help="zb-auto: microbatches of activations per stage")
    sched.add_argument("--png", metavar="FILE", help="draw the timeline to FILE")
    sched.add_argument("--trace", metavar="FILE", help="write a chrome trace (JSON) to FILE")

    demo = sub.add_parser("demo", help="plan a small model for this machine and train it under torchrun",
                          description="Plan a small GPT for this host (4 gloo processes), print the plan and a "
                                      "rank's graph, train a few steps under torchrun and compare each step's loss "
                                      "with single-device training.")
    demo.add_argument("--nproc", type=int, default=4, help="processes (default 4)")
    demo.add_argument("--steps", type=int, default=3, help="training steps (default 3)")

    cal = sub.add_parser("calibrate", help="measure this host (collectives, matmul curve), print and cache the fit",
                         description="Measure collectives on the real backend, matmul throughput and "
                                     "elementwise rate for N local ranks, print the fitted table and cache it "
                                     "for Cluster.local(world_size=N).")
    cal.add_argument("--world-size", type=int, default=4, help="ranks (default 4)")
    cal.add_argument("--cached", action="store_true", help="print the cached table without measuring")
    for command in sub.choices.values():  # `fxplan COMMAND ... --debug` works too, not only before COMMAND
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def cmd_calibrate(args) -> int:
    from fxplan.errors import ClusterError
    from fxplan.runtime.probe import cache_path, cached_calibration, local_calibration

    if args.world_size < 1:
        raise ClusterError(f"--world-size must be a positive integer, got {args.world_size}")
    cal = cached_calibration(args.world_size) if args.cached else local_calibration(args.world_size, refresh=True)
    if cal is None:
        raise ClusterError(f"no cached calibration for {args.world_size} ranks; run `fxplan calibrate "
                           f"--world-size {args.world_size}`")
    print(cal.table())
    print(f"cached in {cache_path()}")
    return 0


def cmd_plan(args) -> int:
    import fxplan

    from fxplan.cli_checks import check_output_path

    check_output_path(args.json, "--json")  # before any search: a bad path must not cost a whole search
    check_output_path(args.png, "--png")
    cluster = fxplan.Cluster.parse(args.cluster)
    constraints = fxplan.Constraints.parse(args.pin)
    if args.batch < 1:
        raise fxplan.ConstraintError(f"--batch must be a positive integer, got {args.batch}")
    if not (args.time_limit > 0 and args.time_limit < float("inf")):
        raise fxplan.ConstraintError(f"--time-limit must be a positive number of seconds, got {args.time_limit}")
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

        if plan.pp > 1:  # the schedule's timeline at the plan's estimated pass times, the stages beside it
            from fxplan.schedule_draw import draw_plan_schedule

            stem = args.png[:-4] if args.png.lower().endswith(".png") else args.png
            draw_plan_schedule(plan, args.png)
            draw_plan(plan, stem + "-stages.png")
            print(f"wrote {args.png} and {stem}-stages.png")
        else:
            draw_plan(plan, args.png)
            print(f"wrote {args.png}")
    return 0


def cmd_schedule(args) -> int:
    from fxplan import schedules
    from fxplan.cli_checks import check_output_path

    check_output_path(args.png, "--png")
    check_output_path(args.trace, "--trace")

    r = schedules.simulate(args.name, stages=args.stages, microbatches=args.microbatches, t_f=args.t_f, t_b=args.t_b,
                           t_w=args.t_w, t_comm=args.t_comm, chunks=args.chunks, memory_limit=args.memory_limit)
    print(r.summary())
    if args.png:
        from fxplan.schedule_draw import draw_timeline

        draw_timeline(r, args.png)
        print(f"wrote {args.png}")
    if args.trace:
        from fxplan.schedule_draw import write_chrome_trace

        write_chrome_trace(r, args.trace)
        print(f"wrote {args.trace}")
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
        code = {"plan": cmd_plan, "schedule": cmd_schedule, "demo": cmd_demo,
                 "calibrate": cmd_calibrate}[args.command](args)
        if argv is None:
            # Run as the program: the interpreter's teardown would collect every object torch made
            # (0.4-0.8 s of a 6 s plan); frozen, they are left to the process's exit.
            gc.freeze()
        return code
    except FxplanError as exc:
        if args.debug:
            raise
        print(f"fxplan {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the command line prints one line; --debug shows the traceback
        if args.debug:
            raise
        from fxplan.cli_checks import one_line

        print(one_line(args.command, exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
