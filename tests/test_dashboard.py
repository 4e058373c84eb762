"""The gateway's dashboard (services/README.md, "Dashboard"): the aggregation over Prometheus text
(pure, with shared/runtime/promtext.py), the keys that guard /dashboard/state, /services and
/usage, `streamoe cost --api-key` and the load generator's key, and the page itself in a real
headless Chromium (Playwright) against a live system under load, then with its decode rank killed."""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web

from services.gateway import dashboard as dash
from shared.planner.slo import parse_slo
from shared.protocol import streams
from shared.protocol.messages import PlacementUpdate
from shared.protocol.wire import encode
from shared.runtime import promtext

KEY = "sk-dash-" + secrets.token_hex(8)
CHROMIUM = os.environ.get("STREAMOE_TEST_CHROMIUM", "/usr/bin/chromium")
STATIC = Path(dash.__file__).parent / "static"


# -- the arithmetic, over Prometheus text --------------------------------------------------------------
def gateway_text(completed: int, hit: int, miss: int, output: int, ttft: tuple[int, int, int]) -> str:
    """A gateway's exposition: requests, tokens, and TTFT buckets (cumulative at 0.08, 0.16, +Inf)."""
    return "\n".join([
        "# HELP streamoe_requests_total Generation requests by outcome",
        "# TYPE streamoe_requests_total counter",
        f'streamoe_requests_total{{outcome="completed"}} {completed}.0',
        'streamoe_requests_total{outcome="error"} 0.0',
        "# TYPE streamoe_tokens_total counter",
        f'streamoe_tokens_total{{kind="input_cache_hit"}} {hit}.0',
        f'streamoe_tokens_total{{kind="input_cache_miss"}} {miss}.0',
        f'streamoe_tokens_total{{kind="output"}} {output}.0',
        "# TYPE streamoe_ttft_seconds histogram",
        f'streamoe_ttft_seconds_bucket{{le="0.08"}} {ttft[0]}.0',
        f'streamoe_ttft_seconds_bucket{{le="0.16"}} {ttft[1]}.0',
        f'streamoe_ttft_seconds_bucket{{le="+Inf"}} {ttft[2]}.0',
        f"streamoe_ttft_seconds_count {ttft[2]}.0",
        "streamoe_gateway_inflight_requests 2.0",
        "streamoe_http_requests_total{route=\"/v1/completions\",code=\"200\"} 99.0", ""])


def decode_text(experts: dict[tuple[int, int], int], drafts: int, accepted: int, group: str = "decode") -> str:
    labels = f'group="{group}",rank="0",role="decode"'
    lines = [f"streamoe_running_requests{{{labels}}} 3.0", f"streamoe_waiting_requests{{{labels}}} 1.0",
             f"streamoe_kv_blocks_used{{{labels}}} 25.0", f"streamoe_kv_blocks_total{{{labels}}} 100.0",
             f"streamoe_spec_decode_num_draft_tokens_total{{{labels}}} {drafts}.0",
             f"streamoe_spec_decode_num_accepted_tokens_total{{{labels}}} {accepted}.0",
             f"streamoe_ep_group_members{{{labels}}} 1.0"]
    lines += [f'streamoe_expert_tokens_total{{{labels},layer="{layer}",expert="{e}"}} {n}.0'
              for (layer, e), n in experts.items()]
    return "\n".join(lines) + "\n"


def parse(text: str) -> promtext.Raw:
    return promtext.parse_metrics(text, dash.WANTED)


def test_quantiles_and_attainment_interpolate_as_prometheus():
    cumulative = [(0.08, 2.0), (0.16, 8.0), (math.inf, 10.0)]
    assert promtext.quantile(0.5, cumulative) == pytest.approx(0.12)  # 0.08 + 0.08 * (5 - 2) / (8 - 2)
    assert promtext.quantile(0.95, cumulative) == 0.16  # in the +Inf bucket: the highest finite bound
    assert promtext.quantile(0.1, cumulative) == pytest.approx(0.08 * 1 / 2)
    assert promtext.quantile(0.5, [(0.08, 0.0), (math.inf, 0.0)]) is None
    assert promtext.attainment(0.1, cumulative) == pytest.approx((2 + 6 * 0.25) / 10)
    assert promtext.attainment(0.04, cumulative) == pytest.approx(0.1)
    assert promtext.attainment(1.0, cumulative) == pytest.approx(0.8)  # beyond the last finite bound: what is known
    assert promtext.attainment(0.1, []) is None


