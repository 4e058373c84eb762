"""`streamoe init-model`: the preset table, determinism, and what transformers reads of it."""
from __future__ import annotations

import hashlib
import json

import pytest

from shared.launcher.cli import main
from shared.model.presets import init_model, preset_config

TABLE = {  # shared/model/README.md's table, column by column
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=3, first_k_dense_replace=1,
                 num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                 v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                 moe_intermediate_size=64, n_shared_experts=1, max_position_embeddings=2048),
    "small": dict(vocab_size=8192, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
                  first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256,
                  qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=64, num_experts_per_tok=6,
                  n_group=8, topk_group=4, moe_intermediate_size=256, n_shared_experts=1,
                  max_position_embeddings=4096),
}


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_preset_config_values(preset):
    config = preset_config(preset)
    for key, value in TABLE[preset].items():
        assert config[key] == value, key
    assert config["model_type"] == "deepseek_v3"
    assert config["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
    assert config["routed_scaling_factor"] == 2.5 and config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)


def test_transformers_reads_the_preset_config(tiny_fp32):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_fp32))
    assert config.model_type == "deepseek_v3"
    for key, value in TABLE["tiny"].items():
        assert getattr(config, key) == value, key
    assert config.num_key_value_heads == 4 and config.rope_parameters["rope_type"] == "default"


def test_init_model_is_deterministic_per_seed(tmp_path):
    a, b, c = (init_model(tmp_path / name, "tiny", seed=seed) for name, seed in (("a", 7), ("b", 7), ("c", 8)))
    assert sha(a / "model.safetensors") == sha(b / "model.safetensors")
    assert sha(a / "model.safetensors") != sha(c / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (a / name).read_bytes() == (c / name).read_bytes(), name


def test_cli_init_model_writes_hf_layout(tmp_path, capsys):
    assert main(["init-model", str(tmp_path / "m"), "--preset", "tiny", "--seed", "3", "--dtype", "fp32"]) == 0
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    generation = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)
    tokenizer_config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    assert "<｜User｜>" in tokenizer_config["chat_template"]


def test_cli_init_model_rejects_bad_preset(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["init-model", str(tmp_path / "m"), "--preset", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_fingerprint_follows_weights_and_dtype(tmp_path, monkeypatch):
    import shutil

    import torch

    from shared.model.loader import checkpoint_fingerprint

    monkeypatch.setenv("STREAMOE_HOME", str(tmp_path / "home"))
    a = init_model(tmp_path / "a", "tiny", seed=1)
    b = init_model(tmp_path / "b", "tiny", seed=2)
    shutil.copytree(a, tmp_path / "copy")
    fa = checkpoint_fingerprint(a, torch.float32)
    assert fa == checkpoint_fingerprint(tmp_path / "copy", torch.float32)  # content, not location
    assert fa != checkpoint_fingerprint(b, torch.float32)
    assert fa != checkpoint_fingerprint(a, torch.bfloat16)
    assert list((tmp_path / "home" / "checksums").glob("*.checksum"))  # remembered for the next start
    assert checkpoint_fingerprint(a, torch.float32) == fa
