"""`streamoe cost`: the economics report (shared/cost/README.md) from the services' own Prometheus counters.

Reads Prometheus text exposition (saved files, or live `/metrics` endpoints found through a
gateway's `/services` or a `streamoe up` run's `processes.json`), sums the counters below over
every source, and hands the totals to `economics.report`. Each worker rank counts as one GPU.

A live system's totals come from the gateway's `/usage`: the counters every service added to Redis
(shared/runtime/usage.py), so a rank drained or restarted still counts. The live scrape then gives
only the per-rank rates. A gateway without `/usage` (404): the scrape gives both, as before.
"""
from __future__ import annotations

import http.client
import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from shared.cost import economics
from shared.cost.economics import TokenCounts
from shared.protocol import metric_names
from shared.runtime.promtext import parse_metrics, total

# NOTE: matched by sample name: the parser strips `_total` from a counter's family name only.
TOKENS = metric_names.sample(metric_names.TOKENS)  # gateway: {kind}
GPU_SECONDS = metric_names.sample(metric_names.GPU_SECONDS)  # worker rank, seconds up: {role, group, rank}
WORKER_TOKENS = metric_names.sample(metric_names.WORKER_TOKENS)  # worker rank: {role, group, rank, kind}
KINDS = ("input_cache_hit", "input_cache_miss", "output")
INPUT_KINDS = ("input_cache_hit", "input_cache_miss")
DEFAULT_URL = "http://127.0.0.1:8000"
SCRAPE_TIMEOUT_S = 5.0
MAX_PARALLEL_SCRAPES = 16


class ScrapeError(Exception):
    """A live source that could not be read (`streamoe cost` exits 1)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status, when the server answered


def sample_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named `name` with these labels in a Prometheus exposition (0 when absent)."""
    return total(parse_metrics(text, (name,)), name, **labels)


@dataclass
class Totals:
    """Counters summed over every source read so far."""

    tokens: dict[str, float] = field(default_factory=dict)  # kind -> tokens (gateways)
    gpu_seconds: dict[tuple[str, str], float] = field(default_factory=dict)  # (role, rank name) -> s
    worker_tokens: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (role, rank name, kind) -> tokens
    sources: list[str] = field(default_factory=list)
    # the live scrape when the totals above came from Redis (`/usage`): per-rank rates are its own
    live: Totals | None = None

    def add(self, text: str, source: str) -> None:
        """Add one exposition's counters; a ValueError naming `source` if it is not Prometheus text."""
        try:
            raw = parse_metrics(text)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        for (name, label_items), value in raw.items():
            labels = dict(label_items)
            role, kind = labels.get("role", ""), labels.get("kind", "")
            rank = rank_name(role, labels.get("group", ""), labels.get("rank", ""))
            if name == TOKENS and kind in KINDS:
                _inc(self.tokens, kind, value)
            elif name == GPU_SECONDS:
                _inc(self.gpu_seconds, (role, rank), value)
            elif name == WORKER_TOKENS:
                _inc(self.worker_tokens, (role, rank, kind), value)
        self.sources.append(source)

    def tokens_per_s(self, role: str, kinds: tuple[str, ...]) -> dict[str, float]:
        """rank -> its tokens of `kinds` per second it has been up, for every rank of `role`."""
        out = {}
        for (r, rank), seconds in self.gpu_seconds.items():
            if r == role:
                num_tokens = sum(self.worker_tokens.get((role, rank, k), 0.0) for k in kinds)
                out[rank] = num_tokens / seconds if seconds > 0 else 0.0
        return {rank: out[rank] for rank in sorted(out, key=_rank_order)}


def full_report(totals: Totals, gpu_hour_usd: float = economics.GPU_HOUR_USD,
                prices: tuple[float, float, float] = economics.PRICES_PER_MILLION,
                gpus_per_node: int = economics.GPUS_PER_NODE) -> dict:
    """`economics.report` on the totals, plus per-rank throughput and the sources read."""
    tokens = TokenCounts(*(round(totals.tokens.get(k, 0.0)) for k in KINDS))
    out = economics.report(tokens, sum(totals.gpu_seconds.values()), gpu_hour_usd, tuple(prices), gpus_per_node)
    rates = totals.live or totals
    out["prefill_input_tokens_per_s"] = rates.tokens_per_s("prefill", INPUT_KINDS)
    out["decode_output_tokens_per_s"] = rates.tokens_per_s("decode", ("output",))
    out["sources"] = list(totals.sources)
    return out


