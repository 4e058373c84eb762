"""The `tiny` and `small` presets and `init_model`: deterministic random checkpoints in Hugging
Face layout that transformers' DeepseekV3ForCausalLM loads as they are."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from shared.model.config import ModelArgs
from shared.model.fp8 import is_quantized_weight, quantize_blockwise
from shared.model.model import DeepseekV3
from shared.model.tokenizer_files import BOS_ID, EOS_ID, PAD_ID, write_tokenizer_files

# The preset table of shared/model/README.md. `initializer_range` is large enough that greedy
# logits are rarely near-ties; `bias_range` makes the routing bias change expert choices.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                 first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64,
                 qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=16,
                 num_experts_per_tok=4, n_group=4, topk_group=2, moe_intermediate_size=64,
                 n_shared_experts=1, max_position_embeddings=2048),
    "small": dict(vocab_size=8192, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
                  first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256,
                  qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=64,
                  num_experts_per_tok=6, n_group=8, topk_group=4, moe_intermediate_size=256,
                  n_shared_experts=1, max_position_embeddings=4096),
}
INITIALIZER_RANGE = {"tiny": 0.1, "small": 0.05}
BIAS_RANGE = 0.1
FP8_BLOCK = [128, 128]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def preset_config(preset: str, dtype: str = "bf16", fp8: bool = False, mtp: bool = False) -> dict:
    """The full config.json of a preset."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is unknown: choose one of {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported for init-model: choose bf16 or fp32")
    shape = PRESETS[preset]
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        **shape,
        "num_key_value_heads": shape["num_attention_heads"],
        "hidden_act": "silu",
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "rope_theta": 10000.0,
        "rope_interleave": True,
        "rms_norm_eps": 1e-6,
        "initializer_range": INITIALIZER_RANGE[preset],
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "num_nextn_predict_layers": 1 if mtp else 0,
        "use_cache": True,
        "dtype": "bfloat16" if dtype == "bf16" else "float32",
    }
    if fp8:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": FP8_BLOCK}
    return config


def random_state_dict(args: ModelArgs, initializer_range: float, seed: int) -> dict[str, torch.Tensor]:
    """fp32 weights drawn in sorted-name order from one seeded generator (same seed, same bytes).
    The MTP layer's are drawn after all of the main model's, so adding one leaves the main model as
    it was; its embedding and output head are copies of the main model's, as in DeepSeek's files."""
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in DeepseekV3(args).state_dict().items()}
    mtp = f"model.layers.{args.num_hidden_layers}."
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes, key=lambda n: (n.startswith(mtp), n)):
        if name in (mtp + "embed_tokens.weight", mtp + "shared_head.head.weight"):
            continue
        shape = shapes[name]
        if name.endswith("e_score_correction_bias"):
            t = (torch.rand(shape, generator=gen) * 2 - 1) * BIAS_RANGE
        elif name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)  # not all ones: a misplaced norm shows
        else:
            t = torch.randn(shape, generator=gen) * initializer_range
        state[name] = t
    if args.num_mtp_layers:
        state[mtp + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
        state[mtp + "shared_head.head.weight"] = state["lm_head.weight"].clone()
    return state


def init_model(directory: str | Path, preset: str = "tiny", seed: int = 0, dtype: str = "bf16",
               fp8: bool = False, mtp: bool = False) -> Path:
    """Write a preset checkpoint (config, weights, tokenizer, generation config) into `directory`;
    `mtp`: with one randomly initialised MTP layer (`model.layers.{num_hidden_layers}`)."""
    config = preset_config(preset, dtype, fp8, mtp)
    args = ModelArgs.from_dict(config, source=f"preset {preset}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = random_state_dict(args, config["initializer_range"], seed)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(("gate.weight", "e_score_correction_bias")) and ".mlp.gate." in name:
            out[name] = tensor.float().contiguous()  # routing is fp32 in every checkpoint
        elif fp8 and is_quantized_weight(name):
            out[name], out[name + "_scale_inv"] = quantize_blockwise(tensor, tuple(FP8_BLOCK))
        else:
            out[name] = tensor.to(DTYPES[dtype]).contiguous()
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
                  "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer_files(directory, args.vocab_size, args.max_position_embeddings)
    return directory
