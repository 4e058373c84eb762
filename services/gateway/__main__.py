"""python -m services.gateway --model DIR [--http-port 8000] [--api-key KEY ...] [--redis-url URL] ..."""
import argparse
import sys
from pathlib import Path

import uvloop

from shared.cache.reply_memory import DEFAULT_TTL_S
from shared.launcher.cliargs import non_negative_float, non_negative_int, positive_float, positive_int, slo_flag
from shared.planner.slo import DEFAULT_SLO
from shared.runtime.service import add_service_args, parse_service_args, service_config

from .app import GatewayService, GatewaySettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.gateway", description=__doc__)
    add_service_args(parser)
    parser.add_argument("--model", type=Path, required=True, help="model directory (generation_config.json)")
    parser.add_argument("--served-model-name", default=None, help="default: the model directory's name")
    parser.add_argument("--api-key", action="append", default=None, help="repeat for several keys")
    parser.add_argument("--max-body-bytes", type=int, default=8 << 20)
    parser.add_argument("--max-inflight", type=int, default=256)
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--max-tokens-limit", type=int, default=4096, help="the largest max_tokens accepted")
    parser.add_argument("--chat-default-max-tokens", type=int, default=256,
                        help="max_tokens of a chat request that sets none (decode KV is reserved for it)")
    parser.add_argument("--reply-memory-ttl-s", type=int, default=DEFAULT_TTL_S,
                        help="how long a chat reply's generated ids are remembered, so the next turn sending its "
                             "text back is an exact extension of this one (0: off; shared/cache/reply_memory.py)")
    parser.add_argument("--redis-wait-replicas", type=non_negative_int, default=0,
                        help="replicas that must acknowledge a request (WAIT) before it is accepted; "
                             "fewer within --redis-wait-timeout-ms: 503 (0: off)")
    parser.add_argument("--redis-wait-timeout-ms", type=positive_int, default=200)
    parser.add_argument("--progress-timeout-s", type=non_negative_float, default=30.0,
                        help="a request with no new token for this long is published again, or its lost "
                             "tokens sent again (0: off)")
    parser.add_argument("--slo", type=slo_flag, default=slo_flag(DEFAULT_SLO), metavar="SLO",
                        help=f"the latency targets, exported as streamoe_slo_target_seconds (default {DEFAULT_SLO})")
    parser.add_argument("--no-dashboard", action="store_true",
                        help="serve no /dashboard and sample nothing for it (services/README.md, \"Dashboard\")")
    parser.add_argument("--dashboard-interval-s", type=positive_float, default=5.0,
                        help="how often the dashboard scrapes every service's /metrics")
    parser.add_argument("--dashboard-history-s", type=positive_float, default=600.0,
                        help="how much history /dashboard/state keeps (in memory)")
    args = parse_service_args(parser, argv)
    raw = [args.api_key] if isinstance(args.api_key, str) else args.api_key or []  # STREAMOE_API_KEY: one string
    keys = tuple(k for arg in raw for k in arg.split(",") if k)
    settings = GatewaySettings(args.model, args.served_model_name or args.model.resolve().name, keys,
                               args.max_body_bytes, args.max_inflight, request_timeout_s=args.request_timeout_s,
                               max_tokens_limit=args.max_tokens_limit,
                               chat_default_max_tokens=args.chat_default_max_tokens,
                               reply_memory_ttl_s=args.reply_memory_ttl_s,
                               redis_wait_replicas=args.redis_wait_replicas,
                               redis_wait_timeout_ms=args.redis_wait_timeout_ms,
                               progress_timeout_s=args.progress_timeout_s, slo=args.slo,
                               dashboard=not args.no_dashboard, dashboard_interval_s=args.dashboard_interval_s,
                               dashboard_history_s=args.dashboard_history_s)
    return uvloop.run(GatewayService(service_config(args), settings).run())


if __name__ == "__main__":
    sys.exit(main())
