"""The load generator's pure parts: workloads, arrivals, the result dict, plots, the CLI's checks,
and the SSE client against a fake server (no model, no Redis)."""
from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from loadgen import workloads
from loadgen.__main__ import command, parse_args
from loadgen.client import Client, Result, base_url, make_session
from loadgen.plots import LATENCY_CDF_PNG, THROUGHPUT_PNG, write_plots
from loadgen.report import build, parse_slo, summary
from loadgen.runner import Run, RunSettings, arrival_gaps, run

FIXTURES = Path(__file__).parent / "fixtures" / "loadgen"
VLLM_KEYS = ["duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
             "output_throughput", "total_token_throughput", "request_goodput"] + \
    [f"{stat}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "std", "p90", "p99")]


def opts(*args: str):
    return parse_args(["--url", "http://127.0.0.1:1", *args])


def test_lengths_in_range_and_runs_repeat():
    a = workloads.build(opts("--workload", "random", "--num-requests", "300", "--input-len", "100",
                             "--output-len", "20", "--range-ratio", "0.5", "--vocab-size", "1024"))
    inputs, outputs = [len(r.prompt) for r in a.requests], [r.output_len for r in a.requests]
    assert min(inputs) >= 50 and max(inputs) <= 150 and len(set(inputs)) > 50
    assert min(outputs) >= 10 and max(outputs) <= 30
    assert all(3 <= t < 1024 for r in a.requests for t in r.prompt)
    b = workloads.build(opts("--workload", "random", "--num-requests", "300", "--input-len", "100",
                             "--output-len", "20", "--range-ratio", "0.5", "--vocab-size", "1024"))
    assert [r.prompt for r in a.requests] == [r.prompt for r in b.requests]
    c = workloads.build(opts("--workload", "random", "--num-requests", "300", "--input-len", "100",
                             "--output-len", "20", "--range-ratio", "0.5", "--seed", "1"))
    assert [r.prompt for r in a.requests] != [r.prompt for r in c.requests]
    fixed = workloads.build(opts("--workload", "random", "--num-requests", "20", "--input-len", "7",
                                 "--output-len", "3"))
    assert {len(r.prompt) for r in fixed.requests} == {7} and {r.output_len for r in fixed.requests} == {3}
    text = workloads.build(opts("--workload", "random", "--num-requests", "5", "--input-len", "9",
                                "--prompt-format", "text"))
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == 9 for r in text.requests)


def test_shared_prefix_groups_share_their_prefix_only():
    w = workloads.build(opts("--workload", "shared-prefix", "--num-requests", "9", "--input-len", "10",
                             "--prefix-len", "64", "--num-prefixes", "3"))
    heads = [tuple(r.prompt[:64]) for r in w.requests]
    assert heads[0] == heads[3] == heads[6] and heads[1] == heads[4] and len(set(heads)) == 3
    assert all(len(r.prompt) == 74 for r in w.requests)
    assert len({tuple(r.prompt[64:]) for r in w.requests}) == 9


def test_multi_turn_history_grows_with_the_actual_reply():
    w = workloads.build(opts("--workload", "multi-turn", "--num-requests", "7", "--num-turns", "3",
                             "--input-len", "5", "--output-len", "4"))
    assert w.num_requests == 7 and [len(c.user_messages) for c in w.conversations] == [3, 3, 1]
    first = w.requests[0]
    sent = first.messages()
    assert sent == [{"role": "user", "content": w.conversations[0].user_messages[0]}]
    second = first.record_reply("reply one", 12, 4)
    assert second.turn == 1 and second.messages() == [*sent, {"role": "assistant", "content": "reply one"},
                                                      {"role": "user", "content": w.conversations[0].user_messages[1]}]
    third = second.record_reply("reply two", 30, 4)
    assert third.record_reply("reply three", 50, 4) is None
    assert w.conversations[0].usages == [(12, 4), (30, 4), (50, 4)]
    assert w.requests[2].record_reply("only", 9, 4) is None


def test_cache_hit_rate_max_by_hand():
    # turn 2: 64·⌊min(100 + 30, 250 − 1)/64⌋ = 128; turn 3: 64·⌊min(250 + 40, 400 − 1)/64⌋ = 256
    assert workloads.cache_hit_rate_max([[(100, 30), (250, 40), (400, 50)]]) == pytest.approx(384 / 750)
    # the last prompt token is never cached: 64·⌊min(64, 63)/64⌋ = 0, then 64·⌊min(64 + 1, 200 − 1)/64⌋ = 64
    assert workloads.cache_hit_rate_max([[(64, 0), (64, 1), (200, 5)], [(10, 2)]]) == pytest.approx(64 / 338)
    assert workloads.cache_hit_rate_max([]) == 0.0


