"""`python -m loadgen.profile` (issue #20): its sweep against the live tiny system gives a profile
`streamoe plan` reads and plans with; its window arithmetic; its refusals of bad flags."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from loadgen.client import Result
from loadgen.profile import decode_figures, main, prefill_figures
from shared.planner.plan import Interval, load_profile, plan
from shared.planner.slo import parse_slo

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def url(system) -> str:
    return system[-1].url("")


def profile(url: str, out: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadgen.profile", "--url", url, "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_sweep_of_the_live_system_is_a_profile_plan_accepts(url, tmp_path):
    out = tmp_path / "profile.json"
    done = profile(url, out, "--input-lens", "64,16", "--prefill-concurrency", "2", "--running", "1,2",
                   "--decode-input-len", "32", "--decode-output-len", "8", "--max-seconds", "40", "--seed", "1")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["prefill input_len=16", "prefill input_len=64",
                                                      "decode running=1 context_len=36",
                                                      "decode running=2 context_len=36", f"wrote {out}"]
    raw = json.loads(out.read_text())
    assert raw["meta"]["prefill_ranks"] == raw["meta"]["decode_ranks"] == 1  # counted at /services
    assert raw["meta"]["ranks_counted"]["prefill"] == raw["meta"]["ranks_counted"]["decode"] == 1
    assert raw["meta"]["stopped"] == [] and raw["meta"]["duration_s"] < 40
    assert [d["prompt_tokens"] for d in raw["details"]["prefill"]] == [2 * 16, 2 * 64]  # the server's usage
    for point, d in zip(raw["prefill"], raw["details"]["prefill"]):
        assert point["input_tok_s"] == pytest.approx(d["prompt_tokens"] / d["wall_s"])
    one, two = raw["details"]["decode"]
    assert one["window_tokens"] == 8 - 1  # one stream: every token after its first (EOS ignored)
    assert 0 < two["window_tokens"] <= 2 * (8 - 1)
    for point, d in zip(raw["decode"], raw["details"]["decode"]):
        assert point["output_tok_s"] == pytest.approx(d["window_tokens"] / d["window_s"])
    assert all(set(p) == {"input_len", "input_tok_s", "cache_hit_rate", "ttft_ms"} for p in raw["prefill"])
    assert all(set(d) == {"running", "context_len", "output_tok_s", "itl_ms"} for d in raw["decode"])

    loaded = load_profile(out)
    assert [p.input_len for p in loaded.prefill] == [16, 64]
    assert all(p.input_tok_s > 0 and p.ttft_ms > 0 and p.cache_hit_rate == 0 for p in loaded.prefill)
    assert [(d.running, d.context_len) for d in loaded.decode] == [(1, 32 + 8 / 2), (2, 32 + 8 / 2)]
    assert all(d.output_tok_s > 0 and d.itl_ms > 0 for d in loaded.decode)

    worst_ttft = max(p.ttft_ms for p in loaded.prefill)
    worst_itl = max(d.itl_ms for d in loaded.decode)
    slo = parse_slo(f"ttft:{worst_ttft * 2 + 1000:.0f} itl:{worst_itl * 2 + 1000:.0f}")
    best_in = max(p.input_tok_s for p in loaded.prefill if p.input_len == 64)
    best_out = max(d.output_tok_s for d in loaded.decode)
    load = Interval(0, 3600, requests_per_s=3 * best_in / 64, mean_input_len=64, mean_output_len=8)
    result = plan(loaded, [load], slo)
    row = result["intervals"][0]
    assert row["prefill_tok_s_per_rank"] == pytest.approx(best_in)
    assert row["decode_tok_s_per_rank"] == pytest.approx(best_out)
    assert row["prefill_ranks"] == 3  # 3x what one rank did at input_len 64


def test_rank_flags_override_the_count(url, tmp_path):
    """Per rank: tok/s and running divide by the ranks given, not the one of each role /services lists."""
    out = tmp_path / "profile.json"
    done = profile(url, out, "--input-lens", "16", "--prefill-concurrency", "2", "--running", "2", "--decode-input-len",
                   "16", "--decode-output-len", "6", "--prefill-ranks", "2", "--decode-ranks", "4")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    raw = json.loads(out.read_text())
    assert (raw["meta"]["prefill_ranks"], raw["meta"]["decode_ranks"], raw["meta"]["ranks_counted"]) == (2, 4, None)
    (prefill,), (d_prefill,) = raw["prefill"], raw["details"]["prefill"]
    assert prefill["input_tok_s"] == pytest.approx(d_prefill["input_tok_s"] / 2)
    (decode,), (d_decode,) = raw["decode"], raw["details"]["decode"]
    assert decode["running"] == 2 / 4 and decode["context_len"] == 16 + 6 / 2
    assert decode["output_tok_s"] == pytest.approx(d_decode["output_tok_s"] / 4)
    assert "(2 ranks)" in done.stdout and "(4 ranks)" in done.stdout


def test_a_budget_too_small_for_any_point_fails_clearly(url, tmp_path):
    out = tmp_path / "profile.json"
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
        model = json.load(r)["data"][0]["id"]
    # NOTE: --model and the rank flags skip the lookups, which the budget would cut off first
    done = profile(url, out, "--input-lens", "16", "--running", "1", "--max-seconds", "0.001", "--model", model,
                   "--prefill-ranks", "1", "--decode-ranks", "1")
    assert done.returncode == 1 and not out.exists()
    assert "error: no prefill and no decode point measured" in done.stderr and "--max-seconds" in done.stderr
    assert "stopped: the warmup ran past half of --max-seconds" in done.stdout
    assert "Traceback" not in done.stderr


def test_a_prompt_beyond_the_context_ends_the_role_with_the_servers_reason(url, tmp_path):
    """tiny's context is 2048 tokens: the 4096-token prefill point is refused and the sweep goes on
    to decode, whose prompts are all refused: no decode point, exit 1, the server's reason shown."""
    out = tmp_path / "profile.json"
    done = profile(url, out, "--input-lens", "16,4096,8192", "--prefill-concurrency", "1", "--running", "1,2",
                   "--decode-input-len", "4096", "--no-warmup")
    assert done.returncode == 1 and not out.exists(), done.stdout + done.stderr
    assert done.stdout.startswith("prefill input_len=16: ")
    assert "stopped: prefill: input_len 4096 refused, longer ones skipped: HTTP 400: prompt: 4096 tokens" \
        in done.stdout and "8192" not in done.stdout
    assert "error: no decode point measured (" in done.stderr and "context is 2048 tokens" in done.stderr


