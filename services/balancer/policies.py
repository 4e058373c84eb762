"""The prefill and decode balancers of DeepSeek's system, as pure functions (no Redis, no torch).

- prefill LB: requests differ in length and cached prefix, so ranks get uneven core-attention
  compute (Σ new × (cached + new)) and uneven dispatch send load (input tokens). Pick the rank
  that keeps the largest share of both lowest after this request lands.
- decode LB: core-attention compute follows KV usage, dispatch load follows request count. Only
  ranks with room for the request's whole span (prompt + max_tokens, reserved at admission) are
  eligible; among them, the one left least loaded on both counts.
"""
from __future__ import annotations

from dataclasses import dataclass

from shared.protocol.messages import attention_compute


@dataclass(frozen=True)
class PrefillLoad:
    rank: int
    pending_compute: float  # Σ new × (cached + new) over the rank's queued and running prefills
    pending_tokens: int  # Σ new input tokens over the same


@dataclass(frozen=True)
class DecodeLoad:
    rank: int
    kv_blocks_used: int  # including blocks reserved for admitted requests
    kv_blocks_total: int
    running: int
    max_running: int


def choose_prefill_rank(loads: list[PrefillLoad], new_tokens: int, cached_tokens: int = 0) -> int:
    """The live prefill rank for a request of `new_tokens` uncached and `cached_tokens` cached tokens."""
    if not loads:
        raise LookupError("no live prefill rank")
    work = attention_compute(new_tokens, cached_tokens)
    total_compute = sum(l.pending_compute for l in loads) + work
    total_tokens = sum(l.pending_tokens for l in loads) + new_tokens

    def cost(candidate: PrefillLoad) -> tuple[float, int, int]:
        compute = max(l.pending_compute + (work if l is candidate else 0) for l in loads)
        tokens = max(l.pending_tokens + (new_tokens if l is candidate else 0) for l in loads)
        share = compute / total_compute + tokens / total_tokens
        return share, candidate.pending_tokens, candidate.rank

    return min(loads, key=cost).rank


def choose_decode_rank(loads: list[DecodeLoad], reserve_blocks: int) -> int | None:
    """The decode rank that takes a request needing `reserve_blocks` KV blocks; None when no rank
    has room (the request waits, or the gateway answers 429)."""
    fits = [l for l in loads if l.kv_blocks_total - l.kv_blocks_used >= reserve_blocks and l.running < l.max_running]
    if not fits:
        return None

    def cost(l: DecodeLoad) -> tuple[float, int]:
        return (l.kv_blocks_used + reserve_blocks) / l.kv_blocks_total + (l.running + 1) / l.max_running, l.rank

    return min(fits, key=cost).rank
