"""The gateway's live dashboard: `GET /dashboard` (a page, static/) polls `GET /dashboard/state`.

A sampler task scrapes every live service's /metrics (found as `streamoe cost` finds them: the
heartbeats' metrics URLs), in parallel with short timeouts, every `--dashboard-interval-s`, reads
what Redis holds (usage totals, stream groups, the planner's decision, `streamoe up`'s process
list, EPLB placements), and keeps the last `--dashboard-history-s` of samples in memory, so a page
opened now shows the last minutes. A failed scrape or Redis read marks its part down ("n/a" on the
page); the state itself never fails. The fields are in services/README.md, "Dashboard".

The arithmetic (`build_sample`, `Aggregator`, over shared/runtime/promtext.py's parsing, counter
gains and histogram quantiles) is pure; `Dashboard` does the I/O.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import aiohttp
import numpy as np
from redis.exceptions import RedisError, ResponseError

from shared.cost.metrics_report import Totals, full_report, rank_name
from shared.ep.eplb import balance, initial_placement, placement_from_phy2log, rank_loads
from shared.planner.slo import SLO
from shared.protocol import metric_names, streams
from shared.protocol.messages import ExpertLoad, PlacementUpdate
from shared.protocol.wire import WireError, decode
from shared.runtime import redis_client
from shared.runtime.discovery import live_services
from shared.runtime.promtext import Raw, attainment, buckets, gains, grouped, levels, parse_metrics, quantile, total
from shared.runtime.usage import exposition, read_usage

SCRAPE_TIMEOUT_S = 2.0
# the SLO metrics and the gateway histograms that measure them
HISTOGRAMS = {"ttft": "streamoe_ttft_seconds", "itl": "streamoe_itl_seconds", "tpot": "streamoe_tpot_seconds",
              "e2el": "streamoe_e2e_seconds"}
QUANTILES = (0.5, 0.95, 0.99)
SPEC = {"drafts": metric_names.sample(metric_names.SPEC_DRAFTS),
        "draft_tokens": metric_names.sample(metric_names.SPEC_DRAFT_TOKENS),
        "accepted_tokens": metric_names.sample(metric_names.SPEC_ACCEPTED_TOKENS)}
TOKENS = metric_names.sample(metric_names.TOKENS)
EXPERT_TOKENS = "streamoe_expert_tokens_total"
# every sample the dashboard reads; the rest of an exposition is skipped before parsing
WANTED = (TOKENS, "streamoe_requests_total", "streamoe_gateway_inflight_requests",
          *(f"{h}_bucket" for h in HISTOGRAMS.values()), "streamoe_running_requests", "streamoe_waiting_requests",
          "streamoe_kv_blocks_used", "streamoe_kv_blocks_total", EXPERT_TOKENS, "streamoe_ep_group_members",
          *SPEC.values(), metric_names.PLANNER_DESIRED, metric_names.PLANNER_ACTUAL,
          metric_names.sample(metric_names.GPU_SECONDS), metric_names.sample(metric_names.WORKER_TOKENS))
_USAGE_PREFIXES = tuple(metric_names.sample(c) + ch for c in metric_names.USAGE_COUNTERS for ch in ("{", " "))


# -- pure: Prometheus text -> numbers (shared/runtime/promtext.py) -----------------------------------

def usage_text(text: str) -> str:
    """Only the usage counters' samples of an exposition (what `Totals.add` reads)."""
    return "\n".join(line for line in text.splitlines() if line.startswith(_USAGE_PREFIXES)) + "\n"


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def build_sample(t: float, dt: float, gained: Raw, level: Raw, slo_s: dict[str, float]) -> dict:
    """One point of the history: rates over the last `dt` seconds (gateways' counters), latency
    quantiles and SLO attainment of what the interval observed, and the gauges now."""
    hit = total(gained, TOKENS, kind="input_cache_hit")
    miss = total(gained, TOKENS, kind="input_cache_miss")
    out = {"t": round(t, 3), "dt": dt,
           "requests_per_s": total(gained, "streamoe_requests_total") / dt,
           "input_tokens_per_s": (hit + miss) / dt,
           "output_tokens_per_s": total(gained, TOKENS, kind="output") / dt,
           "cached_tokens_per_s": hit / dt,
           "prefix_hit_rate": _ratio(hit, hit + miss),
           "running": total(level, "streamoe_running_requests"),
           "waiting": total(level, "streamoe_waiting_requests"),
           "inflight": total(level, "streamoe_gateway_inflight_requests")}
    for metric in ("ttft", "itl"):
        cumulative = buckets(gained, HISTOGRAMS[metric])
        for q in QUANTILES:
            out[f"{metric}_p{round(q * 100)}"] = quantile(q, cumulative)
    for metric, target in slo_s.items():
        out[f"{metric}_slo_attainment"] = attainment(target, buckets(gained, HISTOGRAMS[metric]))
    used = grouped(level, "streamoe_kv_blocks_used", "role", "group", "rank")
    pool = grouped(level, "streamoe_kv_blocks_total", "role", "group", "rank")
    out["kv_usage"] = {rank_name(*key): _ratio(used.get(key, 0.0), blocks)
                       for key, blocks in sorted(pool.items(), key=lambda kv: _rank_key(kv[0])) if key[0] == "decode"}
    draft = total(gained, SPEC["draft_tokens"])
    out["spec_acceptance"] = _ratio(total(gained, SPEC["accepted_tokens"]), draft)
    desired = grouped(level, metric_names.PLANNER_DESIRED, "role")
    if desired:
        actual = grouped(level, metric_names.PLANNER_ACTUAL, "role")
        out["planner"] = {role: {"desired": n, "actual": actual.get((role,))} for (role,), n in sorted(desired.items())}
    return out


