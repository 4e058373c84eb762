"""`streamoe up`: ready line, a request served, a service killed with -9 restarted, clean stop."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from shared.launcher.redis_server import free_port
from shared.protocol import streams
from shared.protocol.messages import Notice
from shared.protocol.wire import decode as decode_message


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def complete(url: str, model: str, api_key: str | None = None, max_tokens: int = 5) -> dict:
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def start_up(tiny_fp32, tmp_path, *flags: str) -> tuple[subprocess.Popen, str, Path]:
    """`streamoe up` on a copy of the tiny checkpoint -> (process, URL, run dir) once ready."""
    model = tmp_path / "tiny"
    shutil.copytree(tiny_fp32, model)
    port = free_port()
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "shared.launcher.cli", "up", "--model", str(model),
                             "--port", str(port), "--run-dir", str(run_dir), "--ready-timeout", "180", *flags],
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "up.err", "w"), text=True,
                            env={**os.environ, "STREAMOE_HOME": str(tmp_path / "home")})
    line = proc.stdout.readline().strip()
    if line != f"streamoe ready: http://127.0.0.1:{port}":
        proc.kill()
        proc.wait()
        logs = "".join(f"\n--- {log.name}:\n" + log.read_text()[-1500:] for log in sorted(run_dir.glob("*.log")))
        raise AssertionError(f"no ready line: {line!r}; up said:\n{(tmp_path / 'up.err').read_text()[-3000:]}{logs}")
    return proc, f"http://127.0.0.1:{port}", run_dir


def stop_up(proc: subprocess.Popen, run_dir: Path) -> None:
    """SIGTERM: exit 0 and nothing it started left running."""
    pids = [p["pid"] for p in json.loads((run_dir / "processes.json").read_text())["processes"]]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    time.sleep(0.5)
    assert not [pid for pid in pids if alive(pid)], "processes left behind"


def test_up_serves_restarts_and_stops_cleanly(tiny_fp32, tmp_path):
    proc, url, run_dir = start_up(tiny_fp32, tmp_path, "--api-key", "sk-up-test-key", "--redis-appendfsync",
                                  "always", "--worker-threads", "lend")
    try:
        with pytest.raises(urllib.error.HTTPError, match="401"):
            complete(url, "tiny")
        # --worker-threads lend: while prefill idles, decode computes on every core, then gives them back
        lease, cores = run_dir / "core-lease", os.cpu_count()
        seen = set()
        with ThreadPoolExecutor(1) as pool:
            done = pool.submit(complete, url, "tiny", "sk-up-test-key", 200)
            while not done.done():
                seen.add(struct.unpack("<2i", lease.read_bytes()))
                time.sleep(0.002)
            assert done.result()["usage"]["completion_tokens"] == 200
        assert (0, cores) in seen, seen  # decode alone, on all of them
        share = max(1, cores // 2)
        assert {p for p, _ in seen} | {d for _, d in seen} <= {0, share, cores - share, cores}, seen
        deadline = time.monotonic() + 10
        while struct.unpack("<2i", lease.read_bytes()) != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert struct.unpack("<2i", lease.read_bytes()) == (0, 0)  # both idle: both gave their cores back
        listed = json.loads((run_dir / "processes.json").read_text())
        processes = listed["processes"]
        names = {p["name"] for p in processes}
        assert names == {"tokenizer", "cache", "balancer", "prefill", "decode", "gateway", "redis"}
        for p in processes:
            if p["name"] in ("prefill", "decode"):
                argv = Path(f"/proc/{p['pid']}/cmdline").read_bytes().split(b"\0")
                slot = 0 if p["name"] == "prefill" else 1
                assert argv[argv.index(b"--core-lease") + 1] == f"{lease}:{slot}".encode(), argv
        # numerics calibrated once by `up` (an fp32 checkpoint stays fp32), the same on every worker
        numerics = listed["numerics"]
        assert numerics["dtype"] == "fp32" and numerics["calibration"] in ("measured", "cached"), numerics
        for p in processes:
            if p["name"] in ("prefill", "decode"):
                with urllib.request.urlopen(f"http://127.0.0.1:{p['ports']['http']}/health", timeout=10) as r:
                    health = json.loads(r.read())
                assert (health["dtype"], health["moe_backend"]) == (numerics["dtype"], numerics["moe_backend"])
                assert health["calibration"] == "flag", health  # `up` gave it the values
        # the embedded Redis wants the password drawn for the run; no command line shows it, nor
        # the API key, and processes.json has the URL without it
        password = (run_dir / "redis" / "secret.conf").read_text().split()[1]
        assert oct((run_dir / "redis" / "secret.conf").stat().st_mode & 0o777) == "0o600"
        port = next(p["ports"]["redis"] for p in processes if p["name"] == "redis")
        assert listed["redis_url"] == f"redis://:***@127.0.0.1:{port}/0"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert redis.Redis(port=port, password=password).ping()
        assert redis.Redis(port=port, password=password).config_get("appendfsync") == {"appendfsync": "always"}
        for p in processes:
            cmdline = open(f"/proc/{p['pid']}/cmdline", "rb").read()
            assert password.encode() not in cmdline and b"sk-up-test-key" not in cmdline, p["name"]
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
        # the supervisor announced the death before the restart (shared/runtime/notices.py)
        announced = [decode_message(f[b"m"], Notice) for _, f in
                     redis.Redis(port=port, password=password).xrange(streams.NOTICES)]
        assert [(n.kind, n.role, n.rank, n.reason) for n in announced] == [("death", "decode", 0, "signal 9")]
        assert announced[0].instance_id.startswith("decode-0-")
        body = complete(url, "tiny", "sk-up-test-key")  # served again once the new decode rank is up
        assert body["usage"]["completion_tokens"] >= 1
        stop_up(proc, run_dir)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_up_with_ep_groups(tiny_fp32, tmp_path):
    """`--prefill-ep 2 --decode-ep 2`: two rank processes per role, ready only once each group has
    formed, a request served through both groups; then `up` killed with -9, and no service left."""
    proc, url, run_dir = start_up(tiny_fp32, tmp_path, "--prefill-ep", "2", "--decode-ep", "2", "--ep-wire", "exact",
                                  "--num-redundant-experts", "2", "--worker-threads", "all")
    try:
        processes = json.loads((run_dir / "processes.json").read_text())["processes"]
        ranks = sorted((p["name"], p["rank"]) for p in processes if p["name"] in ("prefill", "decode"))
        assert ranks == [("decode", 0), ("decode", 1), ("prefill", 0), ("prefill", 1)]
        # --worker-threads all: every rank computes on every core, its OpenMP threads waiting passively
        for p in processes:
            if p["name"] in ("prefill", "decode"):
                argv = Path(f"/proc/{p['pid']}/cmdline").read_bytes().split(b"\0")
                assert argv[argv.index(b"--threads") + 1] == str(os.cpu_count()).encode(), argv
                environ = Path(f"/proc/{p['pid']}/environ").read_bytes().split(b"\0")
                environ = dict(e.split(b"=", 1) for e in environ if e)
                assert environ.get(b"OMP_WAIT_POLICY") == os.environ.get("OMP_WAIT_POLICY", "PASSIVE").encode()
        assert complete(url, "tiny")["usage"]["completion_tokens"] == 5
        for role in ("prefill", "decode"):
            for r in range(2):
                assert '"ep_group_joined"' in (run_dir / f"{role}-{r}.log").read_text()
        # each rank its own instance id: heartbeats, abort groups and owned requests are keyed by it
        with urllib.request.urlopen(f"{url}/services", timeout=10) as r:
            live = json.loads(r.read())["services"]
        for role in ("prefill", "decode"):
            assert len({s["instance_id"] for s in live if s["name"] == role}) == 2, live
        # `up` itself killed with -9: no service outlives it (each gets SIGINT, and drains)
        services = [p["pid"] for p in processes if p["name"] != "redis"]
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 60
        while [pid for pid in services if alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in services if alive(pid)], "services outlived streamoe up"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in json.loads((run_dir / "processes.json").read_text())["processes"]:
            if p["name"] == "redis" and alive(p["pid"]):  # the embedded Redis is up's to stop
                os.kill(p["pid"], signal.SIGTERM)


def test_up_with_an_embedded_redis_cluster(tiny_fp32, tmp_path):
    """`--redis-shards 3 --redis-replicas 1`: six redis-servers joined into one cluster (three
    primaries, each with a replica that reached it with the run's password), the services on it
    with three stream partitions, a request served, and every process gone at the stop."""
    proc, url, run_dir = start_up(tiny_fp32, tmp_path, "--redis-shards", "3", "--redis-replicas", "1",
                                  "--worker-cpus", "0")
    try:
        processes = json.loads((run_dir / "processes.json").read_text())["processes"]
        assert sorted(p["rank"] for p in processes if p["name"] == "redis") == list(range(6))
        # --worker-cpus 0: the workers' steps on CPU 0; every other process (the Redis nodes too), and
        # the workers' event loops once set up, on the rest (where there is a rest)
        allowed = os.sched_getaffinity(0)
        others = allowed - {0} or allowed
        for p in processes:
            assert os.sched_getaffinity(p["pid"]) == (others if others != allowed or p["name"] not in
                                                      ("prefill", "decode") else {0}), p["name"]
        assert complete(url, "tiny")["usage"]["completion_tokens"] == 5
        for p in processes:  # the compute thread each started for the request computes on CPU 0
            if p["name"] in ("prefill", "decode"):
                masks = [os.sched_getaffinity(int(t.name)) for t in Path(f"/proc/{p['pid']}/task").iterdir()]
                assert {0} in masks, (p["name"], masks)
        roles = []
        for node in range(6):  # each node's view of the cluster: which nodes are primaries and replicas
            lines = (run_dir / "redis-cluster" / f"node{node}" / "nodes.conf").read_text().splitlines()
            mine = next(line for line in lines if "myself" in line)
            roles.append("master" if "master" in mine.split()[2] else "slave")
        assert sorted(roles) == ["master"] * 3 + ["slave"] * 3
        assert "--redis-cluster" not in (run_dir / "balancer.log").read_text()  # no mode error
        stop_up(proc, run_dir)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cpu_lists():
    """--worker-cpus reads CPU lists as `taskset -c` does; a bad one names itself."""
    import argparse

    from shared.launcher.cliargs import cpu_list_flag, cpu_list_text

    assert cpu_list_flag("0-3,8") == {0, 1, 2, 3, 8} and cpu_list_flag("1") == {1}
    assert cpu_list_text({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11" and cpu_list_text(cpu_list_flag("5")) == "5"
    for bad in ("", "a", "3-1", "1,,2", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected CPU numbers and ranges"):
            cpu_list_flag(bad)


def test_worker_threads():
    """`share` splits the cores (`lend` too, and lends them step by step); `all` or a count may
    oversubscribe them, and then the workers' OpenMP threads wait passively (unless the environment
    says otherwise); a bad value names itself."""
    from shared.launcher.up import worker_threads

    os.environ.pop("OMP_WAIT_POLICY", None)
    assert worker_threads("share", 8, 2) == (4, {}) and worker_threads("share", 2, 4) == (1, {})
    assert worker_threads("lend", 8, 2) == (4, {})  # the share, and the lease lends the rest
    assert worker_threads("turns", 8, 2) == (4, {})  # the share, when a turn comes too late
    assert worker_threads("all", 8, 1) == (8, {})
    assert worker_threads("all", 8, 2) == (8, {"OMP_WAIT_POLICY": "PASSIVE"})
    assert worker_threads("3", 8, 2) == (3, {}) and worker_threads("3", 8, 3) == (3, {"OMP_WAIT_POLICY": "PASSIVE"})
    os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
    try:
        assert worker_threads("all", 8, 2) == (8, {})
    finally:
        del os.environ["OMP_WAIT_POLICY"]
    for bad in ("0", "-1", "many", ""):
        with pytest.raises(ValueError, match=f"--worker-threads={bad}: expected share, lend, turns, all"):
            worker_threads(bad, 8, 2)


def test_up_refuses_a_bad_worker_threads(tmp_path):
    done = subprocess.run([sys.executable, "-m", "shared.launcher.cli", "up", "--worker-threads", "lots", "--port",
                           str(free_port()), "--run-dir", str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "STREAMOE_HOME": str(tmp_path / "home")})
    assert done.returncode == 2, done.stderr
    assert "--worker-threads=lots: expected share, lend, turns, all" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "shared.launcher.cli", "up", "--worker-threads", "turns",
                           "--decode-ep", "2", "--port", str(free_port()), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "STREAMOE_HOME": str(tmp_path / "home")})
    assert done.returncode == 2 and ("--worker-threads turns with --prefill-ep 1 --decode-ep 2: the ranks of an EP "
                                     "group compute each step together") in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "shared.launcher.cli", "up", "--worker-cpus", "4095",
                           "--port", str(free_port()), "--run-dir", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "STREAMOE_HOME": str(tmp_path / "home")})
    assert done.returncode == 2 and "--worker-cpus=4095: CPU 4095 is not one this process may run on" in done.stderr
    assert not (tmp_path / "home").exists()  # refused before anything was made or started


def test_up_refuses_a_port_something_listens_on(tmp_path):
    """The gateway binds with SO_REUSEPORT (a rolling restart's successor shares the port), so `up`
    checks first that nothing listens there: a second `up` on the same port would share it."""
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = subprocess.run([sys.executable, "-m", "shared.launcher.cli", "up", "--port", str(port), "--run-dir",
                               str(tmp_path / "run")], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "STREAMOE_HOME": str(tmp_path / "home")})
    assert done.returncode == 2 and f"--port={port}: something listens" in done.stderr, done.stderr
    assert not (tmp_path / "home").exists()  # refused before anything was made or started
