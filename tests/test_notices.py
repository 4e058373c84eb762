"""Death and leave notices (shared/runtime/notices.py) on a real Redis: what a death notice removes,
what it fills in, and when a restarted rank announces its predecessor."""
from __future__ import annotations

import json

from shared.protocol import streams
from shared.protocol.messages import LoadReport, Notice
from shared.protocol.wire import decode, encode
from shared.runtime import notices


async def test_a_death_notice_clears_the_rank_and_names_its_instance(redis):
    await redis.set(streams.load_key("decode", "g", 0), b"rank 0 serves on")
    load = streams.load_key("decode", "g", 1)
    await redis.set(load, encode(LoadReport("decode", 1, "decode-1-old", 0, 0, 0, 10, group_id="g")))
    await redis.set(streams.heartbeat_key("decode", "decode-1-old"), b"{}")
    alive = streams.ep_group_key("decode", "g", "alive:1")
    await redis.set(alive, b"incarnation-1")
    published = await notices.publish(redis, Notice("death", "decode", "", "g", 1, 2, reason="signal 9"))
    # filled in from what Redis held: the instance from its load report, the incarnation from its alive key
    assert (published.instance_id, published.incarnation) == ("decode-1-old", b"incarnation-1")
    assert not await redis.exists(load, alive, streams.heartbeat_key("decode", "decode-1-old"))
    (entry,) = await redis.xrange(streams.ep_inbox("decode", "g", 0))  # the peer's inbox, not its own
    assert entry[1] == {b"t": b"g", b"s": b"1", b"i": b"incarnation-1"}
    assert not await redis.exists(streams.ep_inbox("decode", "g", 1))
    (notice,) = [decode(fields[b"m"], Notice) for _, fields in await redis.xrange(streams.NOTICES)]
    assert notice == published and notice.time > 0


async def test_a_notice_for_an_earlier_incarnation_leaves_the_new_one_alone(redis):
    """The successor already runs: its load report and alive key stay."""
    load = streams.load_key("prefill", "g", 0)
    await redis.set(load, encode(LoadReport("prefill", 0, "prefill-0-new", 0, 0, 0, 10, group_id="g")))
    alive = streams.ep_group_key("prefill", "g", "alive:0")
    await redis.set(alive, b"new")
    await notices.publish(redis, Notice("death", "prefill", "prefill-0-old", "g", 0, 2, incarnation=b"old"))
    assert await redis.exists(load, alive) == 2


async def test_a_restarted_rank_finds_its_predecessor_unless_it_drains(redis):
    load = streams.load_key("decode", "decode", 0)
    assert await notices.previous_incarnation(redis, "decode", "decode", 0, 1, "new") is None  # nothing left
    await redis.set(load, encode(LoadReport("decode", 0, "old", 0, 0, 0, 10)))
    assert await notices.previous_incarnation(redis, "decode", "decode", 0, 1, "old") is None  # itself
    found = await notices.previous_incarnation(redis, "decode", "decode", 0, 1, "new")
    assert (found.kind, found.instance_id, found.rank, found.reason) == ("death", "old", 0, "restarted")
    await redis.set(streams.heartbeat_key("decode", "old"), json.dumps({"draining": True}))
    assert await notices.previous_incarnation(redis, "decode", "decode", 0, 1, "new") is None  # it leaves itself


async def test_a_roles_only_rank_keeps_its_load_report_for_its_successor(redis):
    """No other decode rank: the report lapses on its TTL instead, so the gateway goes on admitting
    and the balancer routes into the stream the restarted rank will read."""
    load = streams.load_key("decode", "decode", 0)
    await redis.set(load, encode(LoadReport("decode", 0, "only", 0, 0, 0, 10)))
    await redis.set(streams.load_key("prefill", "prefill", 0), b"another role")
    assert not await notices.others_serve(redis, "decode", "decode", 0)
    await notices.publish(redis, Notice("death", "decode", "", "decode", 0))
    assert await redis.exists(load) and not await redis.exists(streams.heartbeat_key("decode", "only"))


async def test_a_fenced_instance_cannot_touch_records_it_owns_no_more(redis):
    """ownership is fenced on the owner: the balancer takes a dead instance's request in one step
    (ownership.take), after which that instance records nothing more (record_tokens answers 0, so
    its decode rank sends no delta), and the first admission of a request wins (a handoff admitted
    twice has one owner). The resumed request's admission replaces the taker's tombstone."""
    from shared.protocol.messages import Sampling, TokenizedRequest
    from shared.runtime import ownership

    req = TokenizedRequest("r1", "t1", "g1", Sampling(max_tokens=8), 2e9, [5, 6, 7])
    async with redis.pipeline(transaction=False) as pipe:
        ownership.record_admission(pipe, "old", 0, req, 11)
        ownership.record_tokens(pipe, "old", "r1", [12], 2)
        assert (await pipe.execute())[0::3] == [1, 1]  # admitted, recorded: send
    assert ownership.unpack_ids(await redis.get(ownership.ids_key("r1"))) == [11, 12]
    async with redis.pipeline(transaction=False) as pipe:  # another instance admits a copy: refused
        ownership.record_admission(pipe, "other", 1, req, 11)
        assert (await pipe.execute())[0] == 0
    raw, ids = await ownership.take(redis, "old", "r1")  # "old" taken for dead: the balancer resumes it
    assert ids == [11, 12] and raw is not None
    assert await ownership.take(redis, "old", "r1") == (raw, ids)  # a balancer that died first: taken again
    async with redis.pipeline(transaction=False) as pipe:  # the old one thaws and writes late: refused
        ownership.record_tokens(pipe, "old", "r1", [99], 3)
        assert (await pipe.execute())[0] == 0
    async with redis.pipeline(transaction=False) as pipe:  # resumed: a new instance owns it now
        ownership.record_admission(pipe, "new", 1, req, 11)
        ownership.record_tokens(pipe, "new", "r1", [12], 2)
        assert (await pipe.execute())[0::3] == [1, 1]
    assert await ownership.take(redis, "old", "r1") is None
    async with redis.pipeline(transaction=False) as pipe:
        ownership.record_tokens(pipe, "old", "r1", [99], 3)
        ownership.forget(pipe, "old", ["r1"])
        await pipe.execute()
    assert ownership.unpack_ids(await redis.get(ownership.ids_key("r1"))) == [11, 12]
    assert (await redis.hget(streams.owner_key("r1"), "instance_id")) == b"new"
    async with redis.pipeline(transaction=False) as pipe:
        ownership.forget(pipe, "new", ["r1"])
        ownership.record_tokens(pipe, "old", "r1", [99], 3)  # no record: nothing is made again
        await pipe.execute()
    assert not await redis.exists(streams.owner_key("r1"), ownership.ids_key("r1"))