def test_gains_count_restarts_and_wait_for_new_sources():
    key = ("streamoe_requests_total", (("outcome", "completed"),))
    other = ("streamoe_tokens_total", (("kind", "output"),))
    prev = {"a": {key: 10.0}, "b": {key: 50.0}}
    cur = {"a": {key: 14.0, other: 7.0}, "b": {key: 3.0}, "c": {key: 1000.0}}
    # a: +4, and a series new in a known source counts whole; b restarted: its 3; c is new: nothing yet
    assert promtext.gains(prev, cur) == {key: 7.0, other: 7.0}
    assert promtext.levels(cur)[key] == 1017.0


def test_a_sample_from_two_scrapes():
    """Rates over the interval, quantiles and attainment of what it observed, gauges now."""
    slo_s = {"ttft": 0.1, "itl": 0.1}
    before = {"g": parse(gateway_text(10, 64, 100, 50, (0, 0, 0))),
              "d": parse(decode_text({}, 0, 0)),
              "d2": parse(decode_text({}, 0, 0, group="decode-2"))}
    after = {"g": parse(gateway_text(20, 128, 300, 150, (2, 8, 10))),
             "d": parse(decode_text({}, 40, 30)),
             "d2": parse(decode_text({}, 0, 0, group="decode-2"))}
    assert ("streamoe_http_requests_total", (("code", "200"), ("route", "/v1/completions"))) not in after["g"]
    point = dash.build_sample(1000.0, 5.0, promtext.gains(before, after), promtext.levels(after), slo_s)
    assert point["requests_per_s"] == 2.0 and point["dt"] == 5.0
    assert point["input_tokens_per_s"] == (64 + 200) / 5 and point["output_tokens_per_s"] == 20.0
    assert point["cached_tokens_per_s"] == 64 / 5 and point["prefix_hit_rate"] == 64 / 264
    assert point["ttft_p50"] == pytest.approx(0.12) and point["ttft_p99"] == 0.16
    assert point["ttft_slo_attainment"] == pytest.approx(0.35)
    assert point["itl_p50"] is None and point["itl_slo_attainment"] is None  # no gap observed
    assert (point["running"], point["waiting"], point["inflight"]) == (6.0, 2.0, 2.0)
    assert point["kv_usage"] == {"0": 0.25, "decode-2/0": 0.25}
    assert point["spec_acceptance"] == 0.75
    assert "planner" not in point
    with pytest.raises(ValueError, match="not Prometheus text"):
        parse('streamoe_tokens_total{kind="output} 1\n')


