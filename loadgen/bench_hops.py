"""The CPU each streamed token costs past the decode step, hop by hop, against the step's own.

    python -m loadgen.bench_hops [--model DIR | --preset small] [--streams 32] [--steps 150]
                                 [--step-interval-ms 30] [--dtype auto] [--out FILE]

1. A Redis, the tokenizer and a gateway, each its own process (real HTTP, real Redis). This
   process opens --streams streamed completions through the gateway and stands in for prefill and
   decode: it reads each tokenized request and, every --step-interval-ms, writes one token delta per
   request (ids only, as a decode step does) to the raw deltas stream, --steps times. The tokenizer
   detokenizes them, the gateway sends them down the SSE streams, this process reads them.
   Measured: each process's CPU seconds (/proc) over that phase, per token.
2. The decode step's CPU per token at a batch of --streams, in this process (the engine, the
   model, the numerics `streamoe up` would choose, every core).
Each hop's CPU ÷ the step's is the share of a step it costs. Where the step computes on every core
(a small machine), that CPU comes out of the step, and more: a hop that displaces one OpenMP
thread stalls the others at the next barrier.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from shared.launcher.redis_server import start_redis
from shared.launcher.service_process import ServiceProcess
from shared.model.config import ModelArgs
from shared.protocol import streams
from shared.protocol.messages import TokenDelta, TokenizedRequest
from shared.protocol.wire import decode
from shared.runtime.bus import FIELD, encode_fields

MODEL_NAME = "bench-hops"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadgen.bench_hops", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None)
    source.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--streams", type=int, default=32, help="streamed requests at once (the decode batch)")
    p.add_argument("--steps", type=int, default=150, help="token deltas per stream")
    p.add_argument("--step-interval-ms", type=float, default=30.0, help="time between two steps' deltas")
    p.add_argument("--dtype", default="auto", help="the decode step's dtype (auto: what `streamoe up` would choose)")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    args = p.parse_args(argv)
    for name in ("streams", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected at least 1")
    return args


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def stream_phase(args: argparse.Namespace, redis_url: str, gateway: ServiceProcess, watched: dict[str, int],
                       vocab_size: int) -> dict:
    """Every stream opened, then --steps deltas each; CPU of `watched` (name -> pid) over the steps."""
    import aiohttp
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab_size, (args.steps, args.streams), generator=gen).tolist()
    received: list[int] = []

    async def client(session: aiohttp.ClientSession) -> None:
        body = {"model": MODEL_NAME, "prompt": "Count the hops", "max_tokens": args.steps, "stream": True,
                "ignore_eos": True}
        n = 0
        async with session.post(f"http://127.0.0.1:{gateway.port}/v1/completions", json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"the gateway answered {r.status}: {await r.text()}")
            async for line in r.content:
                if line.startswith(b"data: {"):
                    n += 1
        received.append(n)

    requests: dict[str, TokenizedRequest] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        clients = [asyncio.create_task(client(session)) for _ in range(args.streams)]
        last = "0"
        while len(requests) < args.streams:  # what the tokenizer wrote for prefill
            reply = await redis.xread({streams.tokenized_stream(0): last}, count=256, block=200)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    req = decode(fields[FIELD], TokenizedRequest, [])
                    requests[req.request_id] = req
            if any(c.done() for c in clients):
                await asyncio.gather(*clients)  # a client that failed says why
        before = {name: cpu_seconds(pid) for name, pid in watched.items()}
        start = time.perf_counter()
        history = {rid: list(req.prompt_ids) for rid, req in requests.items()}
        for step in range(args.steps):
            async with redis.pipeline(transaction=False) as pipe:
                for column, (rid, req) in enumerate(requests.items()):
                    token = ids[step][column]
                    pipe.xadd(streams.raw_deltas_stream(0), encode_fields(TokenDelta(
                        rid, req.trace_id, req.gateway_id, step, [token],
                        finish_reason="length" if step == args.steps - 1 else None, prefix_ids=history[rid][-6:],
                        num_prompt_tokens=len(req.prompt_ids), prompt_ids=req.prompt_ids if step == 0 else None)))
                    history[rid].append(token)
                await pipe.execute()
            await asyncio.sleep(args.step_interval_ms / 1000)
        await asyncio.gather(*clients)
        seconds = time.perf_counter() - start
        after = {name: cpu_seconds(pid) for name, pid in watched.items()}
    await redis.aclose()
    if received != [args.steps] * args.streams:
        raise RuntimeError(f"expected {args.steps} events on each of {args.streams} streams, got {sorted(received)}")
    tokens = args.steps * args.streams
    return {"tokens": tokens, "seconds": seconds,
            "cpu_us_per_token": {name: 1e6 * (after[name] - before[name]) / tokens for name in watched}}


def decode_step_cpu(model_dir: Path, args: argparse.Namespace) -> dict:
    """CPU microseconds per token of the engine's decode steps at a batch of --streams."""
    from shared.engine.engine import Engine, EngineConfig
    from shared.engine.sequence import SamplingParams
    from shared.model.loader import checkpoint_fingerprint, load_model
    from shared.runtime.numerics import Shapes, resolve

    torch.set_num_threads(os.cpu_count() or 1)
    numerics = resolve(Shapes.of(ModelArgs.from_file(model_dir / "config.json")), "cpu", torch.get_num_threads(),
                       args.dtype, "auto")
    model = load_model(model_dir, dtype=numerics.torch_dtype, moe_backend=numerics.moe_backend)
    engine = Engine(model, EngineConfig(model_fingerprint=checkpoint_fingerprint(model_dir, model.dtype)))
    steps = min(args.steps, 40)
    gen = torch.Generator().manual_seed(1)
    for i in range(args.streams):
        engine.add_request(str(i), torch.randint(3, model.args.vocab_size, (16,), generator=gen).tolist(),
                           SamplingParams(max_tokens=steps + 6, ignore_eos=True))
    while engine.scheduler.waiting or any(not s.output_ids for s in engine.scheduler.running):
        engine.step()  # the prompts
    for _ in range(3):
        engine.step()  # warm
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu, start, tokens = usage.ru_utime + usage.ru_stime, time.perf_counter(), 0
    for _ in range(steps):
        tokens += sum(len(d.token_ids) for d in engine.step())
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_us_per_token": 1e6 * (usage.ru_utime + usage.ru_stime - cpu) / tokens,
            "step_ms": 1e3 * seconds / steps, "threads": torch.get_num_threads(), "dtype": numerics.dtype,
            "moe_backend": numerics.moe_backend}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from shared.launcher.up import resolve_model

    model_dir = resolve_model(argparse.Namespace(model=args.model, preset=args.preset))
    vocab_size = ModelArgs.from_file(model_dir / "config.json").vocab_size
    run_dir = Path(tempfile.mkdtemp(prefix="bench-hops-"))
    redis_proc, redis_url = start_redis(run_dir / "redis", appendonly=False)
    services: list[ServiceProcess] = []
    try:
        import redis as sync_redis

        with sync_redis.Redis.from_url(redis_url) as r:  # the gateway admits once both roles report load
            for role in ("prefill", "decode"):
                r.set(streams.load_key(role, role, 0), b"{}", ex=3600)
        tokenizer = ServiceProcess("services.tokenizer", redis_url, "--model", str(model_dir), log_dir=run_dir)
        services.append(tokenizer)
        gateway = ServiceProcess("services.gateway", redis_url, "--model", str(model_dir), "--served-model-name",
                                 MODEL_NAME, "--request-timeout-s", "600", log_dir=run_dir)
        services.append(gateway)
        hops = asyncio.run(stream_phase(args, redis_url, gateway, {
            "tokenizer": tokenizer.proc.pid, "gateway": gateway.proc.pid, "redis": redis_proc.pid}, vocab_size))
    finally:
        for service in services:
            service.stop()
        redis_proc.terminate()
        redis_proc.wait(timeout=30)
    step = decode_step_cpu(model_dir, args)
    per_token = hops["cpu_us_per_token"]
    result = {"model": str(model_dir), "streams": args.streams, "steps": args.steps,
              "step_interval_ms": args.step_interval_ms, "cores": os.cpu_count(), "hops": hops, "decode_step": step,
              "share_of_step": {name: us / step["cpu_us_per_token"] for name, us in per_token.items()},
              "command": "python -m loadgen.bench_hops " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"{args.streams} streams x {args.steps} tokens through the tokenizer and a gateway; {os.cpu_count()} cores")
    print(f"{'':34} {'CPU us/token':>12} {'/ decode step':>13}")
    for name, us in per_token.items():
        print(f"{name:34} {us:12.1f} {result['share_of_step'][name]:12.2f}x")
    total = sum(per_token.values())
    print(f"{'all three':34} {total:12.1f} {total / step['cpu_us_per_token']:12.2f}x")
    print(f"{'decode step (' + str(args.streams) + ' rows, ' + step['dtype'] + ')':34} "
          f"{step['cpu_us_per_token']:12.1f}  ({step['step_ms']:.1f} ms a step on {step['threads']} threads)")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
