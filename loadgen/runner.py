"""When each request is sent: open-loop arrivals, a concurrency cap, and the limits that end a run.

Arrivals are a gamma process at `rate` requests/s (shape = burstiness, scale = 1/(rate·burstiness):
burstiness 1 is Poisson, below 1 burstier, above 1 more regular; rate inf sends at once), a
trace's own timestamps, or none (closed loop) under `max_concurrency` in-flight requests; both
limits may combine, as in `vllm bench serve`: a request due while every slot is taken waits for
one. The next request is taken from a ready queue, so a conversation's turn n+1 becomes ready
only once turn n has its reply. A run stops after `num_requests`, or once `duration_s` has passed:
no new request is sent then, in-flight ones get `grace_s` more and are then cancelled.
"""
from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .client import Client, Result
from .workloads import Request, Workload


@dataclass(frozen=True)
class RunSettings:
    rate: float = math.inf  # requests/s; inf: all at once
    burstiness: float = 1.0
    max_concurrency: int | None = None
    duration_s: float | None = None  # stop sending after this long
    grace_s: float = 30.0  # then wait this long for in-flight requests before cancelling them
    seed: int = 0
    progress: bool = True


@dataclass
class Run:
    results: list[Result]  # in the order the requests were sent
    duration_s: float  # from the first request sent to the last one finished (or cancelled)
    num_skipped: int = 0  # conversation turns never sent because an earlier turn failed
    spec_decode: dict | None = None  # the server's speculation figures over the run (spec_counters.py)


def arrival_gaps(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """n gaps in seconds between consecutive arrivals: gamma(shape=burstiness, scale=1/(rate·burstiness)),
    mean 1/rate; zeros when the rate is inf."""
    if math.isinf(rate):
        return np.zeros(n)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


class Runner:
    def __init__(self, workload: Workload, client: Client, settings: RunSettings):
        self.workload, self.client, self.settings = workload, client, settings
        self.ready: asyncio.Queue[Request | None] = asyncio.Queue()  # None: a turn skipped (its conversation failed)
        self.slots = asyncio.Semaphore(settings.max_concurrency) if settings.max_concurrency else None
        self.results: list[Result] = []
        self.num_skipped = 0
        self.tasks: set[asyncio.Task] = set()
        self.bar = tqdm(total=workload.num_requests, disable=not settings.progress, file=sys.stderr,
                        desc=workload.name, unit="req", dynamic_ncols=True)

    async def run(self) -> Run:
        for request in self.workload.requests:
            self.ready.put_nowait(request)
        self.t0 = self.client.t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self.dispatch(), self.settings.duration_s)
        except TimeoutError:
            pass  # --duration passed: send nothing more
        await self.drain()
        duration = time.perf_counter() - self.t0
        self.bar.close()
        for result in self.results:
            if result.error is None and result.e2el_s is None:
                result.error, result.message = "cancelled", "still running when the run ended"
        return Run(self.results, duration, self.num_skipped)

    async def dispatch(self) -> None:
        gaps = arrival_gaps(self.workload.num_requests, self.settings.rate, self.settings.burstiness,
                            np.random.default_rng(self.settings.seed))
        next_at = 0.0
        for gap in gaps:
            request = await self.ready.get()
            if request is None:
                self.num_skipped += 1
                self.bar.update(1)
                continue
            at = request.arrival_s if request.arrival_s is not None else next_at
            next_at = at + gap
            delay = self.t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.slots is not None:
                await self.slots.acquire()
            result = Result(request.output_len, time.perf_counter() - self.t0)
            self.results.append(result)
            task = asyncio.create_task(self.one(request, result))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def one(self, request: Request, result: Result) -> None:
        try:
            await self.client.send(request, result)
        except Exception as e:  # a reply the client could not make sense of: record it, keep the run going
            result.error, result.message = "client", f"{type(e).__name__}: {e}"
        finally:
            if self.slots is not None:
                self.slots.release()
            self.bar.update(1)
        if request.conversation is None:
            return
        following = len(request.conversation.user_messages) - request.turn - 1
        if result.ok:
            following_request = request.record_reply(result.text, result.prompt_tokens, result.completion_tokens)
            if following_request is not None:
                self.ready.put_nowait(following_request)
        else:
            for _ in range(following):  # the conversation cannot go on without this reply
                self.ready.put_nowait(None)

    async def drain(self) -> None:
        """Wait for in-flight requests: all of them, or until `grace_s` after --duration ends the run."""
        if not self.tasks:
            return
        timeout = None
        if self.settings.duration_s is not None:
            deadline = self.t0 + self.settings.duration_s + self.settings.grace_s
            timeout = max(0.0, deadline - time.perf_counter())
        _, pending = await asyncio.wait(set(self.tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def run(workload: Workload, client: Client, settings: RunSettings) -> Run:
    return await Runner(workload, client, settings).run()
