"""`streamoe up`: ready line, a request served, a service killed with -9 restarted, clean stop."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from shared.redis_server import free_port


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def complete(url: str, model: str) -> dict:
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 5, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def start_up(tiny_fp32, tmp_path, *flags: str) -> tuple[subprocess.Popen, str, Path]:
    """`streamoe up` on a copy of the tiny checkpoint -> (process, URL, run dir) once ready."""
    model = tmp_path / "tiny"
    shutil.copytree(tiny_fp32, model)
    port = free_port()
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "up", "--model", str(model), "--port", str(port),
                             "--run-dir", str(run_dir), "--ready-timeout", "180", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "STREAMOE_HOME": str(tmp_path / "home")})
    line = proc.stdout.readline().strip()
    if line != f"streamoe ready: http://127.0.0.1:{port}":
        proc.kill()
        raise AssertionError(f"no ready line: {line!r}")
    return proc, f"http://127.0.0.1:{port}", run_dir


def stop_up(proc: subprocess.Popen, run_dir: Path) -> None:
    """SIGTERM: exit 0 and nothing it started left running."""
    pids = [p["pid"] for p in json.loads((run_dir / "processes.json").read_text())["processes"]]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    time.sleep(0.5)
    assert not [pid for pid in pids if alive(pid)], "processes left behind"


def test_up_serves_restarts_and_stops_cleanly(tiny_fp32, tmp_path):
    proc, url, run_dir = start_up(tiny_fp32, tmp_path)
    try:
        assert len(complete(url, "tiny")["choices"][0]["text"]) >= 0
        processes = json.loads((run_dir / "processes.json").read_text())["processes"]
        names = {p["name"] for p in processes}
        assert names == {"tokenizer", "cache", "balancer", "prefill", "decode", "gateway", "redis"}
        decode = next(p for p in processes if p["name"] == "decode")
        os.kill(decode["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            now = json.loads((run_dir / "processes.json").read_text())["processes"]
            restarted = next(p for p in now if p["name"] == "decode")
            if restarted["pid"] != decode["pid"]:
                break
            time.sleep(0.5)
        assert restarted["pid"] != decode["pid"] and restarted["restarts"] == 1
        body = complete(url, "tiny")  # served again once the new decode rank is up
        assert body["usage"]["completion_tokens"] >= 1
        stop_up(proc, run_dir)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_up_with_ep_groups(tiny_fp32, tmp_path):
    """`--prefill-ep 2 --decode-ep 2`: two rank processes per role, ready only once each group has
    formed, a request served through both groups, and a clean stop."""
    proc, url, run_dir = start_up(tiny_fp32, tmp_path, "--prefill-ep", "2", "--decode-ep", "2", "--ep-wire", "exact",
                                  "--num-redundant-experts", "2")
    try:
        processes = json.loads((run_dir / "processes.json").read_text())["processes"]
        ranks = sorted((p["name"], p["rank"]) for p in processes if p["name"] in ("prefill", "decode"))
        assert ranks == [("decode", 0), ("decode", 1), ("prefill", 0), ("prefill", 1)]
        assert complete(url, "tiny")["usage"]["completion_tokens"] == 5
        for role in ("prefill", "decode"):
            for r in range(2):
                assert '"ep_group_joined"' in (run_dir / f"{role}-{r}.log").read_text()
        # each rank its own instance id: heartbeats, abort groups and owned requests are keyed by it
        with urllib.request.urlopen(f"{url}/services", timeout=10) as r:
            live = json.loads(r.read())["services"]
        for role in ("prefill", "decode"):
            assert len({s["instance_id"] for s in live if s["name"] == role}) == 2, live
        stop_up(proc, run_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
