"""The all-to-all of an expert-parallel group: one interface, an in-process hub and Redis streams.

Every rank of a group calls `all_to_all(key, sends)` with the same sequence of keys; `sends[p]` goes
to rank p and the call returns `recv`, where `recv[p]` is what rank p sent under that key. Several
keys may be in flight at once (two overlapped micro-batches). A rank's own slot never crosses the
wire. A rank that does not send within the timeout raises ExchangeTimeout on the others.

Redis (`RedisTransport`)
- Each rank reads one inbox stream, `streams.ep_inbox(role, group_id, rank)`, with one background
  task (blocking XREAD, no consumer group) that files payloads into per-key mailboxes, wakes the
  waiter, and deletes what it read (XDEL, pipelined with its next XREAD): inboxes stay bounded.
- Sending is one pipelined round trip: an XADD to each peer's inbox.
- Entry fields: `t` kind (b"d" data, b"h" hello, b"r" reply to a hello), `s` source rank, `i`
  incarnation of the source; data adds `d` the incarnation of the destination as the source knows
  it, `k` key, `p` payload; a hello or reply adds `a` the incarnation of the destination it knows
  (b"" when none yet) and `n` the group size.

Join handshake (`start`); it also re-forms the group after a rank restarts:
1. Each transport draws a random incarnation id; its reader drains its inbox from the first entry,
   so nothing sent before it ran is lost, and leftovers of earlier runs are read once and deleted.
2. Until every peer has joined, `start` sends HELLO(a = the peer's incarnation as far as we know it)
   to the peers still missing, again every HELLO_INTERVAL_S.
3. A reader records the sender's incarnation of every HELLO or REPLY (a changed one means the peer
   restarted: its half-filled mailbox slots are dropped) and marks the sender joined when `a` is its
   own incarnation; it answers each HELLO (never a REPLY) with a REPLY, so the exchange terminates.
4. `start` returns when every peer is joined: we know its incarnation and it knows ours. Only a live
   peer can acknowledge a fresh random id, so stale HELLOs can never complete a join.
5. Data is accepted only when `i` is the sender's known incarnation and `d` is ours: entries left by,
   or addressed to, an earlier incarnation or run are dropped (`stats.dropped_stale`).
After a rank restarts, the survivors' readers answer its HELLOs; a survivor calls `start()` again to
wait until the newcomer has joined before its next exchange. One live process per rank is assumed.

Members: a group re-formed without a dead rank (shared/ep/membership.py) exchanges among its
`members` only (`set_members`): nothing is sent to the others, nothing awaited from them, and
their slot of `recv` is b"".
"""
from __future__ import annotations

import asyncio
import logging
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from contextlib import suppress
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import streams

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0  # an exchange's deadline: a peer silent this long is taken for dead
JOIN_TIMEOUT_S = 60.0  # start(): ranks finish loading weights at different times
HELLO_INTERVAL_S = 0.2  # re-send of the join HELLO to peers that have not answered
READ_BLOCK_MS = 1000  # one blocking XREAD; the reader loops until close() wakes it with an entry
READ_COUNT = 32  # entries per XREAD
NUM_ABANDONED_KEYS = 1024  # keys of timed-out exchanges remembered, so late arrivals are dropped
JOIN_HINT = "check that its process runs, with the same Redis, role, group id and ep_size"
DATA, HELLO, REPLY, WAKE = b"d", b"h", b"r", b"x"  # entry kinds (`t`)


class ExchangeTimeout(RuntimeError):
    """Some ranks did not send under `key` within `timeout_s` (dead, hung, or on another key)."""

    def __init__(self, key: str, missing: list[int], timeout_s: float, group: str, what: str | None = None,
                 hint: str = "check that its process is alive and that every rank calls the same sequence of keys"):
        who = f"rank {missing[0]}" if len(missing) == 1 else "ranks " + ", ".join(map(str, missing))
        super().__init__(f"{who} of the {group} {what or f'did not send {key!r}'} within {timeout_s} s; {hint}")
        self.key, self.missing, self.timeout_s, self.group = key, missing, timeout_s, group


@dataclass
class TransportStats:
    """Data messages and payload bytes by peer rank. The own slot stays 0: it never crosses the wire
    and is counted in `local_*` instead."""
    sent_messages: list[int]
    sent_bytes: list[int]
    received_messages: list[int]
    received_bytes: list[int]
    local_messages: int = 0
    local_bytes: int = 0
    dropped_stale: int = 0  # entries of an earlier incarnation or run, or of an abandoned exchange

    @classmethod
    def zeros(cls, size: int) -> TransportStats:
        return cls([0] * size, [0] * size, [0] * size, [0] * size)


