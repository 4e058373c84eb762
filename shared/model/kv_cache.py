"""The latent KV pool, and the per-step plan of which rows each sequence's attention reads.

Only the MLA latent is cached (no per-head keys or values). Who owns which slot is decided
elsewhere (the engine's block manager); the pool only holds the tensor.

The read plan is built once per step on the host from Python ints and a [S, W] table of each
sequence's rows (the pool slot of every position, or without a cache the step's own rows), so the
forward never reads a device value back. Legend: S = sequences, t / L = longest query / context of a padded bucket.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from functools import cached_property

import torch

from shared.model.config import ModelArgs

# A decode bucket gathers at most about this many latent rows (one sequence longer than that goes
# alone): the gather then stays in the CPU's caches until the attention reads it. 64 sequences of
# 267 tokens (small preset, bf16, 2 threads) took 2.3 ms a layer in one bucket, 1.7-1.8 in 2-4.
DECODE_BUCKET_ROWS = 8192
# A decode bucket's padded rows may be this many times its sequences' own: sequences are sorted by
# length, so a step's decodes fall into a few buckets, each one SDPA call.
DECODE_PADDING = 1.25
# A prefill bucket may cost this many times the attention of its sequences one by one. Measured on
# the CPU (2 threads, small preset, 8-12 sequences of 64-512 new tokens, some with cached prefixes),
# any padding costs more than another SDPA call: sequences are batched only where their padded
# layout costs nothing (same query and context lengths). A GPU, where a call costs more, may want more.
MAX_PADDING = 1.0


class LatentKVPool:
    def __init__(self, args: ModelArgs, num_slots: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.num_slots = num_slots
        # the main layers', then the MTP layer's (its own paged latent KV, in the same blocks)
        self.kv = torch.zeros(args.num_kv_layers, num_slots, args.kv_cache_dim, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
        return args.num_kv_layers * args.kv_cache_dim * dtype.itemsize

    def store(self, layer: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """slots [T], kv [T, C+R]."""
        self.kv[layer].index_copy_(0, slots, kv.to(self.kv.dtype))

    def load(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """slots [L] -> [L, C+R]."""
        return self.kv[layer].index_select(0, slots)

    def layer_rows(self, layer: int) -> torch.Tensor:
        """Every slot's row of a layer [slots, C+R], in place (kernels that read by slot)."""
        return self.kv[layer]


@dataclass
class DecodeBucket:
    """Single-token absorbed sequences attended in one call: the H heads of each query are H
    queries of one latent head, against the sequence's context padded to L rows."""

    num_seqs: int
    max_context: int
    rows: torch.Tensor  # [S] the sequences' token rows in the step
    slots: torch.Tensor  # [S * L] context rows to read, sequence by sequence; padding repeats the last
    mask: torch.Tensor | None  # [S, 1, 1, L] bool, True on real keys; None: no padding
    lengths: torch.Tensor  # [S] int64 real keys of each sequence


@dataclass
class PaddedBucket:
    """Sequences of one attention path attended in one call, queries padded to t and contexts to L."""

    is_absorbed: bool
    num_seqs: int
    max_query: int
    max_context: int
    token_rows: torch.Tensor  # [Tg] the bucket's token rows in the step, sequence by sequence
    query_rows: torch.Tensor  # [S * t] token row of each padded query; padding repeats a real one
    query_pos: torch.Tensor | None  # [Tg] each token's place among the padded queries; None: no padding
    context_rows: torch.Tensor  # [sum L] every sequence's context rows, packed
    context_pos: torch.Tensor | None  # [S * L] packed context index of each padded key; None: no padding
    mask: torch.Tensor | None  # [S, 1, t, L] bool, True where a query may see a key; None: plain causal