def chunks(first: float, n: int, gap: float) -> Result:
    r = Result(n, 0.0, ttft_s=first)
    r.token_times_s = [(first + i * gap, 1) for i in range(n)]
    r.itl_s = [gap] * (n - 1)
    r.completion_tokens = n
    return r


def test_decode_counts_the_window_where_every_stream_runs():
    a, b = chunks(0.0, 11, 0.1), chunks(0.5, 11, 0.1)  # a: 0.0..1.0, b: 0.5..1.5; both run in (0.5, 1.0]
    f = decode_figures([a, b])
    assert f["window"] == "every stream running" and f["window_s"] == pytest.approx(0.5)
    assert f["window_tokens"] == 10 and f["output_tok_s"] == pytest.approx(20.0)
    assert f["itl_ms"] == pytest.approx(100.0)
    a, b = chunks(0.0, 3, 0.1), chunks(1.0, 3, 0.2)  # never both running: every token after a first, 0.0..1.4
    f = decode_figures([a, b])
    assert f["window"] == "whole" and f["window_tokens"] == 4 and f["output_tok_s"] == pytest.approx(4 / 1.4)
    assert f["median_itl_ms"] == pytest.approx(150.0)


def test_prefill_rate_runs_to_the_last_first_token():
    a, b = Result(1, 0.0, ttft_s=0.2), Result(1, 0.1, ttft_s=0.3)
    a.prompt_tokens, b.prompt_tokens, b.cached_tokens = 100, 100, 50
    f = prefill_figures([a, b])
    assert f["input_tok_s"] == pytest.approx(200 / 0.4) and f["cache_hit_rate"] == pytest.approx(0.25)
    assert f["median_ttft_ms"] == pytest.approx(250.0) and f["ttft_ms"] == pytest.approx(290.0)


@pytest.mark.parametrize("flag, value, says", [
    ("--input-lens", "16,abc", "'abc' is not an integer >= 1"),
    ("--input-lens", ",", "give at least one integer"),
    ("--running", "0", "'0' is not an integer >= 1"),
    ("--prefill-concurrency", "0", "must be an integer >= 1"),
    ("--decode-input-len", "1.5", "must be an integer >= 1"),
    ("--decode-output-len", "1", "must be an integer >= 2"),
    ("--max-seconds", "-1", "must be a number > 0"),
    ("--max-seconds", "nan", "must be a number > 0"),
    ("--prefill-ranks", "x", "must be an integer >= 1"),
    ("--decode-ranks", "0", "must be an integer >= 1"),
    ("--vocab-size", "2", "must be an integer >= 4"),
])
def test_bad_flags_are_named(capsys, flag, value, says):
    with pytest.raises(SystemExit) as exit_:
        main(["--url", "http://127.0.0.1:9", "--out", "unused.json", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {value!r}: " in err and says in err and "Traceback" not in err


def test_an_unreachable_server_fails_clearly(capsys, tmp_path):
    from shared.launcher.redis_server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    assert main(["--url", url, "--out", str(tmp_path / "p.json")]) == 1
    err = capsys.readouterr().err
    assert f"error: --url {url}: " in err and "Cannot connect" in err and not (tmp_path / "p.json").exists()
