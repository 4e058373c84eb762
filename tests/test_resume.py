"""A decode rank killed (kill -9) while its requests stream: the balancer finds them through their
ownership records once the rank's heartbeat is gone and resumes them (prompt + the tokens already
sent, re-prefilled); each client's stream goes on with no token missing or repeated. Its own set
of services, with short heartbeat and claim times so the test does not wait the defaults."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
import torch
from procs import ServiceProcess, metric, sse_events, stop_all
from reference import load_reference, reference_greedy

from shared.protocol import streams
from shared.runtime import ownership

FAST = ["--heartbeat-ttl-s", "1.5", "--claim-idle-ms", "1500", "--housekeeping-s", "0.3"]


def start_services(model: Path, redis_url: str, cache_dir: Path, victim: str, *worker_flags: str) -> dict:
    """tokenizer, cache, balancer, one prefill and one decode rank (instance `victim`), gateway, on
    `model`, with short heartbeat and claim times; "worker" holds the ranks' flags (for a successor)."""
    import redis as sync_redis

    sync_redis.Redis.from_url(redis_url).flushdb()
    cache = ["--cache-dir", str(cache_dir), "--cache-capacity-mib", "64"]
    worker = ["--model", str(model), "--dtype", "fp32", "--rank", "0", "--threads", "1", "--kv-cache-mib", "64",
              *worker_flags, *cache, *FAST]
    return {
        "tokenizer": ServiceProcess("services.tokenizer", redis_url, "--model", str(model), *FAST),
        "cache": ServiceProcess("services.cache", redis_url, "--model", str(model), "--dtype", "fp32", *cache,
                                *FAST),
        "balancer": ServiceProcess("services.balancer", redis_url, *FAST),
        "prefill": ServiceProcess("services.prefill", redis_url, *worker),
        "decode": ServiceProcess("services.decode", redis_url, *worker, instance_id=victim),
        "gateway": ServiceProcess("services.gateway", redis_url, "--model", str(model), "--request-timeout-s",
                                  "120", *FAST),
        "worker": worker,
    }


@pytest.fixture(scope="module")
def services(tiny_fp32, redis_url, tmp_path_factory):
    started = start_services(tiny_fp32, redis_url, tmp_path_factory.mktemp("resume-blocks"), "decode-victim")
    yield started
    stop_all(s for s in started.values() if isinstance(s, ServiceProcess))


