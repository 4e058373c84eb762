"""Decoupled RoPE of MLA: default and YaRN frequencies, interleaved or half-split layout.

The numerics follow transformers (our oracle): angles in fp32, cos/sin scaled by YaRN's
attention factor, then cast to the activation dtype before the rotation.
"""
from __future__ import annotations

import math

import torch

from shared.model.config import RopeArgs, yarn_mscale


class RotaryEmbedding:
    """cos/sin tables for `dim` rotary channels; holds no module state (safe to build on meta)."""

    def __init__(self, rope: RopeArgs, dim: int):
        self.rope = rope
        self.dim = dim
        self.inv_freq, self.attention_factor = _frequencies(rope, dim)  # [dim/2] fp32 on CPU
        self._device_inv_freq: dict[torch.device, torch.Tensor] = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, dim/2] in `dtype`."""
        inv_freq = self._device_inv_freq.get(positions.device)
        if inv_freq is None:
            inv_freq = self.inv_freq.to(positions.device)
            self._device_inv_freq[positions.device] = inv_freq
        angles = positions.float()[:, None] * inv_freq[None, :]  # [T, dim/2]
        cos = angles.cos() * self.attention_factor
        sin = angles.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dim of x [T, ..., dim] by per-token angles cos/sin [T, dim/2].

    NOTE: with `interleave` the pairs are (x0, x1), (x2, x3), ... as DeepSeek trains them, and the
    result is written de-interleaved (all first members, then all second members). Queries and
    keys get the same permutation, so every dot product is unchanged; transformers does the same.
    """
    while cos.dim() < x.dim():
        cos = cos.unsqueeze(-2)
        sin = sin.unsqueeze(-2)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _frequencies(rope: RopeArgs, dim: int) -> tuple[torch.Tensor, float]:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    pos_freqs = rope.theta ** exponents
    if rope.type == "default":
        return 1.0 / pos_freqs, 1.0
    # YaRN: interpolate the low frequencies, keep the high ones, ramp in between.
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)
