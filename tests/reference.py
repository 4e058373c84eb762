"""The oracle: transformers' DeepseekV3ForCausalLM, plus the near-tie rule of shared/model/README.md.

Random weights give near-ties: two tokens (or experts) whose scores differ by less than the
rounding noise of a different but correct summation order. A greedy comparison is exact up to the
first reference step whose top-2 logit margin is under LOGIT_TIE, or whose expert selection has a
gap under EXPERT_TIE at that or an earlier position.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

LOGIT_TIE = 1e-3
EXPERT_TIE = 1e-5


def load_reference(path, dtype=torch.float32):
    from transformers import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def selection_gap(router_logits: torch.Tensor, gate) -> torch.Tensor:
    """router_logits [N, E] of a reference gate -> [N] smallest margin that decides the selection:
    kept vs dropped group score, and k-th vs (k+1)-th expert among the kept groups."""
    scores = router_logits.float().sigmoid() + gate.e_score_correction_bias.float()
    n, num_experts = scores.shape
    groups = scores.view(n, gate.num_group, num_experts // gate.num_group)
    group_scores = groups.topk(2, dim=-1).values.sum(-1)  # [N, G]
    gaps = torch.full((n,), float("inf"))
    if gate.topk_group < gate.num_group:
        ranked = group_scores.sort(dim=-1, descending=True).values
        gaps = torch.minimum(gaps, ranked[:, gate.topk_group - 1] - ranked[:, gate.topk_group])
    kept = group_scores.topk(gate.topk_group, dim=-1).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    masked = groups.masked_fill(~mask[..., None], float("-inf")).view(n, num_experts)
    ranked = masked.sort(dim=-1, descending=True).values
    if gate.top_k < gate.topk_group * (num_experts // gate.num_group):
        gaps = torch.minimum(gaps, ranked[:, gate.top_k - 1] - ranked[:, gate.top_k])
    return gaps


@dataclass
class GateRecorder:
    """Forward hooks on every reference gate: per layer, the router logits and chosen experts of
    each position, in call order (prefill rows first, then one row per decode step)."""

    model: object
    logits: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    chosen: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def __enter__(self):
        self.handles = []
        for i, layer in enumerate(self.model.model.layers):
            gate = getattr(layer.mlp, "gate", None)
            if gate is None:
                continue

            def hook(module, inputs, output, i=i):
                self.logits.setdefault(i, []).append(output[0].detach().float())
                self.chosen.setdefault(i, []).append(output[2].detach())

            self.handles.append(gate.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def gaps(self) -> torch.Tensor:
        """[positions] smallest selection gap over all MoE layers."""
        per_layer = []
        for i, chunks in self.logits.items():
            per_layer.append(selection_gap(torch.cat(chunks), self.model.model.layers[i].mlp.gate))
        return torch.stack(per_layer).min(dim=0).values


@dataclass
class ReferenceGreedy:
    tokens: list[int]
    trusted: int  # how many leading tokens are outside near-ties


def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id=None) -> ReferenceGreedy:
    """transformers generate(do_sample=False) with the near-tie bound of shared/model/README.md."""
    ids = torch.tensor([prompt_ids])
    kwargs = {} if eos_token_id is not None else {"min_new_tokens": max_new_tokens}
    with GateRecorder(model) as rec, torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             eos_token_id=eos_token_id, pad_token_id=0, **kwargs)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    logits = torch.cat(out.logits).float()  # [steps, V]
    top2 = logits.topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    gaps = rec.gaps() if rec.logits else torch.full((len(prompt_ids) + len(tokens),), float("inf"))
    prefix_gap = torch.cummin(gaps, dim=0).values  # [positions]
    trusted = 0
    for step in range(len(tokens)):
        # step s reads positions 0 .. P+s-1
        if margins[step] < LOGIT_TIE or prefix_gap[len(prompt_ids) + step - 1] < EXPERT_TIE:
            break
        trusted += 1
    return ReferenceGreedy(tokens, trusted)