def _rank_key(key: tuple[str, ...]) -> tuple:
    role, group, rank = key
    return role, group != role, group, int(rank) if rank.isdigit() else 0, rank


class RollingSum:
    """The sum of the last `size` dicts added (a window over the samples)."""

    def __init__(self, size: int):
        self.parts: deque[dict] = deque()
        self.size = size
        self.total: dict = {}

    def add(self, part: dict) -> None:
        self.parts.append(part)
        for k, v in part.items():
            self.total[k] = self.total.get(k, 0.0) + v
        while len(self.parts) > self.size:
            for k, v in self.parts.popleft().items():
                left = self.total.get(k, 0.0) - v
                if abs(left) < 1e-9:
                    self.total.pop(k, None)
                else:
                    self.total[k] = left


def expert_heat(gained: Raw) -> dict[tuple[str, str, int, int], float]:
    """Tokens routed per (role, group, layer, expert), summed over the group's ranks."""
    out = {}
    for (role, group, layer, expert), v in grouped(gained, EXPERT_TOKENS, "role", "group", "layer", "expert").items():
        if layer.isdigit() and expert.isdigit():
            out[(role, group, int(layer), int(expert))] = v
    return out


def expert_groups(heat: dict[tuple[str, str, int, int], float], model: dict, ep: dict[tuple[str, str], dict],
                  placements: dict[tuple[str, str], dict]) -> list[dict]:
    """Per EP group: the window's tokens as a [layer][expert] matrix (the heatmap), the experts'
    max/mean load per layer (mean over layers), and for an EP group (its ranks report to EPLB) the
    ranks' max/mean under the placement in use, as EPLB measures it (shared/ep/eplb.py: balance)."""
    first = int(model.get("first_k_dense_replace", 0))
    out = []
    for role, group in sorted({(r, g) for r, g, _, _ in heat} | set(ep)):
        cells = {(layer, e): v for (r, g, layer, e), v in heat.items() if (r, g) == (role, group)}
        num_experts = int(model.get("n_routed_experts") or (1 + max((e for _, e in cells), default=-1)))
        last = int(model.get("num_hidden_layers") or (1 + max((layer for layer, _ in cells), default=first - 1)))
        layers = sorted(set(range(first, last)) | {layer for layer, _ in cells})
        matrix = np.zeros((len(layers), max(num_experts, 1)))
        for (layer, e), v in cells.items():
            if e < num_experts:
                matrix[layers.index(layer), e] = v
        mean = matrix.mean(axis=1)
        loaded = mean > 0
        expert_max_mean = float((matrix.max(axis=1)[loaded] / mean[loaded]).mean()) if loaded.any() else None
        row = {"role": role, "group": group, "layers": layers, "experts": num_experts,
               "tokens": matrix.round(1).tolist(), "total": float(matrix.sum()), "expert_max_mean": expert_max_mean,
               "rank_max_mean": None, "ep_size": None, "placement_version": None, "max_mean_before": None,
               "max_mean_after": None, "rebalanced_at": None, **placements.get((role, group), {})}
        info = ep.get((role, group))
        if info is not None:
            row["ep_size"] = info["ep_size"]
            row["rank_max_mean"] = _rank_max_mean(matrix, layers, first, num_experts, info,
                                                  placements.get((role, group), {}).get("phy2log"))
        row.pop("phy2log", None)
        out.append(row)
    return out


