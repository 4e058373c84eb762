"""Death and leave notices (shared/runtime/notices.py) on a real Redis: what a death notice removes,
what it fills in, and when a restarted rank announces its predecessor."""
from __future__ import annotations

import json

import pytest

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


async def test_resume_runs_a_taken_request_again_from_the_tokens_sent(redis):
    """ownership.resume, shared by the balancer and by a rank cut out of its EP group: the request
    taken from its instance goes to the tokenized stream as prompt + tokens sent, with what is left
    of max_tokens; one whose every token was sent only gets its end; the instance's set forgets
    both. A rank resuming its own requests (again=False) leaves a taken one (its tombstone) alone."""
    import time

    from shared.protocol.messages import Sampling, TokenDelta, TokenizedRequest
    from shared.runtime import ownership
    from shared.runtime.bus import Bus

    bus = Bus(redis, "test")
    deadline = time.time() + 60
    running = TokenizedRequest("r1", "t1", "gw", Sampling(max_tokens=8), deadline, [5, 6, 7])
    spent = TokenizedRequest("r2", "t2", "gw", Sampling(max_tokens=2), deadline, [5, 6])
    async with redis.pipeline(transaction=False) as pipe:
        ownership.record_admission(pipe, "cut", 0, running, 11)
        ownership.record_tokens(pipe, "cut", "r1", [12, 13], 3)
        ownership.record_admission(pipe, "cut", 0, spent, 21)
        ownership.record_tokens(pipe, "cut", "r2", [22], 2)
        await pipe.execute()
    for stream in (streams.tokenized_stream(0), streams.delta_stream("gw")):
        await bus.ensure_consumer_group(stream, "g")
    done = await ownership.resume(redis, bus, 1, "cut", "r1", again=False)
    assert (done.outcome, done.emitted, done.original) == ("resumed", 3, running)
    (entry,) = await bus.read(streams.tokenized_stream(0), "g", TokenizedRequest, count=10, block_ms=None)
    assert entry.message.prompt_ids == [5, 6, 7, 11, 12, 13] and entry.message.resumed == 3
    assert entry.message.sampling.max_tokens == 5
    assert await redis.hget(streams.owner_key("r1"), "instance_id") == ownership.tombstone("cut").encode()
    assert await ownership.resume(redis, bus, 1, "cut", "r1", again=False) is None  # its tombstone: left
    assert (await ownership.resume(redis, bus, 1, "cut", "r1")).outcome == "resumed"  # a balancer takes it again
    done = await ownership.resume(redis, bus, 1, "cut", "r2", again=False)
    assert (done.outcome, done.emitted) == ("finished", 2)
    (end,) = await bus.read(streams.delta_stream("gw"), "g", TokenDelta, count=10, block_ms=None)
    assert (end.message.index, end.message.token_ids, end.message.finish_reason) == (2, [], "length")
    assert not await redis.exists(streams.owner_key("r2"), ownership.ids_key("r2"))
    assert not await redis.smembers(ownership.owned_key("cut"))


def test_a_later_incarnation_of_a_running_request_waits_for_the_earlier_to_be_fenced():
    """A decode rank thawed after a freeze can read the handoff of a request the balancer resumed
    (a larger `resumed`) before its next step refuses the earlier incarnation's record and drops
    it. The later one waits and then joins; it is never dropped as a duplicate (the request would
    be lost: the earlier incarnation sends nothing more)."""
    from services.decode.decode_rank import handoff_verdict
    from shared.protocol.messages import KVChunk, Sampling, TokenizedRequest
    from shared.protocol.wire import TensorBlob

    def handoff(resumed: int, finish_reason: str | None = None) -> KVChunk:
        req = TokenizedRequest("r1", "t1", "gw", Sampling(max_tokens=8), 2e9, [5, 6, 7, 8][:3 + resumed],
                               resumed=resumed)
        return KVChunk("r1", "t1", -1, 2, TensorBlob("float32", [0], b""), "", request=req, first_token=9,
                       finish_reason=finish_reason, final=True)

    first, later = handoff(0), handoff(1)
    assert handoff_verdict(later, first.request, False, False, []) == "wait"
    assert handoff_verdict(later, None, True, False, [("r1", 0)]) == "wait"  # its end held: sent or fenced first
    assert handoff_verdict(later, None, False, False, [("r1", 0)]) == "admit"  # the earlier one fenced
    assert handoff_verdict(first, None, False, False, []) == "admit"
    assert handoff_verdict(first, first.request, False, False, []) == "drop"  # a duplicate of what runs
    assert handoff_verdict(first, later.request, False, False, []) == "drop"  # an earlier one, late
    assert handoff_verdict(later, None, False, False, [("r1", 1)]) == "drop"  # ran here to the end
    assert handoff_verdict(later, None, False, True, []) == "drop"  # cancelled
    assert handoff_verdict(handoff(1, "stop"), None, False, False, []) == "drop"  # ended at prefill


