"""RMSNorm as DeepSeek-V3 (and transformers) compute it: statistics in fp32, scale in the input dtype."""
from __future__ import annotations

import torch
from torch import nn

from shared.model import native


class RMSNorm(nn.Module):
    # row counts computed by native.rms_norm (bf16 on a CPU; the model sets them with its MoE plan, as
    # for native.Linear): the same arithmetic in one call instead of eight operators
    native_rows: frozenset[int] = frozenset()

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # native.rms_norm's conditions, checked here once (the weight's width is the module's)
        if (x.dim() == 2 and x.shape[0] in self.native_rows and x.dtype == w.dtype == torch.bfloat16 and x.is_cpu
                and x.stride(1) == 1 and w.is_cpu and x.shape[1] == w.shape[0] and w.is_contiguous()):
            return native._rms_norm(x, w, self.eps, native.library())
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def add_forward(self, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + r, this norm of it): a residual sum and the next norm, in one native call where it runs."""
        w = self.weight
        if (x.dim() == 2 and x.shape[0] in self.native_rows and x.shape == r.shape and x.dtype == r.dtype == w.dtype
                == torch.bfloat16 and x.is_cpu and r.is_cpu and x.stride(1) == r.stride(1) == 1 and w.is_cpu
                and x.shape[1] == w.shape[0] and w.is_contiguous()):
            return native._add_rms_norm(x, r, w, self.eps, native.library())
        s = x + r
        return s, self(s)
