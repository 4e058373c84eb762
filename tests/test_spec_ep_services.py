"""Speculative decoding through EP groups (tiny fp32 with a distilled MTP layer, N = 2): a prefill
and a decode group of two ranks each, exact wire, the prefix cache on. The verify steps' tokens
cross ranks in the exchange like any others (the MTP layer's MoE runs whole on each rank for now).
One decode rank is killed mid-request: its group re-forms without it, its requests resume on the
survivor, which speculates on; a prompt served again hits the cache. Every token is transformers'
(up to its first near-tie), none missing or repeated."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from distilled import trained_prompts
from procs import ServiceProcess, metric, stop_all
from reference import load_reference, reference_greedy
from test_resume import FAST
from test_spec_services import greedy_streams, spec_counters

from shared.runtime import ownership

N = 2


@pytest.fixture(scope="module")
def ep_system(distilled_mtp, redis_url, tmp_path_factory):
    import redis as sync_redis

    model, _ = distilled_mtp
    sync_redis.Redis.from_url(redis_url).flushdb()
    cache = ["--cache-dir", str(tmp_path_factory.mktemp("spec-ep-blocks")), "--cache-capacity-mib", "64"]
    common = ["--model", str(model), "--dtype", "fp32", "--threads", "1", "--kv-cache-mib", "32", "--ep-size", "2",
              "--ep-wire", "exact", "--ep-timeout-s", "4", "--speculative-tokens", str(N), *cache, *FAST]
    started = {"tokenizer": ServiceProcess("services.tokenizer", redis_url, "--model", str(model), *FAST),
               "cache": ServiceProcess("services.cache", redis_url, "--model", str(model), "--dtype", "fp32", *cache,
                                       *FAST),
               "balancer": ServiceProcess("services.balancer", redis_url, *FAST)}
    for role in ("prefill", "decode"):  # a rank is ready once its whole group has joined: start both, then wait
        pending = [ServiceProcess(f"services.{role}", redis_url, *common, "--rank", str(r), wait=False,
                                  instance_id=f"spec-ep-{role}{r}") for r in range(2)]
        for r, service in enumerate(pending):
            service.wait_healthy()
            started[f"{role}{r}"] = service
    started["gateway"] = ServiceProcess("services.gateway", redis_url, "--model", str(model), "--request-timeout-s",
                                        "120", *FAST)
    yield started
    stop_all(s for s in started.values() if isinstance(s, ServiceProcess))


async def test_ep_groups_speculate_and_survive_a_decode_rank_kill(ep_system, distilled_mtp, redis_url):
    from redis.asyncio import Redis

    path, _ = distilled_mtp
    prompts = trained_prompts(8, prefix_seed=92, tail=[4, 5])
    max_tokens = 64
    client = Redis.from_url(redis_url)
    async with aiohttp.ClientSession() as session:
        running = greedy_streams(session, ep_system["gateway"], path, prompts, max_tokens)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # every request decoding, some on rank 1, each with tokens sent
            owned = {r: await client.smembers(ownership.owned_key(f"spec-ep-decode{r}")) for r in range(2)}
            emitted = [await client.strlen(ownership.ids_key(x.decode())) // 4 for r in owned for x in owned[r]]
            if len(emitted) == len(prompts) and owned[1] and all(e >= 8 for e in emitted):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the requests never all ran, some on decode rank 1")
        ep_system["decode1"].proc.kill()
        ep_system["decode1"].proc.wait()
        results = await asyncio.wait_for(asyncio.gather(*running), 180)
        (hits,) = await asyncio.wait_for(asyncio.gather(
            *greedy_streams(session, ep_system["gateway"], path, prompts[-1:], max_tokens)), 120)
    await client.aclose()
    assert metric(ep_system["balancer"], "streamoe_requests_resumed_total", outcome="resumed") >= 1
    assert metric(ep_system["decode0"], "streamoe_ep_reforms_total", change="shrink") == 1
    ref = load_reference(path)
    for prompt, (tokens, usage) in zip(prompts + prompts[-1:], results + [hits]):
        assert len(tokens) == max_tokens and usage["completion_tokens"] == max_tokens  # none missing, none twice
        expected = reference_greedy(ref, prompt, max_tokens)
        assert tokens[:expected.trusted] == expected.tokens[:expected.trusted]
    assert hits[1]["prompt_tokens_details"]["cached_tokens"] >= 128
    drafts, draft_tokens, accepted, first = spec_counters(ep_system["decode0"])
    assert drafts > 0 and drafts <= draft_tokens <= N * drafts and 0 < first <= accepted
