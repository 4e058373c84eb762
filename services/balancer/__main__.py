"""python -m services.balancer [--redis-url URL] [--http-port P] ..."""
import argparse
import sys

import uvloop

from shared.ep.eplb import NodeCounts
from shared.runtime.service import add_service_args, parse_service_args, service_config

from .expert_lb import EPLBSettings
from .router import BalancerService


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.balancer", description=__doc__)
    add_service_args(parser)
    eplb = parser.add_argument_group("expert-parallel load balancer (EPLB)")
    eplb.add_argument("--eplb-interval-s", type=float, default=30.0, help="how often placements are reconsidered "
                      "(0: never)")
    eplb.add_argument("--eplb-window", type=int, default=10, help="intervals in the moving load window")
    eplb.add_argument("--ep-nodes", type=NodeCounts.parse, default=NodeCounts(), metavar="N|GROUP=N,...",
                      help="nodes each EP group spans: one count for all, or per group id (by default its role), "
                      "e.g. decode=18,prefill=4 (default 1)")
    eplb.add_argument("--eplb-min-gain", type=float, default=0.05)
    eplb.add_argument("--eplb-min-tokens", type=int, default=1000)
    args = parse_service_args(parser, argv)
    settings = EPLBSettings(args.eplb_window, args.ep_nodes, args.eplb_min_gain, args.eplb_min_tokens)
    return uvloop.run(BalancerService(service_config(args), settings, args.eplb_interval_s).run())


if __name__ == "__main__":
    sys.exit(main())
