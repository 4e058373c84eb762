"""Ranks in one process (tests and benchmarks): a hub hands each payload to its peer's mailbox."""
from __future__ import annotations

import asyncio
from contextlib import suppress

from shared.ep.transport.base import JOIN_HINT, JOIN_TIMEOUT_S, TIMEOUT_S, ExchangeTimeout, Transport


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

    async def start(self, timeout_s: float | None = None, fail_on_gone: bool = False) -> None:
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
