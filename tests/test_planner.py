"""The SLO syntax and `streamoe plan` (shared/planner/): DeepSeek's published day, sized from the
per-GPU throughputs it published, and SLO-driven sizing on a synthetic profile."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from shared.planner.plan import Interval, Units, load_load, load_profile, parse_units, plan
from shared.planner.slo import DEFAULT_SLO, SLO, parse_slo

DAY_S = 86_400
INPUT_TOKENS, OUTPUT_TOKENS, HIT_RATE = 608e9, 168e9, 0.563  # DeepSeek's day (2025-02-27 noon to noon)
MEAN_OUTPUT_LEN = 1_000.0  # any: the totals fix the rates


def test_one_slo_syntax():
    assert parse_slo("ttft:2000 itl:100") == parse_slo("ttft:2000,itl:100") == parse_slo(["ttft:2000", "itl:100"])
    assert parse_slo(None) == parse_slo("") == parse_slo(DEFAULT_SLO) == SLO(ttft_ms=2000.0, itl_ms=100.0)
    assert parse_slo("e2el:9000, tpot:40.5").items() == {"tpot": 40.5, "e2el": 9000.0}
    assert str(parse_slo("itl:50 ttft:300")) == "ttft:300 itl:50"
    for bad, named in (("ttft", "'ttft'"), ("ttft:-1", "'ttft:-1'"), ("speed:5", "'speed:5'"),
                       ("itl:abc", "'itl:abc'"), ("itl:inf", "'itl:inf'"), ("itl:5 itl:6", "itl is given twice")):
        with pytest.raises(ValueError, match=named):
            parse_slo(bad)


def deepseek_day(tmp_path):
    """A flat 24-interval CSV from the day's totals, and a profile of the published per-GPU rates:
    73.7k input tok/s per node in prefill (cache hits included, at the day's hit rate) and 14.8k
    output tok/s per node in decode at ~20 tok/s per stream (ITL 47 ms)."""
    rate = OUTPUT_TOKENS / DAY_S / MEAN_OUTPUT_LEN
    input_len = INPUT_TOKENS / OUTPUT_TOKENS * MEAN_OUTPUT_LEN
    rows = [f"{h * 3600},3600,{rate},{input_len},{MEAN_OUTPUT_LEN},{HIT_RATE}" for h in range(24)]
    load = tmp_path / "day.csv"
    load.write_text("start_s,duration_s,requests_per_s,mean_input_len,mean_output_len,cache_hit_rate\n"
                    + "\n".join(rows) + "\n")
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({
        "prefill": [{"input_len": input_len, "input_tok_s": 9212, "cache_hit_rate": HIT_RATE, "ttft_ms": 1500}],
        "decode": [{"running": 90, "context_len": 4989, "output_tok_s": 1850, "itl_ms": 47}]}))
    return profile, load


def test_deepseek_day_in_nodes_and_dollars(tmp_path):
    profile, load = deepseek_day(tmp_path)
    day = plan(load_profile(profile), load_load(load, 180), parse_slo("itl:50"), parse_units("prefill=8,decode=8"))
    assert len(day["intervals"]) == 24 and day["hours"] == 24
    assert day["mean_nodes"] == pytest.approx(228, rel=0.01)  # DeepSeek: 226.75 on average, 278 at the peak
    assert day["cost_usd"] == pytest.approx(87_552, rel=0.01)  # DeepSeek: $87,072
    assert day["peak_cost_usd"] == pytest.approx(day["cost_usd"])  # a flat load: the peak all day
    first = day["intervals"][0]
    assert first["prefill_ranks"] % 8 == 0 and first["decode_ranks"] % 8 == 0
    assert first["prefill_ranks"] * first["prefill_tok_s_per_rank"] >= first["input_tok_s"]
    assert first["decode_ranks"] * first["decode_tok_s_per_rank"] >= first["output_tok_s"]
    # their EP units: prefill 4 nodes (32 GPUs), decode 18 nodes (144 GPUs)
    ep = plan(load_profile(profile), load_load(load, 180), parse_slo("itl:50"), parse_units("prefill=32,decode=144"))
    assert ep["mean_nodes"] == 240
    # the ITL it was measured at is over a tighter bound: refused, naming it
    with pytest.raises(ValueError, match="ITL of 40 ms or less"):
        plan(load_profile(profile), load_load(load, 180), parse_slo("itl:40"))


SYNTHETIC = {
    "prefill": [{"input_len": 512, "input_tok_s": 20000, "ttft_ms": 120},
                {"input_len": 2048, "input_tok_s": 30000, "ttft_ms": 400},
                {"input_len": 2048, "input_tok_s": 36000, "ttft_ms": 900}],
    "decode": [{"running": 8, "context_len": 1024, "output_tok_s": 400, "itl_ms": 20},
               {"running": 32, "context_len": 1024, "output_tok_s": 1000, "itl_ms": 32},
               {"running": 64, "context_len": 1024, "output_tok_s": 1400, "itl_ms": 46}],
}


def test_more_load_and_tighter_slos_take_more_ranks(tmp_path):
    profile_path = tmp_path / "profile.json"
    profile_path.write_text(json.dumps(SYNTHETIC))
    profile = load_profile(profile_path)
    hour = [Interval(0, 3600, rps, 2048, 256, 0.0) for rps in (2.0, 20.0, 200.0)]
    loose = plan(profile, hour, parse_slo("ttft:2000 itl:50"))
    ranks = [(r["prefill_ranks"], r["decode_ranks"]) for r in loose["intervals"]]
    assert ranks[0] <= ranks[1] <= ranks[2] and ranks[0] < ranks[2]  # more load, more ranks
    assert ranks[2] == (-(-200 * 2048 // 36000), -(-200 * 256 // 1400))  # the best points within the bounds
    tight = plan(profile, hour, parse_slo("ttft:2000 itl:25"))  # only the 8-stream point meets it
    assert [r["decode_ranks"] for r in tight["intervals"]][2] == -(-200 * 256 // 400)
    assert all(t["decode_ranks"] >= lo["decode_ranks"] for t, lo in zip(tight["intervals"], loose["intervals"]))
    assert tight["cost_usd"] > loose["cost_usd"]
    tight_ttft = plan(profile, hour, parse_slo("ttft:500 itl:50"))  # the 900 ms prefill point is out
    assert tight_ttft["intervals"][2]["prefill_ranks"] == -(-200 * 2048 // 30000)
    # an idle interval keeps one unit of each role
    idle = plan(profile, [Interval(0, 60, 0.0, 0.0, 0.0)], parse_slo(None), Units(prefill=2, decode=3))
    assert (idle["intervals"][0]["prefill_ranks"], idle["intervals"][0]["decode_ranks"]) == (2, 3)
    # cache hits make the same input cheaper to prefill
    cached = plan(profile, [Interval(0, 3600, 200.0, 2048, 256, 0.5)], parse_slo("ttft:500 itl:50"))
    assert cached["intervals"][0]["prefill_ranks"] < tight_ttft["intervals"][2]["prefill_ranks"]


def test_a_trace_is_cut_into_intervals_with_its_cache_hits(tmp_path):
    trace = tmp_path / "trace.jsonl"
    lines = [{"timestamp": 0, "input_length": 1024, "output_length": 10, "hash_ids": [1, 2]},
             {"timestamp": 500, "input_length": 1024, "output_length": 30, "hash_ids": [1, 2]},  # all hits
             {"timestamp": 61_000, "input_length": 600, "output_length": 20, "hash_ids": [1, 3]}]  # 512 of 600
    trace.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    first, second = load_load(trace, 60)
    assert (first.requests_per_s, first.mean_input_len, first.mean_output_len) == (2 / 60, 1024, 20)
    assert first.cache_hit_rate == pytest.approx(0.5) and second.cache_hit_rate == pytest.approx(512 / 600)
    assert second.start_s == 60


def test_streamoe_plan_writes_the_plan_and_names_bad_input(tmp_path):
    profile, load = deepseek_day(tmp_path)
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    done = subprocess.run([sys.executable, "-m", "shared.launcher.cli", "plan", "--profile", str(profile), "--load",
                           str(load), "--slo", "itl:50", "--unit", "prefill=8,decode=8", "--out", str(out), "--plot",
                           str(png)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert {"intervals", "rank_hours", "cost_usd", "peak_cost_usd"} <= result.keys()
    assert {"start_s", "prefill_ranks", "decode_ranks"} <= result["intervals"][0].keys()
    assert "mean 228.00 nodes" in done.stdout and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad_profile = tmp_path / "bad.json"
    bad_profile.write_text(json.dumps({"prefill": [{"input_len": 10}], "decode": SYNTHETIC["decode"]}))
    for flags, named in ((["--slo", "itl:fast"], "'itl:fast'"), (["--unit", "prefill=0"], "'prefill=0'"),
                         (["--profile", str(bad_profile)], "prefill\\[0\\]: input_tok_s=None")):
        args = {"--profile": str(profile), "--load": str(load), "--out": str(tmp_path / "x.json")}
        extra = dict(zip(flags[::2], flags[1::2]))
        argv = [a for k, v in {**args, **extra}.items() for a in (k, v)]
        done = subprocess.run([sys.executable, "-m", "shared.launcher.cli", "plan", *argv], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and re.search(named, done.stderr), done.stderr
