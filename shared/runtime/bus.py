"""The one Redis-streams wrapper: consumer groups, at-least-once delivery, claims, dead letters,
and bounded streams that never drop an unread or pending entry.

- `publish` refuses (StreamFull) once a stream holds `cap` entries: the producer pushes back
  (the gateway answers 429) instead of Redis dropping work.
- `read` returns decoded messages; an entry that does not decode goes to the dead-letter stream
  with the reason and is acked, and the consumer goes on.
- A consumer acks only after what it produced from an entry is written (`ack`).
- `claim_stale` takes over entries a dead consumer left pending (XAUTOCLAIM).
- `reclaim_lost` re-reads entries a live consumer was handed but never saw: Redis delivered them
  and the reply was lost (Redis killed between its AOF write and the reply; redis-py then retries
  the read on a new connection and gets only newer entries).
- `trim` deletes, by MINID, only entries every consumer group has delivered and acked.
- `read_streams` reads several streams in one blocking call on one Redis; on a Redis Cluster,
  whose streams lie in several slots, one blocking read per slot runs side by side, and a read
  still blocked when another returns stays in flight for the next call (never cancelled: a
  cancelled read may have been delivered, and its entries would wait for a claim).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.protocol import streams
from shared.protocol.wire import WireError, decode, encode_parts
from shared.runtime import redis_client

T = TypeVar("T")
FIELD = b"m"  # an entry's field holding the encoded message; large bytes ride beside it as a0, a1, ...
log = logging.getLogger(__name__)


SCRIPT_VALUE_BYTES = 4096  # publish_many: entries with a larger field value are pipelined, not scripted
# KEYS: a stream per entry; ARGV: per entry, its number of field and value arguments, then those.
# Returns the entries' ids, in order.
XADD_MANY = """
local ids, a = {}, 1
for i = 1, #KEYS do
    local n = tonumber(ARGV[a])
    ids[i] = redis.call('XADD', KEYS[i], '*', unpack(ARGV, a + 1, a + n))
    a = a + n + 1
