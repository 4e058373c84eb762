"""Chaos: every accepted request completes, exactly once, while processes die; overload gets 429s.

    python -m loadgen.chaos [--preset tiny | --model DIR] [--requests 200] [--concurrency 16]
                            [--input-len 96] [--output-len 32] [--kill tokenizer,cache,balancer,prefill,decode]
                            [--fault-window-s 60] [--kill-gap-s 2] [--prefill-ep N] [--decode-ep M]
                            [--overload-requests 200] [--no-baseline] [--out FILE]

`streamoe up` runs the system (its supervisor restarts what dies) with fast failure detection
(heartbeat TTL 2 s, pending entries claimed after 2 s idle). Phases, one system:
1. fault-free: the requests (random token-id prompts, streamed, greedy, EOS ignored, with
   `return_token_ids`) in a closed loop of `--concurrency`; their outputs are the reference, their
   rate the sustainable one;
2. the same requests spread over `--fault-window-s` with no fault: the latency baseline
   (`--no-baseline` skips it);
3. faults: the same arrivals again, while a killer sends kill -9 (`--signal term`: SIGTERM) to
   each `--kill` target in turn (a kind, or kind:rank in an EP group), each once the last one's
   restart answers /health; an EP group's survivors re-form without the killed rank (no restart)
   and take its successor back in. SIGTERM to a role's only rank: it asks for a successor (a
   handover notice) and serves until the successor does. The target `rolling` sends SIGHUP to
   `streamoe up` instead: a rolling restart of every service, waited for to its end;
4. overload: `--overload-requests` at 10x the sustainable rate; the gateway admits up to its
   `--max-inflight` (here `--gateway-max-inflight`) and answers the rest 429 at once.
Counts per phase: sent, completed, refused before acceptance (429 overloaded; 503 while no rank of
a role is live, both with Retry-After), lost (accepted, never completely answered), tokens
duplicated or missing (a stream's token ids vs max_tokens), outputs that differ from the
fault-free run, latency percentiles, and the refusals' latency.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import numpy as np

from shared.cost.metrics_report import sample_sum

from .client import Client, Result, make_session
from .system import running_system
from .workloads import Request

KINDS = ("tokenizer", "cache", "balancer", "prefill", "decode")
ROLLING = "rolling"  # a --kill target: SIGHUP to streamoe up, a rolling restart of every service
FAST = {"STREAMOE_HEARTBEAT_TTL_S": "2", "STREAMOE_CLAIM_IDLE_MS": "2000", "STREAMOE_HOUSEKEEPING_S": "0.5"}


@dataclass
class Kill:
    kind: str
    pid: int
    at_s: float  # after the faults phase started
    # a worker: requests it ran or queued when killed (it waits for one; a decode rank: for a running one)
    requests_on_it: int | None = None
    healthy_again_s: float | None = None  # from the kill to the restarted process answering /health
    # an EP group's rank: the survivors re-form without it (no restart), then take its successor in
    survivors_restarted: bool | None = None
    group_without_it_s: float | None = None  # from the kill to every survivor computing without it
    group_whole_s: float | None = None  # from the kill to every rank computing in the whole group again
    completed_while_without: int | None = None  # requests finished while the group ran without the rank
    shrinks_by_reason: dict | None = None  # the survivors' re-formings without it: notice | timeout
    # SIGTERM to its role's only rank: handover notices the balancer saw for that role meanwhile
    handovers: float | None = None
    # a worker: its requests the balancer resumed elsewhere or routed again meanwhile (the balancer
    # counts; a rolling restart later replaces it, and its counts with it)
    went_on_elsewhere: float | None = None
    replaced: list | None = None  # `rolling`: the services whose process the rolling restart replaced


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadgen.chaos", description=__doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    model.add_argument("--model", type=Path, default=None)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=96)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--kill", default=",".join(KINDS),
                   help="what to kill, in order (comma-separated kinds; a worker's rank as kind:rank; rolling: "
                   "SIGHUP to streamoe up, a rolling restart of every service)")
    p.add_argument("--signal", choices=["kill", "term", "stop"], default="kill",
                   help="kill: kill -9 (a crash); term: SIGTERM (a graceful stop: the worker drains); stop: "
                   "SIGSTOP, then SIGCONT after --stop-s (a hung process that wakes up)")
    p.add_argument("--stop-s", type=float, default=8.0, help="with --signal stop: how long a victim stays frozen")
    p.add_argument("--prefill-ep", type=int, default=1)
    p.add_argument("--decode-ep", type=int, default=1)
    p.add_argument("--ep-timeout-s", type=float, default=5.0, help="how long an EP group waits for a silent rank")
    p.add_argument("--heartbeat-ttl-s", type=float, default=float(FAST["STREAMOE_HEARTBEAT_TTL_S"]),
                   help="the services' heartbeat TTL: how long before a silent process is taken for dead "
                   "(long: only the death notices make recovery fast)")
    p.add_argument("--ep-wire", default="exact", choices=["fp8", "exact"],
                   help="exact by default: outputs are compared token for token, and fp8 rounding can flip a "
                        "close call differently in another batch")
    p.add_argument("--fault-window-s", type=float, default=60.0, help="phase 2 sends its requests over this long")
    p.add_argument("--kill-gap-s", type=float, default=2.0,
                   help="from one restart answering /health (or the phase's start) to the next kill")
    p.add_argument("--overload-requests", type=int, default=200)
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the fault-free pass at the faults phase's arrivals (its latencies are the baseline)")
    p.add_argument("--gateway-max-inflight", type=int, default=32)
    p.add_argument("--redis-shards", type=int, default=0,
                   help="run the system on an N-primary local Redis Cluster (streamoe up --redis-shards); 0: one Redis")
    p.add_argument("--redis-replicas", type=int, default=0, help="replicas per primary, with --redis-shards")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8171)
    p.add_argument("--run-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    args = p.parse_args(argv)
    unknown = [k for k in args.kill.split(",") if k and k.split(":")[0] not in (*KINDS, ROLLING)]
    if unknown:
        p.error(f"--kill={args.kill!r}: {unknown} are not among {[*KINDS, ROLLING]}")
    if args.redis_replicas and not args.redis_shards:
        p.error(f"--redis-replicas={args.redis_replicas} needs --redis-shards")
    return args


def processes(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "processes.json").read_text())["processes"]


async def healthy(session: aiohttp.ClientSession, port: int) -> bool:
    try:
        async with session.get(f"http://127.0.0.1:{port}/health", timeout=aiohttp.ClientTimeout(total=1)) as r:
            return r.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


async def thaw(pid: int, after_s: float) -> None:
    await asyncio.sleep(after_s)
    os.kill(pid, signal.SIGCONT)


async def killer(run_dir: Path, targets: list[str], t0: float, gap_s: float,
                 how: signal.Signals = signal.SIGKILL, stop_s: float = 8.0) -> list[Kill]:
    """kill -9 (or SIGTERM) each target (a kind, or kind:rank) in turn; the next once the last
    one's successor answers /health."""
    kills = []
    async with aiohttp.ClientSession() as session:
        for target in targets:
            kind, _, rank = target.partition(":")
            await asyncio.sleep(gap_s)
            if kind == ROLLING:
                kills.append(await rolling_restart(run_dir, t0))
                continue
            balancer = next(p for p in processes(run_dir) if p["name"] == "balancer")
            single = kind in ("prefill", "decode") and sum(p["name"] == kind for p in processes(run_dir)) == 1
            handovers = await metric_or_none(balancer, "streamoe_notices_total", kind="handover", role=kind) \
                if single and how == signal.SIGTERM else None
            went_on = await went_on_elsewhere(balancer) if kind in ("prefill", "decode") else None
            victim = next(p for p in processes(run_dir) if p["name"] == kind and (not rank or p["rank"] == int(rank)))
            survivors = [p for p in processes(run_dir) if p["name"] == kind and p["pid"] != victim["pid"]]
            in_group = rank != "" and kind in ("prefill", "decode") and survivors
            reforms = [await reform_counts(p) for p in survivors] if in_group else []
            busy = await requests_on(victim, running=kind == "decode") if kind in ("prefill", "decode") else None
            os.kill(victim["pid"], how)
            kill = Kill(target, victim["pid"], time.perf_counter() - t0, requests_on_it=busy)
            thawing = asyncio.create_task(thaw(victim["pid"], stop_s)) if how == signal.SIGSTOP else None
            kills.append(kill)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                group = [p for p in processes(run_dir) if p["name"] == kind]  # an EP group comes back whole
                replaced = next(p for p in group if p["rank"] == victim["rank"])["pid"] != victim["pid"]
                replaced = replaced or (thawing is not None and thawing.done())  # the same process, awake
                if in_group and kill.group_without_it_s is None:
                    if all([(await reform_counts(p))[0] > before[0] for p, before in zip(survivors, reforms)]):
                        kill.group_without_it_s = time.perf_counter() - t0 - kill.at_s
                if replaced and all([await healthy(session, p["ports"]["http"]) for p in group]):
                    kill.healthy_again_s = time.perf_counter() - t0 - kill.at_s
                    if not in_group or all([(await reform_counts(p))[1] > before[1]
                                            for p, before in zip(survivors, reforms)]):
                        break
                await asyncio.sleep(0.1)
            if handovers is not None:
                after = await metric_or_none(balancer, "streamoe_notices_total", kind="handover", role=kind)
                kill.handovers = None if after is None else after - handovers
            if went_on is not None:
                after = await went_on_elsewhere(balancer)
                kill.went_on_elsewhere = None if after is None else after - went_on
            if in_group:
                kill.group_whole_s = time.perf_counter() - t0 - kill.at_s
                now = {p["rank"]: p["pid"] for p in processes(run_dir) if p["name"] == kind}
                kill.survivors_restarted = any(now[p["rank"]] != p["pid"] for p in survivors)
                after = [(await reform_counts(p))[2] for p in survivors]
                kill.shrinks_by_reason = {r: sum(a[r] - b[2][r] for a, b in zip(after, reforms))
                                          for r in ("notice", "heartbeat", "timeout")}
    return kills


