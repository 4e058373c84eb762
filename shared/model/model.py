"""DeepSeek-V3 in plain PyTorch: ModelArgs -> DeepseekV3.

Parameter names are the Hugging Face checkpoint's (`model.layers.3.mlp.experts.7.up_proj.weight`),
so a state dict loads without renaming. The model knows nothing of I/O, parallelism or
quantization; those are applied around it (loader, engine, EP).

Legend: T = tokens in the step (sequences packed without padding), D = hidden, V = vocab.
"""
from __future__ import annotations

import ctypes
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


_ABSENT = object()
# modules, parameters and buffers registered anywhere so far (a module's attribute replaced counts): a
# LayerWeightsView described before the latest one is looked at again
_registrations = [0]


def _registered(*_args) -> None:
    _registrations[0] += 1


for _register in (torch.nn.modules.module.register_module_parameter_registration_hook,
                  torch.nn.modules.module.register_module_buffer_registration_hook,
                  torch.nn.modules.module.register_module_module_registration_hook):
    _register(_registered)


class LayerWeightsView:
    """The main layers' weights as native.decode_layers reads them (one native.LayerWeights per layer),
    described once. `current()` checks, in some tens of µs, that no module, parameter or buffer was
    registered since (a replaced weight, an added bias: a global count), that the plain attributes a
    step may change (the plans, the stacks, the load counters) are the ones read, and each tensor's
    address and version: a replaced or rewritten weight is described again, never read stale."""

    MUTABLE = frozenset({"native_plan", "plan", "stack", "expert_load", "w13", "w2"})  # watched one by one

    def __init__(self, model: DeepseekV3, plan: MoEPlan):
        self.plan = plan
        self.registrations = _registrations[0]
        self.watch: list[tuple[dict, str, object]] = []
        self.tensors: list[torch.Tensor] = []  # every tensor pointed to (the packed copies kept alive here)
        self.rows: frozenset[int] = frozenset(range(1, native.NORM_ROWS + 1))  # T every module runs natively
        self.array = self._describe(model)
        self.versioned = [x for x in self.tensors if not x.is_inference()]  # (inference tensors have no version)
        self.state = self._state()

    def _state(self) -> tuple:
        return tuple(x.data_ptr() for x in self.tensors), tuple(x._version for x in self.versioned)

    def current(self) -> bool:
        return (_registrations[0] == self.registrations and all(d.get(k, _ABSENT) is v for d, k, v in self.watch)
                and self._state() == self.state)

    def _read(self, owner: object, name: str):
        """owner.name, watched where it is one of the MUTABLE plain attributes."""
        value = getattr(owner, name)
        if name in self.MUTABLE and name in owner.__dict__:
            self.watch.append((owner.__dict__, name, value))
        return value

    def _ptr(self, x: torch.Tensor | None, dtype: torch.dtype = torch.bfloat16) -> int | None:
        if x is None:
            return None
        if x.dtype != dtype or not x.is_contiguous() or not x.is_cpu:
            raise _DoesNotFit
        self.tensors.append(x)
        return x.data_ptr()

    def _weight(self, module: nn.Module, rows: bool = True) -> int:
        """A native.Linear's or RMSNorm's weight (no bias), its native row counts narrowing `rows`."""
        if rows:
            self.rows &= self._read(module, "native_rows")
        if isinstance(module, nn.Linear) and self._read(module, "bias") is not None:
            raise _DoesNotFit
        return self._ptr(self._read(module, "weight"))

    def _describe(self, model: DeepseekV3) -> ctypes.Array | None:
        backbone = self._read(model, "model")
        layers = self._read(backbone, "layers")
        count = model.args.num_hidden_layers
        described = (native.LayerWeights * count)()
        try:
            final = self._read(backbone, "norm")
            self._weight(final)
            self.final_norm, self.final_eps = final.weight, final.eps
            for i, w in enumerate(described):
                layer = self._read(layers, str(i))
                attn, mlp = self._read(layer, "self_attn"), self._read(layer, "mlp")
                norm, post = self._read(layer, "input_layernorm"), self._read(layer, "post_attention_layernorm")
                if self._read(attn, "native_plan") is not self.plan:
                    raise _DoesNotFit
                w.in_norm, w.in_eps = self._weight(norm), self._read(norm, "eps")
                w.post_norm, w.post_eps = self._weight(post), self._read(post, "eps")
                q_a = self._read(attn, "q_a_proj") if "q_a_proj" in attn._modules else None
                if q_a is not None:
                    q_norm = self._read(attn, "q_a_layernorm")
                    w.qa, w.Q = self._weight(q_a), q_a.weight.shape[0]
                    w.qa_norm, w.q_eps = self._weight(q_norm, rows=False), self._read(q_norm, "eps")
                w.qb = self._weight(self._read(attn, "q_b_proj" if q_a is not None else "q_proj"))
                kv_norm = self._read(attn, "kv_a_layernorm")
                w.kva = self._weight(self._read(attn, "kv_a_proj_with_mqa"))
                w.kv_norm, w.kv_eps = self._weight(kv_norm, rows=False), self._read(kv_norm, "eps")
                self._weight(self._read(attn, "kv_b_proj"), rows=False)  # (its packed copies below)
                uk, uv = attn._packed_w_b()
                w.uk, w.Np_uk, w.uv, w.Np_uv = self._ptr(uk), uk.shape[2], self._ptr(uv), uv.shape[2]
                w.o = self._weight(self._read(attn, "o_proj"))
                moe = isinstance(mlp, MoE)
                if not moe and not isinstance(mlp, MLP):
                    raise _DoesNotFit  # an EP layer
                ffn = self._read(mlp, "shared_experts") if moe else mlp
                if ffn is not None:
                    w.sg, w.su = self._weight(self._read(ffn, "gate_proj")), self._weight(self._read(ffn, "up_proj"))
                    w.sd, w.Is = self._weight(self._read(ffn, "down_proj")), ffn.gate_proj.weight.shape[0]
                if moe:
                    self._moe(w, mlp, model.device)
        except _DoesNotFit:
            return None
        return described

    def _moe(self, w: native.LayerWeights, mlp: MoE, device: torch.device) -> None:
        gate, stack = self._read(mlp, "gate"), self._read(mlp, "stack")
        if self._read(mlp, "plan") is not self.plan or stack is None:
            raise _DoesNotFit
        if mlp.expert_load is None:
            mlp.expert_load = torch.zeros(mlp.num_experts, dtype=torch.int64, device=device)
        self.rows &= self._read(gate, "native_rows")
        w.gw = self._ptr(self._read(gate, "weight"), torch.float32)
        w.bias = self._ptr(self._read(gate, "e_score_correction_bias"), torch.float32)
        w.E, w.G, w.topk_group = gate.weight.shape[0], self._read(gate, "n_group"), self._read(gate, "topk_group")
        w.K, w.normalize = self._read(gate, "top_k"), int(self._read(gate, "norm_topk_prob"))
        w.scale = self._read(gate, "routed_scaling_factor")
        w13, w2 = self._read(stack, "w13"), self._read(stack, "w2")
        w.w13, w.w2, w.I = self._ptr(w13), self._ptr(w2), w2.shape[2]
        packed = stack.packed_for_native()
        w.w13p, w.w2p = native._packed_pointers(packed, *w2.shape)
        self.tensors += [] if packed is None else list(packed)
        w.load = self._ptr(self._read(mlp, "expert_load"), torch.int64)


