"""`streamoe cost` (shared/cost/README.md): DeepSeek's published day from saved metrics, per-rank throughput,
flag and file errors, and live scraping through a gateway's /services and a run's processes.json."""
from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from shared.cost.metrics_report import Totals, full_report
from shared.launcher.cli import main
from shared.launcher.redis_server import free_port

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
DAY = sorted(str(p) for p in (FIXTURES / "deepseek_day").glob("*.prom"))
RANKS = str(FIXTURES / "ranks.prom")
REPO = Path(__file__).parent.parent


def cost(capsys, *args: str) -> tuple[int, str, str]:
    """Run `streamoe cost ARGS` in this process: (exit code, stdout, stderr)."""
    try:
        code = main(["cost", *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def table_row(table: str, label: str) -> str:
    rows = [line for line in table.splitlines() if line.startswith(label + "  ")]
    assert len(rows) == 1, f"no single {label!r} row in:\n{table}"
    return " ".join(rows[0].split())


def check_deepseek_day(report: dict) -> None:
    assert report["input_cache_hit_tokens"] == 342_000_000_000
    assert report["input_cache_miss_tokens"] == 266_000_000_000
    assert report["output_tokens"] == 168_000_000_000
    assert report["cache_hit_rate"] == 342 / 608
    assert report["gpu_hours"] == 226.75 * 8 * 24 == 43_536
    assert report["node_hours"] == 5_442
    assert report["cost_usd"] == 87_072
    assert abs(report["revenue_usd"] - 562_027) / 562_027 < 0.001
    assert report["revenue_usd"] == pytest.approx(562_100, abs=1e-6)  # shared/cost/README.md: the rounded counts
    assert 545 < report["margin_pct"] < 546
    assert report["prefill_input_tokens_per_s"] == {"0": 310e9 / 40e6, "1": 298e9 / 38e6}
    assert report["decode_output_tokens_per_s"] == {"0": 90e9 / 41e6, "1": 78e9 / 37.7296e6}
    assert report["prefill_input_tokens_per_s"]["0"] == 7_750


def test_deepseek_day_json(capsys):
    code, out, err = cost(capsys, "--metrics", *DAY, "--json")
    assert code == 0, err
    assert len(out.splitlines()) == 1
    report = json.loads(out)
    check_deepseek_day(report)
    assert report["gpu_hour_usd"] == 2.0
    assert report["prices_per_million_usd"] == [0.14, 0.55, 2.19]
    assert report["sources"] == DAY


def test_deepseek_day_table(capsys):
    code, out, err = cost(capsys, "--metrics", *DAY)
    assert code == 0, err
    assert table_row(out, "input tokens, cache hit") == "input tokens, cache hit 342,000,000,000"
    assert table_row(out, "cache hit rate") == "cache hit rate 56.25% of input tokens"
    assert table_row(out, "GPU-hours") == "GPU-hours 43,536.00 each worker rank is one GPU"
    assert table_row(out, "node-hours") == "node-hours 5,442.00"
    assert table_row(out, "cost") == "cost $87,072.00 at $2.00 per GPU-hour"
    assert table_row(out, "revenue").startswith("revenue $562,100.00 at $0.14 / $0.55 / $2.19 per 1M tokens")
    assert table_row(out, "margin") == "margin 545.56% (revenue - cost) / cost"
    assert table_row(out, "prefill rank 0") == "prefill rank 0 7,750.00 input tokens/s"
    assert table_row(out, "sources") == f"sources 6 {DAY[0]}"
    assert [line.strip() for line in out.splitlines()[-5:]] == DAY[1:]
    lines = out.splitlines()  # aligned: every value ends in the same column
    width = len(lines[0])
    assert [len(line) for line in lines[:3]] == [width] * 3
    assert lines[3].index("56.25%") + len("56.25%") == lines[6].index("$87,072.00") + len("$87,072.00") == width


def test_deepseek_day_subprocess():
    proc = subprocess.run([sys.executable, "-m", "shared.launcher.cli", "cost", "--metrics", *DAY, "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    check_deepseek_day(json.loads(proc.stdout))


def test_pricing_flags(capsys):
    code, out, err = cost(capsys, "--metrics", *DAY, "--json", "--gpu-hour-usd", "1", "--prices", "0,0,1",
                          "--gpus-per-node", "16")
    assert code == 0, err
    report = json.loads(out)
    assert (report["cost_usd"], report["revenue_usd"], report["node_hours"]) == (43_536, 168_000, 2_721)
    assert report["margin_pct"] == (168_000 - 43_536) / 43_536 * 100
    assert report["prices_per_million_usd"] == [0, 0, 1]


def test_flags_read_environment(capsys, monkeypatch):
    monkeypatch.setenv("STREAMOE_METRICS", " ".join(DAY))
    monkeypatch.setenv("STREAMOE_GPU_HOUR_USD", "1")
    code, out, err = cost(capsys, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["cost_usd"], report["sources"]) == (43_536, DAY)
    code, out, err = cost(capsys, "--json", "--gpu-hour-usd", "4")  # the flag wins over the variable
    assert json.loads(out)["cost_usd"] == 174_144


def test_per_rank_throughput(capsys):
    code, out, err = cost(capsys, "--metrics", RANKS, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["prefill_input_tokens_per_s"] == {"0": 10.0, "1": 0.25, "10": 0.5}
    assert list(report["decode_output_tokens_per_s"].items()) == [("0", 1.5), ("2", 0.0), ("10", 0.2)]
    # an unknown kind of streamoe_tokens_total and unknown metrics are ignored
    assert (report["input_cache_hit_tokens"], report["input_cache_miss_tokens"], report["output_tokens"]) == \
        (310, 702, 25)
    assert report["gpu_hours"] == 165 / 3600
    code, out, err = cost(capsys, "--metrics", RANKS)
    assert table_row(out, "prefill rank 10") == "prefill rank 10 0.50 input tokens/s"
    assert table_row(out, "decode rank 2") == "decode rank 2 0.00 output tokens/s"
    assert table_row(out, "cost") == "cost $0.09167 at $2.00 per GPU-hour"
    assert [line.split()[:3] for line in out.splitlines()
            if line.startswith(("prefill rank", "decode rank"))] == [
        ["prefill", "rank", "0"], ["prefill", "rank", "1"], ["prefill", "rank", "10"],
        ["decode", "rank", "0"], ["decode", "rank", "2"], ["decode", "rank", "10"]]


def test_same_rank_sums_over_sources():
    totals = Totals()
    text = ('streamoe_gpu_seconds_total{role="decode",rank="3"} 30\n'
            'streamoe_worker_tokens_total{role="decode",rank="3",kind="output"} 45\n')
    totals.add(text, "a")
    totals.add(text, "b")
    report = full_report(totals, gpu_hour_usd=3600.0)
    assert report["decode_output_tokens_per_s"] == {"3": 1.5}
    assert report["prefill_input_tokens_per_s"] == {}
    assert (report["cost_usd"], report["revenue_usd"], report["margin_pct"]) == (60.0, 0.0, -100.0)
    assert report["sources"] == ["a", "b"]


def test_no_gpu_time_has_no_margin(capsys, tmp_path):
    path = tmp_path / "gateway.prom"
    path.write_text('streamoe_tokens_total{kind="output"} 1e6\n')
    code, out, err = cost(capsys, "--metrics", str(path))
    assert code == 0, err
    assert table_row(out, "margin") == "margin n/a (revenue - cost) / cost"
    assert table_row(out, "revenue").startswith("revenue $2.19 ")


@pytest.mark.parametrize("text", ["hello world\n", 'streamoe_tokens_total{kind="output" 5\n',
                                  'streamoe_tokens_total{kind="output"} lots\n', "<html>502 Bad Gateway</html>\n"])
def test_malformed_metrics_file_is_named(capsys, tmp_path, text):
    path = tmp_path / "broken.prom"
    path.write_text(text)
    code, out, err = cost(capsys, "--metrics", *DAY[:1], str(path))
    assert code == 2
    assert out == ""
    assert f"streamoe cost: error: {path}: not Prometheus text exposition (" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("flag, value", [("--prices", "1,2"), ("--prices", "0.14,-0.55,2.19"), ("--prices", "a,b,c"),
                                         ("--prices", "1,2,3,4"), ("--prices", "1,nan,2"), ("--gpu-hour-usd", "-1"),
                                         ("--gpu-hour-usd", "two"), ("--gpus-per-node", "0"),
                                         ("--url", "127.0.0.1:8000")])
def test_bad_flag_value(capsys, flag, value):
    code, out, err = cost(capsys, "--metrics", *DAY, flag, value)
    assert code == 2
    assert out == ""
    assert f"argument {flag}: {value!r}: expected" in err


def test_bad_environment_value(capsys, monkeypatch):
    monkeypatch.setenv("STREAMOE_PRICES", "1,2")
    code, out, err = cost(capsys, "--metrics", *DAY)
    assert code == 2
    assert "STREAMOE_PRICES='1,2': not a valid value for --prices" in err


def test_missing_files(capsys, tmp_path):
    code, out, err = cost(capsys, "--metrics", *DAY, str(tmp_path / "nope.prom"))
    assert (code, out) == (2, "")
    assert err == f"streamoe cost: error: --metrics {tmp_path / 'nope.prom'}: no such file\n"
    code, out, err = cost(capsys, "--processes", str(tmp_path / "processes.json"))
    assert (code, out) == (2, "")
    assert err == f"streamoe cost: error: --processes {tmp_path / 'processes.json'}: no such file\n"


# -- live sources ---------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def serve_with(handle):
    """A stand-in HTTP server on a free port answering every GET with `handle(request)` -> its URL."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


def serve(routes: dict[str, str]):
    """A stand-in HTTP server on a free port: GET path -> body (read at request time), else 404."""

    async def handle(request: web.Request) -> web.Response:
        if request.path not in routes:
            raise web.HTTPNotFound()
        return web.Response(text=routes[request.path])

    return serve_with(handle)


def read(path: str) -> str:
    return Path(path).read_text()


async def cost_async(capsys, *args: str) -> tuple[int, str, str]:
    """`streamoe cost` off the event loop, so the stand-in servers can answer it."""
    return await asyncio.to_thread(cost, capsys, *args)


async def test_url_scrapes_every_listed_service(capsys):
    gateway_a, gateway_b, prefill_0 = DAY[2], DAY[3], DAY[4]
    routes = {"/metrics": read(gateway_a)}
    async with serve(routes) as base, serve({"/metrics": read(prefill_0)}) as worker:
        routes["/services"] = json.dumps({"services": [
            {"name": "gateway", "instance_id": "g1", "metrics_url": f"{base}/metrics"},
            {"name": "gateway", "instance_id": "g2", "metrics_url": f"{base}/other-gateway"},
            {"name": "prefill", "instance_id": "p0", "metrics_url": f"{worker}/metrics"}]})
        routes["/other-gateway"] = read(gateway_b)
        code, out, err = await cost_async(capsys, "--url", base + "/", "--json")
    assert code == 0, err
    assert err == ""
    report = json.loads(out)
    assert report["sources"] == [f"{base}/metrics", f"{base}/other-gateway", f"{worker}/metrics"]
    assert (report["input_cache_hit_tokens"], report["output_tokens"]) == (342_000_000_000, 168_000_000_000)
    assert report["gpu_hours"] == 40e6 / 3600
    assert report["prefill_input_tokens_per_s"] == {"0": 7_750.0}
    assert report["decode_output_tokens_per_s"] == {}


async def test_url_without_services_falls_back_to_its_metrics(capsys):
    async with serve({"/metrics": read(RANKS)}) as base:
        code, out, err = await cost_async(capsys, "--url", base, "--json")
    assert code == 0, err
    assert f"{base}/services answered 404" in err
    assert f"reading {base}/metrics only" in err
    report = json.loads(out)
    assert report["sources"] == [f"{base}/metrics"]
    assert report["prefill_input_tokens_per_s"] == {"0": 10.0, "1": 0.25, "10": 0.5}


async def test_url_listing_a_failing_service_exits_1(capsys):
    routes = {"/metrics": read(RANKS)}
    async with serve(routes) as base:
        routes["/services"] = json.dumps({"services": [{"name": "decode", "instance_id": "d",
                                                        "metrics_url": f"{base}/gone"}]})
        code, out, err = await cost_async(capsys, "--url", base)
        assert (code, out) == (1, "")
        assert err == f"streamoe cost: error: {base}/gone: HTTP 404 Not Found\n"
        routes["/services"] = "<html>not json</html>"
        code, out, err = await cost_async(capsys, "--url", base)
        assert (code, out) == (1, "")
        assert err.startswith(f'streamoe cost: error: {base}/services: expected {{"services": [')
        routes["/services"] = json.dumps({"services": [{"name": "decode", "instance_id": "d",
                                                        "metrics_url": f"{base}/services"}]})
        code, out, err = await cost_async(capsys, "--url", base)
        assert code == 1
        assert err.startswith(f"streamoe cost: error: {base}/services: not Prometheus text exposition (")


def test_unreachable_url_exits_1(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = cost(capsys, "--url", url)
    assert (code, out) == (1, "")
    assert err.startswith(f"streamoe cost: error: {url}/services: cannot connect (")
    assert "Traceback" not in err


async def test_processes_json_scrapes_each_service(capsys, tmp_path):
    async with serve({"/metrics": read(DAY[0])}) as decode_0, serve({"/metrics": read(DAY[3])}) as gateway:
        ports = [int(u.rsplit(":", 1)[1]) for u in (decode_0, gateway)]
        processes = {"redis_url": "redis://127.0.0.1:6399/0", "processes": [
            {"name": "decode", "rank": 0, "pid": 11, "ports": {"http": ports[0]}, "log": "decode-0.log",
             "restarts": 0},
            {"name": "gateway", "rank": None, "pid": 12, "ports": {"http": ports[1]}, "log": "gateway.log",
             "restarts": 1},
            {"name": "redis", "rank": None, "pid": 13, "ports": {"redis": 6399}, "restarts": 0}]}
        path = tmp_path / "processes.json"
        path.write_text(json.dumps(processes))
        code, out, err = await cost_async(capsys, "--processes", str(path), "--metrics", DAY[5], "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["sources"] == [DAY[5], f"http://127.0.0.1:{ports[0]}/metrics",
                                 f"http://127.0.0.1:{ports[1]}/metrics"]
    assert (report["input_cache_hit_tokens"], report["output_tokens"]) == (142_000_000_000, 68_000_000_000)
    assert report["gpu_hours"] == (41e6 + 38e6) / 3600
    assert report["decode_output_tokens_per_s"] == {"0": 90e9 / 41e6}
    assert report["prefill_input_tokens_per_s"] == {"1": 298e9 / 38e6}


def test_processes_json_malformed(capsys, tmp_path):
    path = tmp_path / "processes.json"
    path.write_text('{"processes": [{"name": "gateway", "ports": {"http": "eighty"}}]}')
    code, out, err = cost(capsys, "--processes", str(path))
    assert (code, out) == (2, "")
    assert err.startswith(f"streamoe cost: error: --processes {path}: not a `streamoe up` processes.json (")