async def rolling_restart(run_dir: Path, t0: float, timeout_s: float = 300.0) -> Kill:
    """SIGHUP to streamoe up; returns once it has replaced every service (processes.json counts
    its rolling restarts), with the time it took and what it replaced."""
    state = json.loads((run_dir / "processes.json").read_text())
    before, done = {(p["name"], p["rank"]): p["pid"] for p in state["processes"]}, state["rolling_restarts"]
    os.kill(state["supervisor_pid"], signal.SIGHUP)
    kill = Kill(ROLLING, state["supervisor_pid"], time.perf_counter() - t0)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = json.loads((run_dir / "processes.json").read_text())
        if state["rolling_restarts"] > done:
            kill.healthy_again_s = time.perf_counter() - t0 - kill.at_s
            break
        await asyncio.sleep(0.2)
    kill.replaced = sorted(f"{p['name']}" + ("" if p["rank"] is None else f":{p['rank']}")
                           for p in state["processes"] if before.get((p["name"], p["rank"]), p["pid"]) != p["pid"])
    return kill


async def went_on_elsewhere(balancer: dict) -> float | None:
    """Requests the balancer resumed (running on a dead decode rank) or routed again (waiting in a
    dead rank's stream) so far."""
    resumed = await metric_or_none(balancer, "streamoe_requests_resumed_total", outcome="resumed")
    moved = await metric_or_none(balancer, "streamoe_orphaned_requests_moved_total")
    return None if resumed is None or moved is None else resumed + moved


