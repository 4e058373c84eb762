"""Requests through the real services over a real Redis — tokenizer, balancer, one prefill rank,
one decode rank, each its own process — against transformers' greedy tokens. The gateway's part
(publishing requests, reading the delta stream) is played by the test through the same streams."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch
from procs import metric
from reference import load_reference, reference_greedy

from shared.protocol import streams
from shared.protocol.messages import GenerateRequest, KVChunk, Sampling, TokenDelta, TokenizedRequest
from shared.protocol.tensors import checksum, to_blob
from shared.protocol.wire import TensorBlob
from shared.runtime import ownership
from shared.runtime.bus import Bus

GW = "gw-pipeline"
LENGTHS = [1, 3, 17, 64, 65, 130, 200, 300]
MAX_TOKENS = [12, 20, 8, 16, 24, 10, 14, 18]


async def run_requests(redis, requests: list, timeout: float = 180,
                       writes: list | None = None) -> dict[str, list[TokenDelta]]:
    """Publish the requests (or the given writes) and collect every request's deltas."""
    bus = Bus(redis, "test-gateway")
    stream, group = streams.delta_stream(GW), streams.consumer_group("gateway")
    await bus.ensure_consumer_group(stream, group)
    await bus.publish_many(writes if writes is not None else [(streams.requests_stream(0), r) for r in requests])
    got: dict[str, list[TokenDelta]] = {r.request_id: [] for r in requests}
    done: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(done) < len(requests) and time.monotonic() < deadline:
        for entry in await bus.read(stream, group, TokenDelta, count=256, block_ms=200):
            await bus.ack(stream, group, entry.entry_id)
            if entry.message.request_id not in got:
                continue  # a late delta of an earlier test's request (sent before its abort landed)
            got[entry.message.request_id].append(entry.message)
            if entry.message.finish_reason:
                done.add(entry.message.request_id)
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
    assert await redis.xlen(streams.kv_stream("decode", 0)) == 0


async def test_text_prompt_with_stop_string(system, tiny_fp32, client):
    redis = client
    from tokenizers import Tokenizer

    from shared.engine.engine import Engine
    from shared.engine.sequence import SamplingParams
    from shared.model.loader import load_model

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


async def test_bad_kv_handoffs_are_refused_and_reprefilled(system, tiny_fp32, client):
    """A handoff with a corrupted layer, and one missing a layer, both reach the decode rank (the
    test plays a faulty prefill): decode refuses them loudly, sends the requests back through the
    balancer, and they complete with the right tokens."""
    decode = system[4]
    before = metric(decode, "streamoe_kv_reprefills_total")
    gen = torch.Generator().manual_seed(23)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (40, 90)]
    layers, width = 3, 64 + 16  # tiny: 3 layers, kv_lora_rank 64 + qk_rope_head_dim 16
    kv = streams.kv_stream("decode", 0)
    writes, requests = [], []
    for i, prompt in enumerate(prompts):
        req = TokenizedRequest(f"bad{i}", f"trace-bad{i}", GW, Sampling(max_tokens=10, ignore_eos=True),
                               time.time() + 300, prompt)
        requests.append(req)
        for layer in range(layers):
            if i == 1 and layer == 1:
                continue  # the second handoff lost a layer
            blob = to_blob(torch.randn(len(prompt), width, generator=gen))
            digest = checksum(blob.data)
            if i == 0 and layer == 2:  # the first one's last layer is damaged in transit
                blob = TensorBlob(blob.dtype, blob.shape, blob.data[:-4] + b"\0\0\0\0")
            writes.append((kv, KVChunk(req.request_id, req.trace_id, layer, layers, blob, digest)))
        writes.append((kv, KVChunk(req.request_id, req.trace_id, -1, layers, TensorBlob("float32", [0], b""), "",
                                   request=req, first_token=5, final=True)))
    got = await run_requests(client, requests, writes=writes)
    ref = load_reference(tiny_fp32)
    for req in requests:
        deltas = got[req.request_id]
        tokens = [t for d in deltas for t in d.token_ids]
        expected = reference_greedy(ref, req.prompt_ids, 10)
        assert len(tokens) == 10
        assert tokens[:expected.trusted] == expected.tokens[:expected.trusted], req.request_id
        assert tokens[0] != 5 or expected.tokens[0] == 5  # the faulty prefill's first token was not used
    assert metric(decode, "streamoe_kv_reprefills_total") == before + 2
    assert "fails its checksum" in decode.log_tail(20000) and "layer 1 of the KV handoff is missing" in \
        decode.log_tail(20000)
    assert await client.xlen(streams.kv_stream("decode", 0)) == 0  # refused handoffs are deleted too


async def test_first_layer_reaches_decode_before_prefill_computes_the_last(system, client):
    """Layer-wise streaming: on a long prompt the decode rank has layer 0 of the KV before the
    prefill rank has computed its last layer (timestamps from both services, in decode's metrics)."""
    decode = system[4]
    before = metric(decode, "streamoe_kv_handoffs_total", layerwise="yes")
    prompt = torch.randint(3, 1024, (1900,), generator=torch.Generator().manual_seed(3)).tolist()
    req = GenerateRequest("long", "trace-long", GW, Sampling(max_tokens=2, ignore_eos=True), time.time() + 300,
                          prompt_ids=prompt)
    await run_requests(client, [req])
    assert metric(decode, "streamoe_kv_handoffs_total", layerwise="yes") == before + 1
    assert metric(decode, "streamoe_kv_handoff_lead_seconds") > 0


async def test_decode_records_ownership_while_running(system, client):
    """While a request runs, Redis says which decode rank owns it and how many tokens it has sent
    (the record a resume needs); the record goes when the request finishes."""
    from shared.protocol.wire import decode as decode_message

    prompt = list(range(10, 40))
    req = GenerateRequest("owned", "trace-owned", GW, Sampling(max_tokens=300, ignore_eos=True), time.time() + 300,
                          prompt_ids=prompt)
    collect = asyncio.create_task(run_requests(client, [req]))
    seen = []
    while not collect.done():
        async with client.pipeline(transaction=True) as pipe:
            pipe.hgetall(streams.owner_key("owned")).strlen(ownership.ids_key("owned"))
            record, num_ids = await pipe.execute()
        if record:
            seen.append((record, num_ids // 4))
        await asyncio.sleep(0.005)
    deltas = (await collect)["owned"]
    assert len([t for d in deltas for t in d.token_ids]) == 300
    assert seen, "no ownership record was seen while the request ran"
    last = seen[-1][0]
    assert last[b"rank"] == b"0" and last[b"instance_id"] == system[4].instance_id.encode()
    assert decode_message(last[b"request"], TokenizedRequest).prompt_ids == prompt
    emitted = [n for _, n in seen]
    assert emitted == sorted(emitted) and 1 <= emitted[-1] <= 300 and len(set(emitted)) > 1
    assert not await client.exists(streams.owner_key("owned"))


async def test_streams_are_trimmed_once_consumed(system, client):
    """Housekeeping trims what every group has acked (services/README.md, "Delivery"): after the requests
    above, the request and token streams empty out without anyone deleting them by hand."""
    deadline = time.monotonic() + 30
    names = [streams.requests_stream(0), streams.tokenized_stream(0), streams.raw_deltas_stream(0),
             streams.prefill_stream("prefill", 0)]
    lengths = {}
    while time.monotonic() < deadline:
        lengths = {n: await client.xlen(n) for n in names}
        if not any(lengths.values()):
            break
        await asyncio.sleep(0.5)
    assert not any(lengths.values()), lengths
