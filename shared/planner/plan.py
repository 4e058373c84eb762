"""`streamoe plan`: how many prefill and decode ranks a load needs, interval by interval, to meet
the SLOs, given a profile of what one rank serves (shared/planner/README.md).

Pure arithmetic on three inputs:
- a profile (JSON, what `python -m loadgen.profile` writes): per rank, prefill input tokens/s at
  an input length and cache hit rate, with its TTFT; decode output tokens/s at a number of
  running requests and a context length, with its ITL;
- a load: a `.csv` with the header START_S,DURATION_S,... (LOAD_COLUMNS), or a Mooncake trace
  (`.jsonl`: `timestamp` ms, `input_length`, `output_length`, `hash_ids` of 512-token blocks),
  cut into `--interval-s` intervals;
- the SLOs (shared/planner/slo.py).

For each interval: a rank's prefill capacity is the best input tok/s among the profile's points
that meet the TTFT bound at the input length nearest the interval's; it counts every input token,
so it scales with the share of tokens that miss the cache (the profile's against the load's).
A rank's decode capacity is the best output tok/s among the points that meet the ITL bound (and
TPOT; and E2EL less the prefill's TTFT, spread over the output) at the context nearest the
interval's (prompt + half the output). Ranks = demand / capacity, rounded up to whole units (a
unit: the ranks that scale together, e.g. an EP group), at least one unit per role.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.cost.economics import GPU_HOUR_USD, GPUS_PER_NODE
from shared.planner.slo import SLO

LOAD_COLUMNS = ("start_s", "duration_s", "requests_per_s", "mean_input_len", "mean_output_len", "cache_hit_rate")
TRACE_BLOCK_TOKENS = 512  # Mooncake's hash_ids: one per 512-token block
MIN_MISS_SHARE = 0.05  # a load that hits the cache for everything still costs prefill something


@dataclass(frozen=True)
class Interval:
    start_s: float
    duration_s: float
    requests_per_s: float
    mean_input_len: float
    mean_output_len: float
    cache_hit_rate: float = 0.0

    @property
    def input_tok_s(self) -> float:
        return self.requests_per_s * self.mean_input_len

    @property
    def output_tok_s(self) -> float:
        return self.requests_per_s * self.mean_output_len


@dataclass(frozen=True)
class PrefillPoint:
    input_len: float
    input_tok_s: float  # per rank, every input token counted (cache hits included)
    cache_hit_rate: float = 0.0
    ttft_ms: float | None = None


@dataclass(frozen=True)
class DecodePoint:
    running: float
    context_len: float
    output_tok_s: float  # per rank
    itl_ms: float | None = None


@dataclass(frozen=True)
class Profile:
    prefill: list[PrefillPoint]
    decode: list[DecodePoint]


@dataclass(frozen=True)
class Units:
    prefill: int = 1
    decode: int = 1


def parse_units(text: str) -> Units:
    """`prefill=8,decode=8` (either may be left out: 1) -> Units."""
    values = {}
    for item in [i for i in text.replace(" ", ",").split(",") if i]:
        role, _, n = item.partition("=")
        if role not in ("prefill", "decode") or not n.isdigit() or int(n) < 1:
            raise ValueError(f"item {item!r}: expected prefill=N or decode=N with N a whole number >= 1")
        values[role] = int(n)
    return Units(**values)


def _number(where: str, d: dict, key: str, low: float = 0.0, optional: bool = False, low_open: bool = True):
    value = d.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value) \
            or (value <= low if low_open else value < low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise ValueError(f"{where}: {key}={value!r}: expected a number {bound}")
    return float(value)


def load_profile(path: Path) -> Profile:
    """A profile JSON -> Profile; a missing or bad field is named with its point."""
    try:
        raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--profile {path}: not JSON ({e})") from None
    if not isinstance(raw, dict) or not raw.get("prefill") or not raw.get("decode"):
        raise ValueError(f"--profile {path}: expected an object with non-empty lists 'prefill' and 'decode'")
    prefill, decode = [], []
    for i, p in enumerate(raw["prefill"]):
        where = f"--profile {path}: prefill[{i}]"
        if not isinstance(p, dict):
            raise ValueError(f"{where}: expected an object")
        hit = _number(where, p, "cache_hit_rate", optional=True, low_open=False)
        if hit is not None and hit >= 1:
            raise ValueError(f"{where}: cache_hit_rate={hit!r}: expected a number in [0, 1)")
        prefill.append(PrefillPoint(_number(where, p, "input_len"), _number(where, p, "input_tok_s"), hit or 0.0,
                                    _number(where, p, "ttft_ms", optional=True)))
    for i, d in enumerate(raw["decode"]):
        where = f"--profile {path}: decode[{i}]"
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object")
        decode.append(DecodePoint(_number(where, d, "running"), _number(where, d, "context_len"),
                                  _number(where, d, "output_tok_s"), _number(where, d, "itl_ms", optional=True)))
    return Profile(prefill, decode)


def load_csv(path: Path) -> list[Interval]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = tuple(h.strip() for h in reader.fieldnames or ())
        reader.fieldnames = list(header)
        rows = list(reader)
    if header != LOAD_COLUMNS:
        raise ValueError(f"--load {path}: expected the header {','.join(LOAD_COLUMNS)}, "
                         f"got {','.join(header) or 'none'}")
    intervals = []
    for line, row in enumerate(rows, start=2):
        values = {}
        for key in LOAD_COLUMNS:
            try:
                values[key] = float(row[key])
            except (TypeError, ValueError):
                raise ValueError(f"--load {path} line {line}: {key}={row[key]!r}: expected a number") from None
        bad = [k for k in LOAD_COLUMNS if values[k] < 0 or math.isnan(values[k]) or math.isinf(values[k])]
        bad += ["duration_s"] if values["duration_s"] <= 0 else []
        bad += ["cache_hit_rate"] if values["cache_hit_rate"] > 1 else []
        if bad:
            raise ValueError(f"--load {path} line {line}: {bad[0]}={row[bad[0]]!r} is out of range")
        intervals.append(Interval(**values))
    if not intervals:
        raise ValueError(f"--load {path}: no intervals")
    return intervals


def load_trace(path: Path, interval_s: float) -> list[Interval]:
    """A Mooncake trace cut into intervals of `interval_s`: request rate, mean lengths, and the
    share of input tokens in blocks an earlier request already had (the cache hit rate)."""
    requests = []
    with open(path) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                r = json.loads(text)
                requests.append((float(r["timestamp"]) / 1000.0, int(r["input_length"]), int(r["output_length"]),
                                 list(r.get("hash_ids") or [])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"--load {path} line {line}: expected timestamp, input_length, output_length "
                                 f"(and hash_ids): {e}") from None
    if not requests:
        raise ValueError(f"--load {path}: no requests")
    requests.sort(key=lambda r: r[0])
    t0, seen = requests[0][0], set()
    buckets: dict[int, list] = {}
    for t, n_in, n_out, blocks in requests:
        hit_blocks = sum(b in seen for b in blocks)
        seen.update(blocks)
        hits = min(n_in, hit_blocks * TRACE_BLOCK_TOKENS)
        buckets.setdefault(int((t - t0) // interval_s), []).append((n_in, n_out, hits))
    intervals = []
    for k in range(max(buckets) + 1):
        rows = buckets.get(k, [])
        n = len(rows)
        total_in = sum(r[0] for r in rows)
        intervals.append(Interval(k * interval_s, interval_s, n / interval_s, total_in / n if n else 0.0,
                                  sum(r[1] for r in rows) / n if n else 0.0,
                                  sum(r[2] for r in rows) / total_in if total_in else 0.0))
    return intervals


def load_load(path: Path, interval_s: float) -> list[Interval]:
    if Path(path).suffix == ".csv":
        return load_csv(path)
    if Path(path).suffix == ".jsonl":
        return load_trace(path, interval_s)
    raise ValueError(f"--load {path}: expected a .csv ({','.join(LOAD_COLUMNS)}) or a .jsonl Mooncake trace")


def _nearest(points: list, key, target: float) -> list:
    """The points whose `key` is nearest `target` (by ratio: 1k is as far from 2k as 4k is)."""
    target = max(target, 1.0)
    distance = {id(p): abs(math.log(max(key(p), 1.0) / target)) for p in points}
    best = min(distance.values())
    return [p for p in points if distance[id(p)] <= best + 1e-9]


def prefill_capacity(profile: Profile, slo: SLO, interval: Interval) -> tuple[float, PrefillPoint]:
    """Input tok/s one prefill rank serves for this interval within the TTFT bound, and the point."""
    ok = [p for p in profile.prefill if slo.ttft_ms is None or p.ttft_ms is None or p.ttft_ms <= slo.ttft_ms]
    if not ok:
        best = min(p.ttft_ms for p in profile.prefill)
        raise ValueError(f"--slo ttft:{slo.ttft_ms:g}: no prefill point of the profile meets it (its best TTFT is "
                         f"{best:g} ms)")
    point = max(_nearest(ok, lambda p: p.input_len, interval.mean_input_len), key=lambda p: p.input_tok_s)
    scale = max(1.0 - point.cache_hit_rate, MIN_MISS_SHARE) / max(1.0 - interval.cache_hit_rate, MIN_MISS_SHARE)
    return point.input_tok_s * scale, point


def itl_bound(slo: SLO, interval: Interval, ttft_ms: float | None) -> float | None:
    """The ITL a decode rank may run at: the ITL and TPOT bounds, and what E2EL leaves after the
    TTFT, spread over the output."""
    bounds = [b for b in (slo.itl_ms, slo.tpot_ms) if b is not None]
    if slo.e2el_ms is not None and interval.mean_output_len > 1:
        bounds.append((slo.e2el_ms - (ttft_ms or 0.0)) / (interval.mean_output_len - 1))
    return min(bounds) if bounds else None


def decode_capacity(profile: Profile, slo: SLO, interval: Interval,
                    ttft_ms: float | None = None) -> tuple[float, DecodePoint]:
    """Output tok/s one decode rank serves for this interval within the ITL bound, and the point."""
    bound = itl_bound(slo, interval, ttft_ms)
    ok = [d for d in profile.decode if bound is None or d.itl_ms is None or d.itl_ms <= bound]
    if not ok:
        best = min(d.itl_ms for d in profile.decode)
        raise ValueError(f"--slo {slo}: decode must run at an ITL of {bound:.4g} ms or less; no decode point of "
                         f"the profile does (its best ITL is {best:g} ms)")
    context = interval.mean_input_len + interval.mean_output_len / 2
    point = max(_nearest(ok, lambda d: d.context_len, context), key=lambda d: d.output_tok_s)
    return point.output_tok_s, point


def _whole_units(demand: float, capacity: float, unit: int) -> int:
    return max(1, math.ceil(demand / capacity / unit - 1e-9)) * unit


def plan(profile: Profile, intervals: list[Interval], slo: SLO, units: Units = Units(),
         gpu_hour_usd: float = GPU_HOUR_USD, gpus_per_node: int = GPUS_PER_NODE) -> dict:
    """The plan (shared/planner/README.md for its keys)."""
    rows, rank_hours, peak = [], 0.0, 0
    for iv in intervals:
        p_cap, p_point = prefill_capacity(profile, slo, iv)
        d_cap, _ = decode_capacity(profile, slo, iv, p_point.ttft_ms)
        p = _whole_units(iv.input_tok_s, p_cap, units.prefill)
        d = _whole_units(iv.output_tok_s, d_cap, units.decode)
        rank_hours += (p + d) * iv.duration_s / 3600.0
        peak = max(peak, p + d)
        rows.append({"start_s": iv.start_s, "duration_s": iv.duration_s, "prefill_ranks": p, "decode_ranks": d,
                     "requests_per_s": iv.requests_per_s, "input_tok_s": iv.input_tok_s,
                     "output_tok_s": iv.output_tok_s, "cache_hit_rate": iv.cache_hit_rate,
                     "prefill_tok_s_per_rank": p_cap, "decode_tok_s_per_rank": d_cap})
    hours = sum(iv.duration_s for iv in intervals) / 3600.0
    return {"intervals": rows, "rank_hours": rank_hours, "cost_usd": rank_hours * gpu_hour_usd,
            "peak_cost_usd": peak * hours * gpu_hour_usd, "peak_ranks": peak,
            "mean_nodes": rank_hours / hours / gpus_per_node, "peak_nodes": peak / gpus_per_node, "hours": hours,
            "slo": str(slo), "units": asdict(units), "gpu_hour_usd": gpu_hour_usd, "gpus_per_node": gpus_per_node}


def summary(result: dict) -> str:
    return (f"streamoe plan: {len(result['intervals'])} intervals over {result['hours']:.4g} h, SLO {result['slo']}: "
            f"mean {result['mean_nodes']:.2f} nodes, peak {result['peak_nodes']:.2f} nodes; "
            f"{result['rank_hours']:.1f} rank-hours, ${result['cost_usd']:,.0f} "
            f"(the peak all along: ${result['peak_cost_usd']:,.0f})")


def plot(result: dict, path: Path) -> None:
    """Load (tokens/s) and ranks over the intervals, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["intervals"]
    hours = [r["start_s"] / 3600.0 for r in rows]
    fig, (load, ranks) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    load.step(hours, [r["input_tok_s"] for r in rows], where="post", label="input tok/s")
    load.step(hours, [r["output_tok_s"] for r in rows], where="post", label="output tok/s")
    load.set_ylabel("tokens/s")
    load.legend()
    ranks.step(hours, [r["prefill_ranks"] for r in rows], where="post", label="prefill ranks")
    ranks.step(hours, [r["decode_ranks"] for r in rows], where="post", label="decode ranks")
    ranks.step(hours, [r["prefill_ranks"] + r["decode_ranks"] for r in rows], where="post", label="total")
    ranks.set_ylabel("ranks (GPUs)")
    ranks.set_xlabel("hours")
    ranks.legend()
    fig.suptitle(f"SLO {result['slo']}: mean {result['mean_nodes']:.1f} nodes, ${result['cost_usd']:,.0f} "
                 f"(peak all along ${result['peak_cost_usd']:,.0f})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
