"""What Redis moves for the system: the KV handoff against raw XADD, and 1 vs 3 cluster primaries.

`python -m loadgen.bench_redis handoff [--preset tiny|small] [--prompt-len 512] [--batch 8]
[--steps 8] [--repeats 3] [--redis-url URL] [--out FILE]`
    One producer (this process) and one consumer (a process of its own) on one Redis (an embedded
    redis-server, its append-only file off unless --aof on: the disk would set the pace of both
    paths; or --redis-url).
    Each "step" hands off `--batch` prompts of `--prompt-len` tokens, layer by layer, as a prefill
    rank does; the consumer reads, checks and acks as a decode rank does. Two paths, interleaved:
    - `raw`: the same payload bytes as bare stream entries (`XADD` pipelined per layer,
      `XREADGROUP` + `XACK`), the floor of what Redis and redis-py cost;
    - `ours`: `KVChunk`s through the bus (msgpack envelope, tensor blob, XXH3 checksum,
      decoded and checked on arrival, then the tensor rebuilt).
    Reports bytes/s of latent KV for each, and ours / raw.

`python -m loadgen.bench_redis shards [--shards 1,3] [--pairs 1,2,4] [--seconds 4] [--out FILE]`
    A Redis-bound load, the same client (redis-py's cluster client) and the same hash tags on a
    local cluster of 1 and of 3 primaries, started here: `--pairs` processes, each one prefill ->
    decode handoff pair on its own decode rank's stream and one EP pair of two ranks exchanging
    payloads through their inboxes (shared/ep/transport), all at once for `--seconds`. Reports
    handoff and exchange bytes/s per (shards, pairs), and the ratio of 3 primaries to 1.

`python -m loadgen.bench_redis wait [--requests 2000] [--out FILE]`
    What `--redis-wait-replicas 1` costs a request: the gateway's publish (XADD, then WAIT on the
    same connection) against XADD alone, interleaved, on a one-primary cluster with one replica;
    p50/p99 of each. A request pays it once, before its first token.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from shared.launcher.redis_cluster import start_cluster
from shared.launcher.redis_server import start_redis
from shared.model.presets import PRESETS
from shared.protocol import streams
from shared.protocol.messages import KVChunk
from shared.protocol.tensors import checksum, from_blob, to_blob
from shared.runtime import redis_client
from shared.runtime.bus import FIELD, Bus

GROUP = "bench"


def kv_shape(preset: str, prompt_len: int) -> tuple[int, int, int]:
    """(KV layers, tokens, latent width) of one prompt's handoff for a preset."""
    shape = PRESETS[preset]
    return shape["num_hidden_layers"], prompt_len, shape["kv_lora_rank"] + shape["qk_rope_head_dim"]


async def produce(redis, stream: str, path: str, layers: int, batch: int, kv: torch.Tensor, steps: int,
                  seconds: float | None = None) -> int:
    """Hand off `steps` steps (or as many as fit in `seconds`) of `batch` prompts, layer by layer, as
    a prefill rank does; -> entries sent."""
    bus = Bus(redis, f"bench-{os.getpid()}")
    raw_payload = to_blob(kv).data
    deadline = None if seconds is None else time.perf_counter() + seconds
    sent, step = 0, 0
    while (step < steps) if deadline is None else (time.perf_counter() < deadline):
        for layer in range(layers):
            if path == "raw":
                async with redis.pipeline(transaction=False) as pipe:
                    for _ in range(batch):
                        pipe.xadd(stream, {FIELD: raw_payload})
                    await pipe.execute()
            else:  # as a prefill rank sends a layer: each prompt's KV to bytes, its checksum, one round trip
                chunks = []
                for i in range(batch):
                    blob = to_blob(kv)
                    chunks.append((stream, KVChunk(f"r{step}-{i}", "t", layer, layers, blob, checksum(blob.data),
                                                   computed_at=time.time(), sent_at=time.time())))
                await bus.publish_many(chunks)
            sent += batch
        step += 1
    return sent


