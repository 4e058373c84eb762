"""`streamoe`: the command line (services/README.md, "The command line")."""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from shared.cost.economics import GPU_HOUR_USD, GPUS_PER_NODE, PRICES_PER_MILLION
from shared.cost.metrics_report import DEFAULT_URL, ScrapeError, collect, format_table, full_report
from shared.ep.eplb import NodeCounts
from shared.launcher.cliargs import (
    SPECULATIVE_TOKENS_HELP,
    FlagValueError,
    apply_env_defaults,
    cpu_list_flag,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_speculative_tokens,
    slo_flag,
    speculative_tokens_flag,
    units_flag,
)
from shared.runtime.numerics import MOE_BACKEND_HELP, moe_backend_flag


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"streamoe {args.command}: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamoe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init-model", help="write a deterministic random checkpoint of a preset")
    init.add_argument("dir", type=Path)
    init.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    init.add_argument("--fp8", action="store_true", help="store linear weights as block-scaled float8_e4m3fn")
    init.add_argument("--mtp", action="store_true",
                      help="add one randomly initialised MTP layer (train it with `streamoe distill-mtp`)")
    init.set_defaults(handler=_init_model)

    distill = commands.add_parser("distill-mtp", help="train a checkpoint's MTP layer on the model's own greedy "
                                                      "continuations (shared/model/README.md)")
    distill.add_argument("--model", type=Path, required=True, help="a checkpoint directory with an MTP layer")
    distill.add_argument("--out", type=Path, default=None,
                         help="write the trained checkpoint to this new directory (default: update --model in place)")
    distill.add_argument("--steps", type=positive_int, default=None,
                         help="optimizer steps (default: 3000 up to tiny's size, 1500 above; shared/model/README.md)")
    distill.add_argument("--seed", type=int, default=0, help="the data's and the training's seed")
    distill.add_argument("--threads", type=positive_int, default=None,
                         help="torch threads (default: torch's); 1 gives the same bytes for a seed every run")
    distill.set_defaults(handler=_distill_mtp)

    gen = commands.add_parser("generate", help="offline generation from a raw prompt")
    gen.add_argument("--model", type=Path, required=True, help="a Hugging Face model directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help='print one line {"text": ..., "token_ids": [...]}')
    gen.add_argument("--dtype", choices=["auto", "bf16", "fp32", "fp16"], default="auto",
                     help="compute dtype; auto: the checkpoint's or fp32, whichever calibration measures faster")
    gen.add_argument("--moe-backend", type=moe_backend_flag, default="auto", metavar="auto|BACKEND|PLAN",
                     help=MOE_BACKEND_HELP)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    gen.add_argument("--speculative-tokens", type=speculative_tokens_flag, default="auto", metavar="N|auto",
                     help=SPECULATIVE_TOKENS_HELP)
    gen.set_defaults(handler=_generate)

    upp = commands.add_parser("up", help="the whole system on this machine")
    source = upp.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None)
    source.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    upp.add_argument("--host", default="127.0.0.1")
    upp.add_argument("--port", type=int, default=8000)
    upp.add_argument("--prefill-ep", type=int, default=1)
    upp.add_argument("--decode-ep", type=int, default=1)
    upp.add_argument("--worker-threads", default="share", metavar="share|lend|turns|all|N",
                     help="torch threads of each prefill/decode worker: share (the cores split between them), "
                          "lend (its share, plus every core the other workers leave idle, step by step), turns "
                          "(every core, the workers taking them in turn, a step each; not with EP groups), all "
                          "(every worker all the cores; idle OpenMP threads then sleep) or a count")
    upp.add_argument("--worker-cpus", type=cpu_list_flag, default=None, metavar="LIST",
                     help="run the prefill and decode workers on these CPUs (e.g. 0-3,8; --worker-threads splits "
                          "them) and every other process of the run (tokenizer, gateway, cache, balancer, Redis) "
                          "on the rest, so that no token's trip through them takes a core from a step")
    upp.add_argument("--ep-wire", choices=["fp8", "exact"], default="fp8")
    upp.add_argument("--num-redundant-experts", type=int, default=0)
    upp.add_argument("--ep-nodes", type=NodeCounts.parse, default=NodeCounts(), metavar="N|GROUP=N,...",
                     help="nodes each EP group spans (EPLB's hierarchy): one count, or per group, e.g. decode=2")
    upp.add_argument("--cache-dir", type=Path, default=None,
                     help="the prefix cache's block store (default: $STREAMOE_HOME/cache)")
    upp.add_argument("--cache-capacity-mib", type=int, default=8192)
    upp.add_argument("--no-prefix-cache", action="store_true", help="run without the on-disk prefix cache")
    upp.add_argument("--prefill-overlap", choices=["on", "off", "auto"], default="auto",
                     help="two overlapped micro-batches in the prefill group (auto: on)")
    upp.add_argument("--decode-overlap", choices=["on", "off", "auto"], default="auto",
                     help="two overlapped micro-batches in the decode group (auto: off)")
    upp.add_argument("--redis-url", default=None, help="default: start an embedded redis-server")
    upp.add_argument("--redis-cluster", action="store_true",
                     help="--redis-url names a node of a Redis Cluster (STREAMOE_REDIS_CLUSTER=1)")
    upp.add_argument("--redis-shards", type=non_negative_int, default=0, metavar="N",
                     help="start an embedded Redis Cluster of N primaries instead of one redis-server (0: don't)")
    upp.add_argument("--redis-replicas", type=non_negative_int, default=0, metavar="R",
                     help="replicas per primary of the embedded cluster")
    upp.add_argument("--redis-appendfsync", choices=["everysec", "always"], default="everysec",
                     help="when the embedded Redis fsyncs its append-only file: everysec (a crash of the machine "
                     "loses up to a second) or always (before each reply); measured in loadgen/README.md")
    upp.add_argument("--redis-wait-replicas", type=non_negative_int, default=None, metavar="N",
                     help="replicas that must have a request before the gateway accepts it "
                          "(default: 1 with --redis-replicas >= 1, else 0)")
    upp.add_argument("--progress-timeout-s", type=non_negative_float, default=30.0,
                     help="the gateway repairs a request with no new token for this long (0: off)")
    upp.add_argument("--stream-partitions", type=positive_int, default=None, metavar="N",
                     help="partitions of the request queue and the workers' deltas (default: --redis-shards, or 1)")
    upp.add_argument("--dtype", choices=["auto", "bf16", "fp32", "fp16"], default="auto",
                     help="compute dtype; auto: calibrated once here, then given to every worker")
    upp.add_argument("--moe-backend", type=moe_backend_flag, default="auto", metavar="auto|BACKEND|PLAN",
                     help=MOE_BACKEND_HELP)
    upp.add_argument("--device", default="cpu")
    upp.add_argument("--speculative-tokens", type=speculative_tokens_flag, default="auto", metavar="N|auto",
                     help=SPECULATIVE_TOKENS_HELP + "; given to every prefill and decode rank")
    upp.add_argument("--api-key", default=None)
    upp.add_argument("--slo", type=slo_flag, default=None, metavar="SLO",
                     help="latency targets for the gateway (its dashboard) and the planner, e.g. 'ttft:2000 itl:100' "
                     "(ms; the default)")
    scale = upp.add_argument_group("autoscaling (services/planner; shared/planner/README.md)")
    scale.add_argument("--autoscale", action="store_true",
                       help="run the planner and start or drain prefill and decode ranks as it decides; each rank "
                       "it adds is an EP group of its own (needs --prefill-ep 1 --decode-ep 1)")
    scale.add_argument("--autoscale-profile", type=Path, default=None, metavar="FILE",
                       help="what one rank serves (python -m loadgen.profile); required with --autoscale")
    scale.add_argument("--autoscale-min", type=units_flag, default=None, metavar="prefill=N,decode=M",
                       help="the floor (default prefill=1,decode=1); idle scales here")
    scale.add_argument("--autoscale-max", type=units_flag, default=None, metavar="prefill=N,decode=M",
                       help="the ceiling (default: prefill as the floor, decode=<cores - 1>)")
    scale.add_argument("--autoscale-interval-s", type=positive_float, default=30.0, help="how often it decides")
    scale.add_argument("--autoscale-slo-correction", choices=["on", "off"], default="on",
                       help="scale demand by measured/bound latency when the SLO is missed (off where more ranks "
                       "add no capacity, as on one machine's cores)")
    upp.add_argument("--ready-timeout", type=float, default=300.0)
    upp.add_argument("--run-dir", type=Path, default=None, help="default: $STREAMOE_HOME/runs/<time>")
    upp.set_defaults(handler=_up)

    cost = commands.add_parser(
        "cost", help="cost, revenue and margin from the services' counters (shared/cost/README.md)")
    cost.add_argument("--url", type=_http_url, default=None,
                      help="a gateway: read every service it lists at /services "
                           f"(default {DEFAULT_URL} when neither --processes nor --metrics is given)")
    cost.add_argument("--processes", type=Path, default=None, help="a `streamoe up` run's processes.json")
    cost.add_argument("--metrics", nargs="+", default=[], metavar="FILE",
                      help="saved Prometheus text files (STREAMOE_METRICS: paths separated by spaces)")
    cost.add_argument("--gpu-hour-usd", type=non_negative_float, default=GPU_HOUR_USD,
                      help=f"USD per GPU-hour (default {GPU_HOUR_USD:g})")
    cost.add_argument("--prices", type=_prices, default=PRICES_PER_MILLION, metavar="HIT,MISS,OUT",
                      help="USD per 1M tokens: input cache hit, input cache miss, output "
                           f"(default {','.join(f'{p:g}' for p in PRICES_PER_MILLION)})")
    cost.add_argument("--gpus-per-node", type=positive_int, default=GPUS_PER_NODE)
    cost.add_argument("--api-key", default=None,
                      help="the gateway's API key, for its /services and /usage (STREAMOE_API_KEY)")
    cost.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    cost.set_defaults(handler=_cost)

    planp = commands.add_parser(
        "plan", help="prefill and decode ranks per interval for a load and SLOs, with its cost against provisioning "
                     "the peak all along (shared/planner/README.md)")
    planp.add_argument("--profile", type=Path, required=True,
                       help="what one rank serves (JSON: `python -m loadgen.profile` writes it)")
    planp.add_argument("--load", type=Path, required=True,
                       help="a .csv (start_s,duration_s,requests_per_s,mean_input_len,mean_output_len,cache_hit_rate) "
                            "or a .jsonl Mooncake trace")
    planp.add_argument("--slo", type=slo_flag, default=None, metavar="SLO",
                       help="ttft:MS itl:MS tpot:MS e2el:MS, comma- or space-separated (default: ttft:2000 itl:100)")
    planp.add_argument("--unit", type=units_flag, default=None, metavar="prefill=N,decode=M",
                       help="ranks that scale together, e.g. an EP group (default: prefill=1,decode=1)")
    planp.add_argument("--interval-s", type=positive_float, default=180.0,
                       help="a trace's interval (a .csv brings its own; default 180)")
    planp.add_argument("--gpu-hour-usd", type=non_negative_float, default=GPU_HOUR_USD,
                       help=f"USD per GPU-hour (default {GPU_HOUR_USD:g})")
    planp.add_argument("--gpus-per-node", type=positive_int, default=GPUS_PER_NODE)
    planp.add_argument("--out", type=Path, required=True, help="write the plan as JSON")
    planp.add_argument("--plot", type=Path, default=None, help="write load and ranks over time as a PNG")
    planp.set_defaults(handler=_plan)

    for sub in (init, distill, gen, upp, cost, planp):
        apply_env_defaults(sub)
    return parser