def test_the_aggregator_keeps_a_window_of_expert_load_placements_and_cost():
    model = {"n_routed_experts": 4, "first_k_dense_replace": 1, "num_hidden_layers": 3}
    agg = dash.Aggregator(parse_slo("ttft:100 itl:50"), model, window=2)
    ep = {("decode", "decode"): {"ep_size": 2, "num_slots": 4}}
    usage = {'streamoe_tokens_total{kind="output"}': 1e6,
             'streamoe_gpu_seconds_total{group="decode",rank="0",role="decode"}': 3600.0}
    parts = {"live": [], "ep": ep, "usage": usage}
    texts = [decode_text({(1, 0): 10, (2, 1): 5}, 0, 0), decode_text({(1, 0): 30, (1, 3): 20, (2, 1): 45}, 0, 0)]
    assert agg.step(100.0, {"d": gateway_text(1, 0, 0, 0, (0, 0, 0)) + texts[0]}, parts)[0] is None  # a baseline
    point, now = agg.step(105.0, {"d": gateway_text(3, 0, 0, 0, (1, 2, 2)) + texts[1]}, parts)
    (group,) = now["experts"]
    assert group["layers"] == [1, 2] and group["tokens"] == [[20, 0, 0, 20], [0, 40, 0, 0]]
    assert group["expert_max_mean"] == pytest.approx((20 / 10 + 40 / 10) / 2)
    # the initial placement: rank 0 holds experts 0-1, rank 1 experts 2-3 -> layer 1: 20/20, layer 2: 40/0
    assert group["rank_max_mean"] == pytest.approx((1.0 + 2.0) / 2) and group["placement_version"] is None
    assert now["cost"]["cost_usd"] == 2.0 and now["cost"]["revenue_usd"] == pytest.approx(2.19)
    assert now["cost"]["from"] == "redis usage" and point["margin_pct"] == pytest.approx(9.5)
    assert now["window"]["requests"] == 2 and now["window"]["ttft_slo_attainment"] == pytest.approx((1 + 0.25) / 2)
    assert now["ep_members"] == [{"role": "decode", "group": "decode", "rank": 0, "members": 1}]
    # an older balancer's placement (no time) seen from the start: no known time; a new version is
    # timed when it shows up
    placed = PlacementUpdate(3, [[0, 3, 1, 2], [0, 2, 1, 3]], 1.5, 1.0)
    _, now = agg.step(110.0, {"d": texts[1]}, parts | {"placements": {("decode", "decode"): placed}})
    (group,) = now["experts"]
    assert (group["placement_version"], group["rebalanced_at"], group["max_mean_before"]) == (3, None, 1.5)
    assert group["rank_max_mean"] == pytest.approx(2.0)  # {0,3} vs {1,2}, then {0,2} vs {1,3}
    placed = PlacementUpdate(4, placed.phy2log, 2.0, 1.2)
    _, now = agg.step(115.0, {"d": texts[1]}, parts | {"placements": {("decode", "decode"): placed}})
    assert (now["experts"][0]["placement_version"], now["experts"][0]["rebalanced_at"]) == (4, 115.0)
    # a placement that says when EPLB published it: that time
    placed = PlacementUpdate(5, placed.phy2log, 1.2, 1.1, time=112.5)
    _, now = agg.step(120.0, {"d": texts[1]}, parts | {"placements": {("decode", "decode"): placed}})
    assert (now["experts"][0]["placement_version"], now["experts"][0]["rebalanced_at"]) == (5, 112.5)
    # two intervals without new load: the window (2) no longer holds any
    assert now["experts"][0]["total"] == 0 and now["window"]["requests"] == 0


def test_services_down_and_restarts():
    live = [{"name": "gateway", "instance_id": "g", "metrics_url": "u"},
            {"name": "decode", "instance_id": "d", "metrics_url": "v", "draining": False}]
    supervisor = {"processes": [{"name": "gateway", "instance_id": "g", "restarts": 0, "pid": 1},
                                {"name": "decode", "instance_id": "d", "rank": 0, "group": "decode", "restarts": 2},
                                {"name": "prefill", "instance_id": "p", "rank": 0, "restarts": 1}]}
    assert dash.supervisor_record(json.dumps(supervisor), live) == supervisor
    assert dash.supervisor_record(json.dumps(supervisor), [{"instance_id": "other"}]) is None  # an earlier run's
    assert dash.supervisor_record(b"not json", live) is None
    rows = dash.service_rows(live, {"d": "v: connection refused"}, supervisor, {})
    assert [(r["name"], r["status"], r["restarts"]) for r in rows] == \
        [("gateway", "up", 0), ("prefill", "down", 1), ("decode", "down", 2)]
    assert rows[2]["detail"] == "v: connection refused"
    # without streamoe up: a heartbeat that lapsed without a drain is down; a drained one is gone
    board = dash.Dashboard("g", lambda: "", parse_slo(None), Path("/nonexistent"), 1)
    board._follow_departures(live + [{"name": "cache", "instance_id": "c", "draining": True}], 1.0)
    board._follow_departures(live[:1], 2.0)
    assert set(board.departed) == {"d"}
    rows = dash.service_rows(live[:1], {}, None, board.departed)
    assert [(r["name"], r["status"], r["detail"]) for r in rows] == \
        [("gateway", "up", None), ("decode", "down", "heartbeat lapsed")]


