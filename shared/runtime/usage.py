"""Usage that outlives the process: GPU-seconds and tokens, added to one Redis hash.

A Prometheus counter lives as long as its process: a rank the autoscaler drains, or one a rolling
restart replaces, takes its counts with it, and a cost report summed over the live scrapes falls.
So every service adds what its usage counters (metric_names.USAGE_COUNTERS) gained since its last
tick to the hash `streams.USAGE`, every housekeeping tick and once more as it stops; `streamoe
cost` (and the dashboard) read the totals there, through the gateway's `/usage`, and use the live
scrape only for rates.

Each field is a counter's sample as Prometheus writes it (`streamoe_gpu_seconds_total{group="decode",
rank="0",role="decode"}`), so the hash reads back as exposition text (`exposition`), and the same
labels from two processes (a rank and its successor, a restarted gateway) add up.
NOTE: one tick's gain is added by one script (HINCRBYFLOAT per field); should the reply be lost
after Redis ran it, the retry adds that tick twice. Counting a few seconds twice in a rare outage
is the trade against a sequence number per process.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry

from shared.protocol import metric_names, streams

USAGE_SAMPLES = frozenset(metric_names.sample(c) for c in metric_names.USAGE_COUNTERS)

# KEYS: the usage hash; ARGV: field, amount, field, amount, ...
_ADD = """
for i = 1, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1]) end
return #ARGV / 2
"""


def field_of(name: str, labels: dict[str, str]) -> str:
    """A sample as Prometheus writes it, labels sorted: the hash field."""
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def usage_samples(registry: CollectorRegistry) -> dict[str, float]:
    """The registry's usage counters now: field -> value."""
    return {field_of(s.name, s.labels): s.value for family in registry.collect() for s in family.samples
            if s.name in USAGE_SAMPLES}


class UsageFlusher:
    """Adds what a registry's usage counters gained since the last flush that went through."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.flushed: dict[str, float] = {}

    async def flush(self, redis) -> int:
        """One script with every gain; the baseline moves only once Redis has it (an outage: the
        next tick adds both ticks' gains). How many fields gained."""
        now = usage_samples(self.registry)
        gained = {k: v - self.flushed.get(k, 0.0) for k, v in now.items() if v > self.flushed.get(k, 0.0)}
        if gained:
            await redis.eval(_ADD, 1, streams.USAGE, *[x for k, v in gained.items() for x in (k, repr(v))])
        self.flushed = now
        return len(gained)


async def read_usage(redis) -> dict[str, float]:
    """field -> total, every process that ever flushed included."""
    raw = await redis.hgetall(streams.USAGE)
    return {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}


def exposition(usage: dict[str, float]) -> str:
    """The totals as Prometheus text exposition (what `streamoe cost` parses)."""
    lines = []
    for counter in metric_names.USAGE_COUNTERS:
        name = metric_names.sample(counter)
        fields = sorted(f for f in usage if f.partition("{")[0] == name)
        if fields:
            lines.append(f"# TYPE {counter} counter")
            lines += [f"{f} {usage[f]!r}" for f in fields]
    return "\n".join(lines) + "\n"
