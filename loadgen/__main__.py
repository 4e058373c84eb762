"""The load generator (loadgen/README.md): send a workload to an OpenAI-compatible server, measure it.

    python -m loadgen --url URL --workload random|shared-prefix|multi-turn|sharegpt FILE|trace FILE
        --num-requests N [--input-len N --output-len N --range-ratio R] [--rate R --burstiness B |
        --max-concurrency C] [--duration S] [--slo ttft:MS itl:MS] --out result.json [--plot DIR]

Prints a progress bar (stderr) and a summary table (stdout); `--out` writes the result dict with the
keys `vllm bench serve` writes, plus cache hit rates, errors by HTTP code and the run's economics.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import sys
from pathlib import Path

from . import spec_counters, workloads
from .client import Client, base_url, first_model, make_session
from .report import build, parse_slo, summary
from .runner import Run, RunSettings, run

FILE_WORKLOADS = ("sharegpt", "trace")
DEFAULT_NUM_REQUESTS = 1000  # synthetic workloads; a file's workload defaults to all its entries
DEFAULT_INPUT_LEN, DEFAULT_OUTPUT_LEN = 1024, 128  # as vllm's random dataset


def _number(kind: type, low: float, *, low_open: bool = True, allow_inf: bool = False, high: float | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        ok = value is not None and not (isinstance(value, float) and math.isnan(value))
        ok = ok and (value > low if low_open else value >= low) and (allow_inf or not math.isinf(value))
        ok = ok and (high is None or value < high)
        if not ok:
            bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"{text!r}: must be {'an integer' if kind is int else 'a number'} "
                                             f"{bound}{' (or inf)' if allow_inf else ''}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--workload", nargs="+", required=True, metavar=("NAME", "FILE"),
                   help=f"one of {', '.join(workloads.BUILDERS)}; sharegpt and trace take a FILE")
    p.add_argument("--dataset-path", type=Path, help="the FILE of sharegpt/trace, if not given after --workload")
    p.add_argument("--num-requests", type=_number(int, 1, low_open=False),
                   help=f"requests to send (synthetic: {DEFAULT_NUM_REQUESTS}; files: every entry)")
    p.add_argument("--input-len", type=_number(int, 1, low_open=False),
                   help=f"prompt tokens ({DEFAULT_INPUT_LEN}); shared-prefix: the unique suffix; "
                        "multi-turn: words per user message")
    p.add_argument("--output-len", type=_number(int, 1, low_open=False),
                   help=f"max_tokens ({DEFAULT_OUTPUT_LEN}); sharegpt: the gpt reply's words unless given")
    p.add_argument("--range-ratio", type=_number(float, 0, low_open=False, high=1), default=0.0,
                   help="lengths uniform in [len*(1-R), len*(1+R)]")
    p.add_argument("--prompt-format", choices=("ids", "text"), default="ids",
                   help="token-id lists, or words for a server that only takes text")
    p.add_argument("--vocab-size", type=_number(int, workloads.FIRST_TOKEN_ID + 1, low_open=False), default=1024,
                   help=f"synthetic token ids are drawn from [{workloads.FIRST_TOKEN_ID}, N)")
    p.add_argument("--prefix-len", type=_number(int, 1, low_open=False), default=512, help="shared-prefix: tokens")
    p.add_argument("--num-prefixes", type=_number(int, 1, low_open=False), default=4,
                   help="shared-prefix: request i uses prefix i mod N")
    p.add_argument("--num-turns", type=_number(int, 1, low_open=False), default=4, help="multi-turn: turns each")
    p.add_argument("--trace-speedup", type=_number(float, 0), default=1.0, help="trace: replay N times faster")
    p.add_argument("--rate", type=_number(float, 0, allow_inf=True), default=math.inf,
                   help="arrivals per second (inf: all at once)")
    p.add_argument("--burstiness", type=_number(float, 0), default=1.0, help="gamma shape; 1 = Poisson")
    p.add_argument("--max-concurrency", type=_number(int, 1, low_open=False), help="requests in flight at most")
    p.add_argument("--duration", type=_number(float, 0), help="seconds: then send no more requests")
    p.add_argument("--grace-period", type=_number(float, 0, low_open=False), default=30.0,
                   help="seconds in-flight requests get after --duration before they are cancelled")
    p.add_argument("--request-timeout", type=_number(float, 0), default=600.0, help="seconds per request")
    p.add_argument("--slo", nargs="+", default=[], metavar="METRIC:MS",
                   help="goodput counts requests meeting every one: ttft, itl (a request's worst gap), tpot, e2el, "
                   "space- or comma-separated (default: ttft:2000 itl:100)")
    p.add_argument("--model", help="the model name to send (default: the first id of GET /v1/models)")
    # NOTE: STREAMOE_API_KEY is read after parsing: a default would show the key in --help
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' (also to /services; default: "
                   "$STREAMOE_API_KEY)")
    p.add_argument("--temperature", type=_number(float, 0, low_open=False), default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly max_tokens")
    p.add_argument("--seed", type=int, default=0, help="workload and arrival randomness")
    p.add_argument("--num-gpus", type=_number(int, 1, low_open=False), default=2,
                   help="economics: GPUs the run occupies (one prefill and one decode rank)")
    p.add_argument("--gpu-hour-usd", type=_number(float, 0, low_open=False), default=2.0, help="economics")
    p.add_argument("--out", type=Path, help="write the result JSON here")
    p.add_argument("--plot", type=Path, metavar="DIR", help="write latency CDF and throughput PNGs here")
    p.add_argument("--save-requests", action="store_true", help="put per-request records in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    opts = p.parse_args(argv)
    opts.api_key = opts.api_key or os.environ.get("STREAMOE_API_KEY") or None
    name, *rest = opts.workload
    if name not in workloads.BUILDERS:
        p.error(f"argument --workload: {name!r}: choose from {', '.join(workloads.BUILDERS)}")
    if name in FILE_WORKLOADS:
        if len(rest) > 1 or (rest and opts.dataset_path):
            p.error(f"argument --workload: {' '.join(opts.workload)!r}: give one FILE (--workload {name} FILE)")
        path = Path(rest[0]) if rest else opts.dataset_path
        if path is None:
            p.error(f"argument --workload: {name} needs a FILE: --workload {name} FILE")
        if not path.is_file():
            p.error(f"argument --workload: {name} {str(path)!r}: no such file")
        opts.dataset_path = path
    elif rest:
        p.error(f"argument --workload: {' '.join(opts.workload)!r}: {name} takes no FILE")
    opts.workload = name
    try:
        opts.slo = parse_slo(opts.slo)
    except ValueError as e:
        p.error(f"argument --slo: {e}")
    if name not in FILE_WORKLOADS:
        opts.num_requests = opts.num_requests or DEFAULT_NUM_REQUESTS
        opts.output_len = opts.output_len or DEFAULT_OUTPUT_LEN
    opts.input_len = opts.input_len or DEFAULT_INPUT_LEN
    return opts


async def measure(opts: argparse.Namespace, workload: workloads.Workload) -> Run:
    url = base_url(opts.url)
    async with make_session(opts.request_timeout) as session:
        opts.model = opts.model or await first_model(session, url, opts.api_key)
        client = Client(session, url, opts.model, api_key=opts.api_key, temperature=opts.temperature,
                        ignore_eos=opts.ignore_eos)
        settings = RunSettings(opts.rate, opts.burstiness, opts.max_concurrency, opts.duration, opts.grace_period,
                               opts.seed, not opts.no_progress)
        # speculation's counters, if the server has any
        before = await asyncio.to_thread(spec_counters.scrape, url, api_key=opts.api_key)
        result = await run(workload, client, settings)
        result.spec_decode = spec_counters.summarize(
            before, await asyncio.to_thread(spec_counters.scrape, url, api_key=opts.api_key))
        return result


def command(argv: list[str]) -> str:
    """The command line that produced a result, its API key masked."""
    masked = ["***" if before == "--api-key" else a.split("=")[0] + "=***" if a.startswith("--api-key=") else a
              for before, a in zip(["", *argv], argv)]
    return shlex.join(["python", "-m", "loadgen", *masked])


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        workload = workloads.build(opts)
    except (workloads.WorkloadError, OSError, UnicodeDecodeError) as e:
        print(f"python -m loadgen: error: --workload {opts.workload}: {e}", file=sys.stderr)
        return 2
    try:
        result_run = asyncio.run(measure(opts, workload))
    except (RuntimeError, OSError) as e:
        print(f"python -m loadgen: error: {e}", file=sys.stderr)
        return 1
    flags = {k: v for k, v in vars(opts).items() if k != "api_key"}  # NOTE: never write a secret to a file
    result = build(result_run, workload, flags=flags, slo=opts.slo, num_gpus=opts.num_gpus,
                   gpu_hour_usd=opts.gpu_hour_usd, save_requests=opts.save_requests)
    result["command"] = command(sys.argv[1:] if argv is None else argv)
    print(summary(result))
    print(result["command"])
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {opts.out}")
    if opts.plot:
        from .plots import write_plots

        for path in write_plots(result_run.results, result_run.duration_s, opts.plot, f"({workload.name})"):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
