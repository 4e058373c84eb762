"""Loader: every error names its culprit; MTP layers are skipped; peak memory stays near the weights."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.model.config import ConfigError, ModelArgs
from shared.model.loader import CheckpointError, load_model


@pytest.fixture()
def ckpt(tiny_fp32, tmp_path):
    """A private copy of the tiny checkpoint to break."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_fp32, path)
    return path


def rewrite_tensors(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_tensor_is_named(ckpt):
    rewrite_tensors(ckpt, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight' is missing"):
        load_model(ckpt)


def test_extra_tensor_is_named(ckpt):
    rewrite_tensors(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.rogue.weight", torch.zeros(2)))
    rogue = r"model\.safetensors: unexpected tensor 'model\.layers\.0\.self_attn\.rogue\.weight'"
    with pytest.raises(CheckpointError, match=rogue):
        load_model(ckpt)


def test_wrong_shape_is_named(ckpt):
    rewrite_tensors(ckpt, lambda t: t.__setitem__("model.layers.1.self_attn.kv_b_proj.weight", torch.zeros(3, 64)))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.kv_b_proj\.weight' has shape \[3, 64\], "
                                              r"the config expects \[256, 64\]"):
        load_model(ckpt)


def test_unknown_model_type(ckpt):
    edit_config(ckpt, model_type="llama")
    with pytest.raises(ConfigError, match=r"config\.json: model_type='llama' is not supported"):
        load_model(ckpt)


@pytest.mark.parametrize("key, value, message", [
    ("n_group", 3, r"n_group=3 must divide n_routed_experts=16"),
    ("topk_group", 5, r"topk_group=5 must be <= n_group=4"),
    ("num_experts_per_tok", 9, r"num_experts_per_tok=9 exceeds the 8 experts"),
    ("first_k_dense_replace", 7, r"first_k_dense_replace=7 must be in \[0, num_hidden_layers=3\]"),
    ("qk_rope_head_dim", 15, r"qk_rope_head_dim=15 must be even"),
    ("hidden_size", 0, r"hidden_size=0 must be >= 1"),
    ("hidden_size", "big", r"hidden_size='big' must be of type int"),
    ("eos_token_id", 5000, r"eos_token_id=5000 is outside the vocabulary"),
    ("hidden_act", "gelu", r"hidden_act='gelu' is not supported"),
])
def test_config_values_out_of_range(ckpt, key, value, message):
    edit_config(ckpt, **{key: value})
    with pytest.raises(ConfigError, match=message):
        load_model(ckpt)


def test_missing_config_and_pickle_only(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelArgs.from_file(tmp_path / "config.json")
    shutil.copy(__file__, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    with pytest.raises(ConfigError, match="required key 'num_hidden_layers' is missing"):
        load_model(tmp_path)


def test_pickle_checkpoints_are_refused(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(ckpt)


def test_corrupt_safetensors_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match=r"model\.safetensors: header length"):
        load_model(ckpt)


def test_fp8_weight_without_scale(tiny_fp8, tmp_path):
    path = tmp_path / "fp8"
    shutil.copytree(tiny_fp8, path)
    rewrite_tensors(path, lambda t: t.pop("model.layers.0.self_attn.o_proj.weight_scale_inv"))
    with pytest.raises(CheckpointError, match=r"FP8 tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' has no "
                                              r"'model\.layers\.0\.self_attn\.o_proj\.weight_scale_inv'"):
        load_model(path)


def test_the_first_mtp_layer_loads_and_later_ones_are_skipped(tmp_path, tiny_mtp, tiny_fp32):
    """model.layers.3 (num_hidden_layers is 3) is the MTP layer, loaded as model.mtp; a second one
    (model.layers.4, as a file with num_nextn_predict_layers 2 would have) is skipped."""
    path = tmp_path / "mtp2"
    shutil.copytree(tiny_mtp, path)

    def add_second(t):
        for name in [n for n in t if n.startswith("model.layers.3.")]:
            t[name.replace("model.layers.3.", "model.layers.4.", 1)] = t[name].clone()
    rewrite_tensors(path, add_second)
    edit_config(path, num_nextn_predict_layers=2)
    model = load_model(path, dtype="fp32")
    assert len(model.model.layers) == 4 and model.args.num_mtp_layers == 1
    assert torch.equal(model.mtp.eh_proj.weight, load_file(str(tiny_mtp / "model.safetensors"))[
        "model.layers.3.eh_proj.weight"])
    reference = load_model(tiny_fp32, dtype="fp32").state_dict()
    assert all(torch.equal(t, model.state_dict()[name]) for name, t in reference.items())
    rewrite_tensors(path, lambda t: t.pop("model.layers.3.eh_proj.weight"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.3\.eh_proj\.weight' is missing"):
        load_model(path, dtype="fp32")


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from shared.model.loader import load_model
    def status(key):
        return int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) * 1024
    base = status('VmRSS')
    model = load_model(sys.argv[1], dtype=sys.argv[2])
    total = sum(float(p.float().sum()) for p in model.parameters())  # touch every weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"base": base, "peak": status('VmHWM'), "weights": weights}))
""")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_load_peak_memory_near_weights(small_bf16, dtype):
    """Built on meta, filled from the mapped file: the load adds about the weights' size, not twice it
    (fp32 from a bf16 file converts tensor by tensor and releases the file pages it read)."""
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(small_bf16), dtype], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    growth = m["peak"] - m["base"]
    print(f"{dtype}: weights {m['weights'] / 2**20:.0f} MiB, peak growth {growth / 2**20:.0f} MiB")
    assert m["weights"] > 700 * 2**20
    assert growth <= 1.15 * m["weights"] + 128 * 2**20, f"peak grew {growth} for {m['weights']} bytes of weights"
