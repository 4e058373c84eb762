"""Multi-head Latent Attention (MLA) with its two paths behind one interface.

Legend: T = tokens in the step (all sequences packed, no padding), t = one sequence's new tokens,
L = that sequence's context (cached + new), H = heads, C = kv_lora_rank, R = qk_rope_head_dim,
N = qk_nope_head_dim, V = v_head_dim, S = sequences of a padded bucket (queries padded to t, contexts
to L), W = a padded head width.

- expanded path: up-project the cached latent into per-head keys/values, then attend (prefill).
- absorbed path: fold W_UK into the query and W_UV into the output, so attention reads the
  latent cache directly as one shared key of C+R channels and value of C channels (decode).
Both give the same result up to rounding; `AttentionBatch.absorbed` picks one per sequence.

A step's single-token absorbed decodes go through one fused SDPA call per bucket of similar context
lengths (each bucket's paged contexts gathered once, a few thousand rows, see
`kv_cache.DECODE_BUCKET_ROWS`); the other sequences through one SDPA call per bucket of a path (by
default the sequences of one shape, see `kv_cache.MAX_PADDING`). The
indices come from the step's `ReadPlan`, so the per-layer work reads no device value on the host.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from shared.model import native
from shared.model.config import ModelArgs
from shared.model.kv_cache import DecodeBucket, PaddedBucket, ReadPlan, plan_reads
from shared.model.norm import RMSNorm
from shared.model.rope import apply_rotary


class LatentCache(Protocol):
    """Where a layer's latent KV lives: one row of C+R values per token slot."""

    def store(self, layer: int, slots: torch.Tensor, kv: torch.Tensor) -> None: ...

    def load(self, layer: int, slots: torch.Tensor) -> torch.Tensor: ...

    def layer_rows(self, layer: int) -> torch.Tensor: ...


@dataclass
class AttentionBatch:
    """A ragged step: sequence i owns tokens [starts[i], starts[i] + query_lens[i]) of the step.

    `plan` holds the step's index tensors. Left out, it is built here from `context_slots` (the
    slots each sequence attends to, read through the cache) or, without them, for a step without a
    cache; the engine builds it itself, on the host, and moves it to the device without waiting."""

    query_lens: list[int]  # new tokens of each sequence
    context_lens: list[int]  # tokens each sequence attends to after this step (cached + new)
    absorbed: list[bool]  # per sequence: absorbed (latent) path, else expanded
    slot_mapping: torch.Tensor | None = None  # [T] cache slot of each new token
    context_slots: list[torch.Tensor] | None = None  # per sequence [L] slots of its whole context
    plan: ReadPlan | None = field(default=None, repr=False)

    @classmethod
    def prefill(cls, query_lens: list[int], absorbed: bool = False,
                device: torch.device | str = "cpu") -> AttentionBatch:
        """Sequences with no cached prefix, attended without a cache."""
        lens, paths = list(query_lens), [absorbed] * len(query_lens)
        return cls(lens, lens, paths, plan=plan_reads(lens, lens, paths, None).to(torch.device(device)))

    def __post_init__(self) -> None:
        if not (len(self.query_lens) == len(self.context_lens) == len(self.absorbed)):
            raise ValueError("AttentionBatch: query_lens, context_lens and absorbed differ in length")
        for q, c in zip(self.query_lens, self.context_lens):
            if q < 1 or c < q:
                raise ValueError(f"AttentionBatch: query_len={q}, context_len={c} (need 1 <= query_len <= context_len)")
        if self.plan is not None:
            return
        if self.context_slots is None:
            self.plan = plan_reads(self.query_lens, self.context_lens, self.absorbed, None)
            return
        if [len(s) for s in self.context_slots] != self.context_lens:
            raise ValueError("AttentionBatch: context_slots do not match context_lens")
        if not self.context_slots:
            self.plan = ReadPlan(is_cached=True)
            return
        rows = pad_sequence([s.cpu() for s in self.context_slots], batch_first=True)  # [S, L] slot of each position
        plan = plan_reads(self.query_lens, self.context_lens, self.absorbed, rows)
        self.plan = plan.to(self.context_slots[0].device)


