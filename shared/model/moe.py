"""DeepSeek-V3 feed-forward blocks: the dense SwiGLU MLP, the group-limited sigmoid gate, the MoE.

Legend: T = tokens, D = hidden, E = routed experts, K = experts per token, G = expert groups.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.model import native
from shared.model.config import ModelArgs
from shared.model.experts import MLP, ExpertStack, MoEPlan, combine, expert_counts, run_experts


class Gate(nn.Module):
    """Sigmoid scores; the correction bias picks experts but never weighs them.

    NOTE: the weight and bias stay fp32 whatever the model's dtype, and routing runs in fp32,
    as in DeepSeek's reference and transformers: selection gaps of random or real models are
    often below bf16 resolution.
    """

    # token counts routed by native.gate (bf16 rows on a CPU; the model sets them with its MoE plan, as
    # for RMSNorm): the same choice in one call instead of fifteen operators
    native_rows: frozenset[int] = frozenset()

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
        if (x.dim() == 2 and x.shape[0] in self.native_rows and x.dtype == torch.bfloat16 and x.device.type == "cpu"
                and x.stride(1) == 1):
            return native.gate(x, self.weight, self.e_score_correction_bias, self.n_group, self.topk_group,
                               self.top_k, self.norm_topk_prob, self.routed_scaling_factor)
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
    """Routed experts (top-K of E, group-limited) plus the always-on shared expert(s).

    The routed experts run as one grouped pass over the layer's expert stack (experts.py): pairs
    sorted by expert, per-expert counts kept on the device, one backend call, a fixed-order combine."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_experts = args.n_routed_experts
        self.gate = Gate(args)
        # per-expert modules until the loader stacks them (`stack_experts`); then views of the stack
        self.experts = nn.ModuleList(MLP(args.hidden_size, args.moe_intermediate_size)
                                     for _ in range(args.n_routed_experts))
        self.stack: ExpertStack | None = None
        self.shared_experts = (MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)
                               if args.n_shared_experts else None)
        self.plan = MoEPlan.single("grouped")  # set_moe_backend
        self.expert_load: torch.Tensor | None = None  # [E] tokens routed to each expert so far (EPLB, metrics)

    def use_stack(self, stack: ExpertStack) -> None:
        """Compute from `stack`; the per-expert modules become views of it."""
        self.stack = stack
        self.experts = stack.modules

    def stack_experts(self) -> None:
        """Copy the per-expert weights into one stack (the loader fills a stack directly instead)."""
        self.use_stack(ExpertStack.from_experts(list(self.experts)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        weights, ids = self.gate(x)  # [T, K]
        if self.expert_load is None:
            self.expert_load = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        backend = self.plan.choose(x.shape[0])
        if backend == "native":  # sorting, experts, the same fp32 combine and the load count in one call
            if self.stack is None:
                self.stack_experts()
            routed = native.moe(x, ids, weights, self.stack.w13, self.stack.w2, load=self.expert_load,
                                packed=self.stack.packed_for_native())
        else:
            counts = expert_counts(ids, self.num_experts)  # [E]
            self.expert_load += counts
            routed = (self.routed_loop(x, weights, ids) if backend == "reference"
                      else self.routed_grouped(x, weights, ids, counts, backend))
        if self.shared_experts is not None:
            routed = self.shared_experts(x, add=routed)  # routed + shared, as torch adds them
        return routed

    def forward_residual(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h + self(x): on a native plan in one call (native.moe_block: the gate, the experts, the shared
        expert and the sum, the same kernels in the same order as forward's), else forward then the sum."""
        gate, mlp = self.gate, self.shared_experts
        if self.expert_load is None:
            self.expert_load = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        if (x.dim() == 2 and x.shape[0] in gate.native_rows and self.plan.choose(x.shape[0]) == "native"
                and x.dtype == h.dtype == torch.bfloat16 and x.is_cpu and h.is_cpu and x.is_contiguous()
                and h.is_contiguous() and h.shape == x.shape and self.stack is not None
                and self.expert_load.is_cpu and gate.weight.is_contiguous()
                and (mlp is None or (mlp.gate_proj.runs_native(x) and all(
                    w.is_contiguous() for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight))))):
            shared = None if mlp is None else (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
            return native.moe_block(x, h, gate.weight, gate.e_score_correction_bias, gate.n_group, gate.topk_group,
                                    gate.top_k, gate.norm_topk_prob, gate.routed_scaling_factor, self.stack.w13,
                                    self.stack.w2, self.stack.packed_for_native(), self.expert_load, shared,
                                    native.library())
        return h + self(x)

    def routed_loop(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One token and one chosen expert at a time (the obviously correct reference)."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for t in range(x.shape[0]):
            for k in range(ids.shape[1]):
                expert = self.experts[int(ids[t, k])]
                out[t] += weights[t, k] * expert(x[t:t + 1])[0].float()
        return out.to(x.dtype)

    def routed_grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                       backend: str) -> torch.Tensor:
        """Sort the (token, expert) pairs by expert, run every expert in one backend call, combine."""
        if self.stack is None:
            self.stack_experts()
        top_k = ids.shape[1]
        order = ids.flatten().argsort(stable=True)  # [T*K] pairs by expert
        ys = run_experts(backend, x.index_select(0, order // top_k), counts, self.stack)  # [T*K, D]
        rows = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        return combine(ys, rows.view(ids.shape), ids, weights).to(x.dtype)
