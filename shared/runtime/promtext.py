"""Prometheus text exposition as numbers (pure): a scrape parsed into summed samples, what counters
gained between two scrapes of several sources, and a histogram's quantile and SLO attainment as
Prometheus's `histogram_quantile` computes them (linear inside a bucket). The gateway's dashboard,
the planner and `streamoe cost` read their scrapes through it.
"""
from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
Raw = dict[tuple[str, Labels], float]  # (sample name, sorted labels) -> value


def parse_metrics(text: str, names: Iterable[str] | None = None) -> Raw:
    """The samples of one exposition, summed per (name, labels); with `names`, only the samples so
    named (the other lines are skipped before parsing, its slow part). ValueError when the text is
    not Prometheus exposition."""
    if names is not None:
        prefixes = tuple(n + c for n in names for c in "{ ")
        text = "\n".join(line for line in text.splitlines() if line.startswith(prefixes)) + "\n"
    out: Raw = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                out[key] = out.get(key, 0.0) + s.value
    except (ValueError, IndexError, KeyError, TypeError) as e:
        raise ValueError(f"not Prometheus text exposition ({type(e).__name__}: {e})") from None
    return out


def gains(prev: dict[str, Raw], cur: dict[str, Raw]) -> Raw:
    """What each counter gained between two scrapes, summed over the sources read both times.
    A series that fell (its process restarted) gained its whole value; a series new in a known
    source gained all of it (counters start at 0); a source new since `prev` adds nothing yet (its
    counters may hold hours of history). Series that gained nothing are left out."""
    out: Raw = {}
    for source, now in cur.items():
        before = prev.get(source)
        if before is None:
            continue
        for key, value in now.items():
            old = before.get(key, 0.0)
            gained = value - old if value >= old else value
            if gained:
                out[key] = out.get(key, 0.0) + gained
    return out


def levels(cur: dict[str, Raw]) -> Raw:
    """Each series summed over the sources (for gauges)."""
    out: Raw = {}
    for raw in cur.values():
        for key, value in raw.items():
            out[key] = out.get(key, 0.0) + value
    return out


def total(raw: Raw, name: str, **labels: str) -> float:
    """The sum of the samples named `name` with these labels (0 when none)."""
    return sum(v for (n, ls), v in raw.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def grouped(raw: Raw, name: str, *label_names: str) -> dict[tuple[str, ...], float]:
    """Samples named `name` summed by the values of `label_names`."""
    out: dict[tuple[str, ...], float] = {}
    for (n, ls), v in raw.items():
        if n == name:
            d = dict(ls)
            key = tuple(d.get(k, "") for k in label_names)
            out[key] = out.get(key, 0.0) + v
    return out


def buckets(raw: Raw, histogram: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of a histogram's buckets, summed over series, sorted."""
    by_le = grouped(raw, f"{histogram}_bucket", "le")
    return sorted((float(le), count) for (le,), count in by_le.items())


def quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile: linear within the bucket that holds rank q; the highest
    finite bound when that bucket is +Inf's. None without observations."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for i, (le, count) in enumerate(cumulative):
        if count >= rank:
            if le == float("inf"):
                return cumulative[i - 1][0] if i > 0 else None
            if count == lower_count:
                return le
            return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = le, count
    return None


def attainment(target: float, cumulative: list[tuple[float, float]]) -> float | None:
    """The fraction of observations within `target` (linear within its bucket, as `quantile`);
    None without observations."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    lower_bound, lower_count = 0.0, 0.0
    for le, count in cumulative:
        if le >= target:
            if le == float("inf"):
                return lower_count / cumulative[-1][1]
            within = lower_count + (count - lower_count) * (target - lower_bound) / (le - lower_bound)
            return within / cumulative[-1][1]
        lower_bound, lower_count = le, count
    return 1.0
