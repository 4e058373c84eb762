"""Expert parallelism over Redis: overlap on vs off, and bytes on the wire per dispatched token.

    python -m loadgen.bench_ep [--preset small] [--ep 2] [--prefill-len 2048] [--decode-batch 64]

Starts a Redis and `--ep` rank processes (this module with `--rank R`), each holding its slice of
the routed experts, exchanging through the Redis transport with the fp8 wire. Each rank runs:
- prefill: 2 prompts of `--prefill-len` tokens per rank in one step, overlap off then on;
- decode: `--decode-batch` running requests per rank, steps timed with overlap off then on.
Overlap off, the compute thread waits for every exchange: that wait is the exposed communication.
On, it waits only when both micro-batches are on the wire: "hidden" = 1 - exposed(on)/exposed(off).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadgen.bench_ep")
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--redis-url", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def wire_bytes_per_token(hidden: int, top_k: int, slots: int) -> dict[str, float]:
    """Dispatch payload bytes per token sent to a rank, measured on real encoded payloads."""
    from shared.ep.wire import encode_dispatch

    tokens = 512
    x = torch.randn(tokens, hidden)
    pair_token = torch.arange(tokens).repeat_interleave(top_k)
    pair_slot = torch.randint(0, slots, (tokens * top_k,))
    out = {}
    for name, wire, dtype in (("fp8", "fp8", torch.float32), ("bf16", "exact", torch.bfloat16),
                              ("fp32", "exact", torch.float32)):
        out[name] = len(encode_dispatch(x.to(dtype), pair_token, pair_slot, wire)) / tokens
    return out


async def rank_main(args: argparse.Namespace) -> dict:
    from shared.engine.engine import Engine, EngineConfig
    from shared.engine.sequence import SamplingParams
    from shared.ep.eplb import initial_placement
    from shared.ep.group import EPGroup
    from shared.ep.moe import apply_expert_parallel, keep_tensor, local_experts
    from shared.ep.overlap import Overlap, Tracer
    from shared.ep.transport import RedisTransport
    from shared.launcher.up import home
    from shared.model.config import ModelArgs
    from shared.model.loader import load_model

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ep))
    path = home() / "models" / args.preset
    config = ModelArgs.from_file(path / "config.json")
    layers = list(range(config.first_k_dense_replace, config.num_hidden_layers))
    placement = initial_placement(config.n_routed_experts, config.n_routed_experts, len(layers))
    group: list[EPGroup] = []
    model = load_model(path, dtype=args.dtype, keep=keep_tensor(local_experts(placement, layers, args.rank, args.ep)))
    apply_expert_parallel(model, args.rank, args.ep, placement, lambda *a: group[0].exchange(*a), "fp8")
    transport = RedisTransport(args.redis_url, "bench", args.rank, args.ep, "bench", timeout_s=600,
                               join_timeout_s=600)
    await transport.start()
    group.append(EPGroup(transport, asyncio.get_running_loop(), timeout_s=600))
    overlap = Overlap(group[0], Tracer(None, args.rank, "bench"))
    thread = ThreadPoolExecutor(1)
    gen = torch.Generator().manual_seed(args.rank)
    result = {}

    async def timed_steps(engine, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            await group[0].begin_step(True)
            start = time.perf_counter()
            await asyncio.get_running_loop().run_in_executor(thread, engine.step)
            times.append(time.perf_counter() - start)
        return times

    for mode in ("off", "on", "off", "on"):  # interleaved: drift on a shared machine hits both
        engine = Engine(model, EngineConfig(kv_cache_bytes=1 << 30, max_num_batched_tokens=2 * args.prefill_len,
                                            max_num_seqs=max(64, args.decode_batch)))
        engine.runner.overlap = overlap if mode == "on" else None
        for i in range(2):
            prompt = torch.randint(6, config.vocab_size, (args.prefill_len,), generator=gen).tolist()
            engine.add_request(f"p{i}", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        waited, blocked = group[0].waited_s, overlap.blocked_s
        step = await timed_steps(engine, 1)
        exposed = (group[0].waited_s - waited) + (overlap.blocked_s - blocked)
        result.setdefault(f"prefill_{mode}", []).append({"step_s": step[0], "exposed_s": exposed})
        engine = Engine(model, EngineConfig(kv_cache_bytes=1 << 30, max_num_seqs=max(64, args.decode_batch)))
        engine.runner.overlap = overlap if mode == "on" else None
        for i in range(args.decode_batch):
            prompt = torch.randint(6, config.vocab_size, (32,), generator=gen).tolist()
            engine.add_request(f"d{i}", prompt, SamplingParams(max_tokens=args.decode_steps + 2, ignore_eos=True))
        await timed_steps(engine, 1)  # the prompts
        waited, blocked = group[0].waited_s, overlap.blocked_s
        steps = await timed_steps(engine, args.decode_steps)
        exposed = (group[0].waited_s - waited) + (overlap.blocked_s - blocked)
        result.setdefault(f"decode_{mode}", []).append(
            {"step_s": statistics.median(steps), "exposed_s": exposed / len(steps)})
    await transport.close()
    return result


def main(argv=None) -> int:
    args = parse(argv)
    if args.rank is not None:
        result = asyncio.run(rank_main(args))
        args.out.write_text(json.dumps(result))
        return 0
    from shared.launcher.redis_server import start_redis
    from shared.launcher.up import home
    from shared.model.config import ModelArgs
    from shared.model.presets import init_model

    path = home() / "models" / args.preset
    if not (path / "model.safetensors").exists():
        init_model(path, args.preset)
    config = ModelArgs.from_file(path / "config.json")
    tmp = Path(tempfile.mkdtemp(prefix="bench-ep-"))
    redis_proc, url = start_redis(tmp / "redis", appendonly=False)
    given = sys.argv[1:] if argv is None else list(argv)
    try:
        ranks = [subprocess.Popen([sys.executable, "-m", "loadgen.bench_ep", *given, "--rank", str(r),
                                   "--redis-url", url, "--out", str(tmp / f"rank{r}.json")]) for r in range(args.ep)]
        for p in ranks:
            if p.wait() != 0:
                raise SystemExit(f"a rank failed ({p.args})")
    finally:
        redis_proc.terminate()
    results = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(args.ep)]
    print(f"{args.preset}, EP {args.ep} over Redis (one process per rank, {os.cpu_count()} cores), fp8 wire, "
          f"dtype {args.dtype}")
    for phase, what in (("prefill", f"2 x {args.prefill_len}-token prompts per rank, one step"),
                        ("decode", f"{args.decode_batch} running requests per rank, median step")):
        def mean(mode, key, phase=phase):
            return statistics.mean(run[key] for r in results for run in r[f"{phase}_{mode}"])
        off, on = mean("off", "step_s"), mean("on", "step_s")
        exposed_off, exposed_on = mean("off", "exposed_s"), mean("on", "exposed_s")
        print(f"{phase} ({what}): step {off * 1000:.0f} ms off, {on * 1000:.0f} ms on: on/off {on / off:.2f}x; "
              f"exposed communication {exposed_off * 1000:.0f} ms off, {exposed_on * 1000:.0f} ms on: "
              f"{1 - exposed_on / exposed_off:.0%} hidden")
    sizes = wire_bytes_per_token(config.hidden_size, config.num_experts_per_tok, config.n_routed_experts // args.ep)
    per_wire = ", ".join(f"{k} {v:.0f}" for k, v in sizes.items())
    print(f"dispatch bytes per token sent to a rank (hidden {config.hidden_size}, incl. its pair indices): "
          f"{per_wire}; fp8/bf16 {sizes['fp8'] / sizes['bf16']:.2f}x")
    print("command: python -m loadgen.bench_ep " + " ".join(given))
    return 0


if __name__ == "__main__":
    sys.exit(main())
