"""The EP all-to-all: in-process and over a real Redis, ranks in one loop and in separate processes."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from shared.ep.transport import ExchangeTimeout, InProcessHub, RedisTransport, Transport
from shared.protocol import streams
from shared.protocol.wire import decode

ROOT = Path(__file__).resolve().parent.parent
LARGE = 16 << 20


def new_group_id() -> str:
    return uuid.uuid4().hex[:8]


async def make_group(kind: str, size: int, redis_url: str, timeout_s: float = 5.0,
                     group_id: str | None = None) -> list[Transport]:
    if kind == "in-process":
        hub = InProcessHub(size, role="decode", timeout_s=timeout_s)
        transports = [hub.transport(rank) for rank in range(size)]
    else:
        group_id = group_id or new_group_id()
        transports = [RedisTransport(redis_url, "decode", rank, size, group_id, timeout_s=timeout_s)
                      for rank in range(size)]
    await asyncio.gather(*(t.start(timeout_s=10.0) for t in reversed(transports)))
    return transports


def payload(src: int, dst: int, key: str) -> bytes:
    return f"{src}->{dst}@{key}".encode() * (1 + src + 3 * dst)


async def exchange(transports: list[Transport], key: str, make=payload) -> list[list[bytes]]:
    size = len(transports)
    return list(await asyncio.gather(*(t.all_to_all(key, [make(t.rank, p, key) for p in range(size)])
                                       for t in transports)))


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("kind", ["in-process", "redis"])
async def test_all_to_all_delivers_every_slot_exactly(kind, size, redis_url):
    transports = await make_group(kind, size, redis_url)
    try:
        keys = [f"s{step}:l3:mb0:dispatch" for step in range(3)]
        for key in keys:
            recvs = await exchange(transports, key)
            assert recvs == [[payload(p, t.rank, key) for p in range(size)] for t in transports]

        # two micro-batches in flight on every rank at once, completing in either order
        async def both(t: Transport) -> tuple[list[bytes], list[bytes]]:
            a = t.all_to_all("s9:l3:mb0:dispatch", [payload(t.rank, p, "mb0") for p in range(size)])
            b = t.all_to_all("s9:l3:mb1:combine", [payload(t.rank, p, "mb1") for p in range(size)])
            return tuple(await asyncio.gather(b, a))
        results = await asyncio.gather(*(both(t) for t in reversed(transports)))
        for t, (mb1, mb0) in zip(reversed(transports), results):
            assert mb0 == [payload(p, t.rank, "mb0") for p in range(size)]
            assert mb1 == [payload(p, t.rank, "mb1") for p in range(size)]

        assert await exchange(transports, "empty", lambda src, dst, key: b"") == [[b""] * size] * size
        big = os.urandom(LARGE)  # rank 0 -> the last rank (to itself when alone)
        recvs = await exchange(transports, "large", lambda src, dst, key: big if (src, dst) == (0, size - 1) else b"x")
        assert recvs[size - 1][0] == big and recvs[0][0] == (big if size == 1 else b"x")

        num_rounds = len(keys) + 4
        for t in transports:
            assert t.stats.sent_bytes[t.rank] == t.stats.received_bytes[t.rank] == 0  # own slot: never on the wire
            assert t.stats.sent_messages[t.rank] == t.stats.received_messages[t.rank] == 0
            assert t.stats.local_messages == num_rounds
            assert t.stats.dropped_stale == 0  # nothing addressed to itself reached its inbox
            for p in t.peers:
                assert t.stats.sent_messages[p] == t.stats.received_messages[p] == num_rounds
            wire_to_last = t.stats.sent_bytes[size - 1] if t.rank != size - 1 else 0
            assert (wire_to_last >= LARGE) == (t.rank == 0 and size > 1)
    finally:
        await asyncio.gather(*(t.close() for t in transports))


async def test_in_process_ranks_computing_on_threads():
    loop = asyncio.get_running_loop()
    hub = InProcessHub(2)
    transports = [hub.transport(0), hub.transport(1)]
    await asyncio.gather(*(t.start() for t in transports))

    def rank_thread(t: Transport) -> list[list[bytes]]:  # a compute thread calling into the loop
        return [asyncio.run_coroutine_threadsafe(t.all_to_all(f"l{layer}", [payload(t.rank, p, str(layer))
                                                                            for p in range(2)]), loop).result(5)
                for layer in range(4)]
    got = await asyncio.gather(*(asyncio.to_thread(rank_thread, t) for t in transports))
    assert got[1] == [[payload(0, 1, str(layer)), payload(1, 1, str(layer))] for layer in range(4)]
    assert got[0] == [[payload(0, 0, str(layer)), payload(1, 0, str(layer))] for layer in range(4)]


@pytest.mark.parametrize("kind", ["in-process", "redis"])
async def test_a_silent_rank_times_out_with_its_name(kind, redis_url):
    transports = await make_group(kind, 3, redis_url, timeout_s=0.3)
    try:
        t0 = time.monotonic()  # rank 2 does not call this exchange (yet)
        errors = await asyncio.gather(*(t.all_to_all("s7:l3:mb0:dispatch", [b"a"] * 3) for t in transports[:2]),
                                      return_exceptions=True)
        assert time.monotonic() - t0 < 1.0
        for e in errors:
            assert isinstance(e, ExchangeTimeout) and e.missing == [2] and e.key == "s7:l3:mb0:dispatch"
            assert str(e).startswith("rank 2 of the decode EP group")
            assert "did not send 's7:l3:mb0:dispatch' within 0.3 s" in str(e)
        # rank 2 still gets what was sent to it; what it sends to the abandoned exchange is dropped
        assert await transports[2].all_to_all("s7:l3:mb0:dispatch", [b"late"] * 3) == [b"a", b"a", b"late"]
        await asyncio.sleep(0.1)
        assert [t.stats.dropped_stale for t in transports] == [1, 1, 0]
        recvs = await exchange(transports, "s8:l3:mb0:dispatch")
        assert recvs[0] == [payload(p, 0, "s8:l3:mb0:dispatch") for p in range(3)]
    finally:
        await asyncio.gather(*(t.close() for t in transports))


async def test_join_waits_for_late_ranks_and_names_missing_ones(redis_url):
    group_id = new_group_id()
    ranks = [RedisTransport(redis_url, "prefill", rank, 3, group_id) for rank in range(3)]
    try:
        with pytest.raises(ExchangeTimeout, match=r"^rank 2 of the prefill EP group '\w+' did not join within 0.5 s"):
            await asyncio.gather(*(t.start(timeout_s=0.5) for t in ranks[:2]))

        async def late() -> None:
            await asyncio.sleep(0.3)
            await ranks[2].start()
        await asyncio.gather(late(), *(t.start(timeout_s=5.0) for t in ranks[:2]))
        assert (await exchange(ranks, "k"))[2] == [payload(p, 2, "k") for p in range(3)]

        wrong = RedisTransport(redis_url, "prefill", 0, 2, group_id)  # a misconfigured rank 0 of a 2-group
        with pytest.raises(ValueError, match="ep_size"):
            await wrong.start(timeout_s=2.0)
        await wrong.close()
    finally:
        await asyncio.gather(*(t.close() for t in ranks))


async def test_restarted_rank_rejoins_and_stale_entries_are_not_delivered(redis_url, redis):
    group_id = new_group_id()
    r0, r1 = (RedisTransport(redis_url, "decode", rank, 2, group_id, timeout_s=5.0) for rank in range(2))
    await asyncio.gather(r0.start(), r1.start())
    await exchange([r0, r1], "s1")
    with pytest.raises(ExchangeTimeout):  # the old rank 1 sends "s3" early: rank 0 holds it unclaimed
        await r1.all_to_all("s3", [b"stale-early", b"x"], timeout_s=0.1)
    old_incarnation = r1.incarnation
    await r1.close()

    # stale entries in rank 1's inbox: rank 0 sending to the incarnation that is gone, a forged
    # HELLO and data of an earlier run, and data claiming to come from rank 0 under an unknown id
    with pytest.raises(ExchangeTimeout, match="rank 1 of the decode EP group"):
        await r0.all_to_all("s2", [b"stale-0", b"stale-for-old-r1"], timeout_s=0.2)
    inbox1 = streams.ep_inbox("decode", group_id, 1)
    await redis.xadd(inbox1, {b"t": b"h", b"s": 0, b"i": b"earlier-run", b"a": b"", b"n": 2})
    await redis.xadd(inbox1, {b"t": b"d", b"s": 0, b"i": b"earlier-run", b"d": old_incarnation, b"k": b"s2",
                              b"p": b"stale-forged"})
    await redis.xadd(inbox1, {b"t": b"d", b"s": 0, b"i": r0.incarnation, b"d": b"made-up", b"k": b"s2",
                              b"p": b"stale-misaddressed"})
    assert await redis.xlen(inbox1) == 4

    r1 = RedisTransport(redis_url, "decode", 1, 2, group_id, timeout_s=5.0)
    assert r1.incarnation != old_incarnation
    await asyncio.gather(r0.start(timeout_s=5.0), r1.start(timeout_s=5.0))  # the survivor re-joins
    recvs = await exchange([r0, r1], "s2", lambda src, dst, key: f"fresh {src}->{dst}".encode())
    assert recvs == [[b"fresh 0->0", b"fresh 1->0"], [b"fresh 0->1", b"fresh 1->1"]]
    r0_s3 = asyncio.create_task(r0.all_to_all("s3", [b"fresh 0->0", b"fresh 0->1"]))  # rank 0 first
    await asyncio.sleep(0.05)
    assert await r1.all_to_all("s3", [b"fresh 1->0", b"fresh 1->1"]) == [b"fresh 0->1", b"fresh 1->1"]
    assert await r0_s3 == [b"fresh 0->0", b"fresh 1->0"]  # not what the gone incarnation sent early
    assert r1.stats.dropped_stale == 3 and r1.stats.received_messages[0] == 2
    assert await redis.xlen(inbox1) <= 2  # the leftovers were read once and deleted
    await asyncio.gather(r0.close(), r1.close())
    assert not await redis.exists(inbox1, streams.ep_inbox("decode", group_id, 0))


async def test_a_death_notice_fails_the_exchange_at_once_and_names_the_rank(redis_url, redis):
    """A notice for rank 1 (shared/runtime/notices.py) ends rank 0's wait long before its 600 s
    timeout, and every later exchange at once, until rank 1 is taken back in as a new incarnation;
    a late notice naming the incarnation before is dropped."""
    from shared.protocol.messages import Notice
    from shared.runtime import notices

    group_id = new_group_id()
    r0, r1 = (RedisTransport(redis_url, "decode", rank, 2, group_id, timeout_s=600.0) for rank in range(2))
    await asyncio.gather(r0.start(), r1.start())
    await exchange([r0, r1], "s1")
    waiting = asyncio.create_task(r0.all_to_all("s2", [b"a", b"b"]))
    await asyncio.sleep(0.2)
    published = await notices.publish(redis, Notice("death", "decode", "", group_id, 1, 2, incarnation=r1.incarnation))
    start = time.monotonic()
    with pytest.raises(ExchangeTimeout, match="rank 1 of the decode EP group .* died") as failed:
        await waiting
    assert failed.value.noticed and failed.value.missing == [1] and time.monotonic() - start < 5.0
    with pytest.raises(ExchangeTimeout) as again:  # the next exchange does not wait either
        await r0.all_to_all("s3", [b"a", b"b"])
    assert again.value.noticed and published.incarnation == r1.incarnation
    assert [decode(e[1][b"m"], Notice).rank for e in await redis.xrange(streams.NOTICES)][-1] == 1
    old = r1.incarnation
    await r1.close()
    r1 = RedisTransport(redis_url, "decode", 1, 2, group_id, timeout_s=5.0)
    r0.set_members([0])  # the group re-formed without rank 1 ...
    r0.set_members([0, 1])  # ... and takes it back in
    await asyncio.gather(r0.start(timeout_s=5.0), r1.start(timeout_s=5.0))
    await notices.publish(redis, Notice("death", "decode", "", group_id, 1, 2, incarnation=old))  # late
    await asyncio.sleep(0.2)
    assert await exchange([r0, r1], "s4") == [[payload(0, 0, "s4"), payload(1, 0, "s4")],
                                              [payload(0, 1, "s4"), payload(1, 1, "s4")]]
    assert r0.stats.dropped_stale >= 1
    await asyncio.gather(r0.close(), r1.close())


async def test_a_rank_taken_back_in_keeps_what_a_member_sent_before_it_re_joined(redis_url):
    """Re-forming (membership.py): rank 1 dies, rank 0 goes on alone, a new rank 1 asks in, and
    rank 0 takes it back and steps at once. The new rank 1 adds rank 0 to its members a moment
    later: what rank 0 sent meanwhile must not be dropped, else the two wait on different steps."""
    group_id = new_group_id()
    r0, old1 = (RedisTransport(redis_url, "decode", rank, 2, group_id, timeout_s=5.0) for rank in range(2))
    await asyncio.gather(r0.start(), old1.start())
    await exchange([r0, old1], "e1:s1:go")
    await old1.close()
    r0.set_members([0])  # shrink
    await r0.start(timeout_s=1.0)
    assert await r0.all_to_all("e2:s1:go", [b"alone", b""]) == [b"alone", b""]
    new1 = RedisTransport(redis_url, "decode", 1, 2, group_id, timeout_s=5.0)
    new1.set_members([1])  # asking in: its reader answers the members' HELLOs
    await new1.start(timeout_s=1.0)
    try:
        r0.set_members([0, 1])  # grow: the old incarnation cannot answer, the new one does
        await r0.start(timeout_s=5.0)
        new1.set_members([0, 1])  # it read the record: then rank 0's first step arrives
        sent = asyncio.create_task(r0.all_to_all("e3:s1:go", [b"0->0", b"0->1"]))
        deadline = time.monotonic() + 5
        while new1.stats.received_messages[0] + new1.stats.dropped_stale == 0:
            assert time.monotonic() < deadline, "rank 0's step never reached the new rank 1"
            await asyncio.sleep(0.01)
        await new1.start(timeout_s=5.0)
        assert await new1.all_to_all("e3:s1:go", [b"1->0", b"1->1"], timeout_s=2.0) == [b"0->1", b"1->1"]
        assert await sent == [b"0->0", b"1->0"]
        assert new1.stats.dropped_stale == 0
    finally:
        await asyncio.gather(r0.close(), new1.close())


async def test_inboxes_stay_bounded(redis_url, redis):
    group_id = new_group_id()
    transports = await make_group("redis", 4, redis_url, group_id=group_id)
    inboxes = [streams.ep_inbox("decode", group_id, rank) for rank in range(4)]
    try:
        lengths = []
        for step in range(60):
            await exchange(transports, f"s{step}:l0:mb0:dispatch")
            lengths.append(max([await redis.xlen(inbox) for inbox in inboxes]))
        await asyncio.sleep(0.1)
        # at most the entries of the exchanges in flight (not 60 x 3); the first rounds may still
        # hold the join's hellos and replies, which the reader deletes as it goes
        assert max(lengths[5:]) <= 2 * 3 and max(lengths) <= 2 * 3 + 2 * 3, lengths
        assert [await redis.xlen(inbox) for inbox in inboxes] == [0, 0, 0, 0]
    finally:
        await asyncio.gather(*(t.close() for t in transports))


RANK_PROCESS = r"""
import asyncio, sys, time
from shared.ep.transport import ExchangeTimeout, RedisTransport

