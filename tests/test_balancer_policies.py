"""Prefill and decode balancer policies: exact choices on small cases, and balance at scale."""
from __future__ import annotations

import random

import pytest

from services.balancer.policies import (
    DecodeLoad,
    PrefillLoad,
    attention_compute,
    choose_decode_rank,
    choose_prefill_rank,
)


def test_prefill_prefers_the_rank_with_least_attention_compute():
    loads = [PrefillLoad(0, attention_compute(2048, 0), 2048), PrefillLoad(1, attention_compute(512, 0), 512)]
    assert choose_prefill_rank(loads, 1024) == 1


def test_prefill_counts_cached_prefix_in_compute_not_tokens():
    # rank 0: many short prompts (few tokens of compute each); rank 1: one long-context prompt
    loads = [PrefillLoad(0, attention_compute(100, 0) * 10, 1000), PrefillLoad(1, attention_compute(100, 3900), 100)]
    assert choose_prefill_rank(loads, 100, cached_tokens=0) == 1  # balances tokens; compute stays shared
    assert choose_prefill_rank(loads, 100, cached_tokens=3900) == 0  # a long context goes where compute is low


def test_prefill_ties_go_to_the_lowest_rank():
    loads = [PrefillLoad(r, 0.0, 0) for r in (2, 0, 1)]
    assert choose_prefill_rank(loads, 64) == 0
    with pytest.raises(LookupError):
        choose_prefill_rank([], 64)


def test_prefill_balances_a_random_stream():
    rng = random.Random(0)
    compute = {r: 0.0 for r in range(4)}
    tokens = {r: 0 for r in range(4)}
    for _ in range(400):
        new, cached = rng.randint(64, 2048), rng.choice([0, 0, 1024, 3072])
        rank = choose_prefill_rank([PrefillLoad(r, compute[r], tokens[r]) for r in compute], new, cached)
        compute[rank] += attention_compute(new, cached)
        tokens[rank] += new
    mean_c, mean_t = sum(compute.values()) / 4, sum(tokens.values()) / 4
    assert max(compute.values()) / mean_c < 1.05 and max(tokens.values()) / mean_t < 1.1


def test_decode_only_ranks_with_room_for_the_whole_span():
    loads = [DecodeLoad(0, 90, 100, 3, 64), DecodeLoad(1, 50, 100, 10, 64), DecodeLoad(2, 10, 100, 63, 64)]
    assert choose_decode_rank(loads, 20) == 1  # rank 0 lacks room
    assert choose_decode_rank(loads, 60) == 2
    assert choose_decode_rank(loads, 95) is None
    full = [DecodeLoad(0, 0, 100, 64, 64)]
    assert choose_decode_rank(full, 1) is None  # no sequence slot


def test_decode_balances_kv_and_request_count():
    loads = [DecodeLoad(0, 40, 100, 10, 64), DecodeLoad(1, 40, 100, 30, 64)]
    assert choose_decode_rank(loads, 5) == 0  # same KV use, fewer requests
    loads = [DecodeLoad(0, 70, 100, 10, 64), DecodeLoad(1, 20, 100, 10, 64)]
    assert choose_decode_rank(loads, 5) == 1  # same requests, less KV
