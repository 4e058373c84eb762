"""The latent KV pool: per layer, one row of `kv_lora_rank + qk_rope_head_dim` values per slot.

Only the MLA latent is cached (no per-head keys or values). Who owns which slot is decided
elsewhere (the engine's block manager); this class only holds the tensor.
"""
from __future__ import annotations

import torch

from .config import ModelArgs


class LatentKVPool:
    def __init__(self, args: ModelArgs, num_slots: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.num_slots = num_slots
        self.kv = torch.zeros(args.num_hidden_layers, num_slots, args.kv_cache_dim, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
        return args.num_hidden_layers * args.kv_cache_dim * dtype.itemsize

    def store(self, layer: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """slots [T], kv [T, C+R]."""
        self.kv[layer].index_copy_(0, slots, kv.to(self.kv.dtype))

    def load(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """slots [L] -> [L, C+R]."""
        return self.kv[layer].index_select(0, slots)
