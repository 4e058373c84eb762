"""Multi-head Latent Attention (MLA) with its two paths behind one interface.

Legend: T = tokens in the step (all sequences packed, no padding), t = one sequence's new tokens,
L = that sequence's context (cached + new), H = heads, C = kv_lora_rank, R = qk_rope_head_dim,
N = qk_nope_head_dim, V = v_head_dim.

- expanded path: up-project the cached latent into per-head keys/values, then attend (prefill).
- absorbed path: fold W_UK into the query and W_UV into the output, so attention reads the
  latent cache directly as one shared key of C+R channels and value of C channels (decode).
Both give the same result up to rounding; `AttentionBatch.absorbed` picks one per sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .norm import RMSNorm
from .rope import apply_rotary


class LatentCache(Protocol):
    """Where a layer's latent KV lives: one row of C+R values per token slot."""

    def store(self, layer: int, slots: torch.Tensor, kv: torch.Tensor) -> None: ...

    def load(self, layer: int, slots: torch.Tensor) -> torch.Tensor: ...


@dataclass
class AttentionBatch:
    """A ragged step: sequence i owns tokens [starts[i], starts[i] + query_lens[i]) of the step."""

    query_lens: list[int]  # new tokens of each sequence
    context_lens: list[int]  # tokens each sequence attends to after this step (cached + new)
    absorbed: list[bool]  # per sequence: absorbed (latent) path, else expanded
    slot_mapping: torch.Tensor | None = None  # [T] cache slot of each new token
    context_slots: list[torch.Tensor] | None = None  # per sequence [L] slots of its whole context
    # Optional: single-token absorbed sequences attended together, contexts padded to one length.
    grouped: list[int] | None = None  # indices of those sequences (each has query_len 1)
    grouped_slots: torch.Tensor | None = None  # [B, Lmax] their context slots, padding repeats a slot
    grouped_valid: torch.Tensor | None = None  # [B, Lmax] bool, False on padding

    @classmethod
    def prefill(cls, query_lens: list[int], absorbed: bool = False) -> "AttentionBatch":
        """Sequences with no cached prefix, attended without a cache."""
        return cls(list(query_lens), list(query_lens), [absorbed] * len(query_lens))

    def group_single_tokens(self) -> None:
        """Attend all single-token absorbed sequences in one padded batch instead of one by one."""
        grouped = [i for i, (q, a) in enumerate(zip(self.query_lens, self.absorbed)) if q == 1 and a]
        if len(grouped) < 2 or self.context_slots is None:
            return
        device = self.context_slots[grouped[0]].device
        longest = max(self.context_lens[i] for i in grouped)
        padded = torch.zeros(len(grouped), longest, dtype=torch.long, device=device)
        valid = torch.zeros(len(grouped), longest, dtype=torch.bool, device=device)
        for row, i in enumerate(grouped):
            n = self.context_lens[i]
            padded[row, :n] = self.context_slots[i]
            padded[row, n:] = self.context_slots[i][0]  # any real slot; masked out
            valid[row, :n] = True
        self.grouped, self.grouped_slots, self.grouped_valid = grouped, padded, valid

    def __post_init__(self) -> None:
        if not (len(self.query_lens) == len(self.context_lens) == len(self.absorbed)):
            raise ValueError("AttentionBatch: query_lens, context_lens and absorbed differ in length")
        for q, c in zip(self.query_lens, self.context_lens):
            if q < 1 or c < q:
                raise ValueError(f"AttentionBatch: query_len={q}, context_len={c} (need 1 <= query_len <= context_len)")


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
            self.q_proj = nn.Linear(d, h * args.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, args.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
            self.q_b_proj = nn.Linear(args.q_lora_rank, h * args.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, args.kv_lora_rank + args.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, args.rms_norm_eps)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, h * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * args.v_head_dim, d, bias=bias)

    # -- projections (the decode pipeline's ATTN-0) ---------------------------------------------
    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> q_nope [T, H, N], q_pe [T, H, R] (rotated)."""
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(x.shape[0], self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rotary(q_pe, cos, sin, self.interleave)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> the cache rows [T, C+R]: normalised latent, then the rotated shared key."""
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return torch.cat([self.kv_a_layernorm(latent), apply_rotary(k_pe, cos, sin, self.interleave)], dim=-1)

    # -- core attention and output (ATTN-1) -----------------------------------------------------
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch,
                cache: LatentCache | None = None) -> torch.Tensor:
        """x [T, D] -> [T, D]. With a cache the new rows are stored first, then each sequence
        attends to its `context_slots`; without one each sequence attends to its own new tokens."""
        q_nope, q_pe = self.project_q(x, cos, sin)
        kv = self.project_kv(x, cos, sin)  # [T, C+R]
        if cache is not None:
            cache.store(self.layer, batch.slot_mapping, kv)
        return self.attend(q_nope, q_pe, kv, batch, cache)

    def attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, batch: AttentionBatch,
               cache: LatentCache | None) -> torch.Tensor:
        out = q_nope.new_empty(q_nope.shape[0], self.num_heads, self.v_dim)  # [T, H, V]
        starts = [0]
        for t in batch.query_lens:
            starts.append(starts[-1] + t)
        grouped = set(batch.grouped or ())
        if grouped:
            rows = torch.tensor([starts[i] for i in batch.grouped], device=q_nope.device)
            size = batch.grouped_slots.shape
            context = cache.load(self.layer, batch.grouped_slots.flatten()).view(*size, -1)  # [B, Lmax, C+R]
            out[rows] = self._absorbed_padded(q_nope[rows], q_pe[rows], context, batch.grouped_valid)
        for i, (t, ctx_len) in enumerate(zip(batch.query_lens, batch.context_lens)):
            if i in grouped:
                continue
            start = starts[i]
            if cache is None:
                if ctx_len != t:
                    raise ValueError("attention without a cache needs context_len == query_len")
                context = kv[start:start + t]
            else:
                context = cache.load(self.layer, batch.context_slots[i])  # [L, C+R]
            path = self._absorbed if batch.absorbed[i] else self._expanded
            out[start:start + t] = path(q_nope[start:start + t], q_pe[start:start + t], context)
        return self.o_proj(out.view(out.shape[0], -1))

    def _w_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope_dim], w[:, self.nope_dim:]  # W_UK [H, N, C], W_UV [H, V, C]

    def _expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        t, length = q_nope.shape[0], context.shape[0]
        latent, k_pe = context.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(length, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # [L, H, N], [L, H, V]
        k = torch.cat([k_nope, k_pe[:, None, :].expand(length, self.num_heads, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)  # [t, H, N+R]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=_causal_mask(t, length, q.device), scale=self.scale)  # [H, t, V]
        return out.transpose(0, 1)

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        t, length = q_nope.shape[0], context.shape[0]
        w_uk, w_uv = self._w_b()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk)  # [H, t, C]
        q = torch.cat([q_latent, q_pe.transpose(0, 1)], dim=-1)  # [H, t, C+R]
        scores = torch.matmul(q, context.t()).float() * self.scale  # [H, t, L]
        mask = _causal_mask(t, length, q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(context.dtype)
        o_latent = torch.matmul(probs, context[:, :self.kv_lora_rank])  # [H, t, C]
        out = torch.bmm(o_latent, w_uv.transpose(1, 2))  # [H, t, V]
        return out.transpose(0, 1)


    def _absorbed_padded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, context: torch.Tensor,
                         valid: torch.Tensor) -> torch.Tensor:
        """B single-token queries at once: q_nope [B, H, N], q_pe [B, H, R], context [B, L, C+R],
        valid [B, L] -> [B, H, V]."""
        w_uk, w_uv = self._w_b()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, C]
        q = torch.cat([q_latent, q_pe], dim=-1)  # [B, H, C+R]
        scores = torch.bmm(q, context.transpose(1, 2)).float() * self.scale  # [B, H, L]
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(context.dtype)
        o_latent = torch.bmm(probs, context[..., :self.kv_lora_rank])  # [B, H, C]
        return torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [B, H, V]


def _causal_mask(t: int, length: int, device: torch.device) -> torch.Tensor | None:
    """[t, L] bool, True where query i may see key j: j <= (L - t) + i. None when t == 1."""
    if t == 1:
        return None
    rows = torch.arange(t, device=device)[:, None] + (length - t)
    return torch.arange(length, device=device)[None, :] <= rows