def collect(metrics_files: list[Path], url: str | None, processes_file: Path | None,
            timeout: float = SCRAPE_TIMEOUT_S, api_key: str | None = None) -> Totals:
    """Sum the files, plus every service behind `url` and in `processes_file` (each URL once).

    With no source at all, the gateway at DEFAULT_URL. `api_key` goes to the gateway's `/services`
    and `/usage` only (each service's /metrics is open). Raises FileNotFoundError or ValueError for
    a bad file, ScrapeError for a live source that does not answer with Prometheus text.
    """
    totals = Totals()
    for path in metrics_files:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--metrics {path}: no such file")
        totals.add(path.read_bytes().decode("utf-8", errors="replace"), str(path))
    urls: list[str] = []
    gateways: list[str] = []  # where the Redis totals may be read (`/usage`)
    if processes_file is not None:
        metrics_urls, gateway_urls = processes_urls(Path(processes_file))
        urls += metrics_urls
        gateways += gateway_urls
    if url is not None or (not metrics_files and processes_file is None):
        urls += services_metrics_urls(url or DEFAULT_URL, timeout, api_key)
        gateways.insert(0, (url or DEFAULT_URL).rstrip("/"))
    urls = list(dict.fromkeys(urls))
    with ThreadPoolExecutor(max_workers=max(1, min(MAX_PARALLEL_SCRAPES, len(urls)))) as pool:
        texts = list(pool.map(lambda u: fetch(u, timeout), urls))
    live = Totals()
    for u, text in zip(urls, texts):
        try:
            live.add(text, u)
        except ValueError as e:
            raise ScrapeError(str(e)) from None
    usage_url, usage = read_usage_totals(gateways, timeout, api_key)
    if usage is None:  # no gateway with /usage: the scrape's own sums (a drained rank's counts are lost)
        for u, text in zip(urls, texts):
            totals.add(text, u)
        return totals
    try:
        totals.add(usage, usage_url)
    except ValueError as e:
        raise ScrapeError(str(e)) from None
    totals.sources += live.sources
    totals.live = live
    return totals


def read_usage_totals(gateways: list[str], timeout: float = SCRAPE_TIMEOUT_S,
                      api_key: str | None = None) -> tuple[str | None, str | None]:
    """(url, text) of the first gateway's `/usage` (shared/runtime/usage.py); (None, None) when none
    serves it (an older gateway answers 404)."""
    for base in dict.fromkeys(gateways):
        try:
            return f"{base}/usage", fetch(f"{base}/usage", timeout, api_key)
        except ScrapeError as e:
            if e.status != 404:
                raise
    return None, None


def services_metrics_urls(base_url: str, timeout: float = SCRAPE_TIMEOUT_S, api_key: str | None = None) -> list[str]:
    """The metrics URL of every live service the gateway at `base_url` lists at /services.

    A gateway without /services (404): its own /metrics only, said on stderr.
    """
    base = base_url.rstrip("/")
    try:
        body = fetch(f"{base}/services", timeout, api_key)
    except ScrapeError as e:
        if e.status != 404:
            raise
        print(f"streamoe cost: {base}/services answered 404 (an older gateway?); reading {base}/metrics only, "
              "so worker GPU time is missing unless --processes or --metrics adds it", file=sys.stderr)
        return [f"{base}/metrics"]
    try:
        return [s["metrics_url"] for s in json.loads(body)["services"] if s.get("metrics_url")]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ScrapeError(f'{base}/services: expected {{"services": [{{"metrics_url": ...}}, ...]}}, '
                          f"got {body[:200]!r} ({type(e).__name__}: {e})") from None


