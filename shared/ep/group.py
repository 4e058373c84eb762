"""An EP group as one rank sees it: the transport, the step every rank takes together, and the
bridge that lets MoE layers on the compute thread exchange tokens through the event loop.

Every exchange of a step is named `s{step}:l{layer}:{phase}`, so all ranks use the same key
sequence. A step starts with a `go` exchange: each rank says whether it has work, and if any
rank does, all of them step (a rank without work joins with zero tokens). A rank that stops
answering makes every exchange raise `ExchangeTimeout` on the others, never a hang.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future

from .transport import Transport

# (phase, bytes sent to peers, seconds from start to every rank's answer): metrics
ExchangeObserver = Callable[[str, int, float], None]


class EPGroup:
    def __init__(self, transport: Transport, loop: asyncio.AbstractEventLoop, timeout_s: float = 30.0,
                 observe: ExchangeObserver | None = None):
        self.transport = transport
        self.loop = loop
        self.timeout_s = timeout_s
        self.observe = observe
        self.step = 0
        self.agreed_version = 0  # the newest placement every rank has staged (rollout.py)
        self.waited_s = 0.0  # compute thread blocked in exchange() (all of it exposed, no overlap)

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def size(self) -> int:
        return self.transport.size

    async def begin_step(self, has_work: bool, staged_version: int = 0) -> bool:
        """Every rank calls this once per loop turn; True when any rank of the group has work, and
        then every rank must run one engine step (joining with zero tokens if it has none). Each
        rank also reports the placement version it has staged: `agreed_version` is the newest one
        all have, the same on every rank."""
        self.step += 1
        mine = b"%d:%d" % (has_work, staged_version)
        reports = [r.split(b":") for r in await self.transport.all_to_all(f"s{self.step}:go", [mine] * self.size,
                                                                          self.timeout_s)]
        self.agreed_version = min(int(version) for _, version in reports)
        return any(flag == b"1" for flag, _ in reports)

    def start_exchange(self, name: str, sends: list[bytes]) -> Future:
        """From the compute thread: begin an all-to-all of the current step on the event loop; the
        future holds what every rank sent (or the ExchangeTimeout). `name` ends in its phase."""
        started = time.perf_counter()
        future = asyncio.run_coroutine_threadsafe(
            self.transport.all_to_all(f"s{self.step}:{name}", sends, self.timeout_s), self.loop)
        if self.observe is not None:
            sent = sum(len(p) for i, p in enumerate(sends) if i != self.rank)
            phase = name.rsplit(":", 1)[-1]
            future.add_done_callback(lambda _: self.observe(phase, sent, time.perf_counter() - started))
        return future

    def exchange(self, layer: int, phase: str, sends: list[bytes]) -> list[bytes]:
        """From the compute thread: one all-to-all of the current step, waited for."""
        start = time.perf_counter()
        received = self.start_exchange(f"l{layer}:{phase}", sends).result()
        self.waited_s += time.perf_counter() - start
        return received
