"""FP8 block-scaled checkpoints (DeepSeek's format): quantization, loading, and the logits."""
from __future__ import annotations

import json
import math
import shutil

import torch
from modelcheck import packed_logits
from reference import load_reference
from safetensors import safe_open
from safetensors.torch import save_file

from shared.model.fp8 import FP8_MAX, dequantize_blockwise, is_quantized_weight, quantize_blockwise
from shared.model.loader import load_model


def dequantize_by_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Independent of shared.model.fp8: walk the blocks one by one."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(math.ceil(q.shape[0] / block)):
        for j in range(math.ceil(q.shape[1] / block)):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = q[rows, cols].float() * scale_inv[i, j]
    return out


def test_quantize_ragged_shape_round_trip():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(200, 300, generator=gen)
    w[130:, 260:] *= 100  # a ragged corner block with its own, much larger, range
    q, scale_inv = quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (200, 300)
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (2, 3)
    # each block's scale maps its own amax (real elements only) to the fp8 maximum
    assert torch.isclose(scale_inv[1, 2], w[128:, 256:].abs().max() / FP8_MAX)
    assert torch.isclose(scale_inv[0, 0], w[:128, :128].abs().max() / FP8_MAX)
    deq = dequantize_blockwise(q, scale_inv)
    assert torch.equal(deq, dequantize_by_blocks(q, scale_inv))
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values
    big = w.abs() > scale_inv.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300] * 2 ** -6
    assert ((deq - w).abs()[big] <= w.abs()[big] * 2 ** -4).all()


def test_fp8_checkpoint_layout(tiny_fp8):
    config = json.loads((tiny_fp8 / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}
    with safe_open(str(tiny_fp8 / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        kv_a = f.get_tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
        assert kv_a.dtype == torch.float8_e4m3fn and kv_a.shape == (80, 128)  # ragged: 80 rows
        assert f.get_tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv").shape == (1, 1)
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
        assert f.get_tensor("lm_head.weight").dtype == torch.float32
    assert "model.layers.1.mlp.experts.15.down_proj.weight_scale_inv" in names


def test_fp8_logits_match_dequantized_reference(tiny_fp8, tiny_fp32, tmp_path):
    """Ours on the FP8 file == transformers on the same weights dequantized by hand (fp32, 1e-4);
    and against the unquantized weights of the same seed, FP8 costs a bounded logit error."""
    deq_dir = tmp_path / "dequantized"
    shutil.copytree(tiny_fp8, deq_dir)
    config = json.loads((deq_dir / "config.json").read_text())
    del config["quantization_config"]
    (deq_dir / "config.json").write_text(json.dumps(config))
    tensors = {}
    with safe_open(str(tiny_fp8 / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if name.endswith("_scale_inv"):
                continue
            t = f.get_tensor(name)
            if t.dtype == torch.float8_e4m3fn:
                t = dequantize_by_blocks(t, f.get_tensor(name + "_scale_inv"))
            tensors[name] = t.float().contiguous()
    save_file(tensors, str(deq_dir / "model.safetensors"), metadata={"format": "pt"})

    ours = load_model(tiny_fp8, dtype="fp32")
    ref = load_reference(deq_dir)
    exact = load_model(tiny_fp32, dtype="fp32")
    prompts = [torch.randint(3, 1024, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 60)]
    noisy = load_model(tiny_fp32, dtype="fp32")
    gen = torch.Generator().manual_seed(0)
    quantized = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if quantized[name].dtype == p.dtype and is_quantized_weight(name):
                error_norm = (quantized[name] - p).norm()
                noise = torch.randn(p.shape, generator=gen)
                p.add_(noise * error_norm / noise.norm())
    prompts = [torch.randint(3, 1024, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 60)]
    rows = zip(prompts, packed_logits(ours, prompts), packed_logits(exact, prompts), packed_logits(noisy, prompts))
    for prompt, logits, logits_exact, logits_noisy in rows:
        with torch.no_grad():
            expected = ref(torch.tensor([prompt])).logits[0]
        assert (logits - expected).abs().max() <= 1e-4
        # NOTE: the stated tolerance. e4m3 gives each weight ~2.7% relative (RMS) error, and this
        # random network amplifies any weight error (a routing flip changes an expert), so the FP8
        # logits are judged against the same network with Gaussian noise of exactly the FP8 error's
        # norm in every quantized tensor: FP8 must do no worse than 2x that, and stay under 35% RMS.
        drift = relative_rms(logits, logits_exact)
        noise_drift = relative_rms(logits_noisy, logits_exact)
        assert 0 < drift <= min(0.35, 2 * noise_drift), (drift, noise_drift)


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def test_fp8_bf16_compute_loads(tiny_fp8):
    model = load_model(tiny_fp8, dtype="bf16")
    assert model.model.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    logits = packed_logits(model, [[1, 2, 3, 4]])[0]
    assert torch.isfinite(logits).all()
