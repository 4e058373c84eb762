"""The on-disk prefix cache through the whole system: tokenizer -> cache -> balancer -> prefill
(loads the cached prefix, computes the rest, writes the prompt's new blocks) -> decode (writes the
blocks of prompt + reply when a request finishes)."""
from __future__ import annotations

import time

import aiohttp
import pytest
import torch
from procs import ServiceProcess, metric, stop_all
from reference import load_reference, reference_greedy

from shared.protocol import streams


@pytest.fixture(scope="module")
def cached_system(tiny_fp32, redis_url, tmp_path_factory):
    import redis as sync_redis

    sync_redis.Redis.from_url(redis_url).flushdb()
    cache_dir = tmp_path_factory.mktemp("blocks")
    cache = ["--cache-dir", str(cache_dir), "--cache-capacity-mib", "64"]
    worker = ["--model", str(tiny_fp32), "--dtype", "fp32", "--rank", "0", "--threads", "1", "--kv-cache-mib", "64",
              *cache]
    started = {"tokenizer": ServiceProcess("services.tokenizer", redis_url, "--model", str(tiny_fp32)),
               "cache": ServiceProcess("services.cache", redis_url, "--model", str(tiny_fp32), "--dtype", "fp32",
                                       *cache),
               "balancer": ServiceProcess("services.balancer", redis_url),
               "prefill": ServiceProcess("services.prefill", redis_url, *worker),
               "decode": ServiceProcess("services.decode", redis_url, *worker),
               "gateway": ServiceProcess("services.gateway", redis_url, "--model", str(tiny_fp32),
                                         "--request-timeout-s", "120")}
    started["dir"] = cache_dir
    started["args"] = (redis_url, cache)
    yield started
    stop_all(s for s in started.values() if isinstance(s, ServiceProcess))


