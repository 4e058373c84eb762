"""The wire codec and the Redis-streams bus, against a real redis-server."""
from __future__ import annotations

import re

import msgpack
import pytest

from shared.protocol import streams
from shared.protocol.messages import GenerateRequest, KVChunk, Sampling, TokenDelta
from shared.protocol.wire import SCHEMA_VERSION, TensorBlob, WireError, decode, encode, encode_parts
from shared.runtime.bus import Bus, StreamFull


def request(i: int = 0) -> GenerateRequest:
    return GenerateRequest(request_id=f"r{i}", trace_id=f"t{i}", gateway_id="gw0",
                           sampling=Sampling(max_tokens=8, temperature=0.5, stop=["\n"]), deadline=1e10,
                           prompt_ids=[1, 2, 3])


def test_round_trip_and_tensor_blob():
    msg = KVChunk("r", "t", layer=2, num_layers=3, kv=TensorBlob("bfloat16", [4, 80], b"\x01" * 640), checksum="ab")
    assert decode(encode(msg), KVChunk) == msg
    assert decode(encode(request()), GenerateRequest) == request()


@pytest.mark.parametrize("payload, reason", [
    (b"\xc1garbage", "not msgpack"),
    (msgpack.packb([1, 2]), "not a streamoe envelope"),
    (msgpack.packb({"v": SCHEMA_VERSION + 1, "t": "generate", "f": {}}), "schema version"),
    (msgpack.packb({"v": SCHEMA_VERSION, "t": "delta", "f": {}}), "message type 'delta'"),
    (msgpack.packb({"v": SCHEMA_VERSION, "t": "generate", "f": {"request_id": "r"}}), "generate.trace_id: missing"),
])
def test_decode_rejects_with_reason(payload, reason):
    with pytest.raises(WireError, match=reason):
        decode(payload, GenerateRequest)


def test_decode_checks_field_types():
    good = msgpack.unpackb(encode(request()))
    bad = dict(good, f=dict(good["f"], sampling=dict(good["f"]["sampling"], max_tokens="8")))
    with pytest.raises(WireError, match=r"generate\.sampling\.max_tokens: expected int, got str"):
        decode(msgpack.packb(bad), GenerateRequest)
    bad = dict(good, f=dict(good["f"], prompt_ids=[1, "x"]))
    with pytest.raises(WireError, match=r"prompt_ids"):
        decode(msgpack.packb(bad), GenerateRequest)
    bad = dict(good, f=dict(good["f"], surprise=1))
    with pytest.raises(WireError, match=r"unknown field\(s\) \['surprise'\]"):
        decode(msgpack.packb(bad), GenerateRequest)


def test_the_fast_decoder_gives_what_the_checked_one_gives():
    """Well-formed structs decode through converters built once per type; anything else goes the
    checked way, which names the field at fault: the two agree on every value."""
    from shared.protocol import wire
    from shared.protocol.messages import TokenizedRequest

    tokenized = TokenizedRequest("r", "t", "gw0", Sampling(max_tokens=8, temperature=0.5, stop=["\n"]), 1e10,
                                 [1, 2, 3])
    delta = TokenDelta("r", "t", "gw0", 3, [7, 8], finish_reason="stop", prefix_ids=[1, 2], stop=["x"], text="hi",
                       num_prompt_tokens=4, prompt_ids=[1, 2, 3, 4], status=200)
    chunk = KVChunk("r", "t", -1, 3, TensorBlob("bfloat16", [2, 4], b"\0" * 16), "ab", request=tokenized,
                    first_token=9, final=True)
    assert wire._fast(TokenDelta) is not None and wire._fast(KVChunk) is not None
    for msg in (delta, chunk, tokenized, TokenDelta("r", "t", "gw0", 0, [])):
        assert decode(encode(msg), type(msg)) == msg
    plain = msgpack.unpackb(encode(delta))["f"]
    variants = [dict(plain, token_ids=[7, True]), dict(plain, token_ids=[7, 8.0]), dict(plain, index=True),
                dict(plain, index=None), dict(plain, text=None), dict(plain, stop="x"), dict(plain, extra=1),
                {k: v for k, v in plain.items() if k != "index"}, {k: v for k, v in plain.items() if k != "text"}]
    plain = msgpack.unpackb(encode(chunk))["f"]
    variants += [dict(plain, kv=dict(plain["kv"], shape=[2, "4"])), dict(plain, computed_at=5),
                 dict(plain, request=dict(plain["request"], deadline=7)), dict(plain, request=None)]
    for fields in variants:
        kind = KVChunk if "kv" in fields else TokenDelta
        try:
            want = wire._from_plain(fields, kind, kind.TAG)
        except WireError as e:
            with pytest.raises(WireError, match=re.escape(str(e))):
                decode(msgpack.packb({"v": SCHEMA_VERSION, "t": kind.TAG, "f": fields}), kind)
        else:
            got = decode(msgpack.packb({"v": SCHEMA_VERSION, "t": kind.TAG, "f": fields}), kind)
            assert got == want and type(got.computed_at if kind is KVChunk else got.index) is type(
                want.computed_at if kind is KVChunk else want.index)


