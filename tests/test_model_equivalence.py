"""Our DeepSeek-V3 against transformers' DeepseekV3ForCausalLM on the same checkpoints, fp32.

Checkpoints come from our `tiny` preset and from transformers itself (save_pretrained) with the
config variants that exercise separate code: YaRN, no q-LoRA, an odd head count, v_head_dim !=
qk_nope_head_dim, a sharded file, and 4.x-style config keys.
"""
from __future__ import annotations

import json

import pytest
import torch
from modelcheck import incremental_logits, packed_logits
from reference import EXPERT_TIE, GateRecorder, load_reference, selection_gap

from shared.model.experts import BACKENDS
from shared.model.loader import load_model

TOL = 1e-4
PROMPT_LENS = [1, 7, 33, 90]


def prompts_for(vocab: int, lens=PROMPT_LENS, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lens]


def reference_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


def write_hf_checkpoint(path, seed: int = 0, **overrides):
    """A random checkpoint written by transformers' own save_pretrained."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    shape = dict(vocab_size=512, hidden_size=96, intermediate_size=192, moe_intermediate_size=48,
                 num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                 q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                 n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
                 max_position_embeddings=1024, initializer_range=0.1, num_nextn_predict_layers=0,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
    shard = overrides.pop("_shard", None)
    shape.update(overrides)
    shape["num_key_value_heads"] = shape["num_attention_heads"]
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**shape))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("norm.weight"):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=gen))
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                bias = layer.mlp.gate.e_score_correction_bias
                bias.copy_((torch.rand(bias.shape, generator=gen) * 2 - 1) * 0.1)
    model.save_pretrained(str(path), max_shard_size=shard or "5GB")
    return path


VARIANTS = {
    "yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                                  "mscale": 1.0, "mscale_all_dim": 0.8}),
    "no_q_lora": dict(q_lora_rank=None),
    "odd_heads": dict(num_attention_heads=5),
    "v_ne_nope": dict(v_head_dim=24, qk_nope_head_dim=12),
    "not_interleaved": dict(rope_interleave=False),
}


@pytest.fixture(scope="module")
def tiny_pair(tiny_fp32):
    return load_model(tiny_fp32, dtype="fp32"), load_reference(tiny_fp32)


@pytest.mark.parametrize("backend", BACKENDS)  # native: its fp32 experts (its bf16 loops: test_native.py)
@pytest.mark.parametrize("absorbed", [False, True], ids=["expanded", "absorbed"])
def test_tiny_logits_match_reference(tiny_pair, backend, absorbed):
    ours, ref = tiny_pair
    default = ours.model.layers[1].mlp.plan
    ours.set_moe_backend(backend)
    try:
        prompts = prompts_for(ours.args.vocab_size)
        for prompt, logits in zip(prompts, packed_logits(ours, prompts, absorbed=absorbed)):
            diff = (logits - reference_logits(ref, prompt)).abs().max().item()
            assert diff <= TOL, f"prompt of {len(prompt)} tokens: max |diff| {diff:.2e}"
    finally:
        ours.set_moe_backend(default)


def check_incremental(ours, ref, steps: int = 32):
    """Prefill a batch of prompts, then decode `steps` tokens per prompt through the latent cache on
    the absorbed path, all sequences in one ragged step; every step's logits match the reference
    run over the whole sequence (teacher-forced on the reference's greedy tokens)."""
    prompts = prompts_for(ours.args.vocab_size, lens=[1, 5, 40])
    continuations = []
    for p in prompts:
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                               pad_token_id=0)
        continuations.append(out[0, len(p):].tolist())
    for prompt, cont, logits in zip(prompts, continuations, incremental_logits(ours, prompts, continuations)):
        full = reference_logits(ref, prompt + cont)[len(prompt) - 1:]
        diff = (logits - full).abs().max().item()
        assert logits.shape[0] == steps + 1
        assert diff <= TOL, f"prompt of {len(prompt)} tokens: max |diff| {diff:.2e} over {steps} decode steps"


