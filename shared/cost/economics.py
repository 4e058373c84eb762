"""Cost, theoretical revenue and margin, the way DeepSeek published its day (shared/cost/README.md).

Pure arithmetic on token counts and GPU time: `streamoe cost` feeds it the services' counters,
the load generator feeds it one run's counts. Each worker rank counts as one GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

GPU_HOUR_USD = 2.0  # DeepSeek's H800 rental assumption
PRICES_PER_MILLION = (0.14, 0.55, 2.19)  # R1: input cache hit, input cache miss, output (USD per 1M tokens)
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class TokenCounts:
    input_cache_hit: int = 0
    input_cache_miss: int = 0
    output: int = 0

    @property
    def input(self) -> int:
        return self.input_cache_hit + self.input_cache_miss


def report(tokens: TokenCounts, gpu_seconds: float, gpu_hour_usd: float = GPU_HOUR_USD,
           prices: tuple[float, float, float] = PRICES_PER_MILLION, gpus_per_node: int = GPUS_PER_NODE) -> dict:
    """The figures of shared/cost/README.md as a flat dict (USD; margin in percent of cost)."""
    hit, miss, out = prices
    gpu_hours = gpu_seconds / 3600.0
    cost = gpu_hours * gpu_hour_usd
    revenue = (tokens.input_cache_hit * hit + tokens.input_cache_miss * miss + tokens.output * out) / 1e6
    return {
        "input_cache_hit_tokens": tokens.input_cache_hit,
        "input_cache_miss_tokens": tokens.input_cache_miss,
        "output_tokens": tokens.output,
        "cache_hit_rate": tokens.input_cache_hit / tokens.input if tokens.input else 0.0,
        "gpu_hours": gpu_hours,
        "node_hours": gpu_hours / gpus_per_node,
        "gpu_hour_usd": gpu_hour_usd,
        "prices_per_million_usd": list(prices),
        "cost_usd": cost,
        "revenue_usd": revenue,
        "margin_pct": (revenue - cost) / cost * 100.0 if cost > 0 else None,
    }
