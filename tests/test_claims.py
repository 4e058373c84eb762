"""A consumer killed (kill -9) with entries pending: another consumer of its group claims them
(XAUTOCLAIM) and the requests complete with the right tokens. Its own set of services, with a
short claim idle time so the test does not wait the default 30 s."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import torch
from procs import ServiceProcess, greedy_token_ids, stop_all
from reference import load_reference, reference_greedy

from shared.protocol import streams

CLAIM = ["--claim-idle-ms", "1500"]


@pytest.fixture(scope="module")
def services(tiny_fp32, redis_url):
    import redis as sync_redis

    sync_redis.Redis.from_url(redis_url).flushdb()
    worker = ["--model", str(tiny_fp32), "--dtype", "fp32", "--rank", "0", "--threads", "1", "--kv-cache-mib", "64",
              *CLAIM]
    started = {
        "tokenizer": ServiceProcess("services.tokenizer", redis_url, "--model", str(tiny_fp32), *CLAIM),
        "cache": ServiceProcess("services.cache", redis_url, "--model", str(tiny_fp32), *CLAIM),
        "balancer": ServiceProcess("services.balancer", redis_url, *CLAIM),
        # a small token budget: the victim holds its prompts for many steps
        "prefill": ServiceProcess("services.prefill", redis_url, *worker, "--max-num-batched-tokens", "128",
                                  instance_id="prefill-victim"),
        "decode": ServiceProcess("services.decode", redis_url, *worker),
        "gateway": ServiceProcess("services.gateway", redis_url, "--model", str(tiny_fp32), "--request-timeout-s",
                                  "240"),
    }
    yield started
    stop_all(started.values())


async def pending_of(client, stream: str, group: str, consumer: str) -> int:
    summary = await client.xpending(stream, group)
    for c in summary.get("consumers") or []:
        name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
        if name == consumer:
            return int(c["pending"])
    return 0


async def test_killed_prefill_entries_are_claimed_and_complete(services, tiny_fp32, redis_url):
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    gen = torch.Generator().manual_seed(31)
    prompts = [torch.randint(3, 1024, (600,), generator=gen).tolist() for _ in range(6)]
    model = tiny_fp32.resolve().name

    async def one(session, prompt):
        return await greedy_token_ids(session, services["gateway"], model, prompt, 6)

    replacement = None
    try:
        async with aiohttp.ClientSession() as session:
            calls = [asyncio.create_task(one(session, p)) for p in prompts]
            stream, group = streams.prefill_stream("prefill", 0), streams.consumer_group("prefill")
            deadline = time.monotonic() + 60
            held = 0
            while held == 0 and time.monotonic() < deadline:
                held = await pending_of(client, stream, group, "prefill-victim")
                await asyncio.sleep(0.002)
            assert held > 0, "the prefill rank never held an entry"
            services["prefill"].kill()  # kill -9 while it holds `held` entries, read and not acked
            assert await pending_of(client, stream, group, "prefill-victim") > 0
            replacement = await asyncio.to_thread(
                ServiceProcess, "services.prefill", redis_url, "--model", str(tiny_fp32), "--dtype", "fp32",
                "--rank", "0", "--threads", "1", "--kv-cache-mib", "64", *CLAIM, instance_id="prefill-heir")
            outputs = await asyncio.gather(*calls)
        assert await pending_of(client, stream, group, "prefill-victim") == 0
        ref = load_reference(tiny_fp32)
        for prompt, tokens in zip(prompts, outputs):
            expected = reference_greedy(ref, prompt, 6)
            assert len(tokens) == 6 and tokens[:expected.trusted] == expected.tokens[:expected.trusted]
    finally:
        if replacement is not None:
            replacement.stop()
        await client.aclose()