def test_tiny_incremental_absorbed_decoding(tiny_pair):
    check_incremental(*tiny_pair)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_written_variants(tmp_path, variant):
    path = write_hf_checkpoint(tmp_path, **VARIANTS[variant])
    ours, ref = load_model(path, dtype="fp32"), load_reference(path)
    lens = [3, 100] if variant == "yarn" else [3, 30]  # YaRN: run past original_max_position_embeddings
    prompts = prompts_for(ours.args.vocab_size, lens=lens)
    for absorbed in (False, True):
        for prompt, logits in zip(prompts, packed_logits(ours, prompts, absorbed=absorbed)):
            diff = (logits - reference_logits(ref, prompt)).abs().max().item()
            assert diff <= TOL, f"{variant}, absorbed={absorbed}, {len(prompt)} tokens: max |diff| {diff:.2e}"
    check_incremental(ours, ref, steps=8)


def test_sharded_and_4x_config_keys(tmp_path):
    """A sharded checkpoint with an index, and a config.json in transformers 4.x spelling."""
    path = write_hf_checkpoint(tmp_path, _shard="300KB", rope_parameters=VARIANTS["yarn"]["rope_parameters"])
    assert (path / "model.safetensors.index.json").exists()
    assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    ours_5x = load_model(path, dtype="fp32")
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    config["torch_dtype"] = config.pop("dtype")
    (path / "config.json").write_text(json.dumps(config))
    ours_4x = load_model(path, dtype="fp32")
    assert ours_4x.args.rope == ours_5x.args.rope and ours_4x.args.dtype == ours_5x.args.dtype
    prompt = prompts_for(ours_4x.args.vocab_size, lens=[80])
    assert torch.equal(packed_logits(ours_4x, prompt)[0], packed_logits(ours_5x, prompt)[0])


def test_gate_selects_reference_experts(tiny_pair):
    """Our gate picks the reference's experts for every token and MoE layer, wherever the
    reference's own selection gap is above rounding noise."""
    ours, ref = tiny_pair
    prompt = prompts_for(ours.args.vocab_size, lens=[200])[0]
    chosen_ours = {}
    handles = []
    for i, layer in enumerate(ours.model.layers):
        if hasattr(layer.mlp, "gate"):
            handles.append(layer.mlp.gate.register_forward_hook(
                lambda m, inp, out, i=i: chosen_ours.__setitem__(i, out[1])))
    try:
        packed_logits(ours, [prompt])
    finally:
        for h in handles:
            h.remove()
    with GateRecorder(ref) as rec, torch.no_grad():
        ref(torch.tensor([prompt]))
    compared = 0
    for i, ids in chosen_ours.items():
        ref_ids = rec.chosen[i][0]
        gaps = selection_gap(rec.logits[i][0], ref.model.layers[i].mlp.gate)
        for t in range(len(prompt)):
            if gaps[t] >= EXPERT_TIE:
                assert sorted(ids[t].tolist()) == sorted(ref_ids[t].tolist()), f"layer {i}, token {t}"
                compared += 1
    assert compared >= 0.95 * len(prompt) * len(chosen_ours), f"only {compared} selections above the noise"


def test_routing_bias_changes_selection(tiny_pair):
    """The preset's correction bias is non-zero and changes which experts are picked."""
    ours, _ = tiny_pair
    gate = ours.model.layers[1].mlp.gate
    assert gate.e_score_correction_bias.abs().min() > 0
    x = torch.randn(256, ours.args.hidden_size, generator=torch.Generator().manual_seed(0))
    _, with_bias = gate(x)
    saved = gate.e_score_correction_bias.clone()
    try:
        gate.e_score_correction_bias.zero_()
        weights_unbiased, without_bias = gate(x)
    finally:
        gate.e_score_correction_bias.copy_(saved)
    changed = sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(with_bias, without_bias))
    assert changed > 0
    # weights are the unbiased scores, normalised, times routed_scaling_factor
    assert torch.allclose(weights_unbiased.sum(-1), torch.full((256,), ours.args.routed_scaling_factor))