async def metric_or_none(process: dict, name: str, **labels: str) -> float | None:
    try:
        return await metric(process["ports"]["http"], name, **labels)
    except (aiohttp.ClientError, OSError):
        return None


async def requests_on(process: dict, wait_s: float = 10.0, running: bool = False) -> int:
    """Waits (up to wait_s) until the worker runs or queues a request (with `running`: runs one) ->
    how many it runs and queues: a kill under load hits one. A decode rank's queued request is a
    handoff it has not admitted: stopped, it puts the handoff back on its own stream for its
    successor, which the balancer does not count as going on elsewhere; a running one resumes
    from its ownership record."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            text = await scrape(process["ports"]["http"])
            ran = sample_sum(text, "streamoe_running_requests")
            n = ran + sample_sum(text, "streamoe_waiting_requests")
        except (aiohttp.ClientError, OSError):
            ran = n = 0
        if (ran if running else n) or time.monotonic() >= deadline:
            return int(n)
        await asyncio.sleep(0.02)


async def reform_counts(process: dict) -> tuple[float, float, dict[str, float]]:
    """(shrink, grow, shrinks by reason): how often this EP rank's group re-formed without a rank
    (through a death notice, or an exchange timeout), and with one back."""
    try:
        text = await scrape(process["ports"]["http"])
    except (aiohttp.ClientError, OSError):
        return (0.0, 0.0, {})
    reasons = {r: sample_sum(text, "streamoe_ep_reforms_total", change="shrink", reason=r)
               for r in ("notice", "heartbeat", "timeout")}
    return (sample_sum(text, "streamoe_ep_reforms_total", change="shrink"),
            sample_sum(text, "streamoe_ep_reforms_total", change="grow"), reasons)


async def send(url: str, model: str, requests: list[Request], concurrency: int | None, gaps: np.ndarray,
               timeout_s: float, t0: float | None = None) -> tuple[list[Result], float]:
    """Every request (arrivals `gaps` apart, at most `concurrency` in flight) -> results in request
    order (times from `t0`, default the first send), and the seconds from the first send to the
    last answer."""
    slots = asyncio.Semaphore(concurrency) if concurrency else None
    results = [Result(r.output_len, 0.0) for r in requests]
    async with make_session(timeout_s) as session:
        client = Client(session, url, model, t0=t0)

        async def one(i: int) -> None:
            if slots is None:
                await client.send(requests[i], results[i])
                return
            async with slots:
                await client.send(requests[i], results[i])

        start = time.perf_counter()
        tasks = []
        for i, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


async def scrape(port: int) -> str:
    """A service's /metrics text."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
            return await r.text()


