"""`streamoe generate --json` (a real subprocess) against transformers generate(do_sample=False)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from reference import load_reference, reference_greedy

PROMPTS = ["The quick brown fox", "def fib(n):\n    return", "你好，世界 🌍"]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.launcher.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_generate_json_matches_transformers_greedy(tiny_fp32):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_fp32))
    ref = load_reference(tiny_fp32)
    covered = []
    for prompt in PROMPTS:
        proc = run_cli("generate", "--model", str(tiny_fp32), "--prompt", prompt, "--max-tokens", "64",
                       "--ignore-eos", "--json", "--dtype", "fp32")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1, proc.stdout
        result = json.loads(lines[0])
        assert set(result) == {"text", "token_ids"}
        assert len(result["token_ids"]) == 64
        assert result["text"] == tokenizer.decode(result["token_ids"], skip_special_tokens=True)
        expected = reference_greedy(ref, tokenizer(prompt)["input_ids"], 64)
        n = expected.trusted
        assert result["token_ids"][:n] == expected.tokens[:n], f"prompt {prompt!r}"
        covered.append(n)
    print(f"greedy tokens compared (of 64, outside near-ties): {covered}")
    assert min(covered) >= 32, f"near-ties cut the comparison short: {covered}"


def test_generate_flags_read_environment(tiny_fp32):
    env = {"STREAMOE_MAX_TOKENS": "3", "STREAMOE_IGNORE_EOS": "1", "STREAMOE_DTYPE": "fp32"}
    proc = run_cli("generate", "--model", str(tiny_fp32), "--prompt", "hi", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) == 3
    proc = run_cli("generate", "--model", str(tiny_fp32), "--prompt", "hi", "--json", "--max-tokens", "5", env=env)
    assert len(json.loads(proc.stdout)["token_ids"]) == 5  # the flag wins over the variable


def test_generate_bad_input_is_a_clear_error(tiny_fp32, tmp_path):
    proc = run_cli("generate", "--model", str(tiny_fp32), "--prompt", "hi", "--max-tokens", "0")
    assert proc.returncode == 2 and "max_tokens=0" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("generate", "--model", str(tiny_fp32), "--prompt", "hi", "--max-tokens", "5000")
    assert proc.returncode == 2 and "2048" in proc.stderr
    proc = run_cli("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert proc.returncode == 2 and "tokenizer.json" in proc.stderr
    proc = run_cli("generate", "--model", str(tiny_fp32), "--prompt", "hi", env={"STREAMOE_MAX_TOKENS": "many"})
    assert proc.returncode == 2 and "STREAMOE_MAX_TOKENS" in proc.stderr


def test_generate_calibrates_once_then_reuses_it(tiny_fp32, tmp_path):
    """`--dtype auto --moe-backend auto`: measured on the first run, read back on the next; the
    choice on stderr, stdout still the one JSON line."""
    env = {"STREAMOE_HOME": str(tmp_path)}
    args = ("generate", "--model", str(tiny_fp32), "--prompt", "hi", "--json", "--max-tokens", "2",
            "--dtype", "auto", "--moe-backend", "auto", "--threads", "1")
    first, second = run_cli(*args, env=env), run_cli(*args, env=env)
    for proc, source in ((first, "measured"), (second, "cached")):
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads(proc.stdout)["token_ids"]) == 2
        assert "streamoe generate: --dtype fp32 --moe-backend " in proc.stderr and f"({source})" in proc.stderr
    assert len(list((tmp_path / "numerics").glob("*.json"))) == 1


def test_generate_speculates_with_an_mtp_layer_and_says_so(tiny_mtp, tiny_fp32):
    args = ["--prompt", "The quick brown fox", "--max-tokens", "24", "--ignore-eos", "--json", "--dtype", "fp32"]
    plain = json.loads(run_cli("generate", "--model", str(tiny_fp32), *args).stdout)
    proc = run_cli("generate", "--model", str(tiny_mtp), *args, "--speculative-tokens", "2")
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)
    assert spec["token_ids"] == plain["token_ids"]  # the same main model: the same tokens
    assert spec["spec"]["draft_tokens"] > 0 and 0 <= spec["spec"]["accepted_tokens"] <= spec["spec"]["draft_tokens"]
    auto = json.loads(run_cli("generate", "--model", str(tiny_mtp), *args).stdout)  # auto: 1 with an MTP layer
    assert auto["token_ids"] == plain["token_ids"] and "spec" in auto
    off = json.loads(run_cli("generate", "--model", str(tiny_mtp), *args, "--speculative-tokens", "0").stdout)
    assert "spec" not in off
    proc = run_cli("generate", "--model", str(tiny_fp32), *args, "--speculative-tokens", "1")
    assert proc.returncode == 2 and "--speculative-tokens=1: the model has no MTP layer" in proc.stderr
    proc = run_cli("generate", "--model", str(tiny_mtp), *args, env={"STREAMOE_SPECULATIVE_TOKENS": "-2"})
    assert proc.returncode == 2 and "STREAMOE_SPECULATIVE_TOKENS='-2'" in proc.stderr