def test_sharegpt_fixture():
    w = workloads.build(opts("--workload", "sharegpt", str(FIXTURES / "sharegpt_small.json")))
    entries = json.loads((FIXTURES / "sharegpt_small.json").read_text())
    assert w.num_requests == 6  # entry 1 has no human turn: skipped
    assert w.requests[0].prompt == entries[0]["conversations"][0]["value"]
    assert w.requests[0].output_len == len(entries[0]["conversations"][1]["value"].split())
    assert w.requests[1].prompt == entries[2]["conversations"][1]["value"]  # after the system turn
    cut = workloads.build(opts("--workload", "sharegpt", "--dataset-path", str(FIXTURES / "sharegpt_small.json"),
                               "--num-requests", "8", "--output-len", "3"))
    assert len(cut.requests) == 8 and cut.requests[6].prompt == cut.requests[0].prompt
    assert {r.output_len for r in cut.requests} == {3}


def test_trace_fixture_equal_hash_ids_give_equal_blocks():
    w = workloads.build(opts("--workload", "trace", str(FIXTURES / "trace_small.jsonl"), "--trace-speedup", "2"))
    p = [r.prompt for r in w.requests]
    assert [len(x) for x in p] == [600, 700, 300, 1030, 512, 90] and [r.output_len for r in w.requests] == \
        [4, 5, 3, 6, 4, 2]
    assert p[0][:512] == p[1][:512] == p[3][:512]  # hash 0
    assert p[1][512:] == p[3][512:700]  # hash 2
    assert p[2] == p[4][:300]  # hash 3
    assert p[0][512:] != p[1][512:600] and p[4] != p[0][:512]
    assert [r.arrival_s for r in w.requests] == pytest.approx([0, 0.075, 0.15, 0.225, 0.3, 0.4])


@pytest.mark.parametrize("lines, expected", [
    (['{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}', "{not json"],
     "line 2: not valid JSON"),
    (['{"timestamp": 0, "input_length": 10, "hash_ids": [1]}'], "line 1: missing 'output_length'"),
    (["", '{"timestamp": 0, "input_length": 600, "output_length": 2, "hash_ids": [1]}'],
     "line 2: 1 hash_ids for input_length=600"),
    (['{"timestamp": -5, "input_length": 10, "output_length": 2, "hash_ids": [1]}'], "line 1: timestamp=-5"),
    (['{"timestamp": 0, "input_length": 10, "output_length": 0, "hash_ids": [1]}'], "line 1: output_length=0"),
    (['[1, 2]'], "line 1: expected a JSON object"),
])
def test_malformed_trace_names_the_line(tmp_path, lines, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(workloads.WorkloadError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        workloads.build(opts("--workload", "trace", str(path)))


@pytest.mark.parametrize("data, expected", [
    ([{"conversations": []}, {"conversations": []}, {"id": "x"}], "entry 2: needs a 'conversations' list"),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}], "entry 0: conversations\\[1\\]"),
    ({"conversations": []}, "expected a JSON list"),
    ([{"conversations": [{"from": "gpt", "value": "hello"}]}], "no entry has a human turn"),
])
def test_malformed_sharegpt_names_the_entry(tmp_path, data, expected):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(workloads.WorkloadError, match=expected):
        workloads.build(opts("--workload", "sharegpt", str(path)))


def test_gamma_arrivals_mean_and_spread():
    for burstiness in (0.5, 1.0, 4.0):
        gaps = arrival_gaps(40_000, 4.0, burstiness, np.random.default_rng(0))
        assert gaps.mean() == pytest.approx(0.25, rel=0.03)
        # gamma: variance = shape·scale² = 1/(rate²·burstiness)
        assert gaps.var() == pytest.approx(1 / (16 * burstiness), rel=0.06)
    assert not arrival_gaps(5, math.inf, 1.0, np.random.default_rng(0)).any()


def results_by_hand() -> list[Result]:
    out = []
    for i in range(10):  # TTFT 100..1000 ms, 5 tokens in ttft + 4·50 ms
        ttft = (i + 1) / 10
        r = Result(5, start_s=i * 0.1, ttft_s=ttft, e2el_s=ttft + 0.2, itl_s=[0.05] * 4, prompt_tokens=100,
                   completion_tokens=5, cached_tokens=64 if i < 5 else 0)
        r.token_times_s = [(r.start_s + ttft + 0.05 * k, 1) for k in range(5)]
        out.append(r)
    out.append(Result(5, start_s=1.0, error="429", message="overloaded"))
    out.append(Result(5, start_s=1.1, error="stream", message="boom"))
    return out