async def until_all_run_on(client, victim: str, count: int, min_emitted: int) -> None:
    """Until `count` requests are owned by instance `victim`, each with `min_emitted` tokens sent."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        owned = await client.smembers(ownership.owned_key(victim))
        emitted = [await client.strlen(ownership.ids_key(r.decode())) // 4 for r in owned]
        if len(owned) == count and all(e >= min_emitted for e in emitted):
            return
        await asyncio.sleep(0.02)
    pytest.fail("the requests never all ran on the victim")


async def stream_tokens(session, gateway: ServiceProcess, body: dict) -> tuple[list[int], dict]:
    """The token ids of every streamed chunk, in order, and the usage."""
    tokens, usage = [], None
    async with session.post(gateway.url("/v1/completions"), json={**body, "stream": True,
                                                                 "stream_options": {"include_usage": True}}) as r:
        assert r.status == 200, await r.text()
        async for event in sse_events(r):
            assert "error" not in event, event
            for choice in event.get("choices") or []:
                tokens += choice.get("token_ids") or []
            usage = event.get("usage") or usage
    return tokens, usage


async def test_requests_of_a_killed_decode_rank_resume_on_its_successor(services, tiny_fp32, redis_url):
    from redis.asyncio import Redis

    gen = torch.Generator().manual_seed(90)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (70, 130, 33, 200)]
    max_tokens = 160
    model = tiny_fp32.resolve().name
    client = Redis.from_url(redis_url)
    async with aiohttp.ClientSession() as session:
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        running = [asyncio.create_task(stream_tokens(session, services["gateway"], {**body, "prompt": p}))
                   for p in prompts]
        await until_all_run_on(client, "decode-victim", len(prompts), 5)  # then kill -9
        services["decode"].proc.kill()
        services["decode"].proc.wait()
        # the supervisor's part: a new instance of the rank
        services["decode"] = ServiceProcess("services.decode", redis_url, *services["worker"],
                                            instance_id="decode-successor")
        results = await asyncio.wait_for(asyncio.gather(*running), 120)
    assert metric(services["balancer"], "streamoe_requests_resumed_total", outcome="resumed") == len(prompts)
    ref = load_reference(tiny_fp32)
    for prompt, (tokens, usage) in zip(prompts, results):
        assert len(tokens) == max_tokens  # none missing, none twice
        assert usage["completion_tokens"] == max_tokens and usage["prompt_tokens"] == len(prompt)
        expected = reference_greedy(ref, prompt, max_tokens)
        assert tokens[:expected.trusted] == expected.tokens[:expected.trusted]
    # the records are gone: the dead instance's and the requests'
    assert not await client.exists(ownership.owned_key("decode-victim"))
    assert not [k async for k in client.scan_iter(match=streams.owner_key("*") + "*")]
    assert b"decode-victim" not in await client.smembers(ownership.DECODE_INSTANCES)
    await client.aclose()


async def test_a_decode_rank_taken_for_dead_while_frozen_sends_nothing_when_it_thaws(services, tiny_fp32, redis_url):
    """The decode rank frozen (SIGSTOP) with requests streaming: its heartbeat lapses, the balancer
    takes its requests (ownership.take) and resumes them on a new instance. Thawed, the frozen rank
    steps on, but its records are refused, so it sends no delta (streamoe_fenced_writes_total) and
    drops the requests: each client's stream is whole, once, and the reference's."""
    import signal

    from redis.asyncio import Redis

    gen = torch.Generator().manual_seed(91)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (50, 90, 140)]
    max_tokens = 200
    model = tiny_fp32.resolve().name
    client = Redis.from_url(redis_url)
    frozen = services["decode"]
    resumed_before = metric(services["balancer"], "streamoe_requests_resumed_total", outcome="resumed")
    async with aiohttp.ClientSession() as session:
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        running = [asyncio.create_task(stream_tokens(session, services["gateway"], {**body, "prompt": p}))
                   for p in prompts]
        await until_all_run_on(client, frozen.instance_id, len(prompts), 5)
        frozen.proc.send_signal(signal.SIGSTOP)
        services["decode"] = ServiceProcess("services.decode", redis_url, *services["worker"],
                                            instance_id="decode-after-freeze")
        services["frozen"] = frozen  # stopped with the others
        try:
            deadline = time.monotonic() + 60  # the balancer takes them once the heartbeat is a TTL gone
            while await client.scard(ownership.owned_key(frozen.instance_id)) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not await client.scard(ownership.owned_key(frozen.instance_id)), "never taken from it"
        finally:
            frozen.proc.send_signal(signal.SIGCONT)
        results = await asyncio.wait_for(asyncio.gather(*running), 120)
    took = metric(services["balancer"], "streamoe_requests_resumed_total", outcome="resumed") - resumed_before
    assert took == len(prompts)
    # thawed, it stepped at least once more with the requests it held: every delta of it refused
    deadline = time.monotonic() + 30
    while metric(frozen, "streamoe_fenced_writes_total", write="delta") < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert metric(frozen, "streamoe_fenced_writes_total", write="delta") >= 1
    assert metric(frozen, "streamoe_running_requests") == 0  # dropped, not run on
    ref = load_reference(tiny_fp32)
    for prompt, (tokens, usage) in zip(prompts, results):
        assert len(tokens) == max_tokens and usage["completion_tokens"] == max_tokens  # none missing, none twice
        expected = reference_greedy(ref, prompt, max_tokens)
        assert tokens[:expected.trusted] == expected.tokens[:expected.trusted]
    await client.aclose()
