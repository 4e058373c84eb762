"""1,000 requests cancelled at random moments (before prefill, during it, between prefill and
decode, while decoding), by 48 clients: every rank's KV blocks return to their starting count,
no entry stays pending, the gateway does not hold cancelled requests (no 429), and the system
still answers correctly afterwards."""
from __future__ import annotations

import asyncio
import random

import aiohttp
import torch
from procs import greedy_token_ids, metric
from reference import load_reference, reference_greedy

from shared.protocol import streams

CANCELS = 1000


async def pending_entries(client, stream: str) -> int:
    try:
        groups = await client.xinfo_groups(stream)
    except Exception:  # never made: nothing pending
        return 0
    return sum(int(g["pending"]) for g in groups)


async def test_a_thousand_random_cancels_free_every_block(system, tiny_fp32, redis_url):
    from redis.asyncio import Redis

    prefill, decode, gateway = system[3], system[4], system[5]
    model = tiny_fp32.resolve().name
    start = {name: metric(w, "streamoe_kv_blocks_used") for name, w in (("prefill", prefill), ("decode", decode))}
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)
    outcomes = {"cancelled": 0, "finished": 0, "refused": 0}
    reasons = {}

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        # long ones queue up at prefill; prompt + max_tokens stays within the context of 2048
        length = rng.randint(1000, 1600) if i % 5 == 0 else rng.randint(5, 200)
        body = {"model": model, "prompt": torch.randint(3, 1024, (length,), generator=gen).tolist(),
                "max_tokens": rng.randint(150, 400), "temperature": 0, "ignore_eos": True, "stream": i % 4 != 0}

        async def call() -> int:
            async with session.post(gateway.url("/v1/completions"), json=body) as r:
                assert r.status in (200, 429), await r.text()
                text = await r.read()
                if r.status == 429:
                    reasons[text[:60]] = reasons.get(text[:60], 0) + 1
                return r.status

        task = asyncio.create_task(call())
        done, _ = await asyncio.wait({task}, timeout=rng.uniform(0.0, 0.6))
        if done:
            outcomes["finished" if task.result() == 200 else "refused"] += 1
            return
        task.cancel()  # the client goes away: its connection closes
        await asyncio.gather(task, return_exceptions=True)
        outcomes["cancelled"] += 1

    sent = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while outcomes["cancelled"] < CANCELS and sent < 2 * CANCELS:
            sent += 1
            await one(session, sent)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*[worker(session) for _ in range(48)])
    assert outcomes["cancelled"] >= CANCELS, (outcomes, reasons)
    # a cancelled request leaves the gateway at once: 48 clients never fill its 256 slots
    assert outcomes["refused"] == 0, (outcomes, reasons)
    client = Redis.from_url(redis_url)
    deadline = asyncio.get_running_loop().time() + 120
    while asyncio.get_running_loop().time() < deadline:
        now = {name: metric(proc, "streamoe_kv_blocks_used")
               for name, proc in (("prefill", prefill), ("decode", decode))}
        pending = [await pending_entries(client, s)
                   for s in (streams.prefill_stream("prefill", 0), streams.kv_stream("decode", 0))]
        if now == start and pending == [0, 0] and not metric(decode, "streamoe_running_requests"):
            break
        await asyncio.sleep(0.25)
    assert now == start, (start, now)
    assert pending == [0, 0]
    assert metric(decode, "streamoe_requests_aborted_total") > 0  # freed by aborts, not only by finishing
    assert not [k async for k in client.scan_iter(match=streams.owner_key("*") + "*")]  # no ownership record left
    await client.aclose()
    # and it still serves, with transformers' tokens
    prompt = torch.randint(3, 1024, (40,), generator=gen).tolist()
    async with aiohttp.ClientSession() as session:
        tokens = await greedy_token_ids(session, gateway, model, prompt, 12)
    expected = reference_greedy(load_reference(tiny_fp32), prompt, 12)
    assert tokens[:expected.trusted] == expected.tokens[:expected.trusted]