async def consume(redis, stream: str, path: str, expected: list[int | None], itemsize: int) -> int:
    """Read, check and ack as a decode rank does until `expected[0]` entries (set by the producer,
    None while it still sends) have come; -> KV bytes received."""
    bus = Bus(redis, f"bench-consumer-{os.getpid()}")
    received, moved = 0, 0
    while expected[0] is None or received < expected[0]:
        if path == "raw":
            reply = await redis.xreadgroup(GROUP, "c", {stream: ">"}, count=256, block=100)
            ids = []
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    moved += len(fields[FIELD])
                    ids.append(entry_id)
            if ids:
                await redis.xack(stream, GROUP, *ids)
            received += len(ids)
        else:
            entries = await bus.read(stream, GROUP, KVChunk, count=256, block_ms=100)
            for entry in entries:
                chunk = entry.message
                if checksum(chunk.kv.data) != chunk.checksum:
                    raise RuntimeError("a chunk failed its checksum")
                moved += from_blob(chunk.kv).numel() * itemsize
            if entries:
                await bus.ack(stream, GROUP, *[e.entry_id for e in entries])
            received += len(entries)
    return moved


async def handoff_run(redis, stream: str, path: str, layers: int, batch: int, steps: int, kv: torch.Tensor,
                      seconds: float | None = None) -> tuple[int, float]:
    """Producer and consumer in this process; -> (KV bytes delivered, seconds from the first send to
    the last ack)."""
    await redis.delete(stream)
    await Bus(redis, "bench").ensure_consumer_group(stream, GROUP)
    expected: list[int | None] = [None]

    async def producer() -> None:
        expected[0] = await produce(redis, stream, path, layers, batch, kv, steps, seconds)

    start = time.perf_counter()
    _, moved = await asyncio.gather(producer(), consume(redis, stream, path, expected, kv.element_size()))
    elapsed = time.perf_counter() - start
    await redis.delete(stream)
    return moved, elapsed


def _consumer_process(url: str, stream: str, path: str, expected: int, itemsize: int,
                      out: multiprocessing.Queue) -> None:
    """The decode side of `handoff`, a process of its own (as a decode rank is): the bytes it got and
    when it acked the last entry."""
    import uvloop

    async def main() -> tuple[int, float]:
        redis = redis_client.connect(url)
        out.put("ready")
        moved = await consume(redis, stream, path, [expected], itemsize)
        done = time.time()
        await redis.aclose()
        return moved, done

    out.put(uvloop.run(main()))


async def handoff_across(url: str, redis, path: str, layers: int, batch: int, steps: int,
                         kv: torch.Tensor) -> tuple[int, float]:
    """One `handoff` run, the consumer in another process; -> (bytes, seconds from the first send
    to the consumer's last ack)."""
    stream = streams.kv_stream(GROUP, 0)
    await redis.delete(stream)
    await Bus(redis, "bench").ensure_consumer_group(stream, GROUP)
    queue = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(target=_consumer_process, args=(
        url, stream, path, steps * layers * batch, kv.element_size(), queue))
    child.start()
    await asyncio.to_thread(queue.get, True, 60)  # connected
    start = time.time()
    await produce(redis, stream, path, layers, batch, kv, steps)
    moved, done = await asyncio.to_thread(queue.get, True, 120)
    await asyncio.to_thread(child.join)
    await redis.delete(stream)
    return moved, done - start


async def handoff_bench(args: argparse.Namespace, url: str) -> dict:
    layers, tokens, width = kv_shape(args.preset, args.prompt_len)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.kv_dtype]
    kv = torch.randn(tokens, width).to(dtype)
    redis = redis_client.connect(url)
    try:
        for path in ("raw", "ours"):  # warm up: Redis grows its memory, the allocators settle
            await handoff_across(url, redis, path, layers, args.batch, args.steps, kv)
        runs: dict[str, list[float]] = {"raw": [], "ours": []}
        for _ in range(args.repeats):
            for path in ("raw", "ours"):  # interleaved: drift on a shared machine hits both
                moved, seconds = await handoff_across(url, redis, path, layers, args.batch, args.steps, kv)
                runs[path].append(moved / seconds)
                print(f"{path}: {moved / seconds / 1e6:.0f} MB/s ({moved / 1e6:.0f} MB in {seconds:.2f} s)",
                      file=sys.stderr, flush=True)
    finally:
        await redis.aclose()
    raw, ours = statistics.median(runs["raw"]), statistics.median(runs["ours"])
    return {"preset": args.preset, "prompt_len": tokens, "kv_layers": layers, "latent_width": width,
            "kv_dtype": args.kv_dtype, "entry_bytes": kv.numel() * kv.element_size(), "batch": args.batch,
            "steps": args.steps, "raw_bytes_per_s": runs["raw"], "ours_bytes_per_s": runs["ours"],
            "raw_median_bytes_per_s": raw, "ours_median_bytes_per_s": ours, "ours_over_raw": ours / raw}


