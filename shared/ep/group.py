"""An EP group as one rank sees it: the transport, the step every rank takes together, and the
bridge that lets MoE layers on the compute thread exchange tokens through the event loop.

Every exchange of a step is named `e{epoch}:s{step}:l{layer}:{phase}`, so all ranks use the same
key sequence; the step count starts again at each epoch (each re-forming of the group, see
membership.py). A step starts with a `go` exchange: each rank says whether it has work, and if
any rank does, all of them step (a rank without work joins with zero tokens). A rank that stops
answering makes every exchange raise `ExchangeTimeout` on the others, never a hang.

The `go` exchange also carries what the group must agree on between steps: the placement version
each rank has staged (rollout.py), the ranks each has seen asking to join (a bit mask), and the
number of MTP forwards each rank runs per step (speculative decoding: they must be equal).

A layer called more than once in a step (the MTP layer: its catch-up, then one call per further
draft) names its later exchanges `l{layer}#{n}`, so each call of every rank meets its match.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future

from shared.ep.transport import Transport

# (phase, bytes sent to peers, seconds from start to every rank's answer): metrics
ExchangeObserver = Callable[[str, int, float], None]


class GroupMismatch(RuntimeError):
    """The ranks of a group run different settings that must be equal (named in the message)."""


class EPGroup:
    def __init__(self, transport: Transport, loop: asyncio.AbstractEventLoop, timeout_s: float = 30.0,
                 observe: ExchangeObserver | None = None):
        self.transport = transport
        self.loop = loop
        self.timeout_s = timeout_s
        self.observe = observe
        self.step = 0
        self.epoch = 0
        self.agreed_version = 0  # the newest placement every rank has staged (rollout.py)
        self.agreed_joiners = 0  # ranks every member has seen asking to join (bit mask)
        self.waited_s = 0.0  # compute thread blocked in exchange() (all of it exposed, no overlap)
        self.mtp_calls = 0  # MTP layer forwards per step (Engine.mtp_calls): the same on every rank
        self._calls: dict[str, int] = {}  # this step's exchanges per layer and phase
        self._calls_of: tuple[int, int] = (-1, -1)  # (epoch, step) _calls counts

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def size(self) -> int:
        return self.transport.size

    @property
    def members(self) -> list[int]:
        return self.transport.members

    def reform(self, epoch: int, members: list[int]) -> None:
        """Exchange among `members` from now on, counting steps from 0 under the new epoch (the
        caller then joins them: `await transport.start()`)."""
        self.transport.set_members(members)
        self.epoch, self.step = epoch, 0

    def key(self, name: str) -> str:
        return f"e{self.epoch}:s{self.step}:{name}"

    async def begin_step(self, has_work: bool, staged_version: int = 0, joiners: int = 0) -> bool:
        """Every member calls this once per loop turn; True when any member has work, and then every
        member must run one engine step (joining with zero tokens if it has none). Each also reports
        the placement version it has staged and the ranks it has seen asking to join:
        `agreed_version` is the newest version all have staged, `agreed_joiners` the ranks all have
        seen, the same on every member."""
        self.step += 1
        mine = b"%d:%d:%d:%d" % (has_work, staged_version, joiners, self.mtp_calls)
        reports = [r.split(b":") for r in await self.transport.all_to_all(self.key("go"), [mine] * self.size,
                                                                          self.timeout_s) if r]
        calls = sorted({int(c) for *_, c in reports})
        if calls != [self.mtp_calls]:
            raise GroupMismatch(f"--speculative-tokens: this rank runs the MTP layer {self.mtp_calls} times a step, "
                                f"its group's ranks {calls}; give every rank of an EP group the same "
                                "--speculative-tokens")
        self.agreed_version = min(int(version) for _, version, _, _ in reports)
        self.agreed_joiners = -1
        for _, _, seen, _ in reports:
            self.agreed_joiners &= int(seen)
        return any(flag == b"1" for flag, _, _, _ in reports)

    def start_exchange(self, name: str, sends: list[bytes]) -> Future:
        """From the compute thread: begin an all-to-all of the current step on the event loop; the
        future holds what every rank sent (or the ExchangeTimeout). `name` ends in its phase."""
        started = time.perf_counter()
        future = asyncio.run_coroutine_threadsafe(
            self.transport.all_to_all(self.key(name), sends, self.timeout_s), self.loop)
        if self.observe is not None:
            sent = sum(len(p) for i, p in enumerate(sends) if i != self.rank)
            phase = name.rsplit(":", 1)[-1]
            future.add_done_callback(lambda _: self.observe(phase, sent, time.perf_counter() - started))
        return future

    def exchange(self, layer: int, phase: str, sends: list[bytes]) -> list[bytes]:
        """From the compute thread: one all-to-all of the current step, waited for."""
        start = time.perf_counter()
        if self._calls_of != (self.epoch, self.step):
            self._calls, self._calls_of = {}, (self.epoch, self.step)
        n = self._calls.get(f"{layer}:{phase}", 0)
        self._calls[f"{layer}:{phase}"] = n + 1
        received = self.start_exchange(f"l{layer}#{n}:{phase}" if n else f"l{layer}:{phase}", sends).result()
        self.waited_s += time.perf_counter() - start
        return received
