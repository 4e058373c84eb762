"""Speculative decoding's counters, read from the server before and after a run: ours from every
service a streamoe gateway lists at /services, a vLLM server's `vllm:spec_decode_*` from its own
/metrics. The run's share (after minus before, per source) gives the summary's acceptance figures;
none are given when no source has the counters."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from shared.cost.metrics_report import ScrapeError, fetch
from shared.protocol import metric_names
from shared.runtime.promtext import parse_metrics

# (drafts, draft tokens, accepted tokens, accepted per position) sample names, ours then vLLM's
FAMILIES = (
    tuple(metric_names.sample(n) for n in (metric_names.SPEC_DRAFTS, metric_names.SPEC_DRAFT_TOKENS,
                                           metric_names.SPEC_ACCEPTED_TOKENS, metric_names.SPEC_ACCEPTED_PER_POS)),
    ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
     "vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_accepted_tokens_per_pos_total"),
)
Counts = dict[str, float]  # "drafts", "draft_tokens", "accepted_tokens", "pos<k>" -> value


def parse(text: str) -> Counts:
    """The spec_decode counters of one Prometheus exposition, summed over labels ({} when absent)."""
    out: Counts = {}
    for (name, labels), value in parse_metrics(text, [n for names in FAMILIES for n in names]).items():
        for names in FAMILIES:
            if name not in names:
                continue
            key = ("drafts", "draft_tokens", "accepted_tokens", None)[names.index(name)]
            if key is None:
                key = f"pos{int(float(dict(labels).get('position', '0')))}"
            out[key] = out.get(key, 0.0) + value
    return out


def metrics_urls(base_url: str, timeout: float, api_key: str | None = None) -> list[str]:
    """Every /metrics a streamoe gateway lists at /services (which wants the API key when the
    gateway has keys); else the server's own /metrics."""
    base = base_url.rstrip("/")
    try:
        services = json.loads(fetch(f"{base}/services", timeout, api_key))["services"]
        urls = [s["metrics_url"] for s in services if s.get("metrics_url")]
    except (ScrapeError, ValueError, KeyError, TypeError):
        urls = []
    return urls or [f"{base}/metrics"]


def scrape(base_url: str, timeout: float = 5.0, api_key: str | None = None) -> dict[str, Counts]:
    """metrics URL -> its spec_decode counters, for every source that answers and has them."""
    urls = metrics_urls(base_url, timeout, api_key)

    def one(url: str) -> Counts:
        try:
            return parse(fetch(url, timeout))
        except (ScrapeError, ValueError):
            return {}  # a source that went away (or is not Prometheus text) adds nothing

    with ThreadPoolExecutor(max(1, min(16, len(urls)))) as pool:
        return {url: counts for url, counts in zip(urls, pool.map(one, urls)) if counts}


def summarize(before: dict[str, Counts], after: dict[str, Counts]) -> dict | None:
    """The run's acceptance: rate (accepted / draft tokens), mean acceptance length (1 + accepted
    per draft) and the rate at each draft position (accepted there / drafts), vLLM's definitions;
    None without counters or drafts."""
    total: Counts = {}
    for url, counts in after.items():
        base = before.get(url, {})
        for key, value in counts.items():
            gained = value - base.get(key, 0.0)
            total[key] = total.get(key, 0.0) + (gained if gained >= 0 else value)  # a restarted source: from 0
    drafts = total.get("drafts", 0.0)
    if drafts <= 0:
        return None
    positions = sorted(int(k[3:]) for k in total if k.startswith("pos"))
    return {
        "spec_decode_acceptance_rate": total.get("accepted_tokens", 0.0) / max(total.get("draft_tokens", 0.0), 1.0),
        "spec_decode_mean_acceptance_length": 1 + total.get("accepted_tokens", 0.0) / drafts,
        "spec_decode_acceptance_rate_per_pos": [total.get(f"pos{k}", 0.0) / drafts for k in positions],
        "spec_decode_num_drafts": drafts,
        "spec_decode_num_draft_tokens": total.get("draft_tokens", 0.0),
        "spec_decode_num_accepted_tokens": total.get("accepted_tokens", 0.0),
    }
