"""End to end through every service vs the in-process engine, same workload, one run.

    python -m loadgen.bench_e2e [--preset small] [--num-requests 32] [--input-len 160]
                                [--output-len 80] [--range-ratio 0.5] [--dtype auto]
                                [--worker-threads share,lend,turns,all] [--worker-cpus LIST]

1. `streamoe up` serves the preset (its own Redis, tokenizer, balancer, prefill rank, decode
   rank, gateway: each its own process); `python -m loadgen` sends a warm-up (the workload's shape,
   other prompts, 4 output tokens), then the `random` workload, every request at once, streamed,
   greedy, EOS ignored; once per `--worker-threads` value (how
   `streamoe up` gives the workers their threads), each on a fresh system: its own run directory
   and an empty prefix cache (the in-process engine has none; blocks a previous run stored would
   spare the services most of their prefill).
2. The system is stopped; the batched engine of `streamoe generate` runs the same warm-up, then
   the same prompts (the same token ids, from the same seeded workload) in this process, all
   submitted at once.
Prints output tokens/s and TTFT p50 of each, and their ratios to the in-process engine. On a
2-core machine `share` splits the cores (prefill and decode get one each) where the in-process
engine has both; `lend` lends a worker the cores the other leaves idle, step by step; `turns` gives
each worker every core, the two taking them in turn, a step each; `all` gives each worker both,
their idle OpenMP threads sleeping. With `--worker-cpus`, the workers and the in-process engine
compute on those CPUs alone, and the other services, Redis and the load generator run on the
rest: the comparison at equal compute, the hops no longer taking cores from the steps.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from shared.launcher.cliargs import cpu_list_flag, cpu_list_text

from .system import running_system


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadgen.bench_e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--input-len", type=int, default=160)
    p.add_argument("--output-len", type=int, default=80)
    p.add_argument("--range-ratio", type=float, default=0.5)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-threads", default="share,lend,turns,all",
                   help="streamoe up --worker-threads values to run the services with, comma-separated, in order")
    p.add_argument("--worker-cpus", type=cpu_list_flag, default=None, metavar="LIST",
                   help="streamoe up --worker-cpus: the workers on these CPUs, the other services, Redis and the "
                   "load generator on the rest; the in-process engine then computes on these CPUs alone")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--out", type=Path, default=None, help="write both results as JSON")
    return p.parse_args(argv)


def loadgen_argv(args: argparse.Namespace, url: str, vocab_size: int, out: Path) -> list[str]:
    return ["--url", url, "--workload", "random", "--num-requests", str(args.num_requests),
            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--range-ratio", str(args.range_ratio), "--vocab-size", str(vocab_size), "--seed", str(args.seed),
            "--rate", "inf", "--no-progress", "--out", str(out)]


def warmup(args: argparse.Namespace) -> argparse.Namespace:
    """The warm-up both sides run first: the workload's shape (its prefill steps, each as large as the
    measured ones) with other prompts and 4 output tokens. A fresh worker's first large step runs slower
    than the next ones, once per process (0.3-0.55 s more for a 2,048-token prefill on the 2-core EPYC
    of loadgen/README.md)."""
    return argparse.Namespace(**{**vars(args), "output_len": 4, "seed": args.seed + 1})


def through_services(args: argparse.Namespace, vocab_size: int, run_dir: Path, worker_threads: str) -> dict:
    pinning = [] if args.worker_cpus is None else ["--worker-cpus", cpu_list_text(args.worker_cpus)]
    with running_system("--preset", args.preset, "--dtype", args.dtype, "--port", str(args.port),
                        "--run-dir", str(run_dir), "--cache-dir", str(run_dir / "cache"),
                        "--worker-threads", worker_threads, *pinning) as url:
        run_loadgen(loadgen_argv(warmup(args), url, vocab_size, run_dir / "warmup.json"), args.client_cpus)
        out = run_dir / "loadgen.json"
        argv = loadgen_argv(args, url, vocab_size, out)
        result = run_loadgen(argv, args.client_cpus)
        result["command"] = "python -m loadgen " + shlex.join(argv)
        result["numerics"] = json.loads((run_dir / "processes.json").read_text()).get("numerics")
        result["worker_threads"] = worker_threads
        return result


def run_loadgen(argv: list[str], cpus: frozenset[int] | None = None) -> dict:
    out = Path(argv[argv.index("--out") + 1])
    subprocess.run([sys.executable, "-m", "loadgen", *argv], check=True, stdout=subprocess.DEVNULL,
                   preexec_fn=None if cpus is None else partial(os.sched_setaffinity, 0, cpus))
    return json.loads(out.read_text())


def in_process(args: argparse.Namespace, model_dir: Path, vocab_size: int) -> dict:
    from loadgen.__main__ import parse_args
    from loadgen.workloads import build
    from shared.engine.engine import Engine, EngineConfig
    from shared.engine.sequence import SamplingParams
    from shared.model.loader import checkpoint_fingerprint, load_model

    def requests_of(workload: argparse.Namespace) -> list:  # the very prompts loadgen sends for it
        return build(parse_args(loadgen_argv(workload, "http://unused", vocab_size, Path(os.devnull)))).requests

    requests = requests_of(args)
    from shared.model.config import ModelArgs
    from shared.runtime.numerics import Shapes, resolve

    if args.worker_cpus is not None:  # where `up` ran its workers
        os.sched_setaffinity(0, args.worker_cpus)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    # the numerics `streamoe up` would choose with this process's threads (calibrated, or cached)
    numerics = resolve(Shapes.of(ModelArgs.from_file(model_dir / "config.json")), "cpu", torch.get_num_threads(),
                       args.dtype, "auto")
    model = load_model(model_dir, dtype=numerics.torch_dtype, moe_backend=numerics.moe_backend)
    engine = Engine(model, EngineConfig(model_fingerprint=checkpoint_fingerprint(model_dir, model.dtype)))
    for i, r in enumerate(requests_of(warmup(args))):
        engine.add_request(f"warm-{i}", r.prompt, SamplingParams(max_tokens=r.output_len, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    start = time.perf_counter()
    for i, r in enumerate(requests):
        engine.add_request(str(i), r.prompt, SamplingParams(max_tokens=r.output_len, ignore_eos=True))
    first: dict[str, float] = {}
    output = 0
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.token_ids:
                first.setdefault(delta.request_id, time.perf_counter() - start)
            output += len(delta.token_ids)
    duration = time.perf_counter() - start
    return {"duration": duration, "completed": len(requests), "total_output_tokens": output,
            "total_input_tokens": sum(len(r.prompt) for r in requests), "output_throughput": output / duration,
            "median_ttft_ms": float(np.median(list(first.values()))) * 1000,
            "numerics": {"dtype": numerics.dtype, "moe_backend": numerics.moe_backend}}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from shared.launcher.up import home

    values = args.worker_threads.split(",")
    if len(set(values)) != len(values):
        raise SystemExit(f"--worker-threads={args.worker_threads}: name each value once")
    vocab_size = _vocab(args.preset)
    args.client_cpus = None  # the load generator's CPUs: with --worker-cpus, the others
    if args.worker_cpus is not None:
        allowed = frozenset(os.sched_getaffinity(0))
        if not args.worker_cpus <= allowed:
            raise SystemExit(f"--worker-cpus={cpu_list_text(args.worker_cpus)}: this process may run on "
                             f"{cpu_list_text(allowed)} only")
        args.client_cpus = allowed - args.worker_cpus or None
    services = {}
    for value in values:
        run_dir = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
        services[value] = through_services(args, vocab_size, run_dir, value)  # creates the preset on first use
    local = in_process(args, home() / "models" / args.preset, vocab_size)
    print(f"{args.preset}, dtype {args.dtype}: {args.num_requests} requests at once, input {args.input_len} and "
          f"output {args.output_len} tokens ±{args.range_ratio:.0%}; {os.cpu_count()} cores"
          + ("" if args.worker_cpus is None else f", workers and the in-process engine on CPUs "
             f"{cpu_list_text(args.worker_cpus)}, the rest on the others"))
    print(f"{'':40} {'completed':>9} {'in tok':>7} {'out tok':>7} {'seconds':>8} {'out tok/s':>9} {'TTFT p50 ms':>11}")
    rows = [(f"services, --worker-threads {value}", r) for value, r in services.items()]
    for name, r in (*rows, ("in-process engine", local)):
        print(f"{name:40} {r['completed']:>9} {r['total_input_tokens']:>7} {r['total_output_tokens']:>7} "
              f"{r['duration']:>8.1f} {r['output_throughput']:>9.1f} {r['median_ttft_ms']:>11.0f}")
    for value, r in services.items():
        print(f"--worker-threads {value}: output tok/s, services / in-process "
              f"{r['output_throughput'] / local['output_throughput']:.2f}x; TTFT p50 "
              f"{r['median_ttft_ms'] / local['median_ttft_ms']:.2f}x")
    print(f"numerics: services {next(iter(services.values()))['numerics']}, in-process {local['numerics']}")
    print(f"loadgen: {next(iter(services.values()))['command']}")
    if args.out:
        args.out.write_text(json.dumps({"services": services, "in_process": local}, indent=2) + "\n")
    return 0


def _vocab(preset: str) -> int:
    from shared.model.presets import PRESETS

    return PRESETS[preset]["vocab_size"]


if __name__ == "__main__":
    sys.exit(main())
