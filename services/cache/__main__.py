"""python -m services.cache --model DIR [--cache-dir DIR] [--cache-capacity-mib N] [--redis-url URL] ..."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvloop

from shared.runtime.service import add_service_args, parse_service_args, service_config

from .lookup import CacheService, CacheSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.cache", description=__doc__)
    add_service_args(parser)
    parser.add_argument("--model", type=Path, required=True, help="model directory (its fingerprint keys the blocks)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the block store (omit: the cache is off)")
    parser.add_argument("--cache-capacity-mib", type=int, default=8192)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                        help="the workers' compute dtype (it changes the KV, so the blocks' keys); auto: wait "
                             "for the value the workers calibrated and published in Redis")
    parser.add_argument("--device", default="cpu")
    args = parse_service_args(parser, argv)
    settings = CacheSettings(args.model, args.cache_dir, args.cache_capacity_mib << 20, args.dtype, args.device)
    return uvloop.run(CacheService(service_config(args), settings).run())


if __name__ == "__main__":
    sys.exit(main())