def _pair_process(url: str, index: int, seconds: float, entry_bytes: int, exchange_bytes: int, start_at: float,
                  out: multiprocessing.Queue) -> None:
    """One process of the shards run: a handoff pair and an EP pair, side by side, for `seconds`."""
    import uvloop

    from shared.ep.transport import RedisTransport

    async def main() -> dict:
        redis = redis_client.connect(url, cluster=True)
        group = f"bench{index}-{os.getpid()}"
        ranks = [RedisTransport(url, GROUP, r, 2, group, timeout_s=30, cluster=True) for r in range(2)]
        await asyncio.gather(*(t.start(timeout_s=30) for t in ranks))
        kv = torch.zeros(entry_bytes // 4, dtype=torch.float32).view(1, -1)
        while time.time() < start_at:
            await asyncio.sleep(0.01)

        async def exchange() -> tuple[int, float]:
            payload = b"x" * exchange_bytes
            moved, n = 0, 0
            begin = time.perf_counter()
            while time.perf_counter() - begin < seconds:
                key = f"l0#{n}:dispatch"
                await asyncio.gather(*(t.all_to_all(key, [payload, payload]) for t in ranks))
                moved += 2 * exchange_bytes  # each rank sends one payload to its peer
                n += 1
            return moved, time.perf_counter() - begin

        handoff, ep = await asyncio.gather(
            handoff_run(redis, streams.kv_stream(group, 0), "ours", 1, 4, 0, kv, seconds=seconds), exchange())
        await asyncio.gather(*(t.close() for t in ranks))
        await redis.aclose()
        return {"handoff_bytes": handoff[0], "handoff_s": handoff[1], "exchange_bytes": ep[0], "exchange_s": ep[1]}

    out.put(uvloop.run(main()))


def shards_bench(args: argparse.Namespace) -> dict:
    results = []
    context = multiprocessing.get_context("spawn")
    for shards in args.shards:
        with tempfile.TemporaryDirectory(prefix="bench-redis-") as directory:
            cluster = start_cluster(Path(directory), shards, appendonly=False)
            try:
                for pairs in args.pairs:
                    queue = context.Queue()
                    start_at = time.time() + 3.0  # every process connected and joined first
                    procs = [context.Process(target=_pair_process, args=(
                        cluster.url, i, args.seconds, args.entry_bytes, args.exchange_bytes, start_at, queue))
                        for i in range(pairs)]
                    for p in procs:
                        p.start()
                    got = [queue.get(timeout=120 + args.seconds) for _ in procs]
                    for p in procs:
                        p.join()
                    row = {"shards": shards, "pairs": pairs,
                           "handoff_bytes_per_s": sum(g["handoff_bytes"] / g["handoff_s"] for g in got),
                           "exchange_bytes_per_s": sum(g["exchange_bytes"] / g["exchange_s"] for g in got)}
                    results.append(row)
                    print(f"{shards} primaries, {pairs} pairs: handoff {row['handoff_bytes_per_s'] / 1e6:.0f} MB/s, "
                          f"exchange {row['exchange_bytes_per_s'] / 1e6:.0f} MB/s", file=sys.stderr, flush=True)
            finally:
                cluster.stop()
    by = {(r["shards"], r["pairs"]): r for r in results}
    ratios = []
    if len(args.shards) >= 2:
        low, high = min(args.shards), max(args.shards)
        for pairs in args.pairs:
            a, b = by[low, pairs], by[high, pairs]
            ratios.append({"pairs": pairs,
                           f"handoff_{high}_over_{low}": b["handoff_bytes_per_s"] / a["handoff_bytes_per_s"],
                           f"exchange_{high}_over_{low}": b["exchange_bytes_per_s"] / a["exchange_bytes_per_s"]})
    return {"entry_bytes": args.entry_bytes, "exchange_bytes": args.exchange_bytes, "seconds": args.seconds,
            "cores": os.cpu_count(), "runs": results, "ratios": ratios}


async def wait_bench(args: argparse.Namespace) -> dict:
    """Publish latency of a request, XADD alone vs XADD + WAIT 1, interleaved, on a one-primary
    cluster with one replica (as `streamoe up --redis-shards 1 --redis-replicas 1` runs)."""
    from shared.protocol.messages import GenerateRequest, Sampling
    from shared.runtime.bus import encode_fields

    with tempfile.TemporaryDirectory(prefix="bench-redis-") as directory:
        cluster = start_cluster(Path(directory), 1, replicas=1, appendonly=args.aof == "on")
        try:
            client = redis_client.connect(cluster.url, cluster=True)
            await client.initialize()
            writers = {"without": redis_client.ReplicatedWriter(client, 0, 0),
                       "with": redis_client.ReplicatedWriter(client, 1, args.wait_timeout_ms)}
            prompt = " ".join(["word"] * args.prompt_words)
            times: dict[str, list[float]] = {"without": [], "with": []}
            unreplicated = 0
            for i in range(args.requests):
                for how in ("without", "with"):
                    req = GenerateRequest(f"r{i}-{how}", "t", "gw", Sampling(max_tokens=16), time.time() + 60,
                                          prompt_text=prompt)
                    start = time.perf_counter()
                    _, acked = await writers[how].xadd(streams.requests_stream(0), encode_fields(req))
                    times[how].append(time.perf_counter() - start)
                    unreplicated += how == "with" and acked < 1
            for writer in writers.values():
                await writer.aclose()
            await client.aclose()
        finally:
            cluster.stop()

    def pct(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1e3

    out = {how: {"p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99), "mean_ms": statistics.mean(v) * 1e3}
           for how, v in times.items()}
    for how, row in out.items():
        print(f"{how} WAIT: p50 {row['p50_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms", file=sys.stderr)
    return {"requests": args.requests, "prompt_words": args.prompt_words, "aof": args.aof,
            "wait_timeout_ms": args.wait_timeout_ms, "publish_latency": out, "unreplicated": unreplicated,
            "p50_added_ms": out["with"]["p50_ms"] - out["without"]["p50_ms"],
            "p99_added_ms": out["with"]["p99_ms"] - out["without"]["p99_ms"]}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers separated by commas") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers >= 1 separated by commas")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadgen.bench_redis", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    handoff = commands.add_parser("handoff", help="the KV handoff against raw XADD of the same bytes")
    handoff.add_argument("--preset", choices=sorted(PRESETS), default="small")
    handoff.add_argument("--prompt-len", type=int, default=512)
    handoff.add_argument("--kv-dtype", choices=["bf16", "fp32"], default="fp32")
    handoff.add_argument("--batch", type=int, default=8, help="prompts handed off per step")
    handoff.add_argument("--steps", type=int, default=8)
    handoff.add_argument("--repeats", type=int, default=5)
    handoff.add_argument("--redis-url", default=None, help="default: an embedded redis-server")
    handoff.add_argument("--aof", choices=["on", "off"], default="off",
                         help="the embedded server's append-only file (on: the disk's write rate joins in)")
    handoff.add_argument("--out", type=Path, default=None)
    shards = commands.add_parser("shards", help="1 vs 3 primaries of a local Redis Cluster")
    shards.add_argument("--shards", type=_int_list, default=[1, 3])
    shards.add_argument("--pairs", type=_int_list, default=[1, 2, 4])
    shards.add_argument("--seconds", type=float, default=4.0)
    shards.add_argument("--entry-bytes", type=int, default=1 << 20, help="one handoff entry (a layer's KV)")
    shards.add_argument("--exchange-bytes", type=int, default=256 << 10, help="one EP payload per peer and call")
    shards.add_argument("--out", type=Path, default=None)
    wait = commands.add_parser("wait", help="what WAIT 1 adds to publishing a request")
    wait.add_argument("--requests", type=int, default=2000)
    wait.add_argument("--prompt-words", type=int, default=200)
    wait.add_argument("--wait-timeout-ms", type=int, default=200)
    wait.add_argument("--aof", choices=["on", "off"], default="on",
                      help="the nodes' append-only file (on, as `streamoe up` runs them)")
    wait.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import uvloop

    if args.command == "handoff":
        if args.redis_url is None:
            with tempfile.TemporaryDirectory(prefix="bench-redis-") as directory:
                proc, url = start_redis(Path(directory), appendonly=args.aof == "on")
                try:
                    result = uvloop.run(handoff_bench(args, url))
                finally:
                    proc.terminate()
                    proc.wait()
        else:
            result = uvloop.run(handoff_bench(args, args.redis_url))
    elif args.command == "wait":
        result = uvloop.run(wait_bench(args))
    else:
        result = shards_bench(args)
    result = {"command": " ".join(["python -m loadgen.bench_redis", *(argv or sys.argv[1:])]), **result}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