def test_report_keys_and_percentiles():
    w = workloads.Workload("random", [], 12)
    result = build(Run(results_by_hand(), 2.0), w, flags={"rate": math.inf, "model": "m"},
                   slo={"ttft": 500.0}, num_gpus=2, gpu_hour_usd=2.0)
    assert set(VLLM_KEYS) <= set(result)
    assert {"cache_hit_rate", "cache_hit_rate_max", "errors", "economics", "workload", "num_requests",
            "flags"} <= set(result) and "requests" not in result
    assert result["completed"] == 10 and result["duration"] == 2.0
    assert result["total_input_tokens"] == 1000 and result["total_output_tokens"] == 50
    assert result["request_throughput"] == 5.0 and result["output_throughput"] == 25.0
    assert result["total_token_throughput"] == 525.0 and result["request_goodput"] == 2.5  # 5 with ttft <= 500
    assert result["mean_ttft_ms"] == pytest.approx(550) and result["median_ttft_ms"] == pytest.approx(550)
    assert result["p90_ttft_ms"] == pytest.approx(910) and result["p99_ttft_ms"] == pytest.approx(991)
    assert result["std_ttft_ms"] == pytest.approx(100 * math.sqrt(8.25))
    assert result["mean_tpot_ms"] == pytest.approx(50) and result["p99_itl_ms"] == pytest.approx(50)
    assert result["median_e2el_ms"] == pytest.approx(750)
    assert result["cache_hit_rate"] == pytest.approx(320 / 1000) and result["cache_hit_rate_max"] is None
    assert result["errors"] == {"429": 1, "stream": 1, "failed": 2}
    econ = result["economics"]
    assert econ["gpu_hours"] == pytest.approx(4 / 3600) and econ["cost_usd"] == pytest.approx(8 / 3600)
    assert econ["revenue_usd"] == pytest.approx((320 * 0.14 + 680 * 0.55 + 50 * 2.19) / 1e6)
    assert result["flags"]["rate"] == "inf" and json.loads(json.dumps(result, allow_nan=False))
    table = summary(result)
    assert "streamoe load test result" in table and "P99 TTFT (ms):" in table and "991.00" in table
    saved = build(Run(results_by_hand(), 2.0), w, flags={}, save_requests=True)
    assert len(saved["requests"]) == 12 and saved["requests"][-1]["error"] == "stream"
    assert saved["request_goodput"] is None


def test_slo_parsing():
    assert parse_slo(["ttft:200", "tpot:50.5"]) == {"ttft": 200.0, "tpot": 50.5}
    for bad in ("ttft", "ttft:-1", "speed:5", "tpot:abc"):
        with pytest.raises(ValueError, match="METRIC:MS"):
            parse_slo([bad])