def test_stream_rows_say_when_redis_has_no_lag():
    rows, supported = dash.stream_rows({"s": (5, [{b"name": b"g", b"pending": 2, b"lag": 3}]), "t": (0, [])})
    assert supported and rows == [{"stream": "s", "group": "g", "length": 5, "pending": 2, "lag": 3},
                                  {"stream": "t", "group": None, "length": 0, "pending": None, "lag": None}]
    rows, supported = dash.stream_rows({"s": (5, [{"name": "g", "pending": 0}])})  # Redis 6.2: no lag field
    assert not supported and rows[0]["lag"] is None
    assert dash.finite({"a": [float("nan"), 1.5, float("inf")]}) == {"a": [None, 1.5, None]}


# -- keys ----------------------------------------------------------------------------------------------
def gateway_app(tmp_path: Path, **settings):
    from services.gateway.app import GatewayService, GatewaySettings
    from shared.runtime.service import ServiceConfig

    (tmp_path / "tokenizer.json").write_text("{}")
    service = GatewayService(ServiceConfig("redis://127.0.0.1:1/0", "dash-keys"),
                             GatewaySettings(tmp_path, "m", **settings))
    app = service.make_app()
    app.router.add_get("/health", service._health)
    app.router.add_get("/metrics", service._metrics)
    service.add_routes(app)
    return app