async def test_publish_read_ack(redis):
    bus = Bus(redis, "c1")
    group = streams.consumer_group("tokenizer")
    await bus.ensure_consumer_group(streams.requests_stream(0), group)
    await bus.ensure_consumer_group(streams.requests_stream(0), group)  # idempotent
    ids = await bus.publish_many([(streams.requests_stream(0), request(i)) for i in range(3)])
    got = await bus.read(streams.requests_stream(0), group, GenerateRequest, count=10, block_ms=100)
    assert [e.entry_id for e in got] == ids and [e.message.request_id for e in got] == ["r0", "r1", "r2"]
    assert (await redis.xpending(streams.requests_stream(0), group))["pending"] == 3
    await bus.ack(streams.requests_stream(0), group, *ids)
    assert (await redis.xpending(streams.requests_stream(0), group))["pending"] == 0


async def test_undecodable_entry_goes_to_dead_letters_and_reading_goes_on(redis):
    bus = Bus(redis, "c1")
    group = streams.consumer_group("tokenizer")
    await bus.ensure_consumer_group(streams.requests_stream(0), group)
    await redis.xadd(streams.requests_stream(0), {b"m": b"\xc1not msgpack"})
    await bus.publish(streams.requests_stream(0), request(1))
    got = await bus.read(streams.requests_stream(0), group, GenerateRequest, block_ms=100)
    assert [e.message.request_id for e in got] == ["r1"]
    dead = await redis.xrange(streams.DEAD_LETTERS)
    assert len(dead) == 1 and b"not msgpack" in dead[0][1][b"reason"]
    assert dead[0][1][b"stream"] == streams.requests_stream(0).encode()
    assert (await redis.xpending(streams.requests_stream(0), group))["pending"] == 1  # only the good one


async def test_dead_consumer_entries_are_claimed(redis):
    group = streams.consumer_group("tokenizer")
    dead, alive = Bus(redis, "dead"), Bus(redis, "alive")
    await dead.ensure_consumer_group(streams.requests_stream(0), group)
    await dead.publish(streams.requests_stream(0), request(7))
    taken = await dead.read(streams.requests_stream(0), group, GenerateRequest, block_ms=100)
    assert len(taken) == 1  # and then the consumer dies without acking
    assert await alive.read(streams.requests_stream(0), group, GenerateRequest, block_ms=50) == []
    assert await alive.claim_stale(streams.requests_stream(0), group, GenerateRequest, min_idle_ms=60_000) == []
    claimed = await alive.claim_stale(streams.requests_stream(0), group, GenerateRequest, min_idle_ms=0)
    assert [e.message.request_id for e in claimed] == ["r7"]
    consumers = {c["name"]: c["pending"] for c in await redis.xinfo_consumers(streams.requests_stream(0), group)}
    assert consumers[b"alive"] == 1 and consumers[b"dead"] == 0