async def test_a_cut_ranks_death_notice_names_its_instance_after_its_load_report_lapsed(redis):
    """A frozen rank's load report lapses (--load-ttl-s) before the group has cut it out: the death
    notice still names the instance it ran as, seen while it reported, so the balancer resumes
    that instance's requests at once (not when the instance, thawed, can no longer send them)."""
    import logging
    import types

    from shared.ep.rank import EPRank

    class Survivor(EPRank):  # the parts of a running rank that note_peer_instances and announce_cut read
        role, group_id, rank = "decode", "g", 0
        args = types.SimpleNamespace(ep_size=2)
        log = logging.getLogger("test")

    survivor = Survivor()
    survivor.redis, survivor.peer_instances = redis, {}
    survivor.group = types.SimpleNamespace(members=[0, 1])
    load = streams.load_key("decode", "g", 1)
    await redis.set(load, encode(LoadReport("decode", 1, "decode-1-frozen", 3, 0, 0, 10, group_id="g")))
    await survivor.note_peer_instances()
    await redis.delete(load)  # lapsed while it was frozen
    await survivor.note_peer_instances()
    await survivor.announce_cut([1], "heartbeat")
    (notice,) = [decode(fields[b"m"], Notice) for _, fields in await redis.xrange(streams.NOTICES)]
    assert (notice.kind, notice.instance_id, notice.rank, notice.reason) == ("death", "decode-1-frozen", 1,
                                                                             "cut out (heartbeat)")


async def test_a_taken_request_whose_end_was_held_gets_that_end(redis):
    """With a prefix cache a decode rank holds a finished reply's last delta while the reply's blocks
    are stored, and marks its record so (ownership.record_held_end). Taken then (it died), the request
    gets that delta, its tokens and its finish, from the record, and nothing runs again (a stop is
    not run past). A later admission clears an earlier incarnation's mark."""
    import time

    from shared.protocol.messages import Sampling, TokenDelta, TokenizedRequest
    from shared.runtime import ownership
    from shared.runtime.bus import Bus

    bus = Bus(redis, "test")
    for stream in (streams.raw_deltas_stream(0), streams.tokenized_stream(0)):
        await bus.ensure_consumer_group(stream, "g")
    req = TokenizedRequest("r3", "t3", "gw", Sampling(max_tokens=8, stop=["x"]), time.time() + 60, [5, 6, 7])
    async with redis.pipeline(transaction=False) as pipe:
        ownership.record_admission(pipe, "dying", 0, req, 11)
        ownership.record_tokens(pipe, "dying", "r3", [12, 13], 3)  # the last step: 12, 13 and a stop
        ownership.record_held_end(pipe, "dying", "r3", 1, "stop")
        ownership.record_held_end(pipe, "other", "r3", 1, "length")  # not its owner: refused
        assert (await pipe.execute())[3:] == [1, 1, 0]
    done = await ownership.resume(redis, bus, 1, "dying", "r3")
    assert (done.outcome, done.emitted) == ("finished", 3)
    (entry,) = await bus.read(streams.raw_deltas_stream(0), "g", TokenDelta, count=10, block_ms=None)
    end = entry.message
    assert (end.index, end.token_ids, end.finish_reason, end.prefix_ids, end.stop, end.num_prompt_tokens) == (
        1, [12, 13], "stop", [5, 6, 7, 11], ["x"], 3)
    assert not await bus.read(streams.tokenized_stream(0), "g", TokenizedRequest, count=10, block_ms=None)
    assert not await redis.exists(streams.owner_key("r3"), ownership.ids_key("r3"))

    async with redis.pipeline(transaction=False) as pipe:  # marked, taken, then admitted again: unmarked
        ownership.record_admission(pipe, "dying", 0, req, 11)
        ownership.record_held_end(pipe, "dying", "r3", 1, "stop")
        await pipe.execute()
    await ownership.take(redis, "dying", "r3")
    async with redis.pipeline(transaction=False) as pipe:
        ownership.record_admission(pipe, "next", 1, req, 11)
        assert (await pipe.execute())[0] == 1
    assert await redis.hget(streams.owner_key("r3"), "end") is None


@pytest.mark.parametrize("one_script", [True, False])
async def test_a_steps_records_in_one_script_are_fenced_per_request(redis, one_script):
    """record_tokens_many (a decode step's records: one script on one Redis, one command per request
    on a cluster): each request is recorded where this instance owns it and answered 0 where it
    does not (taken from it, or never its own), the others' records untouched, as record_tokens."""
    from shared.protocol.messages import Sampling, TokenizedRequest
    from shared.runtime import ownership

    reqs = [TokenizedRequest(f"m{i}", f"t{i}", "g1", Sampling(max_tokens=8), 2e9, [5, 6, 7]) for i in range(3)]
    async with redis.pipeline(transaction=False) as pipe:
        for req, owner in zip(reqs, ["mine", "other", "mine"]):
            ownership.record_admission(pipe, owner, 0, req, 11)
        await pipe.execute()
    await ownership.take(redis, "mine", "m2")  # taken for dead: fenced from here on
    async with redis.pipeline(transaction=False) as pipe:
        owned = ownership.record_tokens_many(pipe, "mine", [("m0", [12, 13], 3), ("m1", [40], 2), ("m2", [50], 2),
                                                            ("gone", [1], 1)], one_script=one_script)
        pipe.get(ownership.ids_key("m0"))  # a command queued after: its result comes after the records'
        results = await pipe.execute()
    assert owned(results) == [1, 0, 0, 0]
    assert ownership.unpack_ids(results[1 if one_script else 4]) == [11, 12, 13]
    assert ownership.unpack_ids(await redis.get(ownership.ids_key("m1"))) == [11]  # the other's record
    assert ownership.unpack_ids(await redis.get(ownership.ids_key("m2"))) == [11]
    assert not await redis.exists(ownership.ids_key("gone"))
