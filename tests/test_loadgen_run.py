"""`python -m loadgen` as a user runs it: a subprocess against the real services (tiny model)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from loadgen import workloads
from loadgen.__main__ import parse_args

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "loadgen"
SMALL = ["--input-len", "40", "--output-len", "6", "--range-ratio", "0.5", "--vocab-size", "1024"]
WORKLOADS = {
    "random": ["random", "--num-requests", "8", *SMALL],
    "shared-prefix": ["shared-prefix", "--num-requests", "8", "--prefix-len", "128", "--num-prefixes", "2",
                      "--max-concurrency", "3", *SMALL],
    "multi-turn": ["multi-turn", "--num-requests", "8", "--num-turns", "4", *SMALL],
    "sharegpt": ["sharegpt", str(FIXTURES / "sharegpt_small.json"), "--num-requests", "6", "--output-len", "5"],
    "trace": ["trace", str(FIXTURES / "trace_small.jsonl"), "--trace-speedup", "4"],
}


@pytest.fixture(scope="module")
def url(system) -> str:
    return system[-1].url("")


def gateway_counts(gateway) -> dict:
    """What the gateway counted so far, and its TTFT histogram (upper bound -> cumulative count)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(gateway.url("/metrics"), timeout=10) as r:
        families = list(text_string_to_metric_families(r.read().decode()))
    out = {"ttft_buckets": {}}
    for family in families:
        for s in family.samples:
            if s.name == "streamoe_tokens_total":
                out[s.labels["kind"]] = s.value
            elif s.name == "streamoe_requests_total":
                out[s.labels["outcome"]] = s.value
            elif s.name == "streamoe_ttft_seconds_bucket":
                out["ttft_buckets"][float(s.labels["le"])] = s.value
    return out


def check_against_metrics(before: dict, after: dict, result: dict) -> None:
    """The loadgen result agrees with what the gateway counted over the run: requests, tokens by
    kind, and TTFTs (the gateway's clock runs inside the client's, so each request's TTFT at the
    gateway is at most the client's and at most a few ms less)."""
    delta = {k: after[k] - before[k] for k in ("completed", "input_cache_hit", "input_cache_miss", "output")}
    assert delta["completed"] == result["completed"]
    assert delta["output"] == result["total_output_tokens"]
    assert delta["input_cache_hit"] + delta["input_cache_miss"] == result["total_input_tokens"]
    assert delta["input_cache_hit"] == sum(r["cached_tokens"] for r in result["requests"])
    client = sorted(r["ttft_ms"] / 1000 for r in result["requests"] if r["error"] is None)
    n = len(client)
    for bound, cumulative in after["ttft_buckets"].items():
        at_gateway = cumulative - before["ttft_buckets"][bound]  # requests whose gateway TTFT <= bound
        assert at_gateway >= sum(t <= bound for t in client), f"le={bound}"
        assert at_gateway <= sum(t <= bound + 1.0 for t in client) or bound == float("inf"), f"le={bound}"
    assert at_gateway == n


def loadgen(url: str, tmp_path: Path, *args: str, timeout: float = 120) -> tuple[dict, str]:
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-m", "loadgen", "--url", url, "--out", str(out), "--no-progress", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def planned(args: list[str]) -> workloads.Workload:
    """The workload the subprocess built: the same flags and seed give the same requests."""
    return workloads.build(parse_args(["--url", "http://unused", "--workload", *args]))


def planned_output_tokens(w: workloads.Workload) -> int:
    if w.conversations:
        return sum(sum(c.output_lens) for c in w.conversations)
    return sum(r.output_len for r in w.requests)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_each_workload_completes_with_exact_token_counts(system, url, tmp_path, name):
    args = WORKLOADS[name]
    before = gateway_counts(system[-1])
    result, stdout = loadgen(url, tmp_path, "--workload", *args, "--save-requests")
    check_against_metrics(before, gateway_counts(system[-1]), result)
    w = planned(args)
    assert "streamoe load test result" in stdout
    assert result["workload"] == name and result["num_requests"] == w.num_requests
    assert result["completed"] == w.num_requests and result["errors"] == {"failed": 0}
    assert result["total_output_tokens"] == planned_output_tokens(w)  # ignore_eos: exact
    if isinstance(w.requests[0].prompt, list):  # token ids: the server counts exactly what was sent
        assert result["total_input_tokens"] == sum(len(r.prompt) for r in w.requests)
    for metric in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < result[f"median_{metric}_ms"] <= result[f"p90_{metric}_ms"] <= result[f"p99_{metric}_ms"]
    assert result["mean_ttft_ms"] < result["mean_e2el_ms"]
    assert result["output_throughput"] == pytest.approx(result["total_output_tokens"] / result["duration"])
    assert result["economics"]["output_tokens"] == result["total_output_tokens"]
    assert 0.0 <= result["cache_hit_rate"] <= 1.0
    assert not [key for key in result if key.startswith("spec_decode")]  # no speculation, no counters: left out
    if name == "random":
        assert result["cache_hit_rate"] == 0.0  # random prompts share no 64-token block
    if name == "multi-turn":
        assert result["cache_hit_rate_max"] > 0
        assert result["cache_hit_rate"] <= result["cache_hit_rate_max"] + 1e-9  # no cache beats the bound
    else:
        assert result["cache_hit_rate_max"] is None


