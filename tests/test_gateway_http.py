"""The OpenAI-compatible gateway through real HTTP, in front of the real services."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import torch
from procs import ServiceProcess, metric
from reference import load_reference, reference_greedy


@pytest.fixture(scope="module")
def gateway(system):
    return system[-1]


def model_name(tiny_fp32) -> str:
    return tiny_fp32.resolve().name


async def post(url: str, body, headers=None, raw: bytes | None = None):
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=raw if raw is not None else json.dumps(body),
                                headers={"Content-Type": "application/json", **(headers or {})}) as r:
            return r.status, dict(r.headers), await r.read()


async def sse(url: str, body) -> list[dict]:
    events = []
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                line = line.decode().strip()
                if line.startswith("data: "):
                    events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_concurrent_greedy_completions_match_transformers(gateway, tiny_fp32):
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (1, 9, 40, 70, 129, 200, 5, 33)]
    url = gateway.url("/v1/completions")
    bodies = [{"model": model_name(tiny_fp32), "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
               "return_token_ids": True, "stream": i % 2 == 1} for i, p in enumerate(prompts)]

    async def one(body):
        if not body["stream"]:
            status, _, raw = await post(url, body)
            assert status == 200, raw
            reply = json.loads(raw)
            assert reply["prompt_token_ids"] == body["prompt"]
            assert reply["usage"]["prompt_tokens"] == len(body["prompt"]) and reply["usage"]["completion_tokens"] == 12
            assert reply["usage"]["prompt_cache_hit_tokens"] + reply["usage"]["prompt_cache_miss_tokens"] == \
                len(body["prompt"])
            return reply["choices"][0]["token_ids"]
        chunks = await sse(url, {**body, "stream_options": {"include_usage": True}})
        assert chunks[-1]["usage"]["completion_tokens"] == 12 and chunks[-1]["choices"] == []
        assert chunks[0]["prompt_token_ids"] == body["prompt"]
        return [t for c in chunks[:-1] for t in c["choices"][0]["token_ids"]]

    results = await asyncio.gather(*(one(b) for b in bodies))
    ref = load_reference(tiny_fp32)
    covered = 0
    for prompt, tokens in zip(prompts, results):
        expected = reference_greedy(ref, prompt, 12)
        assert len(tokens) == 12 and tokens[:expected.trusted] == expected.tokens[:expected.trusted]
        covered += expected.trusted
    assert covered >= 0.7 * 12 * len(prompts)


async def test_metrics_count_what_clients_saw(system, tiny_fp32):
    """The gateway counts requests by outcome and code, tokens by kind and the latencies; workers
    count their tokens and GPU time; /services lists every live service's metrics."""
    gateway, prefill, decode = system[-1], system[3], system[4]
    names = [("streamoe_tokens_total", {"kind": "input_cache_miss"}), ("streamoe_tokens_total", {"kind": "output"}),
             ("streamoe_tokens_total", {"kind": "input_cache_hit"}),
             ("streamoe_requests_total", {"outcome": "completed"}), ("streamoe_ttft_seconds_count", {}),
             ("streamoe_e2e_seconds_count", {}), ("streamoe_tpot_seconds_count", {}),
             ("streamoe_http_requests_total", {"route": "/v1/completions", "code": "400"})]
    before = [metric(gateway, n, **labels) for n, labels in names]
    worker_before = (metric(prefill, "streamoe_worker_tokens_total", kind="input_cache_miss"),
                     metric(decode, "streamoe_worker_tokens_total", kind="output"),
                     metric(prefill, "streamoe_expert_tokens_total"))
    url = gateway.url("/v1/completions")
    lengths, max_tokens = [5, 70, 130], [4, 9, 1]
    for i, (n, m) in enumerate(zip(lengths, max_tokens)):
        body = {"model": model_name(tiny_fp32), "prompt": list(range(3, 3 + n)), "max_tokens": m, "temperature": 0,
                "ignore_eos": True, "stream": i == 1}
        status, _, raw = await post(url, body)
        assert status == 200, raw
    status, _, _ = await post(url, {"model": model_name(tiny_fp32), "prompt": "x", "max_tokens": -1})
    assert status == 400
    after = [metric(gateway, n, **labels) for n, labels in names]
    miss, output, hit, *counts = [a - b for a, b in zip(after, before)]
    # the prefill rank shares the prompts' common 64-token block in memory: cached, not computed
    assert (miss, hit, output) == (sum(lengths) - 64, 64, sum(max_tokens))
    assert counts == [3, 3, 3, 2, 1]
    assert metric(prefill, "streamoe_worker_tokens_total", kind="input_cache_miss") - worker_before[0] == miss
    # each computed prompt token went to top_k = 4 experts in each of the tiny model's 2 MoE layers
    await asyncio.sleep(1.5)  # expert counts are gathered with the load report, about once a second
    assert metric(prefill, "streamoe_expert_tokens_total") - worker_before[2] == miss * 4 * 2
    # decode computes all but the first token, which prefill samples
    assert metric(decode, "streamoe_worker_tokens_total", kind="output") - worker_before[1] == \
        sum(max_tokens) - len(max_tokens)
    assert metric(decode, "streamoe_gpu_seconds_total", role="decode", rank="0") > 0
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url("/services")) as r:
            listed = (await r.json())["services"]
        assert sorted(s["name"] for s in listed) == ["balancer", "cache", "decode", "gateway", "prefill", "tokenizer"]
        for entry in listed:
            async with session.get(entry["metrics_url"]) as r:
                assert r.status == 200 and "streamoe_messages_total" in await r.text()


