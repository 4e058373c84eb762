"""Ranks in separate processes: each rank's inbox is a Redis stream it reads with one blocking
XREAD loop; payloads go as stream entries."""
from __future__ import annotations

import asyncio
import logging
import os
from contextlib import suppress

from redis.asyncio import Redis

from shared.ep.transport.base import (
    DATA,
    GONE,
    HELLO,
    HELLO_INTERVAL_S,
    JOIN_HINT,
    JOIN_TIMEOUT_S,
    READ_BLOCK_MS,
    READ_COUNT,
    REPLY,
    TIMEOUT_S,
    WAKE,
    ExchangeTimeout,
    Transport,
)
from shared.protocol import streams
from shared.runtime import redis_client

log = logging.getLogger(__name__)


class RedisTransport(Transport):
    """One rank's inbox stream and reader; see the module docstring for the protocol."""

    def __init__(self, redis: str | Redis, role: str, rank: int, size: int, group_id: str,
                 timeout_s: float = TIMEOUT_S, join_timeout_s: float = JOIN_TIMEOUT_S, cluster: bool = False):
        super().__init__(rank, size, f"{role} EP group {group_id!r}", timeout_s, join_timeout_s)
        self._owns_redis = isinstance(redis, str)
        self.redis = redis_client.connect(redis, cluster) if isinstance(redis, str) else redis
        self.incarnation = os.urandom(8).hex().encode()
        self.inboxes = [streams.ep_inbox(role, group_id, p) for p in range(size)]
        self._peer_incarnations: dict[int, bytes] = {}
        self._past_incarnations: set[bytes] = set()  # peers' incarnations replaced by newer ones
        self._acked: set[int] = set()  # peers whose last HELLO acknowledged our incarnation
        self._join_changed = asyncio.Event()
        self._config_error: str | None = None
        self._reader: asyncio.Task | None = None

    async def start(self, timeout_s: float | None = None, fail_on_gone: bool = False) -> None:
        timeout_s = self.join_timeout_s if timeout_s is None else timeout_s
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_loop(), name=f"ep-reader-{self.rank}")
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            self._join_changed.clear()
            if self._config_error:
                raise ValueError(self._config_error)
            missing = [p for p in self.peers if p not in self._acked or p not in self._peer_incarnations]
            if not missing:
                self._is_started = True
                return
            gone = [p for p in missing if p in self._mailboxes.gone] if fail_on_gone else []
            if gone:  # a death notice: no use waiting for it to say hello
                raise ExchangeTimeout("join", gone, timeout_s, self.group, noticed=True,
                                      cause=self._mailboxes.gone[gone[0]])
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise ExchangeTimeout("join", missing, timeout_s, self.group, "did not join", JOIN_HINT)
            await self._send_hellos(missing)
            with suppress(TimeoutError):
                await asyncio.wait_for(self._join_changed.wait(), min(HELLO_INTERVAL_S, remaining))

    async def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        try:
            if self._reader is not None:  # NOTE: woken by an entry, not cancelled: see _read_loop
                await self.redis.xadd(self.inboxes[self.rank], {b"t": WAKE, b"s": self.rank, b"i": self.incarnation})
                with suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._reader), READ_BLOCK_MS / 1000 + 1.0)
            await self.redis.delete(self.inboxes[self.rank])  # whatever arrives from now on is stale
        except redis_client.OUTAGE_ERRORS as e:
            log.warning("rank %d of the %s: closing without Redis (%s)", self.rank, self.group, e)
        finally:
            if self._reader is not None and not self._reader.done():
                self._reader.cancel()
            if self._owns_redis:
                await self.redis.aclose()

    def set_members(self, members: list[int]) -> None:
        """A rank that comes back into the group must acknowledge us again before `start()` returns:
        if it runs as a new process, its answer carries the new incarnation (data sent to the old
        one would be dropped). Its incarnation as we know it is kept meanwhile: a rank joining a
        running group adds the members it learnt a moment ago, and they may already be sending."""
        for p in set(members) - set(self.members):
            self._acked.discard(p)
            self._mailboxes.revive(p)  # taken back in: it asked to join, as a new incarnation
        super().set_members(members)

    def mark_gone(self, ranks: list[int], cause: str) -> None:
        super().mark_gone(ranks, cause)
        self._join_changed.set()

    async def _send(self, key: str, sends: list[bytes]) -> None:
        if self._reader is not None and self._reader.done():  # it ends only on close(): surface why
            raise RuntimeError(f"rank {self.rank} of the {self.group}: the reader of {self.inboxes[self.rank]} "
                               "stopped") from self._reader.exception()
        wire = [(p, sends[p]) for p in self.peers]
        if not wire:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for p, data in wire:
                pipe.xadd(self.inboxes[p], {b"t": DATA, b"s": self.rank, b"i": self.incarnation,
                                            b"d": self._peer_incarnations.get(p, b""), b"k": key, b"p": data})
            await pipe.execute()
        for p, data in wire:
            self.stats.sent_messages[p] += 1
            self.stats.sent_bytes[p] += len(data)

    async def _send_hellos(self, ranks: list[int], kind: bytes = HELLO) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for p in ranks:
                pipe.xadd(self.inboxes[p], {b"t": kind, b"s": self.rank, b"i": self.incarnation,
                                            b"a": self._peer_incarnations.get(p, b""), b"n": self.size})
            await pipe.execute()

    async def _read_loop(self) -> None:
        # NOTE: the loop ends on the `_is_closed` flag: redis-py 8.1 can swallow a task's cancel
        # inside a pipeline blocked in XREAD and go on looping, so close() must not rely on it.
        inbox, last_id, read_ids = self.inboxes[self.rank], b"0-0", []
        while True:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    if read_ids:  # NOTE: delete what the last read filed in the same round trip
                        pipe.xdel(inbox, *read_ids)
                    pipe.xread({inbox: last_id}, count=READ_COUNT, block=READ_BLOCK_MS)
                    reply = (await pipe.execute())[-1]
                if self._is_closed:
                    return
            except redis_client.OUTAGE_ERRORS as e:
                if self._is_closed:
                    return
                log.warning("rank %d of the %s: reading %s failed (%s); retrying", self.rank, self.group, inbox, e)
                await asyncio.sleep(HELLO_INTERVAL_S)
                continue
            read_ids = []
            for entry_id, fields in reply[0][1] if reply else []:
                last_id = entry_id
                read_ids.append(entry_id)
                try:
                    await self._on_entry(fields)
                except (KeyError, ValueError) as e:
                    self.stats.dropped_stale += 1
                    log.warning("rank %d of the %s: dropped malformed entry %s: %r", self.rank, self.group, entry_id, e)

    async def _on_entry(self, fields: dict[bytes, bytes]) -> None:
        if fields[b"t"] == WAKE:  # left by the close() of an earlier incarnation of this rank
            return
        src, incarnation = int(fields[b"s"]), fields[b"i"]
        if src == self.rank or not 0 <= src < self.size:
            raise ValueError(f"source rank {src} in the inbox of rank {self.rank} of {self.size}")
        if fields[b"t"] == GONE:
            if incarnation in self._past_incarnations:
                self.stats.dropped_stale += 1  # it names an incarnation before the one we know
            else:  # the one we know, or one newer (not heard from yet), or any (b"")
                log.info("rank %d of the %s: a death notice for rank %d", self.rank, self.group, src)
                self._mailboxes.mark_gone(src)
                self._join_changed.set()
        elif fields[b"t"] in (HELLO, REPLY):
            await self._on_hello(src, incarnation, fields[b"a"], int(fields[b"n"]), fields[b"t"] == HELLO)
        elif (incarnation == self._peer_incarnations.get(src) and fields[b"d"] == self.incarnation
              and self._mailboxes.file(fields[b"k"].decode(), src, fields[b"p"])):
            self.stats.received_messages[src] += 1
            self.stats.received_bytes[src] += len(fields[b"p"])
        else:
            self.stats.dropped_stale += 1

    async def _on_hello(self, src: int, incarnation: bytes, ack: bytes, size: int, wants_reply: bool) -> None:
        if size != self.size:  # both ends learn it: the REPLY carries our size
            self._config_error = (f"rank {src} of the {self.group} runs with ep_size {size}, rank {self.rank} "
                                  f"with {self.size}; start every rank of a group with the same ep_size")
            if wants_reply:
                await self._send_hellos([src], REPLY)
            self._join_changed.set()
            return
        if self._peer_incarnations.get(src) != incarnation:
            if src in self._peer_incarnations:
                log.info("rank %d of the %s: rank %d has a new incarnation", self.rank, self.group, src)
                self._mailboxes.forget(src)
                self._past_incarnations.add(self._peer_incarnations[src])
            self._peer_incarnations[src] = incarnation
            self._acked.discard(src)
            self._mailboxes.revive(src)
        if ack == self.incarnation:
            self._acked.add(src)
        if wants_reply:
            await self._send_hellos([src], REPLY)
        self._join_changed.set()
