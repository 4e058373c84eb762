"""Requests through the real services over a real Redis — tokenizer, balancer, one prefill rank,
one decode rank, each its own process — against transformers' greedy tokens. The gateway's part
(publishing requests, reading the delta stream) is played by the test through the same streams."""
from __future__ import annotations

import time

import pytest
import torch

from reference import load_reference, reference_greedy
from shared import streams
from shared.bus import Bus
from shared.messages import GenerateRequest, Sampling, TokenDelta

GW = "gw-pipeline"
LENGTHS = [1, 3, 17, 64, 65, 130, 200, 300]
MAX_TOKENS = [12, 20, 8, 16, 24, 10, 14, 18]


async def run_requests(redis, requests: list[GenerateRequest], timeout: float = 180) -> dict[str, list[TokenDelta]]:
    bus = Bus(redis, "test-gateway")
    stream, group = streams.delta_stream(GW), streams.group("gateway")
    await bus.ensure_group(stream, group)
    await bus.publish_many([(streams.REQUESTS, r) for r in requests])
    got: dict[str, list[TokenDelta]] = {r.request_id: [] for r in requests}
    done: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(done) < len(requests) and time.monotonic() < deadline:
        for entry in await bus.read(stream, group, TokenDelta, count=256, block_ms=200):
            got[entry.message.request_id].append(entry.message)
            if entry.message.finish_reason:
                done.add(entry.message.request_id)
            await bus.ack(stream, group, entry.entry_id)
    assert done == set(got), f"unfinished: {set(got) - done}"
    return got


@pytest.fixture()
async def client(redis_url):
    """A Redis client that leaves the services' streams alone (no flush)."""
    from redis.asyncio import Redis

    r = Redis.from_url(redis_url)
    yield r
    await r.aclose()


async def test_greedy_requests_match_transformers(system, tiny_fp32, client):
    redis = client
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in LENGTHS]
    requests = [GenerateRequest(f"p{i}", f"trace-{i}", GW, Sampling(max_tokens=m, ignore_eos=True), time.time() + 300,
                                prompt_ids=p) for i, (p, m) in enumerate(zip(prompts, MAX_TOKENS))]
    got = await run_requests(redis, requests)
    ref = load_reference(tiny_fp32)
    covered = 0
    for i, (prompt, m) in enumerate(zip(prompts, MAX_TOKENS)):
        deltas = got[f"p{i}"]
        assert [d.index for d in deltas] == list(range(len(deltas)))  # one delta per step, no gap
        tokens = [t for d in deltas for t in d.token_ids]
        assert len(tokens) == m and deltas[-1].finish_reason == "length"
        expected = reference_greedy(ref, prompt, m)
        assert tokens[:expected.trusted] == expected.tokens[:expected.trusted], f"prompt {i}"
        covered += expected.trusted
        assert deltas[0].num_prompt_tokens == len(prompt)
    assert covered >= 0.7 * sum(MAX_TOKENS), f"near-ties left only {covered} tokens to compare"
    # every KV handoff entry was consumed and deleted; the decode rank holds no KV any more
    assert await redis.xlen(streams.kv_stream(0)) == 0


async def test_text_prompt_with_stop_string(system, tiny_fp32, client):
    redis = client
    from shared.engine.engine import Engine
    from shared.engine.sequence import SamplingParams
    from shared.model.loader import load_model
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_fp32 / "tokenizer.json"))
    ids = tok.encode("Hello there").ids
    engine = Engine(load_model(tiny_fp32, dtype="fp32"))
    engine.add_request("x", ids, SamplingParams(max_tokens=16, ignore_eos=True))
    full = []
    while engine.has_unfinished():
        full += [t for d in engine.step() for t in d.token_ids]
    text = tok.decode(full)
    stop = text[len(text) // 2:len(text) // 2 + 2]  # two characters from the middle of the reply
    req = GenerateRequest("s1", "trace-s1", GW, Sampling(max_tokens=16, ignore_eos=True, stop=[stop]),
                          time.time() + 300, prompt_text="Hello there")
    deltas = (await run_requests(redis, [req]))["s1"]
    assert deltas[-1].finish_reason == "stop"
    assert "".join(d.text for d in deltas if d.finish_reason in (None, "stop")) == text[:text.find(stop)]
