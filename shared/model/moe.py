"""DeepSeek-V3 feed-forward blocks: the dense SwiGLU MLP, the group-limited sigmoid gate, the MoE.

Legend: T = tokens, D = hidden, E = routed experts, K = experts per token, G = expert groups.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers, experts and shared experts alike."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Sigmoid scores; the correction bias picks experts but never weighs them.

    NOTE: the weight and bias stay fp32 whatever the model's dtype, and routing runs in fp32,
    as in DeepSeek's reference and transformers: selection gaps of random or real models are
    often below bf16 resolution.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.norm_topk_prob = args.norm_topk_prob
        self.routed_scaling_factor = args.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> sigmoid scores [T, E] in fp32 (unbiased)."""
        return F.linear(x.float(), self.weight).sigmoid()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> weights [T, K] fp32, expert ids [T, K] int64."""
        scores = self.scores(x)
        num_tokens, num_experts = scores.shape
        choice = scores + self.e_score_correction_bias  # [T, E]
        grouped = choice.view(num_tokens, self.n_group, num_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]: sum of each group's top 2
        kept = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(num_tokens, num_experts)
        ids = choice.topk(self.top_k, dim=-1, sorted=False).indices  # [T, K]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, ids


class MoE(nn.Module):
    """Routed experts (top-K of E, group-limited) plus the always-on shared expert(s)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_experts = args.n_routed_experts
        self.gate = Gate(args)
        self.experts = nn.ModuleList(MLP(args.hidden_size, args.moe_intermediate_size)
                                     for _ in range(args.n_routed_experts))
        self.shared_experts = (MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)
                               if args.n_shared_experts else None)
        self.impl = "batched"  # or "loop": the slow, obviously correct reference
        self.expert_load: torch.Tensor | None = None  # [E] tokens routed to each expert so far (EPLB, metrics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        weights, ids = self.gate(x)
        if self.expert_load is None:
            self.expert_load = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        self.expert_load += torch.bincount(ids.flatten(), minlength=self.num_experts)
        routed = self.routed_loop(x, weights, ids) if self.impl == "loop" else self.routed_batched(x, weights, ids)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(x)
        return routed

    def routed_loop(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One token and one chosen expert at a time."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for t in range(x.shape[0]):
            for k in range(ids.shape[1]):
                expert = self.experts[int(ids[t, k])]
                out[t] += weights[t, k] * expert(x[t:t + 1])[0].float()
        return out.to(x.dtype)

    def routed_batched(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sort the (token, expert) pairs by expert, run one matmul chain per expert, scatter back."""
        top_k = ids.shape[1]
        flat_ids = ids.flatten()  # [T*K]
        order = flat_ids.argsort(stable=True)
        token_of = order // top_k  # [T*K] source token of each sorted pair
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        ys = run_grouped(self.experts, x.index_select(0, token_of), counts)  # [T*K, D]
        ys = ys.float() * weights.flatten().index_select(0, order)[:, None]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out.index_add_(0, token_of, ys)
        return out.to(x.dtype)


def run_grouped(experts, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """xs [N, D] sorted by expert, counts[e] rows for expert e -> each row through its expert."""
    ys = torch.empty_like(xs)
    start = 0
    for expert_id, n in enumerate(counts):
        if n:
            ys[start:start + n] = experts[expert_id](xs[start:start + n])
            start += n
    return ys