def test_plot_writes_pngs(url, tmp_path):
    import matplotlib.image

    result, stdout = loadgen(url, tmp_path, "--workload", "random", "--num-requests", "6", *SMALL, "--rate", "20",
                             "--plot", str(tmp_path / "plots"), "--slo", "ttft:60000", "tpot:60000")
    assert result["completed"] == 6 and result["request_goodput"] == pytest.approx(result["request_throughput"])
    for name in ("latency_cdf.png", "throughput_over_time.png"):
        pixels = matplotlib.image.imread(tmp_path / "plots" / name)
        assert pixels[..., :3].var() > 0 and f"wrote {tmp_path / 'plots' / name}" in stdout


def test_duration_stops_the_run_by_itself(url, tmp_path):
    started = time.monotonic()
    result, _ = loadgen(url, tmp_path, "--workload", "random", "--num-requests", "2000", "--input-len", "20",
                        "--output-len", "4", "--rate", "8", "--duration", "1.5", "--grace-period", "20")
    assert time.monotonic() - started < 20
    assert 1 <= result["completed"] < 2000 and result["errors"] == {"failed": 0}  # the grace let them finish
    assert result["duration"] < 1.5 + 20


def test_cost_report_reads_the_live_system(system, url):
    """`streamoe cost --url` totals what every service added to Redis (the gateway's /usage) and
    takes the per-rank rates from each live service's metrics, found through the gateway: once the
    services' housekeeping tick has added them, the tokens equal the gateway's, and the two worker
    ranks count as two GPUs."""
    counted = gateway_counts(system[-1])
    deadline = time.monotonic() + 20  # --housekeeping-s is 5 s
    while True:
        done = subprocess.run([sys.executable, "-m", "shared.launcher.cli", "cost", "--url", url, "--json"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        if report["output_tokens"] == counted["output"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert report["output_tokens"] == counted["output"] > 0
    assert report["input_cache_hit_tokens"] + report["input_cache_miss_tokens"] == \
        counted["input_cache_hit"] + counted["input_cache_miss"]
    assert report["sources"][0] == f"{url}/usage" and len(report["sources"]) == 7
    assert set(report["prefill_input_tokens_per_s"]) == {"0"}
    assert report["decode_output_tokens_per_s"]["0"] > 0 and report["cost_usd"] > 0 and report["gpu_hours"] > 0


def test_bench_hops_streams_every_token_and_weighs_each_hop_against_the_step(tiny_fp32, tmp_path):
    """loadgen.bench_hops: every stream gets all its tokens through the real tokenizer and gateway;
    the CPU of each hop is counted over that phase and set against the decode step's CPU per token."""
    from loadgen import bench_hops

    out = tmp_path / "hops.json"
    result = bench_hops.main(["--model", str(tiny_fp32), "--streams", "4", "--steps", "60", "--step-interval-ms",
                              "5", "--dtype", "fp32", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["hops"]["tokens"] == 240 and set(result["hops"]["cpu_us_per_token"]) == {"tokenizer", "gateway",
                                                                                           "redis"}
    assert result["hops"]["cpu_us_per_token"]["gateway"] > 0 and result["hops"]["cpu_us_per_token"]["tokenizer"] > 0
    step = result["decode_step"]
    assert step["cpu_us_per_token"] > 0 and step["dtype"] == "fp32" and step["step_ms"] > 0
    for name, us in result["hops"]["cpu_us_per_token"].items():
        assert result["share_of_step"][name] == pytest.approx(us / step["cpu_us_per_token"])