def processes_urls(path: Path) -> tuple[list[str], list[str]]:
    """(http://127.0.0.1:<http port>/metrics of each process, http://127.0.0.1:<http port> of each
    gateway) in a `streamoe up` processes.json."""
    if not path.is_file():
        raise FileNotFoundError(f"--processes {path}: no such file")
    try:
        entries = json.loads(path.read_text())["processes"]
        bases = [(p.get("name"), f"http://127.0.0.1:{int(p['ports']['http'])}")
                 for p in entries if "http" in p.get("ports", {})]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--processes {path}: not a `streamoe up` processes.json ({type(e).__name__}: {e})") from None
    return [f"{base}/metrics" for _, base in bases], [base for name, base in bases if name == "gateway"]


def fetch(url: str, timeout: float = SCRAPE_TIMEOUT_S, api_key: str | None = None) -> str:
    """GET `url` as text (with `Authorization: Bearer api_key` when given); ScrapeError (with the
    status, if any) when it cannot be read."""
    # NOTE: no proxies from the environment: metrics ports are on the cluster's own network.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            return response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        hint = ("; give the gateway's key with --api-key (or STREAMOE_API_KEY)" if e.code == 401 and not api_key
                else "; the key was refused" if e.code == 401 else "")
        raise ScrapeError(f"{url}: HTTP {e.code} {e.reason}{hint}", status=e.code) from None
    except urllib.error.URLError as e:
        raise ScrapeError(f"{url}: cannot connect ({e.reason}); is the service running?") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise ScrapeError(f"{url}: {type(e).__name__}: {e}") from None


def format_table(report: dict) -> str:
    """The report as an aligned, human-readable table."""
    hit, miss, out = report["prices_per_million_usd"]
    margin = report["margin_pct"]
    rows = [("input tokens, cache hit", f"{report['input_cache_hit_tokens']:,}", ""),
            ("input tokens, cache miss", f"{report['input_cache_miss_tokens']:,}", ""),
            ("output tokens", f"{report['output_tokens']:,}", ""),
            ("cache hit rate", f"{report['cache_hit_rate'] * 100:.2f}%", "of input tokens"),
            ("GPU-hours", _num(report["gpu_hours"]), "each worker rank is one GPU"),
            ("node-hours", _num(report["node_hours"]), ""),
            ("cost", "$" + _num(report["cost_usd"]), f"at ${report['gpu_hour_usd']:,.2f} per GPU-hour"),
            ("revenue", "$" + _num(report["revenue_usd"]),
             f"at ${hit:g} / ${miss:g} / ${out:g} per 1M tokens (hit / miss / output)"),
            ("margin", "n/a" if margin is None else f"{margin:.2f}%", "(revenue - cost) / cost")]
    rows += [(f"prefill rank {rank}", f"{rate:,.2f}", "input tokens/s")
             for rank, rate in report["prefill_input_tokens_per_s"].items()]
    rows += [(f"decode rank {rank}", f"{rate:,.2f}", "output tokens/s")
             for rank, rate in report["decode_output_tokens_per_s"].items()]
    rows.append(("sources", str(len(report["sources"])), "\n".join(report["sources"])))
    label_w = max(len(r[0]) for r in rows)
    value_w = max(len(r[1]) for r in rows)
    indent = "\n" + " " * (label_w + value_w + 4)  # a multi-line note (the sources) stays in its column
    return "\n".join(f"{label:<{label_w}}  {value:>{value_w}}  {note.replace(chr(10), indent)}".rstrip()
                     for label, value, note in rows)


def _num(x: float) -> str:
    # NOTE: a short test run's dollars and hours are well under 1: keep 4 significant digits there.
    return f"{x:,.2f}" if x == 0 or abs(x) >= 1 else f"{x:.4g}"


def _inc(counts: dict, key, value: float) -> None:
    counts[key] = counts.get(key, 0.0) + value


def rank_name(role: str, group: str, rank: str) -> str:
    """A rank as the report names it: its number in the role's default group (the group named as
    the role, or none given), else GROUP/RANK (an EP group of its own, e.g. the autoscaler's)."""
    return rank if group in ("", role) else f"{group}/{rank}"


def _rank_order(rank: str) -> tuple:
    return (0, int(rank), "") if rank.isdigit() else (1, 0, rank)