def choose_absorbed(args: ModelArgs, query_len: int, context_len: int) -> bool:
    """The cheaper path in multiply-adds: expanding L latents vs absorbing t queries."""
    h, c, r = args.num_attention_heads, args.kv_lora_rank, args.qk_rope_head_dim
    n, v = args.qk_nope_head_dim, args.v_head_dim
    expanded = context_len * c * h * (n + v) + query_len * context_len * h * (n + r + v)
    absorbed = query_len * h * c * (n + v) + query_len * context_len * h * (2 * c + r)
    return absorbed <= expanded


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = args.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        self.scale = args.softmax_scale
        self.interleave = args.rope.interleave
        h, d, bias = args.num_attention_heads, args.hidden_size, args.attention_bias
        if args.q_lora_rank is None:
            self.q_proj = native.Linear(d, h * args.qk_head_dim, bias=False)
        else:
            self.q_a_proj = native.Linear(d, args.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
            self.q_b_proj = native.Linear(args.q_lora_rank, h * args.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = native.Linear(d, args.kv_lora_rank + args.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, args.rms_norm_eps)
        self.kv_b_proj = native.Linear(args.kv_lora_rank, h * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.o_proj = native.Linear(h * args.v_head_dim, d, bias=bias)
        # the model's MoE plan where it has `native`: at its token counts the decodes read the cache in place
        self.native_plan = None

    # -- projections (the decode pipeline's ATTN-0) ---------------------------------------------
    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> q_nope [T, H, N], q_pe [T, H, R] (rotated)."""
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(x.shape[0], self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        if self._native_rows(q):  # the same rotation in one call
            return q_nope, native.rope(q_pe, cos, sin, self.interleave)
        return q_nope, apply_rotary(q_pe, cos, sin, self.interleave)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> the cache rows [T, C+R]: normalised latent, then the rotated shared key."""
        kv = self.kv_a_proj_with_mqa(x)
        if self._native_rows(kv):  # the same norm and rotation in one call
            return native.kv_rows(kv, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, cos, sin, self.interleave)
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return torch.cat([self.kv_a_layernorm(latent), apply_rotary(k_pe, cos, sin, self.interleave)], dim=-1)

    def _native_rows(self, x: torch.Tensor) -> bool:
        """Whether the model's plan computes these rows with the native kernels (CPU bf16, a `native` count)."""
        return (self.native_plan is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu"
                and x.shape[0] <= native.NORM_ROWS and self.native_plan.choose(x.shape[0]) == "native")

    # -- core attention and output (ATTN-1) -----------------------------------------------------
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch,
                cache: LatentCache | None = None) -> torch.Tensor:
        """x [T, D] -> [T, D]. With a cache the new rows are stored first, then each sequence
        attends to its `context_slots`; without one each sequence attends to its own new tokens."""
        if cache is not None and batch.plan.decodes_only and batch.plan.is_cached and self._native_rows(x):
            out = self._decode_native(x, cos, sin, batch, cache)
            if out is not None:
                return out
        q_nope, q_pe = self.project_q(x, cos, sin)
        kv = self.project_kv(x, cos, sin)  # [T, C+R]
        if cache is not None and self._native_rows(kv) and cache.layer_rows(self.layer).dtype == kv.dtype:
            native.store_rows(cache.layer_rows(self.layer), batch.slot_mapping, kv)  # cache.store, in one call
        elif cache is not None:
            cache.store(self.layer, batch.slot_mapping, kv)
        return self.attend(q_nope, q_pe, kv, batch, cache)

    def attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, batch: AttentionBatch,
               cache: LatentCache | None) -> torch.Tensor:
        """q_nope [T, H, N], q_pe [T, H, R], the step's new cache rows kv [T, C+R] -> [T, D]. Reads the
        contexts through `cache` when the plan indexes pool slots, else from `kv` itself."""
        plan = batch.plan
        if plan.is_cached and cache is None:
            raise ValueError("this batch attends to cached contexts: it needs a cache")

        def read(rows: torch.Tensor) -> torch.Tensor:
            return cache.load(self.layer, rows) if plan.is_cached else kv.index_select(0, rows)

        # the decodes read their contexts in place on any native plan, at every token count: the kernel
        # beats the gathered SDPA at 1 to 64 sequences (loadgen.bench_attention), whatever runs the experts
        in_place = (self.native_plan is not None and q_nope.device.type == "cpu" and q_nope.dtype == torch.bfloat16)
        rows = (cache.layer_rows(self.layer) if plan.is_cached else kv) if in_place else None
        if in_place and plan.decodes_only:  # every row a decode, in row order: no copy in or out
            out = self._decode_in_place(q_nope, q_pe, plan.decode_in_one, rows, every_row=True)
            return self.o_proj(out.view(out.shape[0], -1))
        out = q_nope.new_empty(q_nope.shape[0], self.num_heads, self.v_dim)  # [T, H, V]
        if in_place and plan.decode:  # one call for every decode of the step (ReadPlan.decode_in_one)
            bucket = plan.decode_in_one
            out.index_copy_(0, bucket.rows, self._decode_in_place(q_nope, q_pe, bucket, rows))
        for bucket in [] if in_place else plan.decode:
            out.index_copy_(0, bucket.rows, self._decode(q_nope, q_pe, bucket, read))
        for bucket in plan.padded:
            path = self._absorbed if bucket.is_absorbed else self._expanded
            out.index_copy_(0, bucket.token_rows, path(q_nope, q_pe, bucket, read))
        return self.o_proj(out.view(out.shape[0], -1))

    def _decode_native(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch,
                       cache: LatentCache) -> torch.Tensor | None:
        """A step of single-token decodes on a native plan, from x to o_proj in one call (native.mla_decode:
        the same kernels in the same order as the path below); None where that call does not fit (biases,
        strided inputs, a cache layer of another dtype), and the path below runs."""
        pool = cache.layer_rows(self.layer)
        q_a = getattr(self, "q_a_proj", None)
        linears = [self.kv_a_proj_with_mqa, self.o_proj, *((q_a, self.q_b_proj) if q_a is not None else (self.q_proj,))]
        if (any(m.bias is not None or not m.weight.is_contiguous() for m in linears) or x.stride(1) != 1
                or pool.dtype != torch.bfloat16 or not pool.is_contiguous()):
            return None
        bucket = batch.plan.decode_in_one
        w_uk, w_uv = self._packed_w_b()
        slots = native.slot_indices(batch.slot_mapping)
        return native.mla_decode(
            x, None if q_a is None else q_a.weight, None if q_a is None else self.q_a_layernorm.weight,
            self.q_a_layernorm.eps if q_a is not None else 0.0, self.q_b_proj.weight if q_a is not None else
            self.q_proj.weight, self.num_heads, self.nope_dim, self.rope_dim, self.kv_a_proj_with_mqa.weight,
            self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, cos.contiguous(), sin.contiguous(), self.interleave,
            pool, slots, w_uk, w_uv, self.v_dim, bucket.slots.view(bucket.num_seqs, bucket.max_context),
            bucket.lengths, self.scale, self.o_proj.weight, native.library())

    def _w_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope_dim], w[:, self.nope_dim:]  # W_UK [H, N, C], W_UV [H, V, C]

    def _absorb_q(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """q_nope [n, H, N], q_pe [n, H, R] -> the latent-space query [n, H, C+R]."""
        q_latent = torch.bmm(q_nope.transpose(0, 1), self._w_b()[0]).transpose(0, 1)  # [n, H, C]
        return torch.cat([q_latent, q_pe], dim=-1)

    def _absorb_out(self, o_latent: torch.Tensor) -> torch.Tensor:
        """o_latent [n, H, C] -> [n, H, V] through W_UV, in o_latent's dtype."""
        w_uv = self._w_b()[1].to(o_latent.dtype)
        return torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    def _decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, bucket: DecodeBucket,
                 read: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The bucket's single-token queries -> [S, H, V]. Its H heads share the one latent key/value
        head, so they go to SDPA as H queries of one head: one fused call, whose scores and softmax
        statistics are fp32 and whose probabilities meet the latent in its dtype."""
        s, length = bucket.num_seqs, bucket.max_context
        q = self._absorb_q(q_nope.index_select(0, bucket.rows), q_pe.index_select(0, bucket.rows))  # [S, H, C+R]
        context = read(bucket.slots).view(s, 1, length, -1)  # [S, 1, L, C+R]: the latent is its own value
        out = F.scaled_dot_product_attention(q[:, None], context, context, attn_mask=bucket.mask, scale=self.scale)
        return self._absorb_out(out[:, 0, :, :self.kv_lora_rank])

    def _decode_in_place(self, q_nope: torch.Tensor, q_pe: torch.Tensor, bucket: DecodeBucket,
                         rows: torch.Tensor, every_row: bool = False) -> torch.Tensor:
        """`_decode` through the native kernels (native.py): the W_UK and W_UV products per head, and
        the attention reading each context's rows where they lie in `rows` (the cache layer, or the
        step's own rows), nothing gathered; scores, softmax and the weighted sum in fp32. With
        `every_row`, the bucket's rows are all of the step's, in order: the queries are read as they lie."""
        s, c = bucket.num_seqs, self.kv_lora_rank
        w_uk, w_uv = self._packed_w_b()
        q = q_nope.new_empty(s, self.num_heads, c + self.rope_dim)  # [S, H, C+R]
        if not every_row:
            q_nope, q_pe = q_nope.index_select(0, bucket.rows), q_pe.index_select(0, bucket.rows)
        native.heads(q_nope, w_uk, c, out=q[..., :c])
        q[..., c:] = q_pe
        slots = bucket.slots.view(s, bucket.max_context)
        latent = native.decode_attention(q, rows, slots, bucket.lengths, c, self.scale)  # [S, H, C]
        return native.heads(latent, w_uv, self.v_dim)  # [S, H, V]

    def _packed_w_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (its latent channels as outputs) and W_UV packed for native.heads: copies of kv_b_proj
        in that layout, made once, again only if the weight changes."""
        weight = self.kv_b_proj.weight
        key = (weight.data_ptr(), weight._version)
        if getattr(self, "_packed_key", None) != key:
            w_uk, w_uv = self._w_b()
            self._packed = native.pack_heads(w_uk.transpose(1, 2)), native.pack_heads(w_uv)
            self._packed_key = key
        return self._packed

    def _expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, bucket: PaddedBucket,
                  read: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The bucket's queries against per-head keys/values up-projected from its contexts -> [Tg, H, V].
        Keys and values are padded to one head width W so SDPA can take its fused kernels."""
        h, n, r, v = self.num_heads, self.nope_dim, self.rope_dim, self.v_dim
        width = max(n + r, v)
        latent, k_pe = read(bucket.context_rows).split([self.kv_lora_rank, r], dim=-1)  # [sum L, C], [sum L, R]
        length = latent.shape[0]
        k_nope, value = self.kv_b_proj(latent).view(length, h, n + v).split([n, v], dim=-1)
        pad = latent.new_zeros(())  # widens q and k with zeros (dot products unchanged), v with don't-cares
        keys_values = torch.cat([k_nope, k_pe[:, None].expand(length, h, r), pad.expand(length, h, width - n - r),
                                 value, pad.expand(length, h, width - v)], dim=-1)  # [sum L, H, 2W]
        q_rows = bucket.query_rows
        q = torch.cat([q_nope.index_select(0, q_rows), q_pe.index_select(0, q_rows),
                       pad.expand(len(q_rows), h, width - n - r)], dim=-1)  # [S*t, H, W]
        out = self._padded_sdpa(q, keys_values, bucket, width)  # [Tg, H, W]
        return out[..., :v]

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, bucket: PaddedBucket,
                  read: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The bucket's queries against its latent contexts, one key/value head shared by all -> [Tg, H, V]."""
        q_rows = bucket.query_rows
        q = self._absorb_q(q_nope.index_select(0, q_rows), q_pe.index_select(0, q_rows))  # [S*t, H, C+R]
        context = read(bucket.context_rows)[:, None]  # [sum L, 1, C+R]: the latent is its own value
        out = self._padded_sdpa(q, context, bucket, None)  # [Tg, H, C+R]
        return self._absorb_out(out[..., :self.kv_lora_rank])

    def _padded_sdpa(self, q: torch.Tensor, keys_values: torch.Tensor, bucket: PaddedBucket,
                     split: int | None) -> torch.Tensor:
        """q [S*t, H, W] against packed keys_values [sum L, Hk, *] (keys | values at `split`, or one
        tensor for both) -> [Tg, H, W]. SDPA's fused kernels keep the scores and softmax statistics in
        fp32 and meet the values with probabilities in the input dtype, as the decode does."""
        s, t, length = bucket.num_seqs, bucket.max_query, bucket.max_context
        if bucket.context_pos is not None:
            keys_values = keys_values.index_select(0, bucket.context_pos)  # [S*L, Hk, *]
        keys_values = keys_values.view(s, length, *keys_values.shape[1:]).transpose(1, 2)  # [S, Hk, L, *]
        keys, values = (keys_values, keys_values) if split is None else keys_values.split(split, dim=-1)
        out = F.scaled_dot_product_attention(
            q.view(s, t, *q.shape[1:]).transpose(1, 2), keys, values, attn_mask=bucket.mask,
            is_causal=bucket.mask is None, scale=self.scale, enable_gqa=keys.shape[1] != q.shape[1])  # [S, H, t, W]
        out = out.transpose(1, 2).reshape(s * t, out.shape[1], out.shape[3])
        return out if bucket.query_pos is None else out.index_select(0, bucket.query_pos)
