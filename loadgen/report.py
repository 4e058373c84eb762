"""A run's result dict (the keys `vllm bench serve` writes, then ours) and its summary table.

NOTE: the key names are read by other programs (loadgen/README.md, "The load generator contract"): change none of them.
"""
from __future__ import annotations

import math
import time
from collections import Counter

import numpy as np

from shared.cost.economics import GPU_HOUR_USD, PRICES_PER_MILLION, TokenCounts
from shared.cost.economics import report as economics_report
from shared.planner import slo as slo_syntax

from .client import Result
from .runner import Run
from .workloads import Workload, cache_hit_rate_max

METRICS = {"ttft": "Time to first token", "tpot": "Time per output token (after the first)",
           "itl": "Inter-token latency", "e2el": "End-to-end latency"}
PERCENTILES = (90, 99)


def parse_slo(items: list[str] | str | None) -> dict[str, float]:
    """`["ttft:200", "itl:50"]` (or "ttft:200,itl:50") -> {"ttft": 200.0, "itl": 50.0}, in
    milliseconds, through the one SLO syntax (shared/planner/slo.py); none given: its default."""
    return slo_syntax.parse_slo(items).items()


def latency_stats(name: str, values_s: list[float]) -> dict[str, float]:
    """mean/median/std/p90/p99 of `values_s`, in milliseconds (0 when there are none, as vllm)."""
    ms = np.asarray(values_s, dtype=float) * 1000.0
    if ms.size == 0:
        ms = np.zeros(1)
    stats = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
             f"std_{name}_ms": float(ms.std())}
    stats.update({f"p{p}_{name}_ms": float(np.percentile(ms, p)) for p in PERCENTILES})
    return stats


def latencies(results: list[Result]) -> dict[str, list[float]]:
    """Seconds, per metric, over completed requests; ITL pools every request's gaps."""
    done = [r for r in results if r.ok]
    return {"ttft": [r.ttft_s for r in done], "tpot": [r.tpot_s for r in done if r.tpot_s is not None],
            "itl": [gap for r in done for gap in r.itl_s], "e2el": [r.e2el_s for r in done]}


def meets_slo(result: Result, slo: dict[str, float]) -> bool:
    """Every metric of `slo` met by this request; its ITL is its worst gap between two tokens."""
    values = {"ttft": result.ttft_s, "tpot": result.tpot_s, "e2el": result.e2el_s,
              "itl": max(result.itl_s) if result.itl_s else None}
    return result.ok and all(values[k] is None or values[k] * 1000.0 <= ms for k, ms in slo.items())


def build(run: Run, workload: Workload, *, flags: dict, slo: dict[str, float] | None = None, num_gpus: int = 2,
          gpu_hour_usd: float = GPU_HOUR_USD, save_requests: bool = False) -> dict:
    """The result dict that `--out` writes."""
    done = [r for r in run.results if r.ok]
    duration = run.duration_s
    total_in, total_out = sum(r.prompt_tokens for r in done), sum(r.completion_tokens for r in done)
    hit = sum(r.cached_tokens for r in done)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    rate = flags.get("rate", math.inf)
    result = {
        "date": time.strftime("%Y%m%d-%H%M%S"),
        "model_id": flags.get("model"),
        "workload": workload.name,
        "num_requests": workload.num_requests,
        "request_rate": "inf" if math.isinf(rate) else rate,
        "burstiness": flags.get("burstiness"),
        "max_concurrency": flags.get("max_concurrency"),
        "duration": duration,
        "completed": len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(total_out),
        "total_token_throughput": per_s(total_in + total_out),
        "request_goodput": per_s(sum(meets_slo(r, slo) for r in done)) if slo else None,
    }
    for name, values in latencies(run.results).items():
        result.update(latency_stats(name, values))
    errors = Counter(r.error for r in run.results if not r.ok)
    if run.num_skipped:
        errors["skipped"] = run.num_skipped  # turns after a failed one: never sent, so not in "failed"
    result.update({
        "cache_hit_rate": hit / total_in if total_in else 0.0,
        "cache_hit_rate_max": cache_hit_rate_max([c.usages for c in workload.conversations])
        if workload.name == "multi-turn" else None,
        "errors": {**{str(k): v for k, v in sorted(errors.items(), key=lambda kv: str(kv[0]))},
                   "failed": len(run.results) - len(done)},
        "economics": economics_report(TokenCounts(hit, total_in - hit, total_out), duration * num_gpus,
                                      gpu_hour_usd, PRICES_PER_MILLION),
        "slo_ms": slo or None,
        "flags": {key: _plain(value) for key, value in flags.items()},
    })
    if run.spec_decode:  # only when the server has speculation's counters and drafted during the run
        result.update(run.spec_decode)
    if save_requests:
        result["requests"] = [record(r) for r in run.results]
    return result


