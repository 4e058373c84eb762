"""Death and leave notices: a process that stops is announced at once, so that nothing waits out an
exchange timeout or a heartbeat TTL for it.

A handover notice says less: the only rank of its role was told to stop (SIGTERM) and serves
on until another instance takes its place. Its supervisor (`streamoe up`) starts the successor at
once; nobody else acts on it (publish only appends it to the NOTICES stream).

Who publishes a death notice:
- `streamoe up`'s supervisor, the moment it sees a child exit;
- a worker that starts as rank R of its group and finds rank R's load report left by another
  instance that is not draining. Its previous incarnation died without a word: Kubernetes
  restarts a container in place, and a kill -9 or an OOM kill runs no hook.

What `publish` does, in this order:
1. For a rank of an EP group: its alive key goes (if it still names that incarnation), and every
   peer's EP inbox gets a `gone` entry. An exchange that waits for the rank fails at once, and the
   group re-forms without it (shared/ep/rank.py, reason `notice`). A transport acts on a `gone`
   entry only if it names the incarnation that transport knows. The supervisor publishes before
   it starts the successor, so the entry precedes the successor's hello in every inbox.
2. The instance's heartbeat goes, and so does the rank's load report where another rank of its
   role reports load: the balancer routes to the others at once. A role's only rank keeps its
   report until its TTL, so the gateway goes on admitting while the successor starts
   (`others_serve`).
3. The notice goes onto the NOTICES stream, capped at MAX_NOTICES entries. The balancer follows
   that stream: it resumes a dead decode instance's requests from their ownership records, and
   routes again what waits in a dead rank's input stream, without waiting out the TTL.

A notice is advice that makes recovery fast, never the only path: without one (a publisher
killed too, Redis away), the timeouts and TTLs still find the death.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time

from redis.asyncio import Redis

from shared.ep.transport.base import GONE
from shared.protocol import streams
from shared.protocol.messages import LoadReport, Notice
from shared.protocol.wire import WireError, decode, encode
from shared.runtime import redis_client

MAX_NOTICES = 1000


async def publish(redis: Redis, notice: Notice) -> Notice:
    """Announce `notice` (see the module docstring); the notice as published, with the instance and
    incarnation filled in where Redis knew them."""
    if not notice.time:
        notice = _replace(notice, time=time.time())
    if notice.kind == "handover":  # still serving: only its supervisor acts, by starting a successor
        await redis.xadd(streams.NOTICES, {b"m": encode(notice)}, maxlen=MAX_NOTICES, approximate=True)
        return notice
    worker = notice.rank >= 0 and notice.role in ("prefill", "decode")
    if worker:
        load = await redis.get(streams.load_key(notice.role, notice.group_id, notice.rank))
        if load is not None and not notice.instance_id:
            try:
                notice = _replace(notice, instance_id=decode(load, LoadReport).instance_id)
            except WireError:
                pass
    if worker and notice.ep_size > 1:
        alive = streams.ep_group_key(notice.role, notice.group_id, f"alive:{notice.rank}")
        current = await redis.get(alive)
        if not notice.incarnation and current is not None:
            notice = _replace(notice, incarnation=current)
        if current is not None and current == notice.incarnation:
            await redis.delete(alive)
        for peer in range(notice.ep_size):
            if peer != notice.rank:
                await redis.xadd(streams.ep_inbox(notice.role, notice.group_id, peer),
                                 {b"t": GONE, b"s": notice.rank, b"i": notice.incarnation})
    if worker and await others_serve(redis, notice.role, notice.group_id, notice.rank):
        # dead or leaving, it takes no more work: the others take it now
        load = await redis.get(streams.load_key(notice.role, notice.group_id, notice.rank))
        if load is not None and instance_of(load) == notice.instance_id:
            await redis.delete(streams.load_key(notice.role, notice.group_id, notice.rank))
    if notice.instance_id and notice.kind == "death":
        await redis.delete(streams.heartbeat_key(notice.role, notice.instance_id))
    await redis.xadd(streams.NOTICES, {b"m": encode(notice)}, maxlen=MAX_NOTICES, approximate=True)
    return notice


async def others_serve(redis: Redis, role: str, group_id: str, rank: int) -> bool:
    """Whether another rank of `role` reports load. When none does, a dead or leaving rank's load
    report is left to lapse on its TTL: the gateway goes on admitting (no 503 for the seconds of a
    restart), and what the balancer routes meanwhile waits in the rank's stream for its successor."""
    mine = streams.load_key(role, group_id, rank)
    async for key in redis.scan_iter(match=streams.tagged("load", f":{role}:*"), count=1000):
        if (key.decode() if isinstance(key, bytes) else key) != mine:
            return True
    return False


async def publish_to(redis_url: str, cluster: bool, notice: Notice, timeout_s: float = 3.0) -> Notice:
    """`publish` on a connection of its own (the supervisor's: it holds none)."""
    redis = redis_client.connect(redis_url, cluster)
    try:
        return await redis_client.within(publish(redis, notice), timeout_s)
    finally:
        with contextlib.suppress(Exception):
            await redis_client.within(redis.aclose(), 1.0)


async def other_reporter(redis: Redis, role: str, group_id: str, rank: int, instance_id: str) -> str | None:
    """The instance whose load report stands for rank `rank` of the group, if it is not
    `instance_id` (a predecessor that left it, or a successor that wrote it); None otherwise."""
    raw = await redis.get(streams.load_key(role, group_id, rank))
    other = instance_of(raw) if raw is not None else None
    return other if other and other != instance_id else None


async def previous_incarnation(redis: Redis, role: str, group_id: str, rank: int, ep_size: int,
                               instance_id: str) -> Notice | None:
    """A death notice for the instance that ran rank `rank` of the group before this one, when it
    left a load report and its heartbeat does not say it is draining; None otherwise."""
    old = await other_reporter(redis, role, group_id, rank, instance_id)
    if old is None:
        return None
    beat = await redis.get(streams.heartbeat_key(role, old))
    if beat is not None and json.loads(beat).get("draining"):
        return None  # it leaves on its own, and says so (a leave notice)
    return Notice("death", role, old, group_id, rank, ep_size, reason="restarted")


def decode_notice(fields: dict[bytes, bytes]) -> Notice:
    return decode(fields[b"m"], Notice)


def instance_of(raw: bytes) -> str | None:
    try:
        return decode(raw, LoadReport).instance_id
    except WireError:
        return None


def _replace(notice: Notice, **changes) -> Notice:
    return dataclasses.replace(notice, **changes)