async def metric(port: int, name: str, **labels: str) -> float:
    """The sum of a service's /metrics samples with this name and these labels."""
    return sample_sum(await scrape(port), name, **labels)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(results: list[Result], requests: list[Request], reference: list[Result] | None,
              duration_s: float) -> dict:
    done = [r for r in results if r.ok]
    latencies = [r.e2el_s for r in done]
    duplicated = sum(max(0, len(r.token_ids) - r.output_len) for r in done)
    missing = sum(max(0, r.output_len - len(r.token_ids)) for r in done)
    differing = [i for i, r in enumerate(results)
                 if reference is not None and r.ok and reference[i].ok and r.token_ids != reference[i].token_ids]
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    refused = [r for r in results if r.error == "429"]
    unavailable = [r for r in results if r.error == "503"]  # refused before acceptance: no live rank of a role
    return {"sent": len(results), "completed": len(done),
            "lost": len(results) - len(done) - len(refused) - len(unavailable),
            "refused_429": len(refused), "refused_503": len(unavailable), "errors": errors,
            "duplicated_tokens": duplicated,
            "missing_tokens": missing, "differing_outputs": differing,
            "not_completed": [i for i, r in enumerate(results) if not r.ok],
            "differences": [{"request": i, "prompt": requests[i].prompt, "fault_free": reference[i].token_ids,
                             "got": results[i].token_ids} for i in differing[:10]],
            "duration_s": duration_s,
            "requests_per_s": len(done) / duration_s if duration_s else None,
            "e2e_p50_s": percentile(latencies, 50), "e2e_p99_s": percentile(latencies, 99),
            "ttft_p99_s": percentile([r.ttft_s for r in done], 99),
            "refused_latency_p99_s": percentile([r.e2el_s for r in refused if r.e2el_s is not None], 99),
            "error_messages": sorted({f"{r.error}: {r.message}" for r in results if r.error and r.error != "429"})[:5]}