class _Mailboxes:
    """What one rank has received, by exchange key, until its all_to_all collects it."""

    def __init__(self, size: int):
        self.size = size
        self.members = set(range(size))  # whose payloads complete an exchange
        self._boxes: dict[str, dict[int, bytes]] = {}  # key -> src rank -> payload
        self._waiting: dict[str, asyncio.Event] = {}  # keys an all_to_all waits on: set when full
        self._abandoned: OrderedDict[str, None] = OrderedDict()

    def open(self, key: str) -> None:
        if key in self._waiting:
            raise ValueError(f"exchange {key!r} is already in flight on this rank; every exchange needs its own key")
        self._abandoned.pop(key, None)
        self._waiting[key] = asyncio.Event()

    def file(self, key: str, src: int, payload: bytes) -> bool:
        if key in self._abandoned:
            return False
        box = self._boxes.setdefault(key, {})
        box[src] = payload
        if self.members.issubset(box) and key in self._waiting:
            self._waiting[key].set()
        return True

    def forget(self, src: int) -> None:
        """Drop what `src` sent to exchanges still incomplete: it came from an incarnation now gone."""
        for box in self._boxes.values():
            if not self.members.issubset(box):
                box.pop(src, None)

    async def wait(self, key: str, timeout_s: float, group: str) -> list[bytes]:
        box = self._boxes.get(key, {})
        if not self.members.issubset(box):
            try:
                await asyncio.wait_for(self._waiting[key].wait(), max(timeout_s, 0.0))
            except TimeoutError:
                box = self._boxes.get(key, {})
                missing = sorted(self.members.difference(box))
                raise ExchangeTimeout(key, missing, timeout_s, group) from None
            box = self._boxes[key]
        return [box.get(p, b"") if p in self.members else b"" for p in range(self.size)]

    def close(self, key: str) -> None:
        del self._waiting[key]
        box = self._boxes.pop(key, None)
        if box is None or not self.members.issubset(box):  # timed out or cancelled: late arrivals are stale
            self._abandoned[key] = None
            if len(self._abandoned) > NUM_ABANDONED_KEYS:
                self._abandoned.popitem(last=False)