@pytest.mark.parametrize("args, flag, value", [
    (["--workload", "random", "--rate", "-1"], "--rate", "-1"),
    (["--workload", "random", "--range-ratio", "1.5"], "--range-ratio", "1.5"),
    (["--workload", "random", "--num-requests", "0"], "--num-requests", "0"),
    (["--workload", "random", "--max-concurrency", "many"], "--max-concurrency", "many"),
    (["--workload", "random", "--burstiness", "0"], "--burstiness", "0"),
    (["--workload", "random", "--slo", "ttft:abc"], "--slo", "ttft:abc"),
    (["--workload", "bogus"], "--workload", "bogus"),
    (["--workload", "trace"], "--workload", "trace needs a FILE"),
    (["--workload", "trace", "/no/such.jsonl"], "--workload", "/no/such.jsonl"),
    (["--workload", "random", "extra.json"], "--workload", "random takes no FILE"),
])
def test_bad_flags_exit_2_naming_flag_and_value(capsys, args, flag, value):
    with pytest.raises(SystemExit) as e:
        opts(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and value in err, err


def test_the_recorded_command_masks_the_api_key():
    assert command(["--url", "u", "--api-key", "secret", "--api-key=other"]) == \
        "python -m loadgen --url u --api-key '***' '--api-key=***'"


def test_plots_are_nonblank_pngs(tmp_path):
    import matplotlib.image

    paths = write_plots(results_by_hand(), 2.0, tmp_path / "plots")
    assert sorted(p.name for p in paths) == sorted([LATENCY_CDF_PNG, THROUGHPUT_PNG])
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels[..., :3].var() > 0


class FakeClient:
    """Stands in for the HTTP client: each request takes `delay` s; records concurrency and order."""

    def __init__(self, delay: float = 0.01, fail_turn: int | None = None):
        self.t0, self.delay, self.inflight, self.most, self.sent = 0.0, delay, 0, 0, []
        self.fail_turn = fail_turn

    async def send(self, request, result):
        self.inflight += 1
        self.most = max(self.most, self.inflight)
        self.sent.append(request)
        await asyncio.sleep(self.delay)
        self.inflight -= 1
        if request.turn == self.fail_turn:
            result.error = "503"
            return
        result.ttft_s, result.e2el_s = self.delay / 2, self.delay
        result.prompt_tokens, result.completion_tokens, result.text = 100 * (request.turn + 1), request.output_len, "r"


async def test_runner_concurrency_cap_and_turn_order():
    w = workloads.build(opts("--workload", "multi-turn", "--num-requests", "12", "--num-turns", "3",
                             "--input-len", "4", "--output-len", "2"))
    client = FakeClient()
    done = await run(w, client, RunSettings(max_concurrency=2, progress=False))
    assert len(done.results) == 12 and all(r.ok for r in done.results) and client.most == 2
    for conv in w.conversations:  # each conversation's turns went out in order, one after the other
        turns = [r.turn for r in client.sent if r.conversation is conv]
        assert turns == [0, 1, 2] and len(conv.messages) == 6


async def test_a_failed_turn_ends_its_conversation():
    w = workloads.build(opts("--workload", "multi-turn", "--num-requests", "8", "--num-turns", "4",
                             "--input-len", "4", "--output-len", "2"))
    done = await run(w, FakeClient(fail_turn=1), RunSettings(progress=False))
    assert [r.error for r in done.results] == [None, None, "503", "503"] and done.num_skipped == 4
    result = build(done, w, flags={})
    assert result["errors"] == {"503": 2, "skipped": 4, "failed": 2} and result["completed"] == 2
    assert result["cache_hit_rate_max"] == 0.0  # no conversation got past its first turn


async def test_runner_rate_and_duration_stop_by_themselves():
    w = workloads.build(opts("--workload", "random", "--num-requests", "2000", "--input-len", "4"))
    started = time.monotonic()
    done = await run(w, FakeClient(delay=5.0), RunSettings(rate=50, duration_s=0.4, grace_s=0.2, progress=False))
    assert time.monotonic() - started < 1.5
    assert 5 <= len(done.results) <= 60 and {r.error for r in done.results} == {"cancelled"}
    assert max(r.start_s for r in done.results) <= 0.45


async def fake_server(aiohttp_port_holder: list) -> web.AppRunner:
    async def completions(request: web.Request):
        body = await request.json()
        assert request.headers["Authorization"] == "Bearer k" and body["stream"] and body["ignore_eos"]
        assert body["stream_options"] == {"include_usage": True} and body["temperature"] == 0
        if body["prompt"] == [429]:
            return web.json_response({"error": {"message": "overloaded"}}, status=429, headers={"Retry-After": "1"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(3):
            await asyncio.sleep(0.02)
            chunk = {"choices": [{"index": 0, "text": f"t{i}", "token_ids": [10 + i]}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if body["prompt"] == [500]:
            await response.write(b'data: {"error": {"message": "worker died"}}\n\n')
        else:
            usage = {"prompt_tokens": 1, "completion_tokens": 3, "prompt_cache_hit_tokens": 1}
            await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    aiohttp_port_holder.append(site._server.sockets[0].getsockname()[1])
    return runner


async def test_client_measures_the_stream_and_records_errors():
    port: list = []
    server = await fake_server(port)
    try:
        async with make_session(10) as session:
            client = Client(session, base_url(f"http://127.0.0.1:{port[0]}/v1/completions"), "m", api_key="k")
            ok, busy, broken = (Result(3, 0.0) for _ in range(3))
            await client.send(workloads.Request(3, [7]), ok)
            await client.send(workloads.Request(3, [429]), busy)
            await client.send(workloads.Request(3, [500]), broken)
    finally:
        await server.cleanup()
    assert ok.ok and ok.text == "t0t1t2" and ok.completion_tokens == 3 and ok.cached_tokens == 1
    assert len(ok.itl_s) == 2 and ok.ttft_s >= 0.015 and ok.e2el_s >= ok.ttft_s + 0.03
    assert ok.tpot_s == pytest.approx((ok.e2el_s - ok.ttft_s) / 2)
    assert busy.error == "429" and busy.message == "overloaded" and not busy.ok
    assert broken.error == "stream" and "worker died" in broken.message