def _rank_max_mean(matrix: np.ndarray, layers: list[int], first: int, num_experts: int, info: dict,
                   phy2log: list[list[int]] | None) -> float | None:
    num_moe = len(phy2log) if phy2log else max(layers, default=first - 1) - first + 1
    if num_moe <= 0 or not matrix.any():
        return None
    weight = np.zeros((num_moe, num_experts))
    for i, layer in enumerate(layers):
        if 0 <= layer - first < num_moe:
            weight[layer - first] = matrix[i, :num_experts]
    try:
        placement = placement_from_phy2log(phy2log or initial_placement(num_experts, info["num_slots"], num_moe),
                                           num_experts)
        ratios, _ = balance(rank_loads(weight, placement, info["ep_size"]))
    except (ValueError, IndexError):
        return None
    return float(ratios[weight.sum(axis=1) > 0].mean())  # the layers that saw load (as expert_max_mean)


def stream_rows(infos: dict[str, tuple[int | None, list[dict] | None]]) -> tuple[list[dict], bool]:
    """stream -> (length, XINFO GROUPS) as rows {stream, group, length, pending, lag}; lag None where
    Redis does not report it (before 7.0). Also whether any group reported a lag field at all."""
    rows, lag_supported = [], False
    for name in sorted(infos):
        length, groups = infos[name]
        if not groups:
            rows.append({"stream": name, "group": None, "length": length, "pending": None, "lag": None})
            continue
        for info in groups:
            info = {(k.decode() if isinstance(k, bytes) else k): v for k, v in info.items()}
            lag_supported |= "lag" in info
            group = info.get("name")
            rows.append({"stream": name, "group": group.decode() if isinstance(group, bytes) else group,
                         "length": length, "pending": int(info.get("pending") or 0),
                         "lag": None if info.get("lag") is None else int(info["lag"])})
    return rows, lag_supported


def service_rows(live: list[dict], scrape_errors: dict[str, str | None], supervisor: dict | None,
                 departed: dict[str, dict]) -> list[dict]:
    """Every service with its status: `up`, `draining`, or `down` (a live heartbeat whose /metrics
    does not answer; a process `streamoe up` lists without a heartbeat; one whose heartbeat lapsed
    without a drain, in `departed`). With `streamoe up`'s list: restarts, pid, rank, group."""
    listed = {p.get("instance_id"): p for p in (supervisor or {}).get("processes", []) if p.get("instance_id")}
    rows = []
    for s in live:
        error = scrape_errors.get(s["instance_id"])
        status = "down" if error else ("draining" if s.get("draining") else "up")
        rows.append({"name": s["name"], "instance_id": s["instance_id"], "status": status, "detail": error,
                     "metrics_url": s.get("metrics_url")})
    seen = {r["instance_id"] for r in rows}
    for instance, p in listed.items():
        if instance not in seen:
            rows.append({"name": p.get("name"), "instance_id": instance, "status": "down",
                         "detail": "no heartbeat (restarting?)", "metrics_url": None})
            seen.add(instance)
    for instance, d in departed.items():
        if instance not in seen and not listed:
            rows.append({"name": d["name"], "instance_id": instance, "status": "down",
                         "detail": "heartbeat lapsed", "metrics_url": d.get("metrics_url")})
    for row in rows:
        p = listed.get(row["instance_id"], {})
        row.update({"restarts": p.get("restarts"), "pid": p.get("pid"), "rank": p.get("rank"),
                    "group": p.get("group")})
    order = {n: i for i, n in enumerate(("gateway", "tokenizer", "cache", "balancer", "prefill", "decode", "planner"))}
    return sorted(rows, key=lambda r: (order.get(r["name"], 99), str(r["name"]), r["rank"] if r["rank"] is not None
                                       else -1, r["instance_id"]))


