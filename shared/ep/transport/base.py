"""The transport interface every EP implementation keeps: exchanges, timeouts, statistics, and
the per-key mailboxes both implementations deliver into."""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass

TIMEOUT_S = 10.0  # an exchange's deadline: a peer silent this long is taken for dead
JOIN_TIMEOUT_S = 60.0  # start(): ranks finish loading weights at different times
HELLO_INTERVAL_S = 0.2  # re-send of the join HELLO to peers that have not answered
READ_BLOCK_MS = 1000  # one blocking XREAD; the reader loops until close() wakes it with an entry
READ_COUNT = 32  # entries per XREAD
NUM_ABANDONED_KEYS = 1024  # keys of timed-out exchanges remembered, so late arrivals are dropped
JOIN_HINT = "check that its process runs, with the same Redis, role, group id and ep_size"
DATA, HELLO, REPLY, WAKE = b"d", b"h", b"r", b"x"  # entry kinds (`t`)
GONE = b"g"  # a death notice for rank `s`, incarnation `i` (shared/runtime/notices.py)


class ExchangeTimeout(RuntimeError):
    """Some ranks did not send under `key` within `timeout_s` (dead, hung, or on another key), or
    (`noticed`) a death notice named them while the exchange waited for them."""

    def __init__(self, key: str, missing: list[int], timeout_s: float, group: str, what: str | None = None,
                 hint: str = "check that its process is alive and that every rank calls the same sequence of keys",
                 noticed: bool = False, cause: str = "notice"):
        who = f"rank {missing[0]}" if len(missing) == 1 else "ranks " + ", ".join(map(str, missing))
        if noticed:
            super().__init__(f"{who} of the {group} died ({CAUSES.get(cause, cause)}) before sending {key!r}")
        else:
            super().__init__(f"{who} of the {group} {what or f'did not send {key!r}'} within {timeout_s} s; {hint}")
        self.key, self.missing, self.timeout_s, self.group = key, missing, timeout_s, group
        self.noticed, self.cause = noticed, (cause if noticed else "timeout")


# why a rank was taken for gone before its exchange timed out (Transport.mark_gone)
CAUSES = {"notice": "a death notice", "heartbeat": "it missed its heartbeats for --rank-dead-after-s",
          "fenced": "this rank was cut out of the group while it did not answer"}


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
        self.gone: dict[int, str] = {}  # rank -> why it is taken for gone (CAUSES): no exchange waits for it

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

    def mark_gone(self, src: int, cause: str = "notice") -> None:
        """`src` is gone (a death notice, missed heartbeats): every exchange waiting for it fails now,
        and the next ones at once, until `src` comes back as a new incarnation or is taken back
        into the group (`revive`)."""
        self.gone.setdefault(src, cause)
        for event in self._waiting.values():
            event.set()

    def revive(self, src: int) -> None:
        self.gone.pop(src, None)

    def forget(self, src: int) -> None:
        """Drop what `src` sent to exchanges still incomplete: it came from an incarnation now gone."""
        for box in self._boxes.values():
            if not self.members.issubset(box):
                box.pop(src, None)

    async def wait(self, key: str, timeout_s: float, group: str) -> list[bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout_s, 0.0)
        while True:
            box = self._boxes.get(key, {})
            if self.members.issubset(box):
                return [box.get(p, b"") if p in self.members else b"" for p in range(self.size)]
            gone = sorted((self.members & self.gone.keys()).difference(box))
            if gone:
                raise ExchangeTimeout(key, gone, timeout_s, group, noticed=True, cause=self.gone[gone[0]])
            self._waiting[key].clear()
            try:
                await asyncio.wait_for(self._waiting[key].wait(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                box = self._boxes.get(key, {})
                missing = sorted(self.members.difference(box))
                raise ExchangeTimeout(key, missing, timeout_s, group) from None

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

    def mark_gone(self, ranks: list[int], cause: str) -> None:
        """Take `ranks` for gone now (see _Mailboxes.mark_gone)."""
        for rank in ranks:
            self._mailboxes.mark_gone(rank, cause)

    @abstractmethod
    async def start(self, timeout_s: float | None = None, fail_on_gone: bool = False) -> None:
        """Join (or re-join) the group: returns once every rank is reachable, else ExchangeTimeout;
        at once (noticed) with `fail_on_gone` when a death notice named a member not yet reached.
        Without it (a group starting), a member that died is waited for: its successor says hello."""

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
            raise ExchangeTimeout(key, e.missing, timeout_s, self.group, noticed=e.noticed, cause=e.cause) from None
        finally:
            self._mailboxes.close(key)
        return recv

    async def __aenter__(self) -> Transport:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
