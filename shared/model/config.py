"""ModelArgs: the DeepSeek-V3 hyper-parameters, read from a Hugging Face `config.json`.

Both key spellings are accepted: transformers 4.x (`rope_scaling` + top-level `rope_theta`,
`torch_dtype`) and 5.x (`rope_parameters`, `dtype`). Every value is checked once here so the
model code can trust it; a bad value raises `ConfigError` naming the file, the key and the value.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v3",)


class ConfigError(ValueError):
    """A config.json that does not describe a model we can run."""


@dataclass(frozen=True)
class RopeArgs:
    """Rotary embedding of the decoupled key/query part (`qk_rope_head_dim` channels)."""

    theta: float = 10000.0
    type: str = "default"  # "default" or "yarn"
    interleave: bool = True  # DeepSeek's pairs (x0, x1), (x2, x3), ...
    # yarn
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelArgs:
    """Everything the model needs; names follow the Hugging Face config keys."""

    # shape
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP of the first `first_k_dense_replace` layers
    num_hidden_layers: int
    first_k_dense_replace: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # mla
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536  # None: a single q_proj, no low-rank query
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # moe
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    moe_intermediate_size: int = 2048
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    # rope
    rope: RopeArgs = field(default_factory=RopeArgs)
    # tokens
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # checkpoint
    dtype: str = "bfloat16"  # dtype the checkpoint's non-quantized weights are stored in
    fp8_block_size: tuple[int, int] | None = None  # set for DeepSeek's block-scaled FP8 checkpoints
    num_nextn_predict_layers: int = 0  # MTP layers in the file; the first is loaded (model.mtp), any others skipped

    @property
    def num_mtp_layers(self) -> int:
        """MTP layers the model builds: DeepSeek-V3 ships one, and drafts reuse it."""
        return min(self.num_nextn_predict_layers, 1)

    @property
    def num_kv_layers(self) -> int:
        """Layers with a latent KV: the main model's, then the MTP layer's."""
        return self.num_hidden_layers + self.num_mtp_layers

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the latent plus the shared rotated key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale² under YaRN with `mscale_all_dim` (as transformers does)."""
        scale = self.qk_head_dim ** -0.5
        r = self.rope
        if r.type == "yarn" and r.mscale_all_dim:
            m = yarn_mscale(r.factor, r.mscale_all_dim)
            scale = scale * m * m
        return scale

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json there; is this a Hugging Face model directory?") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelArgs:
        return _parse(raw, source)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _parse(raw: dict[str, Any], source: str) -> ModelArgs:
    def fail(key: str, value: Any, why: str) -> ConfigError:
        return ConfigError(f"{source}: {key}={value!r} {why}")

    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise fail("model_type", model_type, f"is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")

    def get(key: str, default: Any = ..., kind: type | tuple = int) -> Any:
        if key not in raw or raw[key] is None:
            if default is ...:
                raise ConfigError(f"{source}: required key {key!r} is missing")
            return default
        value = raw[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise fail(key, value, f"must be of type {getattr(kind, '__name__', kind)}")
        return value

    def positive(key: str, default: Any = ...) -> int:
        value = get(key, default)
        if value < 1:
            raise fail(key, value, "must be >= 1")
        return value

    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise fail("hidden_act", act, "is not supported (DeepSeek-V3 uses silu)")
    scoring = raw.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise fail("scoring_func", scoring, "is not supported (DeepSeek-V3 uses sigmoid)")
    topk_method = raw.get("topk_method", "noaux_tc")
    if topk_method != "noaux_tc":
        raise fail("topk_method", topk_method, "is not supported (DeepSeek-V3 uses noaux_tc)")

    num_layers = positive("num_hidden_layers")
    heads = positive("num_attention_heads")
    # NOTE: num_key_value_heads is not read: MLA derives every head's K/V from the shared latent.
    q_lora = raw.get("q_lora_rank")
    if q_lora is not None and (not isinstance(q_lora, int) or q_lora < 1):
        raise fail("q_lora_rank", q_lora, "must be a positive integer or null")
    experts = positive("n_routed_experts")
    n_group = positive("n_group", 1)
    topk_group = positive("topk_group", 1)
    top_k = positive("num_experts_per_tok")
    if experts % n_group:
        raise fail("n_group", n_group, f"must divide n_routed_experts={experts}")
    if topk_group > n_group:
        raise fail("topk_group", topk_group, f"must be <= n_group={n_group}")
    if top_k > topk_group * (experts // n_group):
        kept = topk_group * (experts // n_group)
        raise fail("num_experts_per_tok", top_k, f"exceeds the {kept} experts in the kept groups")
    if experts // n_group < 2:
        raise fail("n_group", n_group, "leaves fewer than 2 experts per group (the group score sums the top 2)")
    first_dense = get("first_k_dense_replace", 0)
    if not 0 <= first_dense <= num_layers:
        raise fail("first_k_dense_replace", first_dense, f"must be in [0, num_hidden_layers={num_layers}]")
    rope_dim = positive("qk_rope_head_dim")
    if rope_dim % 2:
        raise fail("qk_rope_head_dim", rope_dim, "must be even (rotary pairs)")

    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    vocab = positive("vocab_size")
    for key, value in (("bos_token_id", raw.get("bos_token_id")), ("pad_token_id", raw.get("pad_token_id"))):
        if value is not None and not 0 <= value < vocab:
            raise fail(key, value, f"is outside the vocabulary [0, {vocab})")
    for value in eos_ids:
        if not 0 <= value < vocab:
            raise fail("eos_token_id", value, f"is outside the vocabulary [0, {vocab})")

    return ModelArgs(
        vocab_size=vocab,
        hidden_size=positive("hidden_size"),
        intermediate_size=positive("intermediate_size"),
        num_hidden_layers=num_layers,
        first_k_dense_replace=first_dense,
        max_position_embeddings=positive("max_position_embeddings"),
        rms_norm_eps=get("rms_norm_eps", 1e-6, float),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        num_attention_heads=heads,
        q_lora_rank=q_lora,
        kv_lora_rank=positive("kv_lora_rank"),
        qk_nope_head_dim=positive("qk_nope_head_dim"),
        qk_rope_head_dim=rope_dim,
        v_head_dim=positive("v_head_dim"),
        n_routed_experts=experts,
        n_shared_experts=get("n_shared_experts", 0),
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        moe_intermediate_size=positive("moe_intermediate_size"),
        routed_scaling_factor=get("routed_scaling_factor", 1.0, float),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        rope=_parse_rope(raw, source, fail),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=raw.get("pad_token_id"),
        dtype=_parse_dtype(raw, source),
        fp8_block_size=_parse_quantization(raw, source, fail),
        num_nextn_predict_layers=get("num_nextn_predict_layers", 0),
    )


def _parse_rope(raw: dict[str, Any], source: str, fail) -> RopeArgs:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise fail("rope_parameters", params, "must be an object")
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    interleave = bool(raw.get("rope_interleave", True))
    if rope_type == "default":
        return RopeArgs(theta=theta, interleave=interleave)
    if rope_type != "yarn":
        raise fail("rope_parameters.rope_type", rope_type, "is not supported (default or yarn)")
    max_pos = raw.get("max_position_embeddings", 4096)
    original = int(params.get("original_max_position_embeddings", raw.get("original_max_position_embeddings", max_pos)))
    factor = params.get("factor")
    factor = float(factor) if factor is not None else max_pos / original
    if factor < 1:
        raise fail("rope_parameters.factor", factor, "must be >= 1")

    def opt(key: str) -> float | None:
        value = params.get(key)
        return None if value is None else float(value)

    return RopeArgs(
        theta=theta,
        type="yarn",
        interleave=interleave,
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=opt("beta_fast") or 32.0,
        beta_slow=opt("beta_slow") or 1.0,
        mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"),
        attention_factor=opt("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def _parse_dtype(raw: dict[str, Any], source: str) -> str:
    value = raw.get("dtype", raw.get("torch_dtype", "bfloat16"))
    if value not in _DTYPES:
        raise ConfigError(f"{source}: dtype={value!r} is not supported (float32, bfloat16, float16)")
    return _DTYPES[value]


def _parse_quantization(raw: dict[str, Any], source: str, fail) -> tuple[int, int] | None:
    q = raw.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise fail("quantization_config.quant_method", method, "is not supported (fp8 block-scaled only)")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise fail("quantization_config.fmt", fmt, "is not supported (e4m3 only)")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise fail("quantization_config.weight_block_size", block, "must be two positive integers")
    return (block[0], block[1])