def supervisor_record(raw: bytes | str | None, live: list[dict]) -> dict | None:
    """`streamoe up`'s process list (streams.SUPERVISOR_PROCESSES), when it describes this system:
    one of its instances has a live heartbeat (a list an earlier run left in Redis does not)."""
    if not raw:
        return None
    try:
        record = json.loads(raw)
        ids = {p.get("instance_id") for p in record["processes"]}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return record if ids & {s["instance_id"] for s in live} else None


def finite(obj):
    """`obj` with every NaN or infinity as None: JSON has neither (a browser's JSON.parse refuses them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def planner_decision(raw: dict) -> dict | None:
    """The planner's last decision (streams.PLANNER_DECISIONS), numbers as numbers."""
    if not raw:
        return None
    out = {}
    for k, v in raw.items():
        v = _text(v)
        try:
            out[_text(k)] = int(v) if v.lstrip("-").isdigit() else float(v) if v not in ("nan", "inf") else v
        except ValueError:
            out[_text(k)] = v
    return out


# -- the aggregator: scrapes in, history and "now" out ------------------------------------------------

class Aggregator:
    """Turns each round of scrapes into one history point and the state's "now" parts. Pure: the
    caller brings the texts and what Redis said (one round at a time, from one task)."""

    def __init__(self, slo: SLO, model: dict, window: int):
        self.slo_s = {m: ms / 1000.0 for m, ms in slo.items().items()}
        self.model = model
        self.prev: dict[str, Raw] = {}
        self.prev_t: float | None = None
        self.heat = RollingSum(window)
        self.latency = RollingSum(window)  # histogram buckets over the window (attainment)
        self.spec = RollingSum(window)
        self.requests = RollingSum(window)
        self.placement_seen: dict[tuple[str, str], tuple[int, float | None]] = {}

    def step(self, t: float, texts: dict[str, str], redis_parts: dict) -> tuple[dict | None, dict]:
        """(history point, or None on the first round; the state's "now" parts)."""
        cur, errors = {}, dict(redis_parts.get("scrape_errors", {}))
        for source, text in texts.items():
            try:
                cur[source] = parse_metrics(text, WANTED)
            except ValueError as e:
                errors[source] = str(e)
        level = levels(cur)
        point = None
        if self.prev_t is not None and t > self.prev_t:
            gained = gains(self.prev, cur)
            point = build_sample(t, t - self.prev_t, gained, level, self.slo_s)
            self.heat.add(expert_heat(gained))
            self.latency.add({(m, le): c for m in self.slo_s for le, c in buckets(gained, HISTOGRAMS[m])})
            self.spec.add({k: total(gained, name) for k, name in SPEC.items()})
            self.requests.add({"requests": total(gained, "streamoe_requests_total")})
        if cur:  # a round where nothing answered keeps the last baseline
            self.prev, self.prev_t = cur, t
        now = {"services": service_rows(redis_parts.get("live", []), errors, redis_parts.get("supervisor"),
                                        redis_parts.get("departed", {})),
               "ep_members": [{"role": r, "group": g, "rank": int(k) if k.isdigit() else k, "members": int(v)}
                              for (r, g, k), v in sorted(grouped(level, "streamoe_ep_group_members", "role", "group",
                                                                 "rank").items(), key=lambda kv: _rank_key(kv[0]))],
               "experts": expert_groups(self.heat.total, self.model, redis_parts.get("ep", {}),
                                        self._placements(t, redis_parts.get("placements", {}))),
               "window": self._window(),
               "cost": self._cost(texts, redis_parts),
               "planner": redis_parts.get("planner"),
               "supervisor": None if redis_parts.get("supervisor") is None else
               {k: redis_parts["supervisor"].get(k) for k in ("time", "supervisor_pid", "rolling_restarts")}}
        if point is not None and now["cost"] is not None:
            point.update({k: now["cost"][k] for k in ("cost_usd", "revenue_usd", "margin_pct")})
        return point, now

    def _window(self) -> dict:
        """Over the whole history: requests, SLO attainment, speculation's acceptance."""
        out = {"samples": len(self.requests.parts), "requests": self.requests.total.get("requests", 0.0)}
        for metric, target in self.slo_s.items():
            cumulative = sorted((le, c) for (m, le), c in self.latency.total.items() if m == metric)
            out[f"{metric}_slo_attainment"] = attainment(target, cumulative)
        spec = self.spec.total
        out["spec_acceptance"] = _ratio(spec.get("accepted_tokens", 0.0), spec.get("draft_tokens", 0.0))
        out["spec_mean_acceptance_length"] = (1 + spec.get("accepted_tokens", 0.0) / spec["drafts"]
                                              if spec.get("drafts") else None)
        return out

    def _placements(self, t: float, placements: dict[tuple[str, str], PlacementUpdate]) -> dict:
        """Each group's placement in use, and when EPLB published it (a placement from an older
        balancer, without its time: when this gateway first saw that version; None: it was there
        before this gateway started)."""
        out = {}
        for key, update in placements.items():
            seen = self.placement_seen.get(key)
            if seen is None or seen[0] != update.version:
                seen = (update.version, t if key in self.placement_seen else None)
                self.placement_seen[key] = seen
            out[key] = {"placement_version": update.version, "max_mean_before": update.max_mean_before,
                        "max_mean_after": update.max_mean_after, "rebalanced_at": update.time or seen[1],
                        "phy2log": update.phy2log}
        return out

    def _cost(self, texts: dict[str, str], redis_parts: dict) -> dict | None:
        """`streamoe cost`'s report: totals from the usage hash (Redis), per-rank rates from the scrape;
        without the hash (Redis away), the scrape's own sums."""
        live = Totals()
        for source, text in texts.items():
            with contextlib.suppress(ValueError):
                live.add(usage_text(text), source)
        usage = redis_parts.get("usage")
        if usage is None:
            totals = live
        else:
            totals = Totals()
            totals.add(exposition(usage), "redis")
            totals.live = live
        if not totals.tokens and not totals.gpu_seconds:
            return None
        report = full_report(totals)
        report["from"] = "redis usage" if usage is not None else "live scrape"
        report["sources"] = len(report["sources"])
        return report