async def test_chat_streamed_equals_whole(gateway, tiny_fp32):
    body = {"model": model_name(tiny_fp32), "messages": [{"role": "user", "content": "Hello 🌍"}],
            "max_tokens": 10, "temperature": 0}
    status, _, raw = await post(gateway.url("/v1/chat/completions"), body)
    assert status == 200, raw
    whole = json.loads(raw)
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["role"] == "assistant"
    chunks = await sse(gateway.url("/v1/chat/completions"), {**body, "stream": True})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {"model": "M", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": "M", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "M", "prompt": {"a": 1}}, 400, "prompt"),
    ("/v1/completions", {"model": "M", "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {"model": "M", "messages": []}, 400, "messages"),
    ("/v1/completions", {"model": "other-model", "prompt": "x"}, 404, "model"),
    ("/v1/completions", [1, 2], 400, None),
])
async def test_bad_input_gets_a_named_error(gateway, tiny_fp32, path, body, status, param):
    if isinstance(body, dict) and body.get("model") == "M":
        body["model"] = model_name(tiny_fp32)
    code, _, raw = await post(gateway.url(path), body)
    assert code == status, raw
    error = json.loads(raw)["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


async def test_bad_json_and_oversized_body(gateway):
    code, _, raw = await post(gateway.url("/v1/completions"), None, raw=b"{not json")
    assert code == 400 and "not valid JSON" in json.loads(raw)["error"]["message"]
    code, _, raw = await post(gateway.url("/v1/completions"), None, raw=b"x" * (9 << 20))
    assert code == 413 and json.loads(raw)["error"]["type"] == "invalid_request_error"


async def test_models_and_api_keys(gateway, tiny_fp32, redis_url):
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url("/v1/models")) as r:
            assert (await r.json())["data"][0]["id"] == model_name(tiny_fp32)
    keyed = ServiceProcess("services.gateway", redis_url, "--model", str(tiny_fp32), "--api-key", "k1,k2")
    try:
        body = {"model": model_name(tiny_fp32), "prompt": [5, 6], "max_tokens": 2}
        code, _, raw = await post(keyed.url("/v1/completions"), body)
        assert code == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
        code, _, _ = await post(keyed.url("/v1/completions"), body, {"Authorization": "Bearer wrong"})
        assert code == 401
        code, _, raw = await post(keyed.url("/v1/completions"), body, {"Authorization": "Bearer k2"})
        assert code == 200, raw
    finally:
        assert keyed.stop() == 0


def kv_blocks_used(service) -> float:
    return metric(service, "streamoe_kv_blocks_used")


async def test_client_disconnect_frees_decode_kv(system, tiny_fp32):
    gateway, decode = system[-1], system[4]
    assert kv_blocks_used(decode) == 0
    body = {"model": model_name(tiny_fp32), "prompt": list(range(3, 300)), "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url("/v1/completions"), json=body) as r:
            seen = 0
            async for line in r.content:
                seen += line.startswith(b"data: ")
                if seen == 3:
                    assert kv_blocks_used(decode) > 0  # decoding, its KV reserved
                if seen == 5:
                    break  # leaving the block closes the connection mid-stream
    deadline = asyncio.get_running_loop().time() + 60
    while kv_blocks_used(decode) > 0 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
    assert kv_blocks_used(decode) == 0, "the aborted request's KV was not freed"
    assert metric(decode, "streamoe_requests_aborted_total") == 1  # freed by the abort, not by finishing


async def test_a_burst_past_the_redis_pool_is_served_or_refused_cleanly(gateway, tiny_fp32):
    """300 requests at once (more than the gateway's Redis connection pool): each gets a 200 or a
    429, never a 500."""
    url = gateway.url("/v1/completions")
    body = {"model": model_name(tiny_fp32), "prompt": [7, 8, 9], "max_tokens": 1, "temperature": 0}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one():
            async with session.post(url, json=body) as r:
                await r.read()
                return r.status
        statuses = await asyncio.gather(*[one() for _ in range(300)])
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    assert statuses.count(200) >= 100


async def test_overload_deadline_and_no_backend(system, tiny_fp32, redis_url):
    """429 with Retry-After when the in-flight limit is reached; 504 when the deadline passes (and
    the work is aborted); 503 when no worker can take the request before its deadline."""
    name = model_name(tiny_fp32)
    small = ServiceProcess("services.gateway", redis_url, "--model", str(tiny_fp32), "--max-inflight", "1",
                           "--request-timeout-s", "1.5")
    try:
        long_body = {"model": name, "prompt": [5, 6, 7], "max_tokens": 1800, "ignore_eos": True, "temperature": 0}
        slow = asyncio.create_task(post(small.url("/v1/completions"), long_body))
        await asyncio.sleep(0.3)
        code, headers, raw = await post(small.url("/v1/completions"), {"model": name, "prompt": "x"})
        assert code == 429 and headers["Retry-After"] == "1" and headers["retry-after-ms"] == "1000"
        assert json.loads(raw)["error"]["code"] == "overloaded"
        code, _, raw = await slow
        assert code == 504 and json.loads(raw)["error"]["code"] == "timeout"
        decode = system[4]
        deadline = asyncio.get_running_loop().time() + 30
        while kv_blocks_used(decode) > 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
        assert kv_blocks_used(decode) == 0  # the timed-out request was aborted, not left running
    finally:
        assert small.stop() == 0


async def test_no_backend_is_a_503(tiny_fp32, tmp_path):
    """Only a tokenizer, a balancer and a gateway on a Redis of their own: no worker rank is live."""
    from shared.launcher.redis_server import start_redis

    redis_proc, url = start_redis(tmp_path / "redis", appendonly=False)
    services = [ServiceProcess("services.tokenizer", url, "--model", str(tiny_fp32)),
                ServiceProcess("services.balancer", url),
                ServiceProcess("services.gateway", url, "--model", str(tiny_fp32), "--request-timeout-s", "2")]
    try:
        code, _, raw = await post(services[-1].url("/v1/completions"), {"model": model_name(tiny_fp32),
                                                                        "prompt": "x", "max_tokens": 4})
        assert code == 503 and json.loads(raw)["error"]["code"] == "backend_unavailable"
    finally:
        for s in services:
            s.terminate()
        for s in services:
            assert s.stop() == 0, s.log_tail()
        redis_proc.terminate()
        redis_proc.wait()


async def test_official_openai_client(gateway, tiny_fp32):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=gateway.url("/v1"), api_key="unused", max_retries=0)
    name = model_name(tiny_fp32)
    models = await client.models.list()
    assert [m.id for m in models.data] == [name]
    chat = await client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6
    text = await client.completions.create(model=name, prompt="Hello", max_tokens=6, temperature=0)
    assert text.usage.prompt_tokens >= 1 and text.choices[0].finish_reason == "length"
    stream = await client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=6, temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    pieces, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == chat.choices[0].message.content and usage.completion_tokens == 6
    streamed_text = await client.completions.create(model=name, prompt="Hello", max_tokens=6, temperature=0,
                                                    stream=True)
    assert "".join([c.choices[0].text async for c in streamed_text]) == text.choices[0].text
    await client.close()
