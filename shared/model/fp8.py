"""DeepSeek's block-scaled FP8 weights: float8_e4m3fn values, one float32 scale per 128×128 block.

`weight ≈ fp8 * weight_scale_inv` block by block; edge blocks of a shape that is not a multiple
of the block are ragged (their scale covers only the real elements).
"""
from __future__ import annotations

import math
import re

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
QUANTIZED = re.compile(r"^model\.layers\.\d+\..*\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj"
                       r"|gate_proj|up_proj|down_proj)\.weight$")


def is_quantized_weight(name: str) -> bool:
    """Which checkpoint tensors DeepSeek ships in FP8: the linear weights inside decoder layers,
    except the router. Embeddings, the LM head, norms and the gate stay in high precision."""
    return QUANTIZED.match(name) is not None


def scale_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def quantize_blockwise(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [O, I] -> (fp8 [O, I], weight_scale_inv fp32 [ceil(O/bo), ceil(I/bi)])."""
    out_dim, in_dim = weight.shape
    rows, cols = scale_shape((out_dim, in_dim), block)
    padded = torch.zeros(rows * block[0], cols * block[1], dtype=torch.float32, device=weight.device)
    padded[:out_dim, :in_dim] = weight.float()
    tiles = padded.view(rows, block[0], cols, block[1])
    # [rows, cols]; padding is zero, so ragged blocks see only real values
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    q = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(rows * block[0], cols * block[1])[:out_dim, :in_dim].contiguous(), scale_inv


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 [O, I] and scales [ceil(O/bo), ceil(I/bi)] -> weight [O, I] in `dtype` (computed in fp32)."""
    out_dim, in_dim = q.shape
    expected = scale_shape((out_dim, in_dim), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(q.shape)} "
                         f"with block {block}: expected {expected}")
    scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:out_dim]
    scale = scale.repeat_interleave(block[1], dim=1)[:, :in_dim]
    return (q.float() * scale).to(dtype)
