"""The tokenizer service as a real process on a real Redis: encoding, detokenization, dead
letters, a replica killed with -9, health, metrics and a clean SIGTERM."""
from __future__ import annotations

import signal
import time
import urllib.request

import pytest
from procs import ServiceProcess

from shared.protocol import streams
from shared.protocol.messages import GenerateRequest, Sampling, TokenDelta, TokenizedRequest
from shared.runtime.bus import Bus

GW = "gw-test"


def start(model_dir, redis_url, name: str, claim_idle_ms: int = 1000) -> ServiceProcess:
    return ServiceProcess("services.tokenizer", redis_url, "--model", str(model_dir), "--claim-idle-ms",
                          str(claim_idle_ms), "--drain-timeout-s", "5", instance_id=name)


def request(rid: str, **prompt) -> GenerateRequest:
    return GenerateRequest(rid, f"trace-{rid}", GW, Sampling(max_tokens=4), time.time() + 60, **prompt)


async def collect(bus: Bus, stream: str, kind, n: int, timeout: float = 20.0) -> list:
    group = streams.consumer_group("test-reader")
    await bus.ensure_consumer_group(stream, group)
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        entries = await bus.read(stream, group, kind, count=100, block_ms=200)
        out += [e.message for e in entries]
        await bus.ack(stream, group, *[e.entry_id for e in entries])
    return out


@pytest.fixture()
def tokenizer_service(tiny_fp32, redis_url, redis):
    service = start(tiny_fp32, redis_url, "tok-a")
    yield service
    service.kill()


async def test_encodes_text_chat_and_ids_like_transformers(tokenizer_service, tiny_fp32, redis):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_fp32))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 🌍, hi"}]
    bus = Bus(redis, "test")
    await bus.publish_many([(streams.requests_stream(0), request("text", prompt_text="Hello, world")),
                            (streams.requests_stream(0), request("chat", chat=chat)),
                            (streams.requests_stream(0), request("ids", prompt_ids=[1, 5, 9]))])
    got = {m.request_id: m for m in await collect(bus, streams.tokenized_stream(0), TokenizedRequest, 3)}
    assert got["text"].prompt_ids == hf("Hello, world")["input_ids"]
    assert got["chat"].prompt_ids == hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                            return_dict=False)
    assert got["ids"].prompt_ids == [1, 5, 9]
    assert got["text"].trace_id == "trace-text" and got["text"].gateway_id == GW


async def test_bad_prompts_and_bad_entries(tokenizer_service, redis):
    bus = Bus(redis, "test")
    await redis.xadd(streams.requests_stream(0), {b"m": b"\x93garbage"})
    await bus.publish_many([(streams.requests_stream(0), request("role", chat=[{"role": "wizard", "content": "x"}])),
                            (streams.requests_stream(0), request("vocab", prompt_ids=[1, 99999])),
                            (streams.requests_stream(0), request("fine", prompt_text="ok"))])
    errors = {m.request_id: m for m in await collect(bus, streams.delta_stream(GW), TokenDelta, 2)}
    assert errors["role"].finish_reason == "error" and errors["role"].error.startswith("messages:")
    assert "prompt[1]" in errors["vocab"].error and "99999" in errors["vocab"].error
    assert [m.request_id for m in await collect(bus, streams.tokenized_stream(0), TokenizedRequest, 1)] == ["fine"]
    dead = await redis.xrange(streams.DEAD_LETTERS)
    assert len(dead) == 1 and dead[0][1][b"stream"] == streams.requests_stream(0).encode()
    with urllib.request.urlopen(tokenizer_service.url("/metrics"), timeout=5) as r:
        assert b'streamoe_messages_total{outcome="ok",stream="{streamoe:requests:0}"} 3.0' in r.read()