@pytest.mark.parametrize("kv_bytes", [64, 8192])
async def test_publish_many_writes_every_entry_in_order_with_what_it_queues_after(redis, kv_bytes):
    """publish_many: small entries go in one script (XADD_MANY), an entry with a large value
    (a KV chunk) as pipelined XADDs; either way each stream holds its entries in order, the ids
    returned are theirs, and what `then` queues runs in the same round trip, after them."""
    bus = Bus(redis, "c1")
    a, b = streams.raw_deltas_stream(0), streams.delta_stream("gw-x")
    chunk = KVChunk("r9", "t9", 0, 2, TensorBlob("uint8", [kv_bytes], bytes(range(256)) * (kv_bytes // 256 or 1)), "x")
    items = [(a, TokenDelta("r1", "t1", "gw-x", 0, [5])), (b, TokenDelta("r2", "t2", "gw-x", 3, [6, 7], text="hé")),
             (a, TokenDelta("r1", "t1", "gw-x", 1, [8], finish_reason="length")), (b, chunk)]
    ids = await bus.publish_many(items, then=lambda pipe: pipe.set("after", b"1"))
    assert await redis.get("after") == b"1"
    for stream in (a, b):
        entries = await redis.xrange(stream)
        mine = [(i, msg) for i, (s, msg) in zip(ids, items) if s == stream]
        assert [e[0].decode() for e in entries] == [i for i, _ in mine]
        for (_, fields), (_, msg) in zip(entries, mine):
            attachments = [fields[k] for k in sorted(k for k in fields if k != b"m")]
            assert decode(fields[b"m"], type(msg), attachments) == msg


async def test_stale_entries_are_looked_for_at_most_once_an_interval(redis, monkeypatch):
    """claim_stale with every_s (what take, prefill and decode pass: claim_interval_s) makes one
    XAUTOCLAIM per interval per stream and group; what a dead consumer left is claimed at the next."""
    from shared.runtime import bus as bus_module

    clock = [1000.0]
    monkeypatch.setattr(bus_module.time, "monotonic", lambda: clock[0])
    group, stream = streams.consumer_group("tokenizer"), streams.requests_stream(0)
    dead, alive = Bus(redis, "dead"), Bus(redis, "alive")
    await dead.ensure_consumer_group(stream, group)
    assert await alive.claim_stale(stream, group, GenerateRequest, 0, every_s=1.0) == []  # looked: nothing yet
    await dead.publish(stream, request(8))
    assert len(await dead.read(stream, group, GenerateRequest, block_ms=100)) == 1  # then it dies
    clock[0] += 0.9
    assert await alive.claim_stale(stream, group, GenerateRequest, 0, every_s=1.0) == []  # not due
    clock[0] += 0.2
    assert [e.message.request_id for e in await alive.claim_stale(stream, group, GenerateRequest, 0,
                                                                  every_s=1.0)] == ["r8"]
    assert bus_module.claim_interval_s(30_000) == 1.0 and bus_module.claim_interval_s(1500) == 0.375


async def test_an_entry_whose_read_reply_was_lost_is_read_again(redis):
    """Redis delivered the entry (it is pending on this consumer) but the reply never arrived."""
    group, bus = streams.consumer_group("gateway"), Bus(redis, "gw")
    await bus.ensure_consumer_group(streams.requests_stream(0), group)
    await bus.publish(streams.requests_stream(0), request(3))
    await redis.xreadgroup(group, "gw", {streams.requests_stream(0): ">"}, count=10)  # the reply that got lost
    await bus.publish(streams.requests_stream(0), request(4))
    assert [e.message.request_id for e in await bus.read(streams.requests_stream(0), group, GenerateRequest,
                                                          block_ms=50)] == ["r4"]
    assert await bus.reclaim_lost(streams.requests_stream(0), group, GenerateRequest, idle_ms=60_000) == []  # too fresh
    # at most once a second
    assert await bus.reclaim_lost(streams.requests_stream(0), group, GenerateRequest, idle_ms=0) == []
    bus._claimed_at.clear()
    again = await bus.reclaim_lost(streams.requests_stream(0), group, GenerateRequest, idle_ms=0)
    assert sorted(e.message.request_id for e in again) == ["r3", "r4"]  # r4 not acked yet either


async def test_trim_never_drops_unread_or_pending(redis):
    stream = streams.delta_stream("gw0")
    bus = Bus(redis, "c")
    fast, slow = streams.consumer_group("fast"), streams.consumer_group("slow")
    for g in (fast, slow):
        await bus.ensure_consumer_group(stream, g)
    ids = await bus.publish_many([(stream, TokenDelta(f"r{i}", "t", "gw0", i, [i])) for i in range(6)])
    got = await bus.read(stream, fast, TokenDelta, count=6, block_ms=100)
    await bus.ack(stream, fast, *[e.entry_id for e in got])
    slow_got = await bus.read(stream, slow, TokenDelta, count=4, block_ms=100)
    await bus.ack(stream, slow, *[e.entry_id for e in slow_got[:2]])  # 2 acked, 2 pending, 2 unread
    assert await bus.trim(stream) == 2
    remaining = [e[0].decode() for e in await redis.xrange(stream)]
    assert remaining == ids[2:]
    await bus.ack(stream, slow, *[e.entry_id for e in slow_got[2:]])
    rest = await bus.read(stream, slow, TokenDelta, count=10, block_ms=100)
    assert [e.entry_id for e in rest] == ids[4:]
    assert await bus.trim(stream) == 2  # the unread two are still pending on `slow`
    await bus.ack(stream, slow, *[e.entry_id for e in rest])
    assert await bus.trim(stream) == 2 and await redis.xlen(stream) == 0


async def test_publish_pushes_back_at_the_cap(redis):
    bus = Bus(redis, "c")
    for i in range(3):
        await bus.publish(streams.requests_stream(0), request(i), cap=3)
    with pytest.raises(StreamFull) as info:
        await bus.publish(streams.requests_stream(0), request(9), cap=3)
    assert info.value.length == 3 and await redis.xlen(streams.requests_stream(0)) == 3


async def test_large_bytes_ride_beside_the_body(redis):
    """A KV layer's bytes leave the msgpack body (one copy less each way) and come back in place;
    an entry missing its attachment is refused, naming it."""
    data = bytes(range(256)) * 1024  # 256 KiB: over ATTACH_BYTES
    chunk = KVChunk("r", "t", 0, 2, TensorBlob("uint8", [len(data)], data), "sum")
    body, attachments = encode_parts(chunk)
    assert attachments == [data] and len(body) < 512
    assert decode(body, KVChunk, attachments) == chunk == decode(encode(chunk), KVChunk)
    with pytest.raises(WireError, match="attachment 0 is missing"):
        decode(body, KVChunk)
    bus, group = Bus(redis, "c"), streams.consumer_group("test")
    stream = streams.kv_stream("decode", 0)
    await bus.ensure_consumer_group(stream, group)
    await bus.publish_many([(stream, chunk)])
    (_, fields), = await redis.xrange(stream)
    assert fields[b"a0"] == data and len(fields[b"m"]) < 512
    (got,) = await bus.read(stream, group, KVChunk, block_ms=100)
    assert got.message == chunk


async def test_a_reader_claims_the_chunks_another_reader_of_its_stream_took(redis):
    """Two instances read one KV stream (a rank and its successor): one read layer 0 of a handoff,
    the other its final chunk. The one with the final claims what it lacks (Bus.claim_matching):
    only that request's chunks, only those delivered to another reader."""
    group, stream = streams.consumer_group("decode"), streams.kv_stream("decode", 0)
    old, new = Bus(redis, "old"), Bus(redis, "new")
    await old.ensure_consumer_group(stream, group)

    def chunk(request_id: str, layer: int) -> KVChunk:
        return KVChunk(request_id, "t", layer, 2, TensorBlob("uint8", [4], bytes([layer % 256]) * 4), "sum")

    await old.publish_many([(stream, chunk("a", 0)), (stream, chunk("b", 0))])
    assert len(await old.read(stream, group, KVChunk, count=2, block_ms=100)) == 2  # the old reader's share
    await old.publish_many([(stream, chunk("a", 1)), (stream, chunk("a", -1))])
    got = await new.read(stream, group, KVChunk, count=2, block_ms=100)
    assert [(e.message.request_id, e.message.layer) for e in got] == [("a", 1), ("a", -1)]
    held = {e.message.layer for e in got}
    claimed = await new.claim_matching(stream, group, KVChunk, lambda c: c.request_id == "a" and c.layer not in held)
    assert [(e.message.request_id, e.message.layer) for e in claimed] == [("a", 0)]
    consumers = {c["name"]: c["pending"] for c in await redis.xinfo_consumers(stream, group)}
    assert consumers == {b"old": 1, b"new": 3}  # "b" stays with the old reader
