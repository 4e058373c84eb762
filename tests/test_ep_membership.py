"""The EP group's membership record in a real Redis: one commit wins per epoch, the roll call
waits for the members it expects (or its settle time), alive keys and join requests."""
from __future__ import annotations

import asyncio
import time

from shared.ep.membership import Membership, Record, ranks_of

PLACEMENT = [[0, 1, 2, 3], [3, 2, 1, 0]]


def ranks(redis, size: int = 3) -> list[Membership]:
    return [Membership(redis, "decode", "g", r, size, b"inc-%d" % r) for r in range(size)]


async def test_the_first_commit_of_an_epoch_wins_and_everyone_reads_it(redis):
    m = ranks(redis)
    assert await m[0].read() is None
    first = await m[0].commit(0, [0, 1, 2], 0, PLACEMENT)
    assert first == Record(1, [0, 1, 2], 0, PLACEMENT)
    # rank 2 died: ranks 0 and 1 commit epoch 2 at once, with different views; one wins
    won = await asyncio.gather(m[1].commit(1, [1, 0], 0, PLACEMENT), m[0].commit(1, [0], 0, PLACEMENT))
    assert won[0] == won[1] and won[0].epoch == 2 and won[0].members in ([0, 1], [0])
    # a commit that expects an epoch already past changes nothing
    assert await m[2].commit(1, [2], 5, [[9]]) == won[0]


async def test_the_roll_call_ends_when_every_expected_rank_answered(redis):
    m = ranks(redis)
    started = time.monotonic()
    called = await asyncio.gather(*[x.roll_call(4, {0, 1, 2}, settle_s=30) for x in m])
    assert called == [[0, 1, 2]] * 3 and time.monotonic() - started < 5
    # a dead rank never answers: the others go on after the settle time, without it
    started = time.monotonic()
    called = await asyncio.gather(m[0].roll_call(5, {0, 1, 2}, 0.5), m[2].roll_call(5, {0, 1, 2}, 0.5))
    assert called == [[0, 2], [0, 2]] and 0.5 <= time.monotonic() - started < 5
    # the exchange that timed out named rank 1: after a grace time, no need to wait the settle time
    started = time.monotonic()
    called = await asyncio.gather(*[m[r].roll_call(6, {0, 1, 2}, 30, {1}, 0.3) for r in (0, 2)])
    assert called == [[0, 2], [0, 2]] and 0.3 <= time.monotonic() - started < 5


async def test_alive_keys_and_join_requests(redis):
    m = ranks(redis)
    assert await m[1].others_alive() == set()
    await m[0].renew_alive()
    await m[1].renew_alive()
    assert await m[1].others_alive() == {0} and await m[2].others_alive() == {0, 1}
    await m[0].clear_alive()
    assert await m[2].others_alive() == {1}
    assert await m[0].joiners([0, 1]) == 0
    await m[2].ask_to_join()
    mask = await m[0].joiners([0, 1])
    assert ranks_of(mask) == [2] and await m[0].joiners([0, 1, 2]) == 0  # a member is not a joiner
    await m[2].stop_asking()
    assert await m[0].joiners([0, 1]) == 0
