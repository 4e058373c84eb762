"""Chaos through `streamoe up` (loadgen/chaos.py): 200 streamed requests while one process of each
kind is killed (kill -9) and the supervisor restarts it; then overload at 10x the sustainable rate."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from reference import load_reference, reference_greedy

from shared.launcher.redis_server import free_port


def differences_are_near_ties(model, faults: dict) -> None:
    """An output that differs from the fault-free run's must differ only past a near-tie of the
    reference (shared/model/README.md): batches of other shapes round differently in the last bits."""
    ref = load_reference(model)
    for d in faults["differences"]:
        expected = reference_greedy(ref, d["prompt"], len(d["fault_free"]))
        for tokens in (d["fault_free"], d["got"]):
            assert tokens[:expected.trusted] == expected.tokens[:expected.trusted], d
    assert len(faults["differences"]) == len(faults["differing_outputs"]) <= 3


def run_chaos(model, tmp_path, *extra: str) -> dict:
    out = tmp_path / "chaos.json"
    command = [sys.executable, "-m", "loadgen.chaos", "--model", str(model), "--dtype", "fp32",
               "--concurrency", "16", "--input-len", "96", "--output-len", "32", "--gateway-max-inflight", "32",
               "--no-baseline", "--port", str(free_port()), "--run-dir", str(tmp_path / "chaos"), "--out", str(out),
               *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def each_kind_died_and_nothing_was_lost(model, report: dict, sent: int) -> None:
    clean, faults, over = report["fault_free"], report["faults"], report["overload"]
    assert clean["completed"] == clean["sent"] == sent, clean
    # every kind was killed once while the load ran, and came back
    assert [k["kind"] for k in faults["kills"]] == ["tokenizer", "cache", "balancer", "prefill", "decode"]
    assert faults["kills_during_load"] == 5 and all(k["healthy_again_s"] is not None for k in faults["kills"])
    # every request completed, exactly once: no token missing or repeated, the fault-free outputs
    assert faults["lost"] == 0 and faults["errors"].keys() <= {"503"}, faults
    # a 503 comes only while a restarted role has no live rank yet, refused before it was accepted
    assert faults["completed"] + faults["refused_503"] == faults["sent"] == sent
    # how many follows the restarts' speed: 0-4 of 80 on an idle 2-core host (the Redis Cluster run,
    # three runs at d7946c0 and three at f18c527), 9 once within the whole suite on the same host;
    # so at most a fifth of the requests: the exception, each refused before it was accepted
    assert faults["refused_503"] <= sent // 5
    assert faults["duplicated_tokens"] == 0 and faults["missing_tokens"] == 0
    differences_are_near_ties(model, faults)
    # the decode rank died with requests on it: they went on elsewhere, resumed (running) or routed
    # again (a handoff it had not admitted yet)
    assert faults["kills"][-1]["requests_on_it"] >= 1
    assert faults["resumed_by_balancer"] + faults["moved_by_balancer"] >= 1
    # overload: the excess is refused at once, what was admitted completes
    assert over["refused_429"] > 0 and over["lost"] == 0 and over["errors"].keys() <= {"429"}
    assert over["completed"] + over["refused_429"] == over["sent"]
    assert over["refused_latency_p99_s"] < 1.0


def test_no_request_is_lost_while_each_kind_of_process_dies(tiny_fp32, tmp_path):
    report = run_chaos(tiny_fp32, tmp_path, "--requests", "200", "--fault-window-s", "60",
                       "--overload-requests", "200")
    each_kind_died_and_nothing_was_lost(tiny_fp32, report, 200)


def test_the_same_chaos_on_a_redis_cluster(tiny_fp32, tmp_path):
    """The same kills on `streamoe up --redis-shards 3 --redis-replicas 1`: streams sharded by reader
    over three primaries, the gateway waiting for a replica on each publish."""
    report = run_chaos(tiny_fp32, tmp_path, "--redis-shards", "3", "--redis-replicas", "1", "--requests", "80",
                       "--fault-window-s", "40", "--kill-gap-s", "1.5", "--overload-requests", "80")
    each_kind_died_and_nothing_was_lost(tiny_fp32, report, 80)
    assert "--redis-shards 3" in report["command"]
    nodes = [p for p in json.loads((tmp_path / "chaos" / "run" / "processes.json").read_text())["processes"]
             if p["name"] == "redis"]
    assert len(nodes) == 6  # the system really ran on the cluster


@pytest.mark.parametrize("how", ["kill", "term"])
def test_ep_groups_losing_a_rank_lose_no_request(tiny_fp32, tmp_path, how):
    """Prefill and decode as EP 2 groups, and one process of each other kind: tokenizer, cache,
    balancer, then a decode rank and a prefill rank, killed under load (kill -9), or stopped
    (SIGTERM: a worker drains). The supervisor announces each death (a death
    notice); a stopped rank announces its own leave once it steps no more. Either way the survivors
    re-form their groups without it at once: the exchange timeout (600 s) and the heartbeat TTL
    (60 s) are far longer than the requests' deadline, so every request finishing proves the
    notice path.
    The survivors are not restarted; the supervisor restarts the dead one and the group takes it
    back. Every accepted request completes with the fault-free tokens; the decode group's requests
    resume from what their clients have.
    SIGTERM ends with a rolling restart (SIGHUP to streamoe up): each EP rank stopped (its group
    goes on without it) and its successor taken in, every other service replaced successor first."""
    out = tmp_path / "chaos-ep.json"
    rolling = ",rolling" if how == "term" else ""
    command = [sys.executable, "-m", "loadgen.chaos", "--model", str(tiny_fp32), "--dtype", "fp32",
               "--prefill-ep", "2", "--decode-ep", "2",
               "--kill", "tokenizer,cache,balancer,decode:1,prefill:0" + rolling,
               "--signal", how,
               "--ep-timeout-s", "600",
               "--heartbeat-ttl-s", "60", "--requests", "80", "--concurrency", "16", "--input-len", "96",
               "--output-len", "32", "--fault-window-s", "60", "--overload-requests", "0", "--no-baseline",
               "--port", str(free_port()), "--run-dir", str(tmp_path / "chaos"), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    faults = json.loads(out.read_text())["faults"]
    assert faults["kills_during_load"] == 5 + bool(rolling)
    assert all(k["healthy_again_s"] is not None for k in faults["kills"])
    for kill in faults["kills"][3:5]:  # the survivor went on without the dead rank, then took its successor in
        assert kill["survivors_restarted"] is False, kill
        assert kill["kind"] != "decode:1" or kill["requests_on_it"] >= 1, kill  # it had requests to resume
        assert kill["shrinks_by_reason"] == {"notice": 1, "heartbeat": 0, "timeout": 0}, kill
        assert 0 < kill["group_without_it_s"] < kill["group_whole_s"] < 60, kill
    # each role always has a live rank: nothing is refused, everything completes
    assert faults["lost"] == 0 and faults["errors"] == {} and faults["completed"] == faults["sent"], faults
    assert faults["duplicated_tokens"] == 0 and faults["missing_tokens"] == 0
    differences_are_near_ties(tiny_fp32, faults)
    # what the dead decode rank held went on elsewhere: resumed (running) or routed again (queued)
    assert faults["kills"][3]["went_on_elsewhere"] >= 1, faults["kills"][3]
    # kill -9: the supervisor's death notices (counted by the balancer that runs after its own
    # restart: the two workers'); SIGTERM: the drain path, each rank's own leave notice (counted by
    # the balancer the rolling restart started: the four ranks it stopped after it)
    assert faults["notices"] == ({"death": 2, "leave": 0} if how == "kill" else {"death": 0, "leave": 4})
    if rolling:
        assert faults["kills"][-1]["replaced"] == ["balancer", "cache", "decode:0", "decode:1", "gateway",
                                                   "prefill:0", "prefill:1", "tokenizer"], faults["kills"][-1]


def test_the_only_rank_hands_over_on_sigterm_and_a_rolling_restart_drops_nothing(tiny_fp32, tmp_path):
    """One rank per role. SIGTERM to the decode rank, then to the prefill rank: each is its role's
    only rank, so it asks for a successor (a handover notice), `streamoe up` starts one at once,
    and the old rank serves until the successor reports load, then leaves (what it still runs
    resumes there). Then SIGHUP to `streamoe up`: every service replaced, one at a time, the
    successor healthy before the old process drains; the gateway's successor takes its port
    (SO_REUSEPORT) while the old one finishes its streams. No request is refused (no 503: a role
    always has a live rank), lost or changed; the heartbeat TTL (60 s) plays no part."""
    report = run_chaos(tiny_fp32, tmp_path, "--signal", "term", "--kill", "decode,prefill,rolling",
                       "--heartbeat-ttl-s", "60", "--requests", "80", "--fault-window-s", "50", "--kill-gap-s", "1.5",
                       "--overload-requests", "0")
    faults = report["faults"]
    decode, prefill, rolling = faults["kills"]
    assert faults["kills_during_load"] == 3 and all(k["healthy_again_s"] is not None for k in faults["kills"])
    assert decode["handovers"] == 1 and prefill["handovers"] == 1, faults["kills"]  # the handover path, each
    assert decode["requests_on_it"] >= 1, decode
    assert rolling["replaced"] == ["balancer", "cache", "decode:0", "gateway", "prefill:0", "tokenizer"], rolling
    assert faults["lost"] == 0 and faults["errors"] == {} and faults["completed"] == faults["sent"] == 80, faults
    assert faults["duplicated_tokens"] == 0 and faults["missing_tokens"] == 0
    differences_are_near_ties(tiny_fp32, faults)


def test_a_frozen_ep_rank_is_cut_out_and_fenced(tiny_fp32, tmp_path):
    """A decode rank of an EP group frozen (SIGSTOP) for 8 s, then thawed. Its alive key lapses after
    --rank-dead-after-s (1.5 s): the survivor re-forms without it (reason `heartbeat`) and announces
    it dead, so its requests resume elsewhere; the exchange timeout (600 s) and the heartbeat TTL (60 s)
    play no part. Thawed, it finds itself cut out, drops what it ran unsent (fenced), and asks in as
    new. No token of it reaches a client twice or out of order."""
    out = tmp_path / "chaos-stop.json"
    command = [sys.executable, "-m", "loadgen.chaos", "--model", str(tiny_fp32), "--dtype", "fp32",
               "--prefill-ep", "2", "--decode-ep", "2", "--kill", "decode:1", "--signal", "stop", "--stop-s", "8",
               "--ep-timeout-s", "600", "--heartbeat-ttl-s", "60", "--requests", "60", "--concurrency", "16",
               "--input-len", "96", "--output-len", "32", "--fault-window-s", "40", "--overload-requests", "0",
               "--no-baseline", "--port", str(free_port()), "--run-dir", str(tmp_path / "chaos"), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    faults = json.loads(out.read_text())["faults"]
    (kill,) = faults["kills"]
    assert kill["requests_on_it"] >= 1 and kill["survivors_restarted"] is False, kill
    assert kill["shrinks_by_reason"] == {"notice": 0, "heartbeat": 1, "timeout": 0}, kill
    assert kill["healthy_again_s"] is not None and kill["group_whole_s"] >= 8, kill  # back only once thawed
    assert faults["notices"] == {"death": 1, "leave": 0}  # the survivor announced the rank it cut out
    assert faults["lost"] == 0 and faults["errors"] == {} and faults["completed"] == faults["sent"], faults
    assert faults["duplicated_tokens"] == 0 and faults["missing_tokens"] == 0
    differences_are_near_ties(tiny_fp32, faults)
    assert faults["resumed_by_balancer"] + faults["moved_by_balancer"] >= 1
    frozen = (tmp_path / "chaos" / "run" / "decode-1.log").read_text()
    assert '"ep_fenced"' in frozen and frozen.index('"ep_fenced"') < frozen.rindex('"change": "grow"')
