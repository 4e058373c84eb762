"""DeepSeek-V3 in plain PyTorch: ModelArgs -> DeepseekV3.

Parameter names are the Hugging Face checkpoint's (`model.layers.3.mlp.experts.7.up_proj.weight`),
so a state dict loads without renaming. The model knows nothing of I/O, parallelism or
quantization; those are applied around it (loader, engine, EP).

Legend: T = tokens in the step (sequences packed without padding), D = hidden, V = vocab.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from shared.model import native
from shared.model.attention import MLA, AttentionBatch, LatentCache
from shared.model.config import ModelArgs
from shared.model.experts import ExpertStack, MoEPlan, check_supported
from shared.model.moe import MLP, Gate, MoE
from shared.model.norm import RMSNorm
from shared.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = MLA(args, layer)
        self.mlp = MoE(args) if layer >= args.first_k_dense_replace else MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch,
                cache: LatentCache | None) -> torch.Tensor:
        h, x = self.post_attention_layernorm.add_forward(h, self.self_attn(self.input_layernorm(h), cos, sin, batch,
                                                                            cache))
        if isinstance(self.mlp, MoE):
            return self.mlp.forward_residual(x, h)  # h + mlp(x), in one call on a native plan
        return h + self.mlp(x)


class SharedHead(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.head = native.Linear(args.hidden_size, args.vocab_size, bias=False)


class MTPLayer(DecoderLayer):
    """DeepSeek-V3's multi-token prediction module: a full decoder layer (its own MLA latent KV, its
    own MoE) that, at position i, reads the main model's final hidden state h_i and the embedding of
    token i+1, and predicts token i+2. It holds its own copies of the embedding and output head
    (`embed_tokens`, `shared_head.head`; the loader shares the main model's tensors when equal)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, layer)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.eh_proj = native.Linear(2 * args.hidden_size, args.hidden_size, bias=False)
        self.shared_head = SharedHead(args)

    def forward(self, next_ids: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: AttentionBatch, cache: LatentCache | None) -> torch.Tensor:
        """next_ids [T] (token i+1), hidden [T, D] (h_i) -> its normed output [T, D]: what the head reads,
        and the `hidden` of the next draft. The embedding comes first, as the released weights expect."""
        x = self.eh_proj(torch.cat([self.enorm(self.embed_tokens(next_ids)), self.hnorm(hidden)], dim=-1))
        return self.shared_head.norm(super().forward(x, cos, sin, batch, cache))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        # the checkpoint's layout: the MTP layer is `model.layers.{num_hidden_layers}`
        self.layers = nn.ModuleList([*(DecoderLayer(args, i) for i in range(args.num_hidden_layers)),
                                     *(MTPLayer(args, args.num_hidden_layers + j) for j in range(args.num_mtp_layers))])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class DeepseekV3(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = native.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(args.rope, args.qk_rope_head_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def main_layers(self) -> list[DecoderLayer]:
        return list(self.model.layers[:self.args.num_hidden_layers])

    @property
    def mtp(self) -> MTPLayer | None:
        """The MTP layer, when the checkpoint has one."""
        return self.model.layers[self.args.num_hidden_layers] if self.args.num_mtp_layers else None

    def set_moe_backend(self, backend: str | MoEPlan) -> MoEPlan:
        """How every MoE layer runs its routed experts: a backend of experts.BACKENDS or a plan by
        token count (`1:loop,16:weight-major`); refused, naming device and dtype, where it cannot run.
        The token counts whose backend is `native` also run the linears, the norms
        and gates of up to 64 (native.Linear, RMSNorm, Gate), the rotary embeddings and cache rows of
        up to 64 (MLA) and the single-token decode attention (MLA._decode_in_place) through its kernels."""
        plan = backend if isinstance(backend, MoEPlan) else MoEPlan.parse(backend)
        check_supported(plan, self.device, self.dtype)
        linear_rows = frozenset(m for m in range(1, native.LINEAR_ROWS + 1) if plan.choose(m) == "native")
        norm_rows = frozenset(m for m in range(1, native.NORM_ROWS + 1) if plan.choose(m) == "native")
        for module in self.modules():
            if hasattr(module, "plan") and isinstance(module.plan, MoEPlan):
                module.plan = plan
            if isinstance(module, native.Linear):
                module.native_rows = linear_rows
            if isinstance(module, (RMSNorm, Gate)):
                module.native_rows = norm_rows
            if isinstance(module, MLA):
                module.native_plan = plan if "native" in plan.backends else None
            if "native" in plan.backends and isinstance(getattr(module, "stack", None), ExpertStack):
                module.stack.packed_for_native()  # the native loops' copy, made now rather than in a step
        return plan

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                cache: LatentCache | None = None, on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, D] (after the last norm).
        `on_layer(i)` runs once layer i's KV is in the cache (layer-wise KV streaming)."""
        h = self.model.embed_tokens(input_ids)  # [T, D]
        cos, sin = self.rotary.cos_sin(positions, h.dtype)
        for i, layer in enumerate(self.main_layers):
            h = layer(h, cos, sin, batch, cache)
            if on_layer is not None:
                on_layer(i)
        return self.model.norm(h)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> logits [N, V] in fp32."""
        return self.lm_head(hidden).float()

    @torch.inference_mode()
    def draft(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
              cache: LatentCache | None = None) -> torch.Tensor:
        """The MTP layer at `positions` [T]: next_ids [T] (token i+1), hidden [T, D] (h_i, the main
        model's final hidden state, or the MTP's own output for a further draft) -> its output [T, D]."""
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        return self.mtp(next_ids, hidden, cos, sin, batch, cache)

    @torch.inference_mode()
    def draft_logits(self, out: torch.Tensor) -> torch.Tensor:
        """The MTP layer's output [N, D] -> logits [N, V] of the token two past its position, in fp32."""
        return self.mtp.shared_head.head(out).float()