async def phases(args: argparse.Namespace, url: str, model: str, run_dir: Path) -> dict:
    rng = np.random.default_rng(args.seed)
    vocab = 8192 if args.preset == "small" and args.model is None else 1024
    requests = [Request(args.output_len, rng.integers(6, vocab, args.input_len).tolist())
                for _ in range(args.requests)]
    timeout = 300.0
    clean, clean_s = await send(url, model, requests, args.concurrency, np.zeros(len(requests)), timeout)
    report = {"fault_free": summarize(clean, requests, None, clean_s)}
    kinds = [k for k in args.kill.split(",") if k]
    gaps = np.full(len(requests), args.fault_window_s / len(requests))
    if args.baseline:  # the latencies to compare with: the same arrivals, no fault
        paced, paced_s = await send(url, model, requests, args.concurrency, gaps, timeout)
        report["no_faults_same_arrivals"] = summarize(paced, requests, clean, paced_s)
    t0 = time.perf_counter()
    how = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "stop": signal.SIGSTOP}[args.signal]
    kill_task = asyncio.create_task(killer(run_dir, kinds, t0, args.kill_gap_s, how, args.stop_s))
    faulty, faulty_s = await send(url, model, requests, args.concurrency, gaps, timeout, t0)
    kills = await kill_task
    report["faults"] = summarize(faulty, requests, clean, faulty_s)
    for k in kills:
        if k.group_without_it_s is not None:  # finished between the re-forming and the rank's return
            start, end = k.at_s + k.group_without_it_s, k.at_s + (k.group_whole_s or k.group_without_it_s)
            k.completed_while_without = sum(r.ok and start <= r.start_s + r.e2el_s <= end for r in faulty)
    report["faults"]["kills"] = [asdict(k) for k in kills]
    report["faults"]["kills_during_load"] = sum(k.at_s < faulty_s for k in kills)
    balancer = next(p for p in processes(run_dir) if p["name"] == "balancer")
    report["faults"]["resumed_by_balancer"] = await metric(balancer["ports"]["http"], "streamoe_requests_resumed_total",
                                                           outcome="resumed")
    report["faults"]["moved_by_balancer"] = await metric(balancer["ports"]["http"],
                                                         "streamoe_orphaned_requests_moved_total")
    report["faults"]["notices"] = {kind: await metric(balancer["ports"]["http"], "streamoe_notices_total", kind=kind)
                                   for kind in ("death", "leave")}  # since this balancer started
    sustainable = report["fault_free"]["requests_per_s"] or 1.0
    over = [Request(args.output_len, rng.integers(6, vocab, args.input_len).tolist())
            for _ in range(args.overload_requests)]
    gaps = rng.exponential(1.0 / (10 * sustainable), len(over))
    loaded, loaded_s = await send(url, model, over, None, gaps, timeout)
    report["overload"] = summarize(loaded, over, None, loaded_s)
    report["overload"]["rate_per_s"] = 10 * sustainable
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    run_dir = (args.run_dir or Path(tempfile.mkdtemp(prefix="chaos-"))).resolve()
    model_args = ["--model", str(args.model)] if args.model else ["--preset", args.preset]
    os.environ.update(FAST)
    os.environ["STREAMOE_MAX_INFLIGHT"] = str(args.gateway_max_inflight)
    os.environ["STREAMOE_EP_TIMEOUT_S"] = str(args.ep_timeout_s)
    os.environ["STREAMOE_HEARTBEAT_TTL_S"] = str(args.heartbeat_ttl_s)
    cluster = ["--redis-shards", str(args.redis_shards), "--redis-replicas", str(args.redis_replicas)] \
        if args.redis_shards else []
    with running_system(*model_args, *cluster, "--dtype", args.dtype, "--port", str(args.port), "--prefill-ep",
                        str(args.prefill_ep), "--decode-ep", str(args.decode_ep), "--ep-wire", args.ep_wire,
                        "--run-dir",
                        str(run_dir / "run"), "--cache-dir", str(run_dir / "blocks")) as url:
        model = args.model.resolve().name if args.model else args.preset
        report = asyncio.run(phases(args, url, model, run_dir / "run"))
    report["command"] = "python -m loadgen.chaos " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    clean, faults, over = report["fault_free"], report["faults"], report["overload"]
    print(f"fault-free: {clean['completed']}/{clean['sent']} completed, e2e p50 {clean['e2e_p50_s']:.3f} s, "
          f"p99 {clean['e2e_p99_s']:.3f} s, {clean['requests_per_s']:.2f} requests/s")
    if "no_faults_same_arrivals" in report:
        base = report["no_faults_same_arrivals"]
        print(f"no faults, the faults phase's arrivals: {base['completed']}/{base['sent']} completed, e2e p50 "
              f"{base['e2e_p50_s']:.3f} s, p99 {base['e2e_p99_s']:.3f} s")
    print(f"faults ({', '.join(k['kind'] for k in faults['kills'])} killed, {faults['kills_during_load']} during "
          f"the load): {faults['completed']}/{faults['sent']} completed, {faults['refused_503']} refused 503 "
          f"before acceptance, lost {faults['lost']}, duplicated tokens "
          f"{faults['duplicated_tokens']}, missing tokens {faults['missing_tokens']}, outputs differing from the "
          f"fault-free run {len(faults['differing_outputs'])}, resumed after their decode rank died "
          f"{faults['resumed_by_balancer']:.0f}, routed again from a dead rank's stream "
          f"{faults['moved_by_balancer']:.0f}, "
          f"e2e p99 {faults['e2e_p99_s']:.3f} s")
    for k in faults["kills"]:
        if k["group_without_it_s"] is not None:
            print(f"  {k['kind']}: its group computed without it {k['group_without_it_s']:.1f} s after the kill "
                  f"(survivors restarted: {k['survivors_restarted']}; re-formed by {k['shrinks_by_reason']}), "
                  f"whole again at {k['group_whole_s']:.1f} s; {k['completed_while_without']} requests finished "
                  "in between")
    print(f"overload ({over['rate_per_s']:.1f} requests/s, 10x): {over['completed']} completed, "
          f"{over['refused_429']} refused 429 (p99 {over['refused_latency_p99_s'] or 0:.4f} s), lost {over['lost']}")
    print(report["command"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