async def main(url, group_id, rank, timeout_s):
    t = RedisTransport(url, "decode", rank, 2, group_id, timeout_s=timeout_s)
    await t.start(timeout_s=30.0)
    step = 0
    try:
        while True:
            key = f"s{step}:l3:mb0:dispatch"
            t0 = time.monotonic()
            try:
                recv = await t.all_to_all(key, [f"{rank}->{p}@{step}".encode() * 1000 for p in range(2)])
            except ExchangeTimeout as e:
                print(f"timeout {step} {time.monotonic() - t0:.3f} {e}", flush=True)
                return
            assert recv == [f"{p}->{rank}@{step}".encode() * 1000 for p in range(2)], key
            print(f"ok {step} {t.stats.received_bytes[1 - rank]}", flush=True)
            step += 1
            await asyncio.sleep(0.01)
    finally:
        # NOTE: close, never leave the reader to asyncio.run's cancel: a cancel inside a blocking
        # redis-py read can be swallowed, and the process would not exit.
        await t.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
"""


async def test_ranks_in_two_processes_and_a_killed_rank_times_out(redis_url):
    group_id, timeout_s = new_group_id(), 2.0
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", RANK_PROCESS, redis_url, group_id, str(rank),
                                                  str(timeout_s), cwd=ROOT, stdout=asyncio.subprocess.PIPE)
             for rank in (1, 0)]
    survivor, victim = procs[1], procs[0]
    try:
        while True:  # let them exchange a while, then kill rank 1 in the middle of its sequence
            line = (await asyncio.wait_for(victim.stdout.readline(), 30)).decode()
            assert line.startswith("ok "), line
            if int(line.split()[1]) == 20:
                break
        assert int(line.split()[2]) > 20 * 5000  # bytes that crossed from rank 0's process to rank 1's
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        out = (await asyncio.wait_for(survivor.stdout.read(), timeout_s + 10)).decode().splitlines()
        assert time.monotonic() - killed_at < timeout_s + 2.0
        last = out[-1].split(" ", 3)
        assert last[0] == "timeout", out[-3:]
        assert float(last[2]) < timeout_s + 0.5  # the failing call's own wait: its deadline, not a hang
        assert last[3].startswith(f"rank 1 of the decode EP group '{group_id}' did not send 's{last[1]}:l3:mb0"
                                  f":dispatch' within {timeout_s} s")
        assert int(last[1]) >= 20
        assert await asyncio.wait_for(survivor.wait(), 10) == 0
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_redis_throughput_4mib_between_two_ranks(redis_url, redis):
    """A benchmark, not a check: MB/s of 4 MiB exchanges beside raw XADD/XREAD/XDEL of the same bytes."""
    size, rounds, block = 2, 12, os.urandom(4 << 20)
    transports = await make_group("redis", size, redis_url)
    try:
        await exchange(transports, "warm", lambda src, dst, key: block)
        t0 = time.perf_counter()
        for step in range(rounds):
            await exchange(transports, f"s{step}", lambda src, dst, key: block)
        transport_s = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(t.close() for t in transports))

    stream = streams.tagged(f"bench:{new_group_id()}")
    t0 = time.perf_counter()
    for _ in range(rounds * size):  # the same bytes, one entry at a time: add, read, delete
        entry_id = await redis.xadd(stream, {b"p": block})
        (_, [(_, fields)]), = await redis.xread({stream: "0-0"}, count=1)
        await redis.xdel(stream, entry_id)
    raw_s = time.perf_counter() - t0
    megabytes = rounds * size * len(block) / 1e6
    print(f"\nEP transport, 2 ranks on one loop, 4 MiB per peer per exchange: {megabytes / transport_s:.0f} MB/s "
          f"on the wire ({megabytes / transport_s / size:.0f} MB/s per direction); raw XADD+XREAD+XDEL one at a "
          f"time: {megabytes / raw_s:.0f} MB/s; ratio {raw_s / transport_s:.2f}\n"
          f"  (python -m pytest -q -s tests/test_ep_transport.py -k throughput)")