@dataclass
class ReadPlan:
    """Everything the attention of one step indexes with, built once and shared by every layer."""

    is_cached: bool  # rows are pool slots; else rows of the step's own new KV
    decode: list[DecodeBucket] = field(default_factory=list)
    padded: list[PaddedBucket] = field(default_factory=list)

    def to(self, device: torch.device) -> ReadPlan:
        """The plan with its tensors on `device`: from pinned memory without blocking on CUDA."""
        def move(part):
            return replace(part, **{f.name: to_device(getattr(part, f.name), device) for f in fields(part)
                                    if isinstance(getattr(part, f.name), torch.Tensor)})

        return ReadPlan(self.is_cached, [move(b) for b in self.decode], [move(b) for b in self.padded])

    @cached_property
    def decode_in_one(self) -> DecodeBucket | None:
        """Every decode bucket of the step as one, each context padded (repeating its last row) to the
        longest, its sequences in the order of their token rows: for the native decode attention,
        which reads each sequence's own length and gathers nothing, so one call serves the whole
        step. Built on the first use, shared by every layer."""
        if not self.decode:
            return None
        if len(self.decode) == 1:  # one bucket already in row order (one sequence, or equal contexts): itself
            only = self.decode[0]
            if only.num_seqs == 1 or torch.equal(only.rows, torch.arange(only.num_seqs, device=only.rows.device)):
                return only
        length = max(b.max_context for b in self.decode)
        slots = [b.slots.view(b.num_seqs, b.max_context) for b in self.decode]
        slots = torch.cat([torch.cat([s, s[:, -1:].expand(s.shape[0], length - s.shape[1])], dim=1) for s in slots])
        rows, lengths = torch.cat([b.rows for b in self.decode]), torch.cat([b.lengths for b in self.decode])
        rows, order = rows.sort()
        slots, lengths = slots[order], lengths[order]
        mask = (torch.arange(length) < lengths[:, None])[:, None, None]
        return DecodeBucket(len(rows), length, rows, slots.flatten(), mask, lengths)

    @cached_property
    def decodes_only(self) -> bool:
        """Whether every token row of the step is a decode, in row order in `decode_in_one` (its
        outputs are the step's, with no index copy)."""
        one = self.decode_in_one
        return (not self.padded and one is not None
                and bool(torch.equal(one.rows, torch.arange(one.num_seqs, device=one.rows.device))))


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor onto `device`; for CUDA pinned first, so the copy is queued, not waited for."""
    device = torch.device(device)
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def plan_reads(query_lens: list[int], context_lens: list[int], absorbed: list[bool], rows: torch.Tensor | None,
               max_padding: float = MAX_PADDING, decode_rows: int = DECODE_BUCKET_ROWS) -> ReadPlan:
    """The read plan of a ragged step, on the CPU. `rows` [S, W] (W >= every context length) holds
    the pool slot of each sequence's positions; None without a cache (each sequence then attends
    to its own new tokens). Single-token absorbed sequences with a cache are decoded in buckets of
    about `decode_rows` context rows at most; the others go in buckets of one path, each bucket
    costing at most `max_padding` times its sequences' own attention."""
    if decode_rows < 1:
        raise ValueError(f"decode_rows={decode_rows}: must be >= 1")
    plan = ReadPlan(is_cached=rows is not None)
    if not query_lens:
        return plan
    q_lens = torch.tensor(query_lens)
    token_start = q_lens.cumsum(0) - q_lens  # [S] first step row of each sequence
    if rows is None:
        if query_lens != context_lens:
            raise ValueError("attention without a cache needs context_len == query_len")
        rows = token_start[:, None] + torch.arange(max(query_lens))
    decode, paths = [], {False: [], True: []}
    for i, (q, a) in enumerate(zip(query_lens, absorbed)):
        (decode if plan.is_cached and q == 1 and a else paths[a]).append(i)
    for bucket in _decode_buckets(decode, context_lens, decode_rows):
        plan.decode.append(_decode_bucket(bucket, context_lens, token_start, rows))
    for is_absorbed, members in paths.items():
        for bucket in _buckets(members, query_lens, context_lens, max_padding):
            plan.padded.append(_padded_bucket(is_absorbed, bucket, query_lens, context_lens, token_start, rows))
    return plan


