"""The autoscaler's arithmetic (services/planner runs it every `--interval-s`): from what the
gateways counted over the last interval and what the worker ranks queue, the prefill and decode
ranks the next interval needs, within bounds, without flapping.

- **Predicted load**: the last interval's arrivals (requests that got their first token), input
  tokens and output tokens per second, plus the backlog: what the ranks queue (load reports'
  `waiting`) served over the next interval. The ranks per role come from `plan.py`'s capacity
  for that load (the profile's best point within the SLOs), rounded to whole units.
- **SLO correction** (Dynamo's planner does the same): when the gateways measured a p90 TTFT (ITL)
  over its bound (Prometheus's histogram_quantile over the interval's buckets), the prefill
  (decode) demand is scaled by measured / bound, at most 4x: the profile was optimistic for this
  load. Off where extra ranks add no capacity (one machine's cores).
- **Hysteresis**: up at once; down only once `down_after` intervals in a row wanted fewer ranks
  even with DOWN_HEADROOM more load than they measured, then to what the last of them wanted. Idle
  (nothing arrived, nothing in flight, nothing queued): the floor, after the same wait.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from shared.planner.plan import Interval, Profile, Units, decode_capacity, prefill_capacity
from shared.planner.slo import SLO
from shared.protocol import metric_names
from shared.runtime.promtext import Raw, buckets, gains, levels, parse_metrics, quantile, total

ROLES = ("prefill", "decode")
MAX_CORRECTION = 4.0
DOWN_HEADROOM = 0.2  # a role comes down only to ranks that would serve 20% more than the interval's load
QUANTILE = 0.9  # the SLO correction's latency: p90 over the interval (histogram_quantile)
# the gateway's samples it reads (services/gateway/metrics.py)
TOKENS = metric_names.sample(metric_names.TOKENS)
INFLIGHT = "streamoe_gateway_inflight_requests"
TTFT, ITL = "streamoe_ttft_seconds", "streamoe_itl_seconds"


GatewaySample = Raw  # one gateway's samples at one scrape (parse_gateway)


def parse_gateway(text: str) -> GatewaySample:
    """A gateway's /metrics text -> the samples the planner reads (ValueError when it is not
    Prometheus text)."""
    return parse_metrics(text, (TOKENS, INFLIGHT, f"{TTFT}_bucket", f"{ITL}_bucket"))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


@dataclass
class Observation:
    """One interval of the live system."""

    seconds: float
    first_tokens: float = 0.0  # requests that got their first token (their prompt was prefilled)
    input_tokens: float = 0.0
    cached_tokens: float = 0.0
    output_tokens: float = 0.0
    inflight: float = 0.0  # requests the gateways hold now
    waiting: dict[str, int] = field(default_factory=dict)  # role -> requests queued on its ranks
    actual: dict[str, int] = field(default_factory=dict)  # role -> ranks reporting load
    ttft_ms: float | None = None  # p90 over the interval
    itl_ms: float | None = None

    @property
    def idle(self) -> bool:
        return not (self.first_tokens or self.output_tokens or self.inflight or any(self.waiting.values()))


def observe(before: dict[str, GatewaySample], now: dict[str, GatewaySample], seconds: float,
            waiting: dict[str, int], actual: dict[str, int]) -> Observation:
    """The gains between two scrapes of the gateways (by instance), as promtext.gains counts them:
    a gateway new since the last scrape counts from this one on (its counters started with it, or
    we only just found it); a counter that fell (the gateway restarted) counts its whole value."""
    level = levels(now)
    gained = dict.fromkeys(level, 0.0) | gains(before, now)  # every bucket bound, gained or not
    hit, miss = total(gained, TOKENS, kind="input_cache_hit"), total(gained, TOKENS, kind="input_cache_miss")
    ttft, itl = buckets(gained, TTFT), buckets(gained, ITL)
    return Observation(seconds, first_tokens=ttft[-1][1] if ttft else 0.0,  # the +Inf bucket: every request
                       input_tokens=hit + miss, cached_tokens=hit, output_tokens=total(gained, TOKENS, kind="output"),
                       inflight=total(level, INFLIGHT), waiting=waiting, actual=actual,
                       ttft_ms=_ms(quantile(QUANTILE, ttft)), itl_ms=_ms(quantile(QUANTILE, itl)))


@dataclass
class Decision:
    role: str
    desired: int
    wanted: int  # what this interval alone asked for (before the hysteresis)
    direction: str | None  # up, down, or None (no change)
    reason: str  # load, slo, idle, bounds


class Decider:
    """Keeps the desired ranks per role between intervals (shared/planner/autoscale.py's docstring)."""

    def __init__(self, profile: Profile, slo: SLO, low: Units, high: Units, units: Units | None = None,
                 interval_s: float = 30.0, correction: bool = True, down_after: int = 2):
        units = units or Units()
        for role in ROLES:
            lo, hi, unit = getattr(low, role), getattr(high, role), getattr(units, role)
            if lo > hi:
                raise ValueError(f"--min {role}={lo} is above --max {role}={hi}")
            if lo % unit or hi % unit:
                raise ValueError(f"--min {role}={lo} and --max {role}={hi} must be whole units of {unit}")
        self.profile, self.slo, self.low, self.high, self.units = profile, slo, low, high, units
        self.interval_s, self.correction, self.down_after = interval_s, correction, down_after
        self.desired = {role: getattr(low, role) for role in ROLES}
        self.below = {role: 0 for role in ROLES}
        self.mean_input_len = 1.0  # the last interval's with arrivals: the backlog's size

    def wanted(self, obs: Observation) -> dict[str, tuple[int, int, str]]:
        """role -> (ranks, ranks for DOWN_HEADROOM more load, reason) for this interval alone,
        within the bounds."""
        if obs.idle:
            return {role: (getattr(self.low, role), getattr(self.low, role), "idle") for role in ROLES}
        if obs.first_tokens:
            self.mean_input_len = obs.input_tokens / obs.first_tokens
        rate = max(obs.first_tokens, 1.0) / obs.seconds
        input_tok_s = obs.input_tokens / obs.seconds + obs.waiting.get("prefill", 0) * self.mean_input_len / \
            self.interval_s
        output_tok_s = obs.output_tokens / obs.seconds
        hit_rate = obs.cached_tokens / obs.input_tokens if obs.input_tokens else 0.0
        interval = Interval(0.0, obs.seconds, rate, input_tok_s / rate, output_tok_s / rate, hit_rate)
        p_cap, p_point = prefill_capacity(self.profile, self.slo, interval)
        d_cap, _ = decode_capacity(self.profile, self.slo, interval, p_point.ttft_ms)
        demand = {"prefill": (input_tok_s, p_cap, self.slo.ttft_ms, obs.ttft_ms),
                  "decode": (output_tok_s, d_cap, self.slo.itl_ms or self.slo.tpot_ms, obs.itl_ms)}
        out = {}
        for role, (tok_s, cap, bound, measured) in demand.items():
            reason = "load"
            if self.correction and bound is not None and measured is not None and measured > bound:
                tok_s *= min(measured / bound, MAX_CORRECTION)
                reason = "slo"
            ranks, clamped = self._within_bounds(role, tok_s / cap)
            down, _ = self._within_bounds(role, tok_s * (1.0 + DOWN_HEADROOM) / cap)
            out[role] = (ranks, down, "bounds" if clamped and reason == "load" else reason)
        return out

    def _within_bounds(self, role: str, num_ranks: float) -> tuple[int, bool]:
        """`num_ranks` rounded up to whole units and held within the bounds; whether it was clamped."""
        unit = getattr(self.units, role)
        ranks = math.ceil(num_ranks / unit - 1e-9) * unit
        lo, hi = getattr(self.low, role), getattr(self.high, role)
        return min(max(ranks, lo), hi), not lo <= ranks <= hi

    def decide(self, obs: Observation) -> list[Decision]:
        out = []
        for role, (ranks, down, reason) in self.wanted(obs).items():
            now, direction = self.desired[role], None
            if ranks > now:
                self.below[role] = 0
                direction = "up"
            elif down < now:
                ranks = down
                self.below[role] += 1
                if self.below[role] >= self.down_after:
                    self.below[role] = 0
                    direction = "down"
            else:
                self.below[role] = 0
            if direction is not None:
                self.desired[role] = ranks
            out.append(Decision(role, self.desired[role], ranks, direction, reason))
        return out
