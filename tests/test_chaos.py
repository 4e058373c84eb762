"""Chaos through `streamoe up` (loadgen/chaos.py): 200 streamed requests while one process of each
kind is killed (kill -9) and the supervisor restarts it; then overload at 10x the sustainable rate."""
from __future__ import annotations

import json
import subprocess
import sys

from shared.redis_server import free_port


def test_no_request_is_lost_while_each_kind_of_process_dies(tiny_fp32, tmp_path):
    out = tmp_path / "chaos.json"
    command = [sys.executable, "-m", "loadgen.chaos", "--model", str(tiny_fp32), "--dtype", "fp32",
               "--requests", "200", "--concurrency", "16", "--input-len", "96", "--output-len", "32",
               "--fault-window-s", "60", "--overload-requests", "200", "--gateway-max-inflight", "32",
               "--port", str(free_port()), "--run-dir", str(tmp_path / "chaos"), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    clean, faults, over = report["fault_free"], report["faults"], report["overload"]
    assert clean["completed"] == clean["sent"] == 200, clean
    # every kind was killed once while the load ran, and came back
    assert [k["kind"] for k in faults["kills"]] == ["tokenizer", "cache", "balancer", "prefill", "decode"]
    assert faults["kills_during_load"] == 5 and all(k["healthy_again_s"] is not None for k in faults["kills"])
    # every request completed, exactly once: no token missing or repeated, the fault-free outputs
    assert faults["completed"] == faults["sent"] == 200, faults
    assert faults["lost"] == 0 and faults["errors"] == {}
    assert faults["duplicated_tokens"] == 0 and faults["missing_tokens"] == 0
    assert faults["differing_outputs"] == []
    assert faults["resumed_by_balancer"] >= 1  # the decode rank died with requests running
    # overload: the excess is refused at once, what was admitted completes
    assert over["refused_429"] > 0 and over["lost"] == 0 and over["errors"].keys() <= {"429"}
    assert over["completed"] + over["refused_429"] == over["sent"]
    assert over["refused_latency_p99_s"] < 1.0