end
return ids
"""


def claim_interval_s(claim_idle_ms: int) -> float:
    """How often a reader looks for the entries a dead consumer left pending (XAUTOCLAIM): a quarter
    of the idle time that makes them stale, at most once a second. They turn up only when a consumer
    dies, so looking on every read (a round trip, and a scan of the pending list, per read: several
    per decode step) is waste; this adds at most a quarter to how long they already waited."""
    return min(1.0, claim_idle_ms / 4000)


class StreamFull(RuntimeError):
    """The stream is at its cap; retry later (the gateway turns this into a 429)."""

    def __init__(self, stream: str, length: int, cap: int):
        super().__init__(f"stream {stream} holds {length} entries (cap {cap})")
        self.stream, self.length, self.cap = stream, length, cap


@dataclass
class Entry(Generic[T]):
    entry_id: str
    message: T


class Bus:
    def __init__(self, redis: Redis, consumer: str):
        self.redis = redis
        self.consumer = consumer  # unique per process: the instance id
        self._claimed_at: dict[tuple[str, str], float] = {}  # claim_stale's last look, with every_s
        self._reads: dict[tuple[str, tuple[str, ...]], asyncio.Task] = {}  # per-slot reads in flight (cluster)

    async def close(self) -> None:
        """Stop the reads still in flight (what they were handed stays pending, for a claim)."""
        for task in self._reads.values():
            task.cancel()
        for task in self._reads.values():
            with contextlib.suppress(BaseException):
                await task
        self._reads.clear()

    async def ensure_consumer_group(self, stream: str, consumer_group: str, start_id: str = "0") -> None:
        """Create the consumer group (and the stream) if missing; from the stream's beginning, or "$":
        only what is added from now on."""
        try:
            await self.redis.xgroup_create(stream, consumer_group, id=start_id, mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def publish(self, stream: str, msg: Any, cap: int | None = None) -> str:
        await self._check_cap(stream, cap)
        entry_id = await self.redis.xadd(stream, encode_fields(msg))
        return entry_id.decode() if isinstance(entry_id, bytes) else entry_id

    async def publish_replicated(self, stream: str, msg: Any, writer: redis_client.ReplicatedWriter,
                                 cap: int | None = None) -> int:
        """`publish` through `writer` (XADD + WAIT on one connection) -> replicas that acknowledged it."""
        await self._check_cap(stream, cap)
        _, acked = await writer.xadd(stream, encode_fields(msg))
        return acked

    async def _check_cap(self, stream: str, cap: int | None) -> None:
        if cap is not None:
            length = await self.redis.xlen(stream)
            if length >= cap:
                raise StreamFull(stream, length, cap)

    async def publish_many(self, items: list[tuple[str, Any]], then=None) -> list[str]:
        """Several entries in one round trip, in order; `then(pipe)` may queue more commands into the
        same round trip (after the entries). On one Redis the entries go in one script (`XADD_MANY`):
        a pipelined XADD costs the client ~22 µs of parsing and bookkeeping, the script ~8–11 µs an
        entry (loadgen/README.md, "Through the services"). A cluster gets one XADD per entry, as
        its streams may lie on several nodes; so do entries with a large value (a KV chunk), which
        a script would copy once more inside Redis."""
        encoded = [(stream, encode_fields(msg)) for stream, msg in items]
        one_script = (len(items) > 1 and not redis_client.is_cluster(self.redis)
                      and all(len(value) <= SCRIPT_VALUE_BYTES for _, fields in encoded for value in fields.values()))
        async with self.redis.pipeline(transaction=False) as pipe:
            if one_script:
                args = []
                for _, fields in encoded:
                    args.append(2 * len(fields))
                    for name, value in fields.items():
                        args += (name, value)
                pipe.eval(XADD_MANY, len(items), *[stream for stream, _ in encoded], *args)
            else:
                for stream, fields in encoded:
                    pipe.xadd(stream, fields)
            if then is not None:
                then(pipe)
            results = await pipe.execute()
        ids = results[0] if one_script else results[:len(items)]
        return [i.decode() if isinstance(i, bytes) else i for i in ids]

    async def read(self, stream: str, consumer_group: str, kind: type[T], count: int = 16,
                   block_ms: int | None = 1000) -> list[Entry[T]]:
        """New entries for this consumer; undecodable ones are dead-lettered, acked and skipped."""
        try:
            reply = await self.redis.xreadgroup(consumer_group, self.consumer, {stream: ">"}, count=count,
                                                block=block_ms)
        except ResponseError as e:
            await self._recreate_lost_consumer_group(e, [stream], consumer_group)
            return []
        return await self._decode_entries(stream, consumer_group, kind, reply[0][1] if reply else [])

    async def read_streams(self, consumer_group: str, kinds: dict[str, type], count: int = 16,
                           block_ms: int | None = 1000) -> list[tuple[str, Entry]]:
        """New entries from several streams that share one consumer group name: one blocking call on
        one Redis, one per slot on a cluster (the first to answer returns; the others stay in flight)."""
        slots = redis_client.by_slot(list(kinds)) if redis_client.is_cluster(self.redis) else [list(kinds)]
        if len(slots) == 1:
            reply = await self._read_group(consumer_group, tuple(slots[0]), count, block_ms)
        else:
            for names in slots:
                key = (consumer_group, tuple(names))
                if key not in self._reads:
                    self._reads[key] = asyncio.create_task(self._read_group(consumer_group, key[1], count, block_ms))
            await asyncio.wait(self._reads.values(), return_when=asyncio.FIRST_COMPLETED)
            reply = []
            for key, task in list(self._reads.items()):
                if task.done():
                    del self._reads[key]
                    reply += task.result()
        out = []
        for stream, raw in reply:
            stream = stream.decode() if isinstance(stream, bytes) else stream
            out += [(stream, e) for e in await self._decode_entries(stream, consumer_group, kinds[stream], raw)]
        return out

    async def take(self, consumer_group: str, kinds: dict[str, type], claim_idle_ms: int, count: int = 64,
                   block_ms: int | None = 200) -> list[tuple[str, Entry]]:
        """What a consumer-group reader handles next: new entries of the streams in `kinds` (one
        blocking read, `read_streams`), then those a dead consumer left pending for `claim_idle_ms`."""
        entries = await self.read_streams(consumer_group, kinds, count=count, block_ms=block_ms)
        for stream, kind in kinds.items():
            entries += [(stream, e) for e in await self.claim_stale(
                stream, consumer_group, kind, claim_idle_ms, count=count, every_s=claim_interval_s(claim_idle_ms))]
        return entries

    async def _read_group(self, consumer_group: str, names: tuple[str, ...], count: int,
                          block_ms: int | None) -> list:
        try:
            return await self.redis.xreadgroup(consumer_group, self.consumer, {s: ">" for s in names}, count=count,
                                               block=block_ms) or []
        except ResponseError as e:
            await self._recreate_lost_consumer_group(e, list(names), consumer_group)
            return []

    async def claim_stale(self, stream: str, consumer_group: str, kind: type[T], min_idle_ms: int,
                          count: int = 16, every_s: float = 0.0) -> list[Entry[T]]:
        """Entries pending on any consumer for longer than `min_idle_ms`, now ours. With `every_s`,
        at most one XAUTOCLAIM per that many seconds for this stream and group (none: [])."""
        if every_s > 0:
            now = time.monotonic()
            if now - self._claimed_at.get((stream, consumer_group), -every_s) < every_s:
                return []
            self._claimed_at[stream, consumer_group] = now
        try:
            reply = await self.redis.xautoclaim(stream, consumer_group, self.consumer, min_idle_time=min_idle_ms,
                                                start_id="0-0", count=count)
        except ResponseError as e:
            await self._recreate_lost_consumer_group(e, [stream], consumer_group)
            return []
        return await self._decode_entries(stream, consumer_group, kind, [e for e in reply[1] if e[1] is not None])

    async def claim_from(self, stream: str, consumer_group: str, kind: type[T], consumer: str,
                         count: int = 256) -> list[Entry[T]]:
        """The entries pending on one consumer (one that left), now ours; the others' and the
        unread ones stay where they are."""
        try:
            pending = await self.redis.xpending_range(stream, consumer_group, min="-", max="+", count=count,
                                                      consumername=consumer)
        except ResponseError as e:
            await self._recreate_lost_consumer_group(e, [stream], consumer_group)
            return []
        ids = [p["message_id"] for p in pending]
        if not ids:
            return []
        claimed = await self.redis.xclaim(stream, consumer_group, self.consumer, min_idle_time=0, message_ids=ids)
        return await self._decode_entries(stream, consumer_group, kind, [e for e in claimed if e[1] is not None])

    async def claim_matching(self, stream: str, consumer_group: str, kind: type[T], wanted: Callable[[T], bool],
                             count: int = 4096) -> list[Entry[T]]:
        """The entries of `stream` (its first `count`) that `wanted` picks and another consumer was
        delivered, now ours; for a stream that holds little (entries are deleted once consumed)."""
        found = [e for e in await self._decode_entries(stream, consumer_group, kind,
                                                       await self.redis.xrange(stream, count=count))
                 if wanted(e.message)]
        if not found:
            return []
        claimed = await self.redis.xclaim(stream, consumer_group, self.consumer, min_idle_time=0,
                                          message_ids=[e.entry_id for e in found], justid=True)
        ids = {i.decode() if isinstance(i, bytes) else i for i in claimed}
        return [e for e in found if e.entry_id in ids]

    async def reclaim_lost(self, stream: str, consumer_group: str, kind: type[T], idle_ms: int = 1000,
                           every_s: float = 1.0) -> list[Entry[T]]:
        """For a consumer that acks what it reads at once (its own stream or consumer group): entries pending
        longer than `idle_ms` were delivered to a read whose reply never arrived. At most one
        XAUTOCLAIM per `every_s`; redelivered entries must be harmless twice."""
        entries = await self.claim_stale(stream, consumer_group, kind, idle_ms, count=256, every_s=every_s)
        if entries:
            log.warning("re-reading %d entries of %s whose delivery was lost", len(entries), stream)
        return entries

    async def _recreate_lost_consumer_group(self, error: ResponseError, stream_names: list[str],
                                            consumer_group: str) -> None:
        """Redis lost the stream or its consumer group (a flush, a restart without AOF): make it again."""
        if "NOGROUP" not in str(error):
            raise error
        for stream in stream_names:
            await self.ensure_consumer_group(stream, consumer_group)

    async def ack(self, stream: str, consumer_group: str, *entry_ids: str) -> None:
        if entry_ids:
            await self.redis.xack(stream, consumer_group, *entry_ids)

    async def trim(self, stream: str) -> int:
        """Delete the entries every consumer group has delivered and acked; returns how many went."""
        try:
            consumer_groups = await self.redis.xinfo_groups(stream)
        except ResponseError:
            return 0  # no such stream (yet)
        if not consumer_groups:
            return 0
        floor = None
        for g in consumer_groups:
            name = g["name"]
            pending = await self.redis.xpending(stream, name)
            if pending["pending"]:
                candidate = _id_tuple(pending["min"])
            else:  # everything delivered is acked: keep what comes after the last delivered
                last = _id_tuple(g["last-delivered-id"])
                candidate = (last[0], last[1] + 1)
            floor = candidate if floor is None else min(floor, candidate)
        return await self.redis.xtrim(stream, minid=f"{floor[0]}-{floor[1]}", approximate=False)

    async def _decode_entries(self, stream: str, consumer_group: str, kind: type[T], raw: list) -> list[Entry[T]]:
        out: list[Entry[T]] = []
        for entry_id, fields in raw:
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            payload = fields.get(FIELD) if isinstance(fields, dict) else None
            try:
                if payload is None:
                    raise WireError(f"entry has no {FIELD.decode()!r} field")
                attachments = [fields[f] for f in _ATTACHMENT_FIELDS[:len(fields) - 1] if f in fields]
                out.append(Entry(entry_id, decode(payload, kind, attachments)))
            except WireError as e:
                await self.dead_letter(stream, consumer_group, entry_id, str(e), payload)
        return out

    async def dead_letter(self, stream: str, consumer_group: str, entry_id: str, reason: str,
                          payload: bytes | None) -> None:
        log.warning("dead-lettering %s %s: %s", stream, entry_id, reason)
        await self.redis.xadd(streams.DEAD_LETTERS, {b"stream": stream, b"entry_id": entry_id,
                                                     b"reason": reason, b"payload": payload or b""})
        await self.ack(stream, consumer_group, entry_id)


_ATTACHMENT_FIELDS = [f"a{i}".encode() for i in range(64)]


def encode_fields(msg: Any) -> dict[bytes, bytes]:
    """An entry's fields: the message's body, then its attachments (shared/protocol/wire.py)."""
    body, attachments = encode_parts(msg)
    if len(attachments) > len(_ATTACHMENT_FIELDS):
        raise ValueError(f"{len(attachments)} attachments; an entry carries at most {len(_ATTACHMENT_FIELDS)}")
    return {FIELD: body, **dict(zip(_ATTACHMENT_FIELDS, attachments))}


def _id_tuple(entry_id: str | bytes) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)