async def test_keys_guard_the_data_and_not_the_page(tmp_path):
    """With keys: /dashboard/state, /services, /usage answer 401 in OpenAI's shape without a valid
    key; the page, its scripts and styles, /health and /metrics stay open."""
    from aiohttp.test_utils import TestClient, TestServer

    async with TestClient(TestServer(gateway_app(tmp_path, api_keys=(KEY, "other")))) as client:
        for path in ("/dashboard/state", "/services", "/usage"):
            for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"}):
                r = await client.get(path, headers=auth)
                assert r.status == 401, (path, auth)
                assert (await r.json())["error"]["code"] == "invalid_api_key"
        r = await client.get("/dashboard/state", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status == 200 and (await r.json())["history"] == []
        for path, kind in (("/dashboard", "text/html"), ("/dashboard/static/dashboard.js", "text/javascript"),
                           ("/dashboard/static/uPlot.iife.min.js", "text/javascript"),
                           ("/dashboard/static/uPlot.min.css", "text/css"), ("/metrics", "text/plain")):
            r = await client.get(path)
            assert r.status == 200 and r.content_type == kind, path
        r = await client.get("/dashboard/static/README.md")  # only what the page loads
        assert r.status == 404 and (await r.json())["error"]["message"].startswith("Invalid URL")
    async with TestClient(TestServer(gateway_app(tmp_path / "..", dashboard=False))) as client:
        assert (await client.get("/dashboard")).status == 404


def test_the_vendored_chart_library_keeps_its_licence_and_version():
    vendor = STATIC / "vendor"
    assert (vendor / "uPlot.iife.min.js").read_text().startswith("/*! https://github.com/leeoniya/uPlot (v1.6.31) */")
    assert "The MIT License" in (vendor / "LICENSE.uPlot").read_text()
    assert "uplot@1.6.31" in (vendor / "README.md").read_text()
    assert "cdn" not in (STATIC / "dashboard.html").read_text().lower()


async def test_cost_and_the_load_generator_send_the_key(tmp_path, capsys, monkeypatch):
    """`streamoe cost --api-key` (or STREAMOE_API_KEY) reads a keyed gateway's /services and /usage;
    without it, the error says which flag; loadgen's speculation counters read /services with it."""
    import asyncio

    from test_cost import serve_with

    from loadgen import spec_counters
    from loadgen.__main__ import parse_args
    from shared.launcher.cli import main

    async def handle(request: web.Request) -> web.Response:
        if request.path in ("/services", "/usage") and request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response({"error": {"message": "missing or wrong API key"}}, status=401)
        if request.path == "/services":
            base = f"http://127.0.0.1:{request.url.port}"
            return web.json_response({"services": [{"name": "decode", "instance_id": "d",
                                                    "metrics_url": f"{base}/metrics"}]})
        if request.path == "/usage":
            return web.Response(text='streamoe_tokens_total{kind="output"} 1000000.0\n')
        return web.Response(text=decode_text({}, 10, 4))

    async with serve_with(handle) as base:
        monkeypatch.delenv("STREAMOE_API_KEY", raising=False)
        assert await asyncio.to_thread(main, ["cost", "--url", base, "--json"]) == 1
        err = capsys.readouterr().err
        assert f"{base}/services: HTTP 401" in err and "--api-key" in err, err
        assert await asyncio.to_thread(main, ["cost", "--url", base, "--json", "--api-key", KEY]) == 0
        assert json.loads(capsys.readouterr().out)["output_tokens"] == 1_000_000
        monkeypatch.setenv("STREAMOE_API_KEY", f"{KEY},another")  # as the gateway reads it: the first is used
        assert await asyncio.to_thread(main, ["cost", "--url", base, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["output_tokens"] == 1_000_000
        assert parse_args(["--url", base, "--workload", "random"]).api_key == f"{KEY},another"
        scraped = await asyncio.to_thread(spec_counters.scrape, base, 5.0, KEY)
        assert scraped == {f"{base}/metrics": {"draft_tokens": 10.0, "accepted_tokens": 4.0}}
        # without the key, /services refuses: only the server's own /metrics is read
        assert list(await asyncio.to_thread(spec_counters.scrape, base, 5.0)) == [f"{base}/metrics"]


# -- the page, live --------------------------------------------------------------------------------------
def get(url: str, key: str | None = None, timeout: float = 10) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def state(gateway) -> dict:
    status, body = get(gateway.url("/dashboard/state"), KEY)
    assert status == 200, body[:300]
    return json.loads(body)


@pytest.fixture(scope="module")
def live(tiny_fp32, redis_url):
    """tokenizer, cache, balancer, prefill and decode ranks and a keyed gateway sampling every second,
    started side by side."""
    import redis as sync_redis
    from procs import ServiceProcess, stop_all

    sync_redis.Redis.from_url(redis_url).flushdb()
    worker = ["--model", str(tiny_fp32), "--dtype", "fp32", "--rank", "0", "--threads", "1", "--kv-cache-mib", "64"]
    specs = {"tokenizer": ["--model", str(tiny_fp32)], "cache": ["--model", str(tiny_fp32)], "balancer": [],
             "prefill": worker, "decode": worker,
             "gateway": ["--model", str(tiny_fp32), "--api-key", KEY, "--dashboard-interval-s", "1",
                         "--request-timeout-s", "120"]}
    services = {}
    try:
        for name, args in specs.items():
            services[name] = ServiceProcess(f"services.{name}", redis_url, *args, wait=False)
        for service in services.values():
            service.wait_healthy()
        yield services
    finally:
        stop_all(services.values())


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; or set STREAMOE_TEST_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # NOTE: Debian's own Chromium, never a browser Playwright downloads
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def artifacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("STREAMOE_TEST_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


class Page:
    """A page of the dashboard with its console watched: errors are counted from `watch()` on."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.watching = False
        self.before: list[str] = []
        self.states: list = []  # the /dashboard/state responses the page received
        self.page.on("console", lambda m: (self.errors if self.watching else self.before).append(m.text)
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("response", lambda r: self.states.append(r)
                     if self.watching and "/dashboard/state" in r.url else None)
        self.page.goto(url)

    def enter_key(self, key: str, watch: bool = False) -> None:
        """Once the page asks for it; with `watch`, console errors count from here on (the polls
        before a valid key are refused, and Chromium logs each 401)."""
        self.page.wait_for_selector("#key-form:not([hidden])", timeout=10_000)
        self.watching = self.watching or watch
        self.page.fill("#key-input", key)
        self.page.click("#key-submit")

    def close(self) -> None:
        self.context.close()


class Load:
    """Completions from `workers` threads, one after another each, until `stop()`; their prompts share
    a whole first block (prefix-cache hits). Every one must succeed."""

    def __init__(self, gateway, model: str, workers: int = 4):
        self.gateway, self.model = gateway, model
        self.stopping = threading.Event()
        self.sent, self.failures = 0, []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.work, args=(w,)) for w in range(workers)]
        for t in self.threads:
            t.start()

    def work(self, worker: int) -> None:
        i = 0
        while not self.stopping.is_set():
            body = json.dumps({"model": self.model, "prompt": list(range(3, 67)) + [100 + worker, 200 + i, 7],
                               "max_tokens": 12, "temperature": 0, "ignore_eos": True}).encode()
            request = urllib.request.Request(self.gateway.url("/v1/completions"), data=body, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
            try:
                with urllib.request.urlopen(request, timeout=120) as r:
                    r.read()
            except OSError as e:
                self.failures.append(repr(e))
            with self.lock:
                self.sent += 1
            i += 1

    def stop(self) -> int:
        self.stopping.set()
        for t in self.threads:
            t.join()
        assert not self.failures, self.failures
        return self.sent


def gateway_counter(gateway, name: str, **labels: str) -> float:
    from procs import metric

    return metric(gateway, name, **labels)


def color_pixels(page, selector: str, rgb: tuple[int, int, int]) -> list[int]:
    """Per canvas matching `selector`: pixels within 40 of `rgb` (the series' stroke)."""
    return page.evaluate("""([selector, rgb]) => [...document.querySelectorAll(selector)].map((c) => {
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) {
          const off = Math.abs(d[i] - rgb[0]) + Math.abs(d[i + 1] - rgb[1]) + Math.abs(d[i + 2] - rgb[2]);
          if (d[i + 3] > 200 && off < 40) n++;
        }
        return n;
      })""", [selector, list(rgb)])


def test_the_page_shows_the_live_system(live, browser, tiny_fp32, redis_url, tmp_path, capsys):
    """After its key, and while load runs, the page draws what /dashboard/state said; once the load
    stops, the state adds up to what the services counted. `streamoe up`'s process list, a planner
    decision and an EPLB placement are written to Redis as those would write them, so their panels
    show too."""
    import redis as sync_redis

    from shared.launcher.cli import main

    gateway = live["gateway"]
    for path in ("/dashboard/state", "/services", "/usage"):
        status, body = get(gateway.url(path))
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key", path
    for path in ("/dashboard", "/metrics", "/health"):
        assert get(gateway.url(path))[0] == 200, path
    client = sync_redis.Redis.from_url(redis_url)
    processes = [{"name": name, "rank": 0 if name in ("prefill", "decode") else None, "pid": s.proc.pid,
                  "instance_id": s.instance_id, "restarts": 2 if name == "decode" else 0,
                  "ports": {"http": s.port}} for name, s in live.items()]
    client.set(streams.SUPERVISOR_PROCESSES, json.dumps({"time": time.time(), "supervisor_pid": os.getpid(),
                                                         "rolling_restarts": 0, "processes": processes}))
    client.hset(streams.PLANNER_DECISIONS, mapping={"seq": 7, "time": time.time(), "prefill": 1, "decode": 2,
                                                    "prefill_actual": 1, "decode_actual": 1,
                                                    "prefill_reason": "load", "decode_reason": "slo"})
    client.set(streams.placement_key("decode", "decode"), encode(PlacementUpdate(1, [list(range(16))] * 2, 1.8, 1.1)))

    page = Page(browser, gateway.url("/dashboard"))
    load = None
    try:
        p = page.page
        page.enter_key("sk-wrong")
        p.wait_for_function("document.getElementById('key-error').textContent.includes('refused')", timeout=10_000)
        assert p.is_visible("#key-form") and not p.is_visible("#panels")
        refused = list(page.before)
        assert refused and all("401" in m for m in refused), refused  # the refused polls only
        page.enter_key(KEY, watch=True)
        p.wait_for_selector("#panel-throughput .u-legend", timeout=10_000)
        load = Load(gateway, tiny_fp32.resolve().name)
        # a point drawn under load: tokens flowing, requests running, latencies measured, and the
        # workers' usage flushed to Redis (every few seconds: until then the cost panel has none)
        p.wait_for_function("""() => ['last.output_tokens_per_s', 'last.ttft_p50', 'last.itl_p50', 'last.kv_usage.0',
            'cost.output_tokens'].every((f) =>
              Number(document.querySelector(`[data-field="${f}"]`)?.dataset.value) > 0)""", timeout=30_000)
        shown = p.evaluate("""() => ({
            t: document.body.dataset.sampleT,
            stats: Object.fromEntries([...document.querySelectorAll('.stat[data-field]')].map(
              (s) => [s.dataset.field, s.dataset.value])),
            legend: [...document.querySelectorAll('#panel-throughput .u-legend .u-series')].map(
              (s) => [s.querySelector('.u-label').textContent, s.querySelector('.u-value').textContent]),
            services: [...document.querySelectorAll('#panel-services tbody tr')].map(
              (r) => [...r.children].map((c) => c.textContent)),
            planner: document.querySelector('#panel-planner .body').textContent,
            streams: document.querySelector('#panel-streams').textContent,
          })""")
        shot = artifacts(tmp_path) / "dashboard.png"
        p.screenshot(path=str(shot), full_page=True)
        with capsys.disabled():  # the test reads `streamoe cost`'s output from capsys below
            print(f"dashboard screenshot: {shot}")
        bodies = [r.json() for r in page.states if r.status == 200]
        rendered = next(b for b in reversed(bodies) if b["history"] and b["history"][-1]["t"] == float(shown["t"]))
        last = rendered["history"][-1]
        stats = shown["stats"]
        for field in ("requests_per_s", "input_tokens_per_s", "output_tokens_per_s", "running", "waiting",
                      "ttft_p50", "ttft_p99", "itl_p50", "itl_p95", "prefix_hit_rate", "cached_tokens_per_s"):
            if last[field] is None:
                assert stats[f"last.{field}"] == "", field
            else:
                assert float(stats[f"last.{field}"]) == last[field], field
        assert float(stats["last.kv_usage.0"]) == last["kv_usage"]["0"] > 0
        assert float(stats["cost.output_tokens"]) == rendered["cost"]["output_tokens"]
        assert float(stats["cost.revenue_usd"]) == rendered["cost"]["revenue_usd"]
        assert float(stats["window.ttft_slo_attainment"]) == rendered["window"]["ttft_slo_attainment"]
        assert float(stats["slo.ttft"]) == 2.0 and float(stats["experts.prefill/prefill.expert_max_mean"]) == \
            next(g for g in rendered["experts"] if g["role"] == "prefill")["expert_max_mean"]
        # the legend shows the newest point, as the chart's own formatting rounds it
        legend = dict(shown["legend"])
        for label, field in (("requests/s", "requests_per_s"), ("input tok/s", "input_tokens_per_s"),
                             ("output tok/s", "output_tokens_per_s")):
            assert float(legend[label]) == pytest.approx(last[field], abs=0.051), (label, legend)
        # the charts drew their series (stroke-coloured pixels), the heatmap its cells
        assert min(color_pixels(p, "#panel-throughput canvas", (44, 160, 44))) > 30  # output tok/s
        assert min(color_pixels(p, "#panel-ttft canvas", (31, 119, 180))) > 30  # p50
        assert min(color_pixels(p, "#panel-ttft canvas", (214, 39, 40))) > 30  # the SLO line
        assert min(color_pixels(p, "#panel-kv canvas", (31, 119, 180))) > 30  # decode 0
        heat = p.evaluate("""() => [...document.querySelectorAll('#panel-experts canvas')].map((c) => {
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const seen = new Set();
            for (let i = 0; i < d.length; i += 4) seen.add(d[i] << 16 | d[i + 1] << 8 | d[i + 2]);
            return [c.dataset.group, c.dataset.total, seen.size];
          })""")
        by_group = {g: (float(total), colors) for g, total, colors in heat}
        rendered_prefill = next(g for g in rendered["experts"] if g["role"] == "prefill")
        assert by_group["prefill/prefill"][0] == rendered_prefill["total"] > 0 and by_group["prefill/prefill"][1] > 8
        rows = {r[0]: r for r in shown["services"]}
        assert set(rows) == set(live) and all(r[2] == "up" for r in rows.values())
        assert rows["decode"][3] == "2"  # restarts, from streamoe up's list
        assert "seq7" in shown["planner"].replace(" ", "")
        if not rendered["lag_supported"]:
            assert "lag: n/a" in shown["streams"]
        requests = load.stop()
        load = None
        assert page.errors == [], page.errors
    finally:
        if load is not None:
            load.stop()
        page.close()

    output = gateway_counter(gateway, "streamoe_tokens_total", kind="output")
    assert gateway_counter(gateway, "streamoe_requests_total") == requests and output == 12 * requests
    deadline = time.monotonic() + 30  # the services add their usage to Redis every 5 s
    while True:
        now = state(gateway)
        history = now["history"]
        summed = sum(p["output_tokens_per_s"] * p["dt"] for p in history)
        done = math.isclose(summed, output) and now["cost"] and now["cost"]["output_tokens"] == output
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # the history adds up to what the gateway counted; the cost report to what the services added to Redis
    assert summed == pytest.approx(output)
    assert sum(p["requests_per_s"] * p["dt"] for p in history) == pytest.approx(requests)
    hits = gateway_counter(gateway, "streamoe_tokens_total", kind="input_cache_hit")
    assert hits > 0 and sum(p["cached_tokens_per_s"] * p["dt"] for p in history) == pytest.approx(hits)
    assert now["cost"]["output_tokens"] == output and now["cost"]["from"] == "redis usage"
    assert now["cost"]["input_cache_hit_tokens"] == hits
    capsys.readouterr()
    assert main(["cost", "--url", gateway.url(""), "--api-key", KEY, "--json"]) == 0  # the same arithmetic
    report = json.loads(capsys.readouterr().out)
    assert (report["output_tokens"], report["revenue_usd"]) == (output, now["cost"]["revenue_usd"])
    assert now["slo"] == {"ttft": 2.0, "itl": 0.1} and now["window"]["requests"] == requests
    (experts,) = [g for g in now["experts"] if g["role"] == "prefill"]
    prefill_routed = promtext.total(promtext.parse_metrics(get(live["prefill"].url("/metrics"))[1].decode()),
                                    dash.EXPERT_TOKENS)
    assert experts["total"] == prefill_routed > 0 and experts["layers"] == [1, 2] and experts["experts"] == 16
    assert {s["name"]: s["status"] for s in now["services"]} == {n: "up" for n in live}
    assert next(s for s in now["services"] if s["name"] == "decode")["restarts"] == 2
    assert now["planner"]["seq"] == 7 and now["supervisor"]["supervisor_pid"] == os.getpid()
    (placed,) = [g for g in now["experts"] if g["role"] == "decode"]
    assert (placed["placement_version"], placed["max_mean_before"]) == (1, 1.8)
    lags = [s["lag"] for s in now["streams"] if s["group"]]
    # NOTE: Redis 7 reports a group's lag (but not always: None after an XDEL, as on KV streams); 6.2 never
    assert lags and (any(lag is not None for lag in lags) if now["lag_supported"] else set(lags) == {None})


def test_a_killed_service_shows_down(live, browser, tmp_path):
    """The decode rank killed with -9: /dashboard/state answers 200 and marks it down, its panels say
    n/a, and the page shows it without a console error."""
    gateway, decode = live["gateway"], live["decode"]
    decode.proc.send_signal(signal.SIGKILL)
    decode.proc.wait()
    deadline = time.monotonic() + 15
    while True:
        now = state(gateway)
        row = next((s for s in now["services"] if s["name"] == "decode"), None)
        if (row and row["status"] == "down" and now["history"][-1]["kv_usage"] == {}) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert row["status"] == "down" and re.search(r"connect|refused|Errno", row["detail"]), row
    assert now["history"][-1]["kv_usage"] == {}
    page = Page(browser, gateway.url("/dashboard"))
    try:
        p = page.page
        page.enter_key(KEY, watch=True)
        p.wait_for_function("document.getElementById('status').textContent.includes('down: decode')", timeout=15_000)
        decode_row = p.evaluate("""() => [...document.querySelectorAll('#panel-services tbody tr')]
            .map((r) => [...r.children].map((c) => [c.textContent, c.className]))
            .find((r) => r[0][0] === 'decode')""")
        assert decode_row[2] == ["down", "down"], decode_row
        assert p.text_content("#panel-kv .note") == "n/a: no decode rank answers"
        assert page.states and all(r.status == 200 for r in page.states), [r.status for r in page.states]
        shot = artifacts(tmp_path) / "dashboard-decode-down.png"
        p.screenshot(path=str(shot), full_page=True)
        print(f"dashboard screenshot: {shot}")
        assert page.errors == [], page.errors
    finally:
        page.close()
