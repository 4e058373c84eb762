"""The planner service (services/README.md, "planner"): every `--interval-s` it scrapes the live
gateways, reads the worker ranks' load reports and the request queue's lag, decides (shared/planner/autoscale.py), and
publishes the decision: the hash `streams.PLANNER_DECISIONS` and the metrics below.

The hash's fields (all strings, as Redis keeps them):

| field | |
|---|---|
| `prefill`, `decode` | desired ranks |
| `prefill_actual`, `decode_actual` | ranks reporting load at the decision |
| `prefill_reason`, `decode_reason` | load, slo, idle or bounds |
| `seq`, `time` | the decision's number (from 1, per planner start) and its Unix time |
| `input_tok_s`, `output_tok_s`, `ttft_p90_ms`, `itl_p90_ms` | what the interval measured |
| `slo`, `min`, `max`, `interval_s`, `actuate`, `instance_id` | how it decides, and who |
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp
from prometheus_client import Counter, Gauge

from shared.planner.autoscale import ROLES, Decider, GatewaySample, observe, parse_gateway
from shared.planner.plan import Profile, Units
from shared.planner.slo import SLO
from shared.protocol import metric_names, streams
from shared.runtime.discovery import live_services, load_reports, request_backlog
from shared.runtime.service import Service, ServiceConfig


@dataclass(frozen=True)
class PlannerSettings:
    profile: Profile
    slo: SLO
    low: Units
    high: Units
    units: Units
    interval_s: float
    down_after: int
    correction: bool
    actuate: str

    def decider(self) -> Decider:
        return Decider(self.profile, self.slo, self.low, self.high, self.units, self.interval_s, self.correction,
                       self.down_after)


def _units(u: Units) -> str:
    return f"prefill={u.prefill},decode={u.decode}"


class PlannerService(Service):
    name = "planner"

    def __init__(self, config: ServiceConfig, settings: PlannerSettings):
        super().__init__(config)
        self.settings = settings
        self.decider = settings.decider()
        self.desired = Gauge(metric_names.PLANNER_DESIRED, "Ranks the planner wants per role", ["role"],
                             registry=self.registry)
        self.actual = Gauge(metric_names.PLANNER_ACTUAL, "Ranks reporting load per role, at the last decision",
                            ["role"], registry=self.registry)
        self.decisions = Counter(metric_names.PLANNER_DECISIONS, "Changes of the desired ranks, by role, "
                                 "direction (up, down) and reason (load, slo, idle, bounds)",
                                 ["role", "direction", "reason"], registry=self.registry)
        for role in ROLES:
            self.desired.labels(role=role).set(self.decider.desired[role])
        self.seq = 0

    async def setup(self) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self.before: dict[str, GatewaySample] = {}
        self.scraped_at = time.monotonic()
        self.before = await self.scrape()
        await self.publish(None, {role: 0 for role in ROLES})  # the floor, until the first interval

    async def teardown(self) -> None:
        await self.http.close()

    async def scrape(self) -> dict[str, GatewaySample]:
        """instance -> its counters, for every live gateway (one that does not answer is skipped:
        it counts from its next answer on)."""
        gateways = [s for s in await live_services(self.redis) if s["name"] == "gateway"]

        async def one(s: dict) -> tuple[str, GatewaySample | None]:
            try:
                async with self.http.get(s["metrics_url"]) as r:
                    return s["instance_id"], parse_gateway(await r.text()) if r.status == 200 else None
            except (TimeoutError, aiohttp.ClientError, ValueError) as e:
                self.log.warning(json.dumps({"event": "scrape_failed", "url": s["metrics_url"], "error": repr(e)}))
                return s["instance_id"], None

        return {k: v for k, v in await asyncio.gather(*map(one, gateways)) if v is not None}

    async def loop(self) -> None:
        while not self.stopping.is_set():
            with_stop = asyncio.create_task(self.stopping.wait())
            await asyncio.wait({with_stop}, timeout=self.settings.interval_s)
            with_stop.cancel()
            if self.stopping.is_set():
                return
            await self.tick()

    async def tick(self) -> None:
        now = await self.scrape()
        at = time.monotonic()
        seconds, self.scraped_at = max(at - self.scraped_at, 1e-3), at
        reports = await load_reports(self.redis)
        waiting = {role: sum(r.waiting for r in reports if r.role == role) for role in ROLES}
        waiting["prefill"] += await request_backlog(self.redis, self.config.stream_partitions)  # not routed yet
        actual = {role: sum(r.role == role for r in reports) for role in ROLES}
        obs = observe(self.before, now, seconds, waiting, actual)
        self.before = now
        try:
            decisions = self.decider.decide(obs)
        except ValueError as e:  # the SLO is out of the profile's reach: said, and the last decision stays
            self.log.error(json.dumps({"event": "no_decision", "error": str(e)}))
            return
        for d in decisions:
            self.desired.labels(role=d.role).set(d.desired)
            self.actual.labels(role=d.role).set(actual[d.role])
            if d.direction is not None:
                self.decisions.labels(role=d.role, direction=d.direction, reason=d.reason).inc()
                self.log.info(json.dumps({"event": "scale", "role": d.role, "direction": d.direction,
                                          "reason": d.reason, "desired": d.desired, "actual": actual[d.role]}))
        await self.publish(obs, actual, {d.role: d.reason for d in decisions})

    async def publish(self, obs, actual: dict[str, int], reasons: dict[str, str] | None = None) -> None:
        self.seq += 1
        s = self.settings
        fields = {"seq": self.seq, "time": time.time(), "slo": str(s.slo), "min": _units(s.low),
                  "max": _units(s.high), "interval_s": s.interval_s, "actuate": s.actuate,
                  "instance_id": self.config.instance_id}
        for role in ROLES:
            fields[role] = self.decider.desired[role]
            fields[f"{role}_actual"] = actual[role]
            fields[f"{role}_reason"] = (reasons or {}).get(role, "start")
        if obs is not None:
            fields |= {"input_tok_s": obs.input_tokens / obs.seconds, "output_tok_s": obs.output_tokens / obs.seconds,
                       "ttft_p90_ms": "" if obs.ttft_ms is None else obs.ttft_ms,
                       "itl_p90_ms": "" if obs.itl_ms is None else obs.itl_ms}
        await self.redis.hset(streams.PLANNER_DECISIONS, mapping={k: str(v) for k, v in fields.items()})