def _buckets(members: list[int], query_lens: list[int], context_lens: list[int], max_padding: float) -> list[list[int]]:
    """Sequences in buckets whose padded attention costs at most `max_padding` times what they cost
    one by one: longest contexts first, a bucket closes when the next sequence would not fit."""
    def cost(t: int, length: int) -> int:  # query-key pairs SDPA computes: causal skips the upper triangle
        return t * (t + 1) // 2 if t == length else t * length

    buckets: list[tuple[list[int], int, int, bool]] = []  # members, longest query, own cost, all causal
    for i in sorted(members, key=lambda i: (-context_lens[i], -query_lens[i])):
        t, length = query_lens[i], context_lens[i]
        if buckets:
            bucket, longest_t, own, is_causal = buckets[-1]
            longest_t, own, is_causal = max(longest_t, t), own + cost(t, length), is_causal and t == length
            padded = (len(bucket) + 1) * cost(longest_t, longest_t if is_causal else context_lens[bucket[0]])
            if padded <= max_padding * own:
                buckets[-1] = (bucket + [i], longest_t, own, is_causal)
                continue
        buckets.append(([i], t, cost(t, length), t == length))
    return [bucket for bucket, *_ in buckets]


def _decode_buckets(members: list[int], context_lens: list[int], max_rows: int) -> list[list[int]]:
    """Decodes, longest context first, in buckets of at most `max_rows` padded rows (a longer
    sequence alone) padded to at most DECODE_PADDING times their own rows."""
    buckets: list[tuple[list[int], int]] = []  # members, own rows
    for i in sorted(members, key=lambda i: -context_lens[i]):
        if buckets:
            bucket, own = buckets[-1]
            padded = (len(bucket) + 1) * context_lens[bucket[0]]
            if padded <= max_rows and padded <= DECODE_PADDING * (own + context_lens[i]):
                buckets[-1] = (bucket + [i], own + context_lens[i])
                continue
        buckets.append(([i], context_lens[i]))
    return [bucket for bucket, _ in buckets]


def _ranges(lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ranges of `lens` [S] laid end to end: each element's range and index within it, [sum]."""
    owner = torch.repeat_interleave(torch.arange(len(lens)), lens)
    return owner, torch.arange(len(owner)) - (lens.cumsum(0) - lens)[owner]


def _decode_bucket(members: list[int], context_lens: list[int], token_start: torch.Tensor,
                  rows: torch.Tensor) -> DecodeBucket:
    lens = [context_lens[i] for i in members]
    seqs, seq_lens, keys = torch.tensor(members), torch.tensor(lens), torch.arange(lens[0])
    last = seq_lens[:, None] - 1
    slots = rows[seqs[:, None], torch.minimum(keys, last)]  # [S, L]
    mask = None if lens[-1] == lens[0] else (keys <= last)[:, None, None]
    return DecodeBucket(len(members), lens[0], token_start[seqs], slots.flatten(), mask, seq_lens)


def _padded_bucket(is_absorbed: bool, members: list[int], query_lens: list[int], context_lens: list[int],
                  token_start: torch.Tensor, rows: torch.Tensor) -> PaddedBucket:
    q_list, c_list = [query_lens[i] for i in members], [context_lens[i] for i in members]
    max_q, max_c = max(q_list), max(c_list)
    seqs, q_lens, c_lens = torch.tensor(members), torch.tensor(q_list), torch.tensor(c_list)
    starts = token_start[seqs]
    owner, within = _ranges(q_lens)
    queries, keys = torch.arange(max_q), torch.arange(max_c)
    query_rows = starts[:, None] + torch.minimum(queries, q_lens[:, None] - 1)  # [S, t]
    ctx_owner, ctx_within = _ranges(c_lens)
    context_pos = (c_lens.cumsum(0) - c_lens)[:, None] + torch.minimum(keys, c_lens[:, None] - 1)  # [S, L]
    # Query i of a sequence sees keys up to (L - t) + i: padding keys only ever reach padding queries,
    # whose outputs are dropped, so no row is empty. Without a cached prefix that is plain causal.
    mask = None if q_list == c_list else (keys <= (c_lens - q_lens)[:, None, None] + queries[:, None])[:, None]
    return PaddedBucket(
        is_absorbed=is_absorbed, num_seqs=len(members), max_query=max_q, max_context=max_c,
        token_rows=starts[owner] + within, query_rows=query_rows.flatten(),
        query_pos=None if min(q_list) == max_q else owner * max_q + within,
        context_rows=rows[seqs[ctx_owner], ctx_within],
        context_pos=None if min(c_list) == max_c else context_pos.flatten(), mask=mask)