async def test_detokenizes_statelessly_across_a_killed_replica(tokenizer_service, tiny_fp32, redis_url, redis):
    """Deltas are spread over replica A (killed with -9 mid-stream), entries a dead consumer left
    pending, and replica B; the gateway stream still gets exactly the text, in pieces that
    concatenate to it, one delta per index."""
    from tokenizers import Tokenizer

    from shared.model.detok import prefix_window

    proc_a = tokenizer_service.proc
    text = "你好，世界 🌍 — the quick brown fox; def f(x): return x"
    ids = Tokenizer.from_file(str(tiny_fp32 / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    window = prefix_window(None)
    deltas = [TokenDelta("r1", "t1", GW, i, [ids[i]], prefix_ids=ids[max(0, i - window):i],
                         finish_reason="length" if i == len(ids) - 1 else None) for i in range(len(ids))]
    bus = Bus(redis, "test")
    third = len(deltas) // 3
    await bus.publish_many([(streams.raw_deltas_stream(0), d) for d in deltas[:third]])
    first = await collect(bus, streams.delta_stream(GW), TokenDelta, third)
    proc_a.send_signal(signal.SIGKILL)
    proc_a.wait()
    ghost = Bus(redis, "ghost")  # a consumer that read entries and died before acking them
    await bus.publish_many([(streams.raw_deltas_stream(0), d) for d in deltas[third:2 * third]])
    taken = await ghost.read(streams.raw_deltas_stream(0), streams.consumer_group("tokenizer"), TokenDelta, count=100,
                             block_ms=500)
    assert len(taken) == third
    await bus.publish_many([(streams.raw_deltas_stream(0), d) for d in deltas[2 * third:]])
    replica_b = start(tiny_fp32, redis_url, "tok-b", claim_idle_ms=500)
    try:
        rest = await collect(bus, streams.delta_stream(GW), TokenDelta, len(deltas) - third)
    finally:
        replica_b.kill()
    got = sorted(first + rest, key=lambda d: d.index)
    assert [d.index for d in got] == list(range(len(ids)))
    assert "".join(d.text for d in got) == text
    assert got[-1].finish_reason == "length"


async def test_sigterm_drains_and_exits_cleanly(tokenizer_service, redis):
    proc = tokenizer_service.proc
    assert await redis.exists(streams.heartbeat_key("tokenizer", "tok-a"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not await redis.exists(streams.heartbeat_key("tokenizer", "tok-a"))


def test_remembered_reply_ids_are_spliced_only_between_special_tokens(tiny_fp32, tmp_path):
    """shared/cache/reply_memory.py: an assistant message whose ids are remembered is encoded as those
    ids; everything else exactly as the template's text; a template that does not frame replies
    with special tokens falls back to the text."""
    import json
    import shutil

    from services.tokenizer.codec import Encoder

    encoder = Encoder(tiny_fp32)
    lossy = [140, 90, 140, 522]  # byte tokens that are not UTF-8 on their own: the text says U+FFFD
    text = encoder.tokenizer.decode(lossy, skip_special_tokens=False)
    assert encoder.tokenizer.encode(text, add_special_tokens=False).ids != lossy
    chat = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": text},
            {"role": "user", "content": "and then?"}]
    plain = encoder.encode(request("a", chat=chat))
    spliced = encoder.encode(request("a", chat=chat), {1: lossy})
    assert plain == encoder.tokenizer.encode(encoder._render(chat), add_special_tokens=False).ids
    head = len(encoder.encode(request("a", chat=chat[:1])))  # through the assistant's opening special token
    as_text = len(encoder.tokenizer.encode(text, add_special_tokens=False).ids)
    assert spliced == plain[:head] + lossy + plain[head + as_text:]
    # remembering a reply's own tokenization changes nothing
    round_trip = encoder.tokenizer.encode("a plain reply", add_special_tokens=False).ids
    chat[1]["content"] = "a plain reply"
    assert encoder.encode(request("a", chat=chat), {1: round_trip}) == encoder.encode(request("a", chat=chat))
    # a template whose reply is not framed by special tokens: the text, never the ids
    other = tmp_path / "model"
    shutil.copytree(tiny_fp32, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("<｜Assistant｜>{{ message['content'] }}",
                                                              "<｜Assistant｜>Answer: {{ message['content'] }}")
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    unframed = Encoder(other)
    chat[1]["content"] = text
    assert unframed.encode(request("a", chat=chat), {1: lossy}) == unframed.encode(request("a", chat=chat))
