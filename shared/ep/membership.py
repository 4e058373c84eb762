"""Who is in an EP group now: the record every rank of a running group follows, and the two ways
it changes, without stopping the ranks that are up.

- Shrink: an exchange times out (a rank died). Every survivor adds itself to the roll call of the
  next epoch, waits until all current members have answered (or all but the ranks the exchange
  missed, for a grace second; or `settle_s` passed), and commits the roll call as the new
  members. The commit is a compare-and-set on the epoch, so the first one wins and every
  survivor applies that same record; a survivor left out (too slow to answer) asks to join like
  a restarted rank.
- Grow: a rank that starts while its group runs (a restarted one) asks to join and waits. The
  members agree in their `go` exchange that every one of them has seen the request (group.py),
  commit members + the joiner at that step, and all, the joiner too, apply that record.

Applying a record (rank.py): each member takes its share of the slots of the ranks out of the
group (moe.member_owners, experts read from the checkpoint), exchanges with the members only, and
counts steps from 0 under the new epoch, so nothing of the old epoch can complete a new exchange.

Redis keys, under `{streamoe:ep:<role>:<group_id>}:` (one hash tag: the commit script touches two of them)
- `epoch` (integer) and `record` (msgpack: epoch, members, placement version and phy2log), set
  together by one script; absent: every rank, epoch 0;
- `alive:{rank}`: the rank's transport incarnation, renewed with a TTL (`--rank-dead-after-s`)
  while it is a member: a member whose key lapses (frozen, hung) is cut out (rank.py);
- `join:{rank}`: the same, renewed with a TTL while it asks to join;
- `rollcall:{epoch}`: the survivors counting off for that epoch.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import msgpack
from redis.asyncio import Redis

from shared.protocol import streams

ALIVE_TTL_S = 6.0  # a member renews its alive key more often than this (housekeeping)
JOIN_TTL_S = 3.0  # a joiner renews its request more often than this
ROLL_CALL_TTL_S = 600

# KEYS: epoch, record; ARGV: the epoch expected now, the new epoch, the new record
_COMMIT = """
local now = tonumber(redis.call('GET', KEYS[1]) or '0')
if now ~= tonumber(ARGV[1]) then return now end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3])
return -1
"""


@dataclass
class Record:
    epoch: int
    members: list[int]
    version: int  # the placement version the members compute with
    phy2log: list[list[int]]

    def encode(self) -> bytes:
        return msgpack.packb({"epoch": self.epoch, "members": self.members, "version": self.version,
                              "phy2log": self.phy2log})

    @classmethod
    def decode(cls, raw: bytes) -> Record:
        d = msgpack.unpackb(raw)
        return cls(int(d["epoch"]), [int(m) for m in d["members"]], int(d["version"]),
                   [[int(e) for e in row] for row in d["phy2log"]])


class Membership:
    def __init__(self, redis: Redis, role: str, group_id: str, rank: int, size: int, incarnation: bytes,
                 alive_ttl_s: float = ALIVE_TTL_S):
        self.redis, self.rank, self.size, self.incarnation = redis, rank, size, incarnation
        self.role, self.group_id, self.alive_ttl_s = role, group_id, alive_ttl_s

    def _key(self, name: str) -> str:
        return streams.ep_group_key(self.role, self.group_id, name)

    async def read(self) -> Record | None:
        raw = await self.redis.get(self._key("record"))
        return Record.decode(raw) if raw else None

    async def commit(self, expected_epoch: int, members: list[int], version: int,
                     phy2log: list[list[int]]) -> Record:
        """Members for epoch expected + 1 unless another rank committed first; the record in force."""
        record = Record(expected_epoch + 1, sorted(members), version, phy2log)
        await self.redis.eval(_COMMIT, 2, self._key("epoch"), self._key("record"), expected_epoch,
                              record.epoch, record.encode())
        return await self.read()

    async def roll_call(self, epoch: int, expected: set[int], settle_s: float, suspects: set[int] = frozenset(),
                        grace_s: float = 1.0) -> list[int]:
        """Count this rank in for `epoch`; the ranks in once all `expected` are, or once all but the
        `suspects` (the ranks a timed-out exchange missed) are and grace_s has passed, or after
        settle_s."""
        key = self._key(f"rollcall:{epoch}")
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(key, self.rank)
            pipe.expire(key, ROLL_CALL_TTL_S)
            await pipe.execute()
        start = time.monotonic()
        while True:
            called = {int(m) for m in await self.redis.smembers(key)}
            waited = time.monotonic() - start
            if expected <= called or (expected - suspects <= called and waited >= grace_s) or waited >= settle_s:
                return sorted(called)
            await asyncio.sleep(0.05)

    async def renew_alive(self) -> None:
        await self.redis.set(self._key(f"alive:{self.rank}"), self.incarnation, px=int(self.alive_ttl_s * 1000))

    async def clear_alive(self) -> None:
        await self.redis.delete(self._key(f"alive:{self.rank}"))

    async def others_alive(self) -> set[int]:
        """Other ranks that are members of a running group (their alive keys)."""
        raw = await self.redis.mget([self._key(f"alive:{r}") for r in range(self.size)])
        return {r for r, v in enumerate(raw) if v is not None and r != self.rank}

    async def ask_to_join(self) -> None:
        await self.redis.set(self._key(f"join:{self.rank}"), self.incarnation, px=int(JOIN_TTL_S * 1000))

    async def stop_asking(self) -> None:
        await self.redis.delete(self._key(f"join:{self.rank}"))

    async def joiners(self, members: list[int]) -> int:
        """The ranks out of `members` asking to join, as a bit mask."""
        others = [r for r in range(self.size) if r not in members]
        if not others:
            return 0
        raw = await self.redis.mget([self._key(f"join:{r}") for r in others])
        return sum(1 << r for r, v in zip(others, raw) if v is not None)


def ranks_of(mask: int) -> list[int]:
    return [r for r in range(mask.bit_length()) if mask >> r & 1]
