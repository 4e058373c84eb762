"""python -m services.planner --profile FILE [--slo SLO] [--min prefill=N,decode=M] [--max ...]
[--interval-s 30] [--slo-correction on|off] [--actuate up|external] ...

The autoscaler's planner: every interval it reads the gateways' counters and the ranks' queues,
decides the prefill and decode ranks (shared/planner/autoscale.py), and publishes the decision in
the Redis hash `streams.PLANNER_DECISIONS` and as metrics. It decides; `streamoe up --autoscale`, or
an external actuator (KEDA, an operator), acts.
"""
import argparse
import sys
from pathlib import Path

import uvloop

from shared.launcher.cliargs import positive_float, slo_flag, units_flag
from shared.planner.plan import Units, load_profile
from shared.planner.slo import DEFAULT_SLO, parse_slo
from shared.runtime.service import add_service_args, parse_service_args, service_config

from .planner import PlannerService, PlannerSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.planner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_service_args(parser)
    plan = parser.add_argument_group("planner")
    plan.add_argument("--profile", type=Path, required=True,
                      help="what one rank serves (python -m loadgen.profile; shared/planner/README.md)")
    plan.add_argument("--slo", type=slo_flag, default=parse_slo(DEFAULT_SLO), metavar="SLO",
                      help=f"e.g. 'ttft:2000 itl:100' (ms; default {DEFAULT_SLO})")
    plan.add_argument("--min", type=units_flag, default=Units(1, 1), metavar="prefill=N,decode=M",
                      help="the floor (default 1 each); idle scales here")
    plan.add_argument("--max", type=units_flag, default=Units(1, 1), metavar="prefill=N,decode=M",
                      help="the ceiling (default 1 each)")
    plan.add_argument("--unit", type=units_flag, default=Units(1, 1), metavar="prefill=N,decode=M",
                      help="ranks that scale together (an EP group's size; default 1)")
    plan.add_argument("--interval-s", type=positive_float, default=30.0, help="how often it decides")
    plan.add_argument("--down-after", type=int, default=2,
                      help="intervals in a row that must want fewer ranks before it scales down (hysteresis)")
    plan.add_argument("--slo-correction", choices=["on", "off"], default="on",
                      help="scale the demand by measured/bound latency when the SLO is missed (off where "
                      "more ranks add no capacity)")
    plan.add_argument("--actuate", choices=["up", "external"], default="external",
                      help="who applies the decisions: streamoe up --autoscale, or an external actuator (KEDA, "
                      "an operator); recorded in the decisions hash")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_service_args(parser, argv)
    if args.down_after < 1:
        parser.error(f"--down-after={args.down_after}: expected a whole number >= 1")
    try:
        profile = load_profile(args.profile)
    except (OSError, ValueError) as e:
        parser.error(f"--profile {args.profile}: {e}" if isinstance(e, OSError) else str(e))
    settings = PlannerSettings(profile, args.slo, args.min, args.max, args.unit, args.interval_s, args.down_after,
                               args.slo_correction == "on", args.actuate)
    try:
        settings.decider()  # the bounds and units agree, before anything starts
    except ValueError as e:
        parser.error(str(e))
    return uvloop.run(PlannerService(service_config(args), settings).run())


if __name__ == "__main__":
    sys.exit(main())
