"""The autoscaler's arithmetic (services/planner runs it every `--interval-s`): from what the
gateways counted over the last interval and what the worker ranks queue, the prefill and decode
ranks the next interval needs, within bounds, without flapping.

- **Predicted load**: the last interval's arrivals (requests that got their first token), input
  tokens and output tokens per second, plus the backlog: what the ranks queue (load reports'
  `waiting`) served over the next interval. The ranks per role come from `plan.py`'s capacity
  for that load (the profile's best point within the SLOs), rounded to whole units.
- **SLO correction** (Dynamo's planner does the same): when the gateways measured a p90 TTFT (ITL)
  over its bound, the prefill (decode) demand is scaled by measured / bound, at most 4x: the
  profile was optimistic for this load. Off where extra ranks add no capacity (one machine's cores).
- **Hysteresis**: up at once; down only once `down_after` intervals in a row wanted fewer ranks
  even with DOWN_HEADROOM more load than they measured, then to what the last of them wanted. Idle
  (nothing arrived, nothing in flight, nothing queued): the floor, after the same wait.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from shared.planner.plan import Interval, Profile, Units, decode_capacity, prefill_capacity
from shared.planner.slo import SLO
from shared.protocol import metric_names

ROLES = ("prefill", "decode")
MAX_CORRECTION = 4.0
DOWN_HEADROOM = 0.2  # a role comes down only to ranks that would serve 20% more than the interval's load
QUANTILE = 0.9  # the SLO correction's latency: p90 over the interval


@dataclass
class GatewaySample:
    """One gateway's counters at one scrape (services/gateway/metrics.py)."""

    input_hit: float = 0.0
    input_miss: float = 0.0
    output: float = 0.0
    inflight: float = 0.0
    ttft: dict[float, float] = field(default_factory=dict)  # histogram: upper bound (s) -> cumulative count
    itl: dict[float, float] = field(default_factory=dict)

    @property
    def first_tokens(self) -> float:
        return self.ttft.get(math.inf, 0.0)


def parse_gateway(text: str) -> GatewaySample:
    """A gateway's /metrics text -> its sample (ValueError when it is not Prometheus text)."""
    out = GatewaySample()
    tokens = metric_names.sample(metric_names.TOKENS)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == tokens:
                kind = s.labels.get("kind")
                if kind == "input_cache_hit":
                    out.input_hit += s.value
                elif kind == "input_cache_miss":
                    out.input_miss += s.value
                elif kind == "output":
                    out.output += s.value
            elif s.name == "streamoe_gateway_inflight_requests":
                out.inflight += s.value
            elif s.name in ("streamoe_ttft_seconds_bucket", "streamoe_itl_seconds_bucket"):
                hist = out.ttft if s.name.startswith("streamoe_ttft") else out.itl
                le = float(s.labels["le"])
                hist[le] = hist.get(le, 0.0) + s.value
    return out


def _gain(now: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {le: max(0.0, c - before.get(le, 0.0)) for le, c in now.items()}


def quantile_ms(hist: dict[float, float], q: float = QUANTILE) -> float | None:
    """The q-quantile of a cumulative histogram, in ms: the upper bound of the bucket it falls in
    (a bound, as Prometheus' histogram_quantile without the interpolation); None when empty."""
    total = hist.get(math.inf, 0.0)
    if total <= 0:
        return None
    finite = sorted(le for le in hist if le != math.inf)
    for le in finite:
        if hist[le] >= q * total:
            return le * 1000.0
    return (finite[-1] if finite else 0.0) * 1000.0 * 2  # past the last bucket: at least twice it


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
    """The gains between two scrapes of the gateways (by instance). A gateway new since the last
    scrape counts from this one on (its counters started with it, or we only just found it)."""
    obs = Observation(seconds, waiting=waiting, actual=actual)
    ttft: dict[float, float] = {}
    itl: dict[float, float] = {}
    for instance, s in now.items():
        obs.inflight += s.inflight
        b = before.get(instance)
        if b is None:
            continue
        hit, miss = max(0.0, s.input_hit - b.input_hit), max(0.0, s.input_miss - b.input_miss)
        obs.input_tokens += hit + miss
        obs.cached_tokens += hit
        obs.output_tokens += max(0.0, s.output - b.output)
        obs.first_tokens += max(0.0, s.first_tokens - b.first_tokens)
        for le, c in _gain(s.ttft, b.ttft).items():
            ttft[le] = ttft.get(le, 0.0) + c
        for le, c in _gain(s.itl, b.itl).items():
            itl[le] = itl.get(le, 0.0) + c
    obs.ttft_ms, obs.itl_ms = quantile_ms(ttft), quantile_ms(itl)
    return obs


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

    def wanted(self, obs: Observation, headroom: float = 0.0) -> dict[str, tuple[int, str]]:
        """role -> (ranks, reason) for this interval alone (its demand times 1 + headroom), within
        the bounds."""
        if obs.idle:
            return {role: (getattr(self.low, role), "idle") for role in ROLES}
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
            tok_s *= 1.0 + headroom
            if self.correction and bound is not None and measured is not None and measured > bound:
                tok_s *= min(measured / bound, MAX_CORRECTION)
                reason = "slo"
            unit = getattr(self.units, role)
            ranks = math.ceil(tok_s / cap / unit - 1e-9) * unit
            lo, hi = getattr(self.low, role), getattr(self.high, role)
            if ranks > hi or ranks < lo:
                reason = "bounds" if reason == "load" else reason
            out[role] = (min(max(ranks, lo), hi), reason)
        return out

    def decide(self, obs: Observation) -> list[Decision]:
        out = []
        with_headroom = self.wanted(obs, DOWN_HEADROOM)
        for role, (ranks, reason) in self.wanted(obs).items():
            now, direction = self.desired[role], None
            if ranks > now:
                self.below[role] = 0
                direction = "up"
            elif with_headroom[role][0] < now:
                ranks = with_headroom[role][0]
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
