"""What the gateway counts (services/README.md, "Metrics"): requests by outcome and HTTP code, tokens by
kind, and the latencies a client sees (TTFT, ITL, TPOT, E2E), measured where the client's
connection is. `streamoe cost` sums `streamoe_tokens_total` over every gateway."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.protocol import metric_names

# Latency buckets (seconds): from a fast decode step to a long queue wait.
_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92, 163.84)


@dataclass
class RequestTimes:
    """One request's clock, from its arrival at the gateway."""

    start: float = field(default_factory=time.monotonic)
    first: float | None = None
    last: float | None = None
    num_output: int = 0


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.http = Counter("streamoe_http_requests_total", "HTTP answers, by route and status code",
                            ["route", "code"], registry=registry)
        self.requests = Counter("streamoe_requests_total", "Generation requests by outcome "
                                "(completed, error, aborted: the client left, timeout: the deadline passed)",
                                ["outcome"], registry=registry)
        self.replies_remembered = Counter("streamoe_replies_remembered_total", "Chat replies whose generated ids "
                                          "were stored for their next turn (shared/cache/reply_memory.py)",
                                          registry=registry)
        self.tokens = Counter(metric_names.TOKENS, "Tokens by kind: input_cache_hit, input_cache_miss, output",
                              ["kind"], registry=registry)
        self.inflight = Gauge("streamoe_gateway_inflight_requests", "Requests admitted and not finished",
                              registry=registry)
        self.repairs = Counter("streamoe_requests_repaired_total", "Requests that showed no progress for "
                               "--progress-timeout-s, by repair: republished (no first token yet), resent (a gap "
                               "the ownership record fills), resumed (no record: from the ids this gateway has)",
                               ["how"], registry=registry)
        self.unreplicated = Counter("streamoe_requests_unreplicated_total", "Requests refused (503) because fewer "
                                    "than --redis-wait-replicas replicas acknowledged them in time",
                                    registry=registry)
        self.ttft = Histogram("streamoe_ttft_seconds", "Time to first token", buckets=_BUCKETS, registry=registry)
        self.itl = Histogram("streamoe_itl_seconds", "Time between token deltas", buckets=_BUCKETS,
                             registry=registry)
        self.tpot = Histogram("streamoe_tpot_seconds", "Time per output token after the first", buckets=_BUCKETS,
                              registry=registry)
        self.e2e = Histogram("streamoe_e2e_seconds", "Request latency, arrival to last token", buckets=_BUCKETS,
                             registry=registry)
        # exported at 0 from the start; looked up once (a labels() call costs more than the increment)
        self.tokens_by_kind = {kind: self.tokens.labels(kind=kind)
                               for kind in ("input_cache_hit", "input_cache_miss", "output")}
        for outcome in ("completed", "error", "aborted", "timeout"):
            self.requests.labels(outcome=outcome)

    def slo_targets(self, slo) -> None:
        """The SLO (`--slo`, shared/planner/slo.py) as gauges, so a dashboard draws its bounds."""
        gauge = Gauge("streamoe_slo_target_seconds", "The SLO's bound per metric (ttft, itl, tpot, e2el)",
                      ["metric"], registry=self.registry)
        for name, ms in slo.items().items():
            gauge.labels(metric=name).set(ms / 1000.0)

    def delta(self, times: RequestTimes, num_tokens: int, num_prompt: int = 0, num_cached: int = 0) -> None:
        """A delta reached the client's request: the first carries the prompt's accounting."""
        t = time.monotonic()
        if times.first is None:
            times.first = t
            self.ttft.observe(t - times.start)
            self.tokens_by_kind["input_cache_hit"].inc(num_cached)
            self.tokens_by_kind["input_cache_miss"].inc(num_prompt - num_cached)
        else:
            self.itl.observe(t - times.last)
        times.last = t
        times.num_output += num_tokens
        self.tokens_by_kind["output"].inc(num_tokens)

    def finished(self, times: RequestTimes, outcome: str) -> None:
        self.requests.labels(outcome=outcome).inc()
        if outcome != "completed" or times.first is None:
            return
        self.e2e.observe(times.last - times.start)
        if times.num_output > 1:
            self.tpot.observe((times.last - times.first) / (times.num_output - 1))