def _plain(value):
    """A flag's value as strict JSON can hold it (inf -> "inf", paths -> str)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str, dict)) else str(value)


def record(r: Result) -> dict:
    def ms(s: float | None) -> float | None:
        return None if s is None else s * 1000.0

    return {"start_s": r.start_s, "output_len": r.output_len, "error": r.error, "message": r.message or None,
            "ttft_ms": ms(r.ttft_s), "tpot_ms": ms(r.tpot_s), "e2el_ms": ms(r.e2el_s),
            "itl_ms": [gap * 1000.0 for gap in r.itl_s], "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens, "cached_tokens": r.cached_tokens, "text": r.text}


def summary(result: dict) -> str:
    """The table printed after a run, laid out as `vllm bench serve`'s."""
    lines = ["{s:{c}^50}".format(s=" streamoe load test result ", c="=")]
    def row(label: str, value) -> None:
        lines.append(f"{label:<40} {value:<10}")

    row("Workload:", result["workload"])
    row("Successful requests:", result["completed"])
    row("Failed requests:", result["errors"]["failed"])
    for code, count in result["errors"].items():
        if code != "failed":
            row(f"  {code}:", count)
    row("Run duration (s):", f"{result['duration']:.2f}")
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", f"{result['request_throughput']:.2f}")
    if result["request_goodput"] is not None:
        row("Request goodput (req/s):", f"{result['request_goodput']:.2f}")
    row("Output token throughput (tok/s):", f"{result['output_throughput']:.2f}")
    row("Total token throughput (tok/s):", f"{result['total_token_throughput']:.2f}")
    row("Prompt cache hit rate:", f"{result['cache_hit_rate']:.2%}")
    if "spec_decode_acceptance_rate" in result:
        row("Draft acceptance rate:", f"{result['spec_decode_acceptance_rate']:.2%}")
        row("Mean acceptance length:", f"{result['spec_decode_mean_acceptance_length']:.2f}")
        row("Per-position acceptance rate:",
            ", ".join(f"{r:.2f}" for r in result["spec_decode_acceptance_rate_per_pos"]))
    if result["cache_hit_rate_max"] is not None:
        row("Prompt cache hit rate, best possible:", f"{result['cache_hit_rate_max']:.2%}")
    for name, title in METRICS.items():
        lines.append("{s:{c}^50}".format(s=f" {title} ", c="-"))
        short = name.upper().replace("E2EL", "E2E latency")
        row(f"Mean {short} (ms):", f"{result[f'mean_{name}_ms']:.2f}")
        row(f"Median {short} (ms):", f"{result[f'median_{name}_ms']:.2f}")
        for p in PERCENTILES:
            row(f"P{p} {short} (ms):", f"{result[f'p{p}_{name}_ms']:.2f}")
    econ = result["economics"]
    lines.append("{s:{c}^50}".format(s=" Economics (shared/cost/README.md) ", c="-"))
    row("GPU-hours:", f"{econ['gpu_hours']:.6f}")
    row("Cost (USD):", f"{econ['cost_usd']:.6f}")
    row("Theoretical revenue (USD):", f"{econ['revenue_usd']:.6f}")
    row("Margin (% of cost):", "n/a" if econ["margin_pct"] is None else f"{econ['margin_pct']:.1f}")
    lines.append("=" * 50)
    return "\n".join(lines)
