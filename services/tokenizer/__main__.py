"""python -m services.tokenizer --model DIR [--redis-url URL] [--http-port P] ..."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvloop

from shared.runtime.service import add_service_args, parse_service_args, service_config

from .codec import TokenizerService


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.tokenizer", description=__doc__)
    add_service_args(parser)
    parser.add_argument("--model", type=Path, required=True, help="model directory (tokenizer.json, "
                                                                  "tokenizer_config.json)")
    args = parse_service_args(parser, argv)
    service = TokenizerService(service_config(args), args.model)
    return uvloop.run(service.run())


if __name__ == "__main__":
    sys.exit(main())