class Transport(ABC):
    """One rank's end of the group's all-to-all. Use `async with transport:` or start()/close()."""

    def __init__(self, rank: int, size: int, group: str, timeout_s: float, join_timeout_s: float):
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is outside an EP group of {size} ranks (0..{size - 1})")
        self.rank, self.size = rank, size
        self.group = group  # e.g. "decode EP group 'g0'", for error messages
        self.timeout_s, self.join_timeout_s = timeout_s, join_timeout_s
        self.stats = TransportStats.zeros(size)
        self._mailboxes = _Mailboxes(size)
        self._is_started = False
        self._is_closed = False

    @property
    def members(self) -> list[int]:
        return sorted(self._mailboxes.members)

    @property
    def peers(self) -> list[int]:
        """The other members: whom exchanges and the join handshake involve."""
        return [p for p in self.members if p != self.rank]

    def set_members(self, members: list[int]) -> None:
        """Exchange among `members` only from now on (between exchanges; `start()` again to join them)."""
        if self.rank not in members or not all(0 <= p < self.size for p in members):
            raise ValueError(f"members {sorted(members)} of the {self.group}: must include rank {self.rank} "
                             f"and lie in 0..{self.size - 1}")
        self._mailboxes.members = set(members)

    @abstractmethod
    async def start(self, timeout_s: float | None = None) -> None:
        """Join (or re-join) the group: returns once every rank is reachable, else ExchangeTimeout."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def _send(self, key: str, sends: list[bytes]) -> None:
        """Hand `sends[p]` to every peer p (never to self)."""

    async def all_to_all(self, key: str, sends: list[bytes], timeout_s: float | None = None) -> list[bytes]:
        """Send `sends[p]` to rank p; return `recv` with `recv[p]` what rank p sent under `key`."""
        if len(sends) != self.size:
            raise ValueError(f"all_to_all({key!r}) got {len(sends)} payloads for a group of {self.size} ranks")
        if not self._is_started or self._is_closed:
            raise RuntimeError(f"rank {self.rank} of the {self.group}: all_to_all({key!r}) needs start() "
                               "first and cannot run after close()")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s
        self._mailboxes.open(key)
        try:
            self._mailboxes.file(key, self.rank, sends[self.rank])
            self.stats.local_messages += 1
            self.stats.local_bytes += len(sends[self.rank])
            await self._send(key, sends)
            remaining = deadline - asyncio.get_running_loop().time()
            recv = await self._mailboxes.wait(key, remaining, self.group)
        except ExchangeTimeout as e:  # name the whole budget, not what was left after sending
            raise ExchangeTimeout(key, e.missing, timeout_s, self.group) from None
        finally:
            self._mailboxes.close(key)
        return recv

    async def __aenter__(self) -> Transport:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class InProcessHub:
    """All ranks of a group on one event loop (ep_size 1, unit tests): payloads are handed over
    as they are. Ranks computing on other threads call in with asyncio.run_coroutine_threadsafe."""

    def __init__(self, size: int, role: str = "in-process", timeout_s: float = TIMEOUT_S,
                 join_timeout_s: float = JOIN_TIMEOUT_S):
        self.size, self.role = size, role
        self.timeout_s, self.join_timeout_s = timeout_s, join_timeout_s
        self._transports: dict[int, InProcessTransport] = {}
        self._changed = asyncio.Event()  # replaced on every join/leave; waiters hold the old one

    def transport(self, rank: int) -> InProcessTransport:
        """A new transport for `rank` (a new incarnation: the previous one must be closed)."""
        old = self._transports.get(rank)
        if old is not None and not old._is_closed:
            raise ValueError(f"rank {rank} already has an open transport on this hub; close it first")
        self._transports[rank] = InProcessTransport(self, rank)
        return self._transports[rank]

    def live(self, rank: int) -> InProcessTransport | None:
        t = self._transports.get(rank)
        return t if t is not None and t._is_started and not t._is_closed else None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class InProcessTransport(Transport):
    def __init__(self, hub: InProcessHub, rank: int):
        super().__init__(rank, hub.size, f"{hub.role} EP group (in-process)", hub.timeout_s, hub.join_timeout_s)
        self._hub = hub

    async def start(self, timeout_s: float | None = None) -> None:
        timeout_s = self.join_timeout_s if timeout_s is None else timeout_s
        self._is_started = True
        self._hub._notify()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while missing := [p for p in self.members if self._hub.live(p) is None]:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise ExchangeTimeout("join", missing, timeout_s, self.group, "did not join", JOIN_HINT)
            with suppress(TimeoutError):
                await asyncio.wait_for(self._hub._changed.wait(), remaining)

    async def close(self) -> None:
        self._is_closed = True
        self._hub._notify()

    async def _send(self, key: str, sends: list[bytes]) -> None:
        for p in self.peers:
            peer = self._hub.live(p)
            if peer is None:
                continue  # not joined, or closed: its next incarnation must not see this
            self.stats.sent_messages[p] += 1
            self.stats.sent_bytes[p] += len(sends[p])
            if peer._mailboxes.file(key, self.rank, sends[p]):
                peer.stats.received_messages[self.rank] += 1
                peer.stats.received_bytes[self.rank] += len(sends[p])
            else:
                peer.stats.dropped_stale += 1


class RedisTransport(Transport):
    """One rank's inbox stream and reader; see the module docstring for the protocol."""

    def __init__(self, redis: str | Redis, role: str, rank: int, size: int, group_id: str,
                 timeout_s: float = TIMEOUT_S, join_timeout_s: float = JOIN_TIMEOUT_S):
        super().__init__(rank, size, f"{role} EP group {group_id!r}", timeout_s, join_timeout_s)
        self._owns_redis = isinstance(redis, str)
        self.redis = Redis.from_url(redis) if isinstance(redis, str) else redis
        self.incarnation = os.urandom(8).hex().encode()
        self.inboxes = [streams.ep_inbox(role, group_id, p) for p in range(size)]
        self._peer_incarnations: dict[int, bytes] = {}
        self._acked: set[int] = set()  # peers whose last HELLO acknowledged our incarnation
        self._join_changed = asyncio.Event()
        self._config_error: str | None = None
        self._reader: asyncio.Task | None = None

    async def start(self, timeout_s: float | None = None) -> None:
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
        except (RedisConnectionError, RedisTimeoutError) as e:
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
        super().set_members(members)

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
            except (RedisConnectionError, RedisTimeoutError) as e:
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
        if fields[b"t"] in (HELLO, REPLY):
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
            self._peer_incarnations[src] = incarnation
            self._acked.discard(src)
        if ack == self.incarnation:
            self._acked.add(src)
        if wants_reply:
            await self._send_hellos([src], REPLY)
        self._join_changed.set()