def _plan(args: argparse.Namespace) -> int:
    from shared.planner import plan as planner
    from shared.planner.slo import parse_slo

    result = planner.plan(planner.load_profile(args.profile), planner.load_load(args.load, args.interval_s),
                          args.slo or parse_slo(None), args.unit or planner.Units(), args.gpu_hour_usd,
                          args.gpus_per_node)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot is not None:
        planner.plot(result, args.plot)
    print(planner.summary(result))
    return 0


def _non_negative(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _prices(raw: str) -> tuple[float, float, float]:
    values = [_non_negative(part) for part in raw.split(",")]
    if len(values) != 3 or None in values:
        raise FlagValueError(f"{raw!r}: expected three USD prices >= 0 per 1M tokens, HIT,MISS,OUT "
                             "(e.g. 0.14,0.55,2.19)")
    return tuple(values)


def _http_url(raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise FlagValueError(f"{raw!r}: expected an http:// or https:// URL, e.g. http://127.0.0.1:8000")
    return raw


def _init_model(args: argparse.Namespace) -> int:
    from shared.model.presets import init_model

    path = init_model(args.dir, args.preset, seed=args.seed, dtype=args.dtype, fp8=args.fp8, mtp=args.mtp)
    print(f"wrote {args.preset} checkpoint to {path}", file=sys.stderr)
    return 0


def _distill_mtp(args: argparse.Namespace) -> int:
    import torch

    from shared.model.distill import distill_mtp

    if args.threads:
        torch.set_num_threads(args.threads)
    distill_mtp(args.model, args.out, steps=args.steps, seed=args.seed, log=lambda line: print(line, flush=True))
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch
    from tokenizers import Tokenizer

    from shared.engine.engine import Engine, EngineConfig
    from shared.engine.sequence import SamplingParams
    from shared.model.loader import checkpoint_fingerprint, load_model
    from shared.runtime.numerics import Shapes, resolve

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.temperature < 0:
        raise ValueError(f"--temperature={args.temperature}: must be >= 0")
    tokenizer_path = args.model / "tokenizer.json"
    if not tokenizer_path.exists():
        raise FileNotFoundError(f"{tokenizer_path}: the model directory has no tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    prompt_ids = tokenizer.encode(args.prompt).ids
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                            ignore_eos=args.ignore_eos)
    params.validate()
    numerics = resolve(Shapes.of_model(args.model), args.device, args.threads, args.dtype, args.moe_backend)
    print(f"streamoe generate: --dtype {numerics.dtype} --moe-backend {numerics.moe_backend} ({numerics.source})",
          file=sys.stderr)
    model = load_model(args.model, dtype=numerics.dtype, device=args.device, moe_backend=numerics.moe_backend)
    speculative = resolve_speculative_tokens(args.speculative_tokens, model.mtp is not None)
    engine = Engine(model, EngineConfig(kv_cache_bytes=_kv_bytes_for(model, len(prompt_ids) + args.max_tokens),
                                        model_fingerprint=checkpoint_fingerprint(args.model, model.dtype),
                                        speculative_tokens=speculative))
    engine.add_request("cli", prompt_ids, params)
    token_ids: list[int] = []
    while engine.has_unfinished():
        for delta in engine.step():
            token_ids.extend(delta.token_ids)
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    if args.json:
        out = {"text": text, "token_ids": token_ids}
        if engine.spec.num_drafts:
            out["spec"] = {"draft_tokens": engine.spec.num_draft_tokens,
                           "accepted_tokens": engine.spec.num_accepted_tokens}
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(text)
    return 0


def _up(args: argparse.Namespace) -> int:
    from shared.launcher.up import up

    return up(args)


def _cost(args: argparse.Namespace) -> int:
    files = shlex.split(args.metrics) if isinstance(args.metrics, str) else args.metrics  # STREAMOE_METRICS
    try:
        # NOTE: STREAMOE_API_KEY may list the gateway's keys comma-separated, as the gateway reads it: one is enough
        key = (args.api_key or "").split(",")[0].strip() or None
        totals = collect([Path(f) for f in files], args.url, args.processes, api_key=key)
    except ScrapeError as e:
        print(f"streamoe cost: error: {e}", file=sys.stderr)
        return 1
    report = full_report(totals, args.gpu_hour_usd, args.prices, args.gpus_per_node)
    print(json.dumps(report) if args.json else format_table(report))
    return 0


def _kv_bytes_for(model, num_tokens: int) -> int:
    from shared.cache.hashing import BLOCK_SIZE
    from shared.model.kv_cache import LatentKVPool

    blocks = -(-num_tokens // BLOCK_SIZE)
    return blocks * BLOCK_SIZE * LatentKVPool.bytes_per_token(model.args, model.dtype)


if __name__ == "__main__":
    sys.exit(main())
