"""python -m services.balancer [--redis-url URL] [--http-port P] ..."""
import argparse
import sys

import uvloop

from shared.service import add_service_args, parse_service_args, service_config

from .worker import BalancerService


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.balancer", description=__doc__)
    add_service_args(parser)
    args = parse_service_args(parser, argv)
    return uvloop.run(BalancerService(service_config(args)).run())


if __name__ == "__main__":
    sys.exit(main())