class _DoesNotFit(Exception):
    """A layer native.decode_layers cannot run as it lies (a bias, a weight not contiguous, an EP layer...)."""


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
        and gates of up to 64 (native.Linear, RMSNorm, Gate) and the rotary embeddings and cache rows of
        up to 64 (MLA) through its kernels (in fp32 the linears of up to native.F32_LINEAR_ROWS only); in
        bf16 a plan with `native` at any count runs every step's single-token decode attention in place
        (MLA._decode_in_place), at every count."""
        plan = backend if isinstance(backend, MoEPlan) else MoEPlan.parse(backend)
        check_supported(plan, self.device, self.dtype)
        _registrations[0] += 1  # the modules' native row counts change: a LayerWeightsView is described again
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
        out = self._decode_layers(h, cos, sin, batch, cache) if on_layer is None and cache is not None else None
        if out is not None:
            return out  # every layer and the final norm in one native call
        for i, layer in enumerate(self.main_layers):
            h = layer(h, cos, sin, batch, cache)
            if on_layer is not None:
                on_layer(i)
        return self.model.norm(h)

    def _decode_layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch,
                       cache: LatentCache) -> torch.Tensor | None:
        """Every main layer of a step whose rows are all single-token decodes, and the final norm, in one
        native call (native.decode_layers: the calls the modules make on a native plan, in their order, so
        the same bits) -> the normed hidden states (h updated in place); None (nothing done) where the step
        or a layer does not fit."""
        t = h.shape[0]
        attn = self.model.layers[0].self_attn
        plan = attn.native_plan
        if (plan is None or t > native.NORM_ROWS or plan.choose(t) != "native" or h.dtype != torch.bfloat16
                or not h.is_cpu or not h.is_contiguous() or not batch.plan.is_cached or not batch.plan.decodes_only):
            return None
        view = self._layer_weights(plan, t)
        if view is None:
            return None
        pools = [cache.layer_rows(i) for i in range(self.args.num_hidden_layers)]
        if any(p.dtype != torch.bfloat16 or not p.is_cpu or not p.is_contiguous() for p in pools):
            return None
        bucket = batch.plan.decode_in_one
        n = len(pools)
        return native.decode_layers(view.array, h, attn.num_heads, attn.nope_dim, attn.rope_dim, attn.kv_lora_rank,
                                    attn.v_dim, attn.interleave, attn.scale, cos.contiguous(), sin.contiguous(),
                                    native.slot_indices(batch.slot_mapping),
                                    bucket.slots.view(bucket.num_seqs, bucket.max_context), bucket.lengths,
                                    (ctypes.c_void_p * n)(*(p.data_ptr() for p in pools)),
                                    (ctypes.c_int64 * n)(*(p.shape[0] for p in pools)), view.final_norm,
                                    view.final_eps, native.library())

    def _layer_weights(self, plan: MoEPlan, t: int) -> LayerWeightsView | None:
        """The main layers' LayerWeightsView for `plan` (described again where anything it read changed);
        None where a layer does not fit the fused calls or a module keeps T rows off its native kernels."""
        view = getattr(self, "_layer_view", None)
        if view is None or view.plan is not plan or not view.current():
            view = self._layer_view = LayerWeightsView(self, plan)
        return view if view.array is not None and t in view.rows else None

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