async def complete(system, tiny_fp32, prompt: list[int], max_tokens: int, salt: str | None = None) -> dict:
    body = {"model": tiny_fp32.resolve().name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    if salt is not None:
        body["cache_salt"] = salt
    async with aiohttp.ClientSession() as session:
        async with session.post(system["gateway"].url("/v1/completions"), json=body) as r:
            assert r.status == 200, await r.text()
            return await r.json()


def wait_for_blocks(directory, at_least: int, timeout: float = 30) -> int:
    """Block writes run off the request's path: wait until they have landed."""
    deadline = time.monotonic() + timeout
    while True:
        count = len(list(directory.glob("*/*.blk")))
        if count >= at_least or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


async def test_turn_after_turn_hits_the_history(cached_system, tiny_fp32):
    """A conversation as token ids (each turn's prompt = the last prompt + its reply + new tokens):
    turn n+1 finds 64 * floor(min(prompt_n + completion_n, prompt_{n+1} - 1) / 64) tokens cached,
    and the tokens are transformers' own."""
    gen = torch.Generator().manual_seed(77)
    ref = load_reference(tiny_fp32)
    prompt = torch.randint(3, 1024, (150,), generator=gen).tolist()
    history, cached_seen = [], []
    # turn 1 ends on a block boundary (150 + 42 = 192): its last token's KV is needed by turn 2
    for max_tokens, extra in [(42, 30), (33, 50), (10, 0)]:
        reply = await complete(cached_system, tiny_fp32, prompt, max_tokens)
        tokens = reply["choices"][0]["token_ids"]
        usage = reply["usage"]
        cached_seen.append(usage["prompt_tokens_details"]["cached_tokens"])
        assert usage["prompt_cache_hit_tokens"] == cached_seen[-1]
        assert usage["prompt_cache_hit_tokens"] + usage["prompt_cache_miss_tokens"] == len(prompt)
        expected = reference_greedy(ref, prompt, max_tokens)
        assert tokens[:expected.trusted] == expected.tokens[:expected.trusted]
        if history:
            last_prompt, last_completion = history[-1]
            assert cached_seen[-1] == 64 * (min(last_prompt + last_completion, len(prompt) - 1) // 64)
        history.append((len(prompt), len(tokens)))
        wait_for_blocks(cached_system["dir"], (len(prompt) + len(tokens)) // 64)
        prompt = prompt + tokens + torch.randint(3, 1024, (extra,), generator=gen).tolist()
    assert cached_seen == [0, 192, 192]  # turn 2 uses the block that ends on turn 1's last token


async def chat(system, tiny_fp32, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": tiny_fp32.resolve().name, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(system["gateway"].url("/v1/chat/completions"), json=body) as r:
            assert r.status == 200, await r.text()
            return await r.json()


async def test_a_chat_conversation_hits_its_whole_history(cached_system, tiny_fp32):
    """Through the chat API, as a client sends it: each turn sends back the replies' text. Turn n+1
    is an exact extension of turn n (the reply's generated ids, not its re-tokenized text: the
    gateway remembers them), finds 64 * floor(min(p_n + c_n, p_{n+1} - 1) / 64) tokens cached,
    and every reply is transformers' greedy answer to the prompt ids (so the same as with no cache)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_fp32 / "tokenizer.json"))
    ref = load_reference(tiny_fp32)
    words = ["alpha", "river", "stone", "quiet", "maple", "orbit", "lemon", "cobalt", "tiger", "paper"]
    gen = torch.Generator().manual_seed(80)
    messages, history, cached_seen, lossy = [], [], [], 0
    hits_before = metric(cached_system["tokenizer"], "streamoe_reply_memory_total", outcome="hit")
    stored_before = metric(cached_system["gateway"], "streamoe_replies_remembered_total")
    for turn, (user_words, max_tokens) in enumerate([(60, 70), (25, 41), (30, 20)]):
        text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (user_words,), generator=gen))
        messages.append({"role": "user", "content": f"turn {turn}: {text}"})
        reply = await chat(cached_system, tiny_fp32, messages, max_tokens)
        choice, usage = reply["choices"][0], reply["usage"]
        prompt, tokens = reply["prompt_token_ids"], choice["token_ids"]
        cached_seen.append(usage["prompt_tokens_details"]["cached_tokens"])
        expected = reference_greedy(ref, prompt, max_tokens)
        assert tokens[:expected.trusted] == expected.tokens[:expected.trusted]
        if history:
            last_prompt, last_tokens = history[-1]
            assert prompt[:len(last_prompt) + len(last_tokens)] == last_prompt + last_tokens  # an exact extension
            assert cached_seen[-1] == 64 * (min(len(last_prompt) + len(last_tokens), len(prompt) - 1) // 64)
        history.append((prompt, tokens))
        content = choice["message"]["content"]
        lossy += tokenizer.encode(content, add_special_tokens=False).ids != tokens
        messages.append({"role": "assistant", "content": content})
        wait_for_blocks(cached_system["dir"], (len(prompt) + len(tokens)) // 64)
    assert cached_seen[1] >= 128 and cached_seen[2] >= cached_seen[1] + 64
    # the case this is for: a reply whose text does not tokenize back to its ids was remembered
    assert lossy >= 1
    assert metric(cached_system["tokenizer"], "streamoe_reply_memory_total", outcome="hit") - hits_before == 3
    assert metric(cached_system["gateway"], "streamoe_replies_remembered_total") - stored_before == 3


def disk_hits(system) -> float:
    """Prompt tokens the cache service found on disk so far (the prefill rank's in-memory blocks
    would hide the disk tier in `usage`)."""
    return metric(system["cache"], "streamoe_cache_lookup_tokens_total", result="hit")


async def test_salts_never_share_and_corrupt_blocks_are_misses(cached_system, tiny_fp32):
    gen = torch.Generator().manual_seed(78)
    prompt = torch.randint(3, 1024, (200,), generator=gen).tolist()
    first = await complete(cached_system, tiny_fp32, prompt, 4, salt="tenant-a")
    wait_for_blocks(cached_system["dir"], 3)
    before = disk_hits(cached_system)
    other = await complete(cached_system, tiny_fp32, prompt, 4, salt="tenant-b")
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 and disk_hits(cached_system) == before
    again = await complete(cached_system, tiny_fp32, prompt, 4, salt="tenant-a")
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 192
    assert disk_hits(cached_system) == before + 192
    assert again["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]
    # let decode finish its last step and write its blocks first (a write would replace a damaged file)
    deadline = time.monotonic() + 30
    while metric(cached_system["decode"], "streamoe_running_requests") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    # damage every block on disk: each is detected and dropped, never used; the answer stays right
    damaged = {}
    for path in cached_system["dir"].glob("*/*.blk"):
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        damaged[path] = bytes(data)
    before = disk_hits(cached_system)
    third = await complete(cached_system, tiny_fp32, prompt, 4, salt="tenant-a")
    assert disk_hits(cached_system) == before
    assert third["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]
    # the damaged files were removed and prefill wrote good ones again
    from shared.cache.hashing import chain_hashes, root_hash
    from shared.model.loader import checkpoint_fingerprint

    root = root_hash(checkpoint_fingerprint(tiny_fp32, torch.float32), "tenant-a")
    prompt_blocks = [cached_system["dir"] / h.hex()[:2] / f"{h.hex()}.blk" for h in chain_hashes(root, prompt[:192])]
    assert set(prompt_blocks) <= set(damaged)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(p.exists() and p.read_bytes() != damaged[p] for p in prompt_blocks):
        time.sleep(0.05)
    before = disk_hits(cached_system)
    await complete(cached_system, tiny_fp32, prompt, 4, salt="tenant-a")
    assert disk_hits(cached_system) == before + 192


async def test_blocks_on_disk_hit_after_the_cache_service_and_its_index_restart(cached_system, tiny_fp32):
    from redis.asyncio import Redis

    gen = torch.Generator().manual_seed(79)
    prompt = torch.randint(3, 1024, (140,), generator=gen).tolist()
    await complete(cached_system, tiny_fp32, prompt, 4)
    wait_for_blocks(cached_system["dir"], 2)
    redis_url, cache = cached_system["args"]
    cached_system["cache"].stop()
    client = Redis.from_url(redis_url)
    keys = [k async for k in client.scan_iter(match=streams.tagged("cache:cache", ":*"))]
    assert keys
    await client.delete(*keys)  # Redis lost the index
    await client.aclose()
    cached_system["cache"] = ServiceProcess("services.cache", redis_url, "--model", str(tiny_fp32), "--dtype",
                                            "fp32", *cache)
    assert '"index_rebuilt"' in cached_system["cache"].log_tail()
    await complete(cached_system, tiny_fp32, prompt, 4)
    assert disk_hits(cached_system) == 128  # the new cache service's first lookup, from the rebuilt index


async def test_block_writes_stay_off_the_prefill_step(cached_system, tiny_fp32):
    """Prefill steps with block writes off, then on with every write held up 2 s (a slow shared
    filesystem): no step waits for a write (each stays far under 2 s, and the mean is the same as
    with writes off within noise), though the writes did run and took their 2 s."""
    redis_url, cache = cached_system["args"]
    worker = ["--model", str(tiny_fp32), "--dtype", "fp32", "--rank", "0", "--threads", "1", "--kv-cache-mib", "64"]
    gen = torch.Generator().manual_seed(81)

    async def steps(prefill: ServiceProcess) -> tuple[float, float, float]:
        """(step count, seconds, steps over 1 s) after four fresh 300-token prompts."""
        for _ in range(4):
            await complete(cached_system, tiny_fp32, torch.randint(3, 1024, (300,), generator=gen).tolist(), 2)
        count = metric(prefill, "streamoe_step_seconds_count")
        under_1s = metric(prefill, "streamoe_step_seconds_bucket", le="1.0")
        return count, metric(prefill, "streamoe_step_seconds_sum"), count - under_1s

    cached_system["prefill"].stop()
    cached_system["prefill"] = off = ServiceProcess("services.prefill", redis_url, *worker)  # no --cache-dir
    off_count, off_sum, _ = await steps(off)
    off.stop()
    cached_system["prefill"] = on = ServiceProcess("services.prefill", redis_url, *worker, *cache,
                                                   "--cache-write-delay-s", "2")
    on_count, on_sum, slow_steps = await steps(on)
    assert slow_steps == 0
    assert on_sum / on_count <= 2 * off_sum / off_count + 0.05
    deadline = time.monotonic() + 30  # the writes end after their delay, in the background
    while metric(on, "streamoe_cache_write_seconds_count") < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(on, "streamoe_cache_write_seconds_count") == 4  # one write per prompt (decode may win the race)
    assert metric(on, "streamoe_cache_write_seconds_sum") >= 4 * 2.0