def model_config(model_dir: Path) -> dict:
    """The few config.json fields the heatmap needs ({} when unreadable)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: config[k] for k in ("n_routed_experts", "first_k_dense_replace", "num_hidden_layers") if k in config}


# -- I/O: the sampler task ----------------------------------------------------------------------------

class Dashboard:
    """The sampler and the state it serves. `run` is the gateway's background task."""

    def __init__(self, instance_id: str, own_metrics: Callable[[], str], slo: SLO, model_dir: Path, partitions: int,
                 interval_s: float = 5.0, history_s: float = 600.0, log: logging.Logger | None = None):
        self.instance_id, self.own_metrics = instance_id, own_metrics
        self.slo, self.partitions = slo, partitions
        self.interval_s, self.history_s = interval_s, history_s
        self.log = log or logging.getLogger("streamoe.gateway.dashboard")
        window = max(2, round(history_s / interval_s))
        self.history: deque[dict] = deque(maxlen=window)
        self.aggregator = Aggregator(slo, model_config(model_dir), window)
        self.now: dict = {}
        self.errors: list[str] = []
        self.live: list[dict] = []  # the last list of heartbeats Redis gave (scraped while Redis is away)
        self.seen: dict[str, dict] = {}  # instance -> its last heartbeat entry (how it left: drained or lapsed)
        self.departed: dict[str, dict] = {}  # instance -> entry, for heartbeats that lapsed without a drain
        self.started = time.time()
        self.last_sample: float | None = None

    def state(self) -> dict:
        """What `GET /dashboard/state` answers."""
        return finite({"version": 1, "time": time.time(), "instance_id": self.instance_id,
                       "interval_s": self.interval_s, "history_s": self.history_s, "started": self.started,
                       "last_sample": self.last_sample, "slo": {m: ms / 1000.0 for m, ms in self.slo.items().items()},
                       "history": list(self.history), **self.now, "errors": list(self.errors)})

    async def run(self, redis, closing: asyncio.Event) -> None:
        """Sample every interval until `closing`; nothing a round meets stops the next."""
        # NOTE: no proxies from the environment: metrics ports are on the cluster's own network
        async with aiohttp.ClientSession(trust_env=False) as session:
            while not closing.is_set():
                began = time.monotonic()
                try:
                    await self.sample(redis, session)
                except Exception as e:  # a bug in one round: logged, the next round tries again
                    self.log.exception("dashboard sample failed")
                    self.errors = [f"sample failed: {type(e).__name__}: {e}"]
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(closing.wait(), max(0.1, self.interval_s - (time.monotonic() - began)))

    async def sample(self, redis, session: aiohttp.ClientSession) -> None:
        t, errors = time.time(), []
        try:
            live = await redis_client.within(live_services(redis), SCRAPE_TIMEOUT_S)
            self.live = live
        except (RedisError, OSError, TimeoutError) as e:
            live = self.live
            errors.append(f"redis: heartbeats not read ({type(e).__name__}: {e}); scraping the last list")
        self._follow_departures(live, t)
        others = [s for s in live if s["instance_id"] != self.instance_id and s.get("metrics_url")]
        texts = {self.instance_id: self.own_metrics()}
        scrape_errors: dict[str, str | None] = {}
        results = await asyncio.gather(*(_scrape(session, s["metrics_url"]) for s in others))
        for s, (text, error) in zip(others, results):
            if error is None:
                texts[s["instance_id"]] = text
            scrape_errors[s["instance_id"]] = error
        parts = {"live": live, "scrape_errors": scrape_errors, "departed": dict(self.departed)}
        parts.update(await self._redis_parts(redis, live, errors))
        point, now = await asyncio.to_thread(self.aggregator.step, t, texts, parts)
        if point is not None:
            self.history.append(point)
        self.now, self.errors, self.last_sample = now | {"streams": parts.get("streams"),
                                                         "lag_supported": parts.get("lag_supported")}, errors, t

    def _follow_departures(self, live: list[dict], t: float) -> None:
        """A heartbeat that lapsed while its service was not draining is a service down (killed);
        one that drained left on purpose. Either is forgotten after the history window."""
        ids = {s["instance_id"] for s in live}
        for instance, entry in list(self.seen.items()):
            if instance not in ids and not entry.get("draining"):
                self.departed[instance] = entry | {"since": t}
        self.seen = {s["instance_id"]: s for s in live}
        self.departed = {i: d for i, d in self.departed.items()
                         if i not in ids and t - d["since"] < self.history_s}

    async def _redis_parts(self, redis, live: list[dict], errors: list[str]) -> dict:
        """Each read on its own, side by side: one that fails (or takes over 2 s) leaves its part
        None and says why."""
        out: dict = {}

        async def part(name: str, read) -> None:
            try:
                out[name] = await redis_client.within(read(), SCRAPE_TIMEOUT_S)
            except (RedisError, OSError, TimeoutError, WireError, ValueError) as e:
                errors.append(f"redis: {name} not read ({type(e).__name__}: {e})")

        await asyncio.gather(part("usage", lambda: read_usage(redis)), part("planner", self._planner(redis)),
                             part("supervisor", self._supervisor(redis, live)),
                             part("placements", self._placements(redis)), part("ep", self._ep_groups(redis)),
                             part("stream_infos", self._streams(redis)))
        if out.get("stream_infos") is not None:
            out["streams"], out["lag_supported"] = stream_rows(out.pop("stream_infos"))
        return out

    def _planner(self, redis):
        async def read():
            return planner_decision(await redis.hgetall(streams.PLANNER_DECISIONS))
        return read

    def _supervisor(self, redis, live):
        async def read():
            return supervisor_record(await redis.get(streams.SUPERVISOR_PROCESSES), live)
        return read

    def _placements(self, redis):
        async def read():
            keys = [k async for k in redis.scan_iter(match=streams.placement_key("*", "*"), count=1000)]
            out = {}
            for key, raw in zip(keys, await redis_client.mget(redis, keys)):
                if raw is None:
                    continue
                role, group = _text(key).rsplit(":", 2)[-2:]
                with contextlib.suppress(WireError):
                    out[(role, group)] = decode(raw, PlacementUpdate)
            return out
        return read

    def _ep_groups(self, redis):
        """EP groups whose ranks report to EPLB: their size and slots (for the ranks' balance)."""
        async def read():
            keys = [k async for k in redis.scan_iter(match=streams.expert_load_key("*", "*", "*"), count=1000)]
            out = {}
            for raw in await redis_client.mget(redis, keys):
                with contextlib.suppress(WireError, TypeError):
                    report = decode(raw, ExpertLoad)
                    out[(report.role, report.group_id)] = {"ep_size": report.ep_size, "num_slots": report.num_slots}
            return out
        return read

    def _streams(self, redis):
        """Length and consumer groups of the request path's streams and every worker's and gateway's."""
        async def read():
            names = [stream(p) for stream in (streams.requests_stream, streams.tokenized_stream,
                                              streams.cached_stream, streams.raw_deltas_stream)
                     for p in range(self.partitions)] + [streams.ABORTS, streams.NOTICES]
            for pattern in (streams.prefill_stream("*", "*"), streams.kv_stream("*", "*"), streams.delta_stream("*")):
                names += [_text(k) async for k in redis.scan_iter(match=pattern, count=1000, _type="stream")]
            names = list(dict.fromkeys(names))
            infos = await asyncio.gather(*(_stream_info(redis, n) for n in names))
            return {n: info for n, info in zip(names, infos) if info is not None}
        return read


async def _stream_info(redis, name: str) -> tuple[int, list[dict]] | None:
    """(length, XINFO GROUPS) of a stream; None when it does not exist (yet)."""
    try:
        return await redis.xlen(name), await redis.xinfo_groups(name)
    except ResponseError:  # no such key
        return None


async def _scrape(session: aiohttp.ClientSession, url: str) -> tuple[str | None, str | None]:
    """(text, None), or (None, why not)."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)) as r:
            if r.status != 200:
                return None, f"{url}: HTTP {r.status}"
            return await r.text(), None
    except aiohttp.ClientConnectorError as e:
        return None, f"{url}: cannot connect ({type(e.os_error).__name__})"
    except TimeoutError:
        return None, f"{url}: no answer within {SCRAPE_TIMEOUT_S:g} s"
    except (aiohttp.ClientError, OSError) as e:
        return None, f"{url}: {type(e).__name__}: {e}"


def static_files(directory: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, content type) of every file the page loads (nothing else is served)."""
    types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
    files: Iterable[Path] = [*directory.glob("*"), *(directory / "vendor").glob("*")]
    return {p.name: (p, types[p.suffix]) for p in files if p.is_file() and p.suffix in types}
