"""`streamoe up`: the whole system on one machine, as a process supervisor would run it.

An embedded Redis when no URL is given (append-only file on, so a Redis restart keeps the
streams; a password drawn for the run, so other local users cannot reach the streams), or with
`--redis-shards N [--redis-replicas R]` an embedded Redis Cluster of N primaries (the same
password, replicas included; shared/launcher/redis_cluster.py), then
every service as its own `python -m services.<name>` process with its log in the run directory,
`processes.json` describing them, one `streamoe ready: URL` line on stdout once all are healthy,
restarts with backoff for a service that dies (its death announced first, shared/runtime/notices.py),
and a clean stop on SIGTERM/Ctrl-C (every service gets SIGINT: it drains, and hands nothing over).
Should `up` itself die, even by kill -9, every service gets SIGINT and drains (PR_SET_PDEATHSIG);
the embedded Redis, which holds the streams, is left running.

SIGHUP is a rolling restart (`Supervisor.rolling_restart`): every service replaced, one at a
time, the successor healthy before the old process gets SIGTERM; the gateway's successor binds
the same port (SO_REUSEPORT, shared/runtime/listen.py) and takes every new connection while the
old one finishes its open streams. A worker told SIGTERM from elsewhere while it is its role's
only rank asks for a successor (a handover notice); `up` starts it at once, and the old one
serves until the successor does (shared/runtime/engine_service.py, `hand_over`).

Secrets (the Redis URL, which may hold a password, and the API key) reach the services through
their environment (`STREAMOE_REDIS_URL`, `STREAMOE_API_KEY`), never their command lines, which
`ps` shows to every user; `processes.json` has the Redis URL without its password.

`--dtype auto` and `--moe-backend auto` are calibrated here, once, before any service starts, with
the workers' thread count (`--worker-threads`: by default the cores split between the workers;
shared/runtime/numerics.py); every worker and the cache service get the
concrete values, which are printed on stderr and kept in processes.json under "numerics".
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from secrets import token_hex
from urllib.parse import urlsplit, urlunsplit

from shared.launcher.cliargs import cpu_list_text, home, resolve_speculative_tokens
from shared.launcher.redis_cluster import LocalCluster, start_cluster
from shared.launcher.redis_server import free_port, reserve_port, start_redis
from shared.planner.slo import parse_slo
from shared.protocol import streams
from shared.protocol.messages import Notice
from shared.runtime import core_lease, notices, redis_client
from shared.runtime.listen import port_is_free

BACKOFF_S = (1, 2, 4, 8, 16, 30)
PR_SET_PDEATHSIG = 1  # prctl(2)
SUPERVISE_PERIOD_S = 0.1  # how soon a child's exit is seen, announced and its restart scheduled
DRAIN_WAIT_S = 40.0  # a rolling restart waits this long for an old process to drain, then kills it


@dataclass
class Child:
    name: str
    module: str
    args: list[str]
    http_port: int
    log_path: Path
    rank: int | None = None
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    ep_size: int = 1
    group: str = ""  # its EP group when not the role's default one (an autoscaled rank's)
    shares_port: bool = False  # the gateway: its successor binds the same port (SO_REUSEPORT)
    instance: str = ""  # the instance id of the running process
    rolling: bool = False  # the rolling restart replaces it now: the supervisor leaves it alone
    retiring: bool = False  # the autoscaler drains it: never restarted, dropped once it exits
    env: dict = field(default_factory=dict)  # set in its environment besides the secrets (a worker's OpenMP waits)
    lease_slot: int | None = None  # a worker's slot in the core lease (--worker-threads lend or turns)
    lease: Path | None = None
    lease_mode: str = "lend"
    cpus: frozenset[int] | None = None  # a worker's CPUs (--worker-cpus); None: the supervisor's
    # earlier processes still draining after a successor took their place: (process, instance id)
    leaving: list = field(default_factory=list)

    def death_notice(self, proc: subprocess.Popen | None = None, instance: str | None = None) -> Notice:
        """The notice for a process of this child that has exited (shared/runtime/notices.py)."""
        proc = proc or self.proc
        code = proc.returncode
        worker = self.rank is not None
        return Notice("death", self.name, instance or self.instance, self.name if worker else "",
                      self.rank if worker else -1, self.ep_size,
                      reason=f"signal {-code}" if code < 0 else f"exit {code}", time=time.time())

    def start(self, secrets: dict[str, str], extra: tuple[str, ...] = ()) -> None:
        log = open(self.log_path, "a")
        self.instance = self.instance_id()
        if self.lease is not None and self.lease_slot is not None:
            core_lease.clear(self.lease, self.lease_slot)  # what a dead predecessor held
            extra = (*extra, "--core-lease", f"{self.lease}:{self.lease_slot}", "--core-lease-mode", self.lease_mode)
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, "--http-port", str(self.http_port),
                                      "--instance-id", self.instance, *self.args, *extra],
                                     stdout=log, stderr=log, start_new_session=True,
                                     env={**os.environ, **secrets, **self.env},
                                     preexec_fn=die_with_parent if self.cpus is None else partial(pinned, self.cpus))

    def start_successor(self, secrets: dict[str, str]) -> None:
        """A new process beside the running one, which goes on (to be stopped, or stopping): on a
        port of its own, or on the same one where the port is shared."""
        self.leaving.append((self.proc, self.instance))
        self.restarts += 1
        if not self.shares_port:
            self.http_port = free_port()
        old = self.leaving[-1][1]
        self.start(secrets, ("--successor-of", old) if self.rank is not None else ())  # old is alive, not dead

    def instance_id(self) -> str:
        """Unique per rank and per start: the heartbeat, abort group and owned requests are keyed by it."""
        rank = "" if self.rank is None else f"-{self.rank}"
        group = f"-{self.group}" if self.group else ""
        return f"{self.name}{group}{rank}-{os.getpid()}-{self.restarts}"

    def healthy(self) -> bool:
        """Its running process answers /health with 200 (on a shared port: that process, not the
        one before it)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health", timeout=1) as r:
                if r.status != 200:
                    return False
                return not self.shares_port or json.loads(r.read()).get("instance_id") == self.instance
        except (OSError, ValueError):
            return False

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def pinned(cpus: frozenset[int]) -> None:
    """In a worker, before exec: `die_with_parent`, and its CPUs (--worker-cpus)."""
    die_with_parent()
    os.sched_setaffinity(0, cpus)


def die_with_parent() -> None:
    """In the child, before exec: SIGINT (a drain, the whole system stopping) when `streamoe up`
    dies, even by kill -9, so no service outlives its supervisor (Linux; elsewhere a no-op).
    NOTE: the signal follows the thread that started the child: `up` starts every child from its
    main thread."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)
    except (OSError, AttributeError):
        pass


def resolve_model(args: argparse.Namespace) -> Path:
    if args.model is not None:
        return args.model
    from shared.model.presets import init_model

    path = home() / "models" / args.preset
    if not (path / "model.safetensors").exists():
        print(f"streamoe up: creating the {args.preset} preset in {path}", file=sys.stderr)
        init_model(path, args.preset)
    return path


def up(args: argparse.Namespace) -> int:
    if args.prefill_ep < 1 or args.decode_ep < 1:
        print(f"streamoe up: --prefill-ep={args.prefill_ep} --decode-ep={args.decode_ep}: each needs >= 1 rank",
              file=sys.stderr)
        return 2
    cluster_mode = bool(getattr(args, "redis_cluster", False) or getattr(args, "redis_shards", 0))
    if getattr(args, "redis_shards", 0) and args.redis_url is not None:
        print(f"streamoe up: --redis-shards={args.redis_shards} starts an embedded cluster; it cannot go with "
              "--redis-url (a cluster of your own: --redis-url NODE --redis-cluster)", file=sys.stderr)
        return 2
    if getattr(args, "redis_replicas", 0) and not getattr(args, "redis_shards", 0):
        print(f"streamoe up: --redis-replicas={args.redis_replicas} needs --redis-shards N (an embedded cluster)",
              file=sys.stderr)
        return 2
    if not port_is_free(args.host, args.port):
        print(f"streamoe up: --port={args.port}: something listens on {args.host}:{args.port} already (another "
              "streamoe up?); stop it or choose another port", file=sys.stderr)
        return 2
    partitions = getattr(args, "stream_partitions", None) or max(1, getattr(args, "redis_shards", 0))
    cores = os.cpu_count() or 2
    worker_cpus = getattr(args, "worker_cpus", None)
    allowed = frozenset(os.sched_getaffinity(0))
    if worker_cpus is not None:
        if not worker_cpus <= allowed:
            print(f"streamoe up: --worker-cpus={cpu_list_text(worker_cpus)}: CPU "
                  f"{cpu_list_text(worker_cpus - allowed)} is not one this process may run on "
                  f"({cpu_list_text(allowed)})", file=sys.stderr)
            return 2
        cores = len(worker_cpus)
    scaling = None
    if getattr(args, "autoscale", False):
        try:
            scaling = autoscale_bounds(args, cores)
        except ValueError as e:
            print(f"streamoe up: {e}", file=sys.stderr)
            return 2
    # with --autoscale, the most ranks it may run share the cores
    num_workers = args.prefill_ep + args.decode_ep if scaling is None else scaling[1].prefill + scaling[1].decode
    try:
        threads, worker_env = worker_threads(getattr(args, "worker_threads", "share"), cores, num_workers)
    except ValueError as e:
        print(f"streamoe up: {e}", file=sys.stderr)
        return 2
    lease_mode = getattr(args, "worker_threads", "share")
    lend = lease_mode in core_lease.MODES
    if lease_mode == "turns" and max(args.prefill_ep, args.decode_ep) > 1:
        print(f"streamoe up: --worker-threads turns with --prefill-ep {args.prefill_ep} --decode-ep {args.decode_ep}: "
              "the ranks of an EP group compute each step together, so they cannot take the cores in turn "
              "(use lend or share)", file=sys.stderr)
        return 2
    model = resolve_model(args)
    try:
        from shared.model.config import ModelArgs

        speculative = resolve_speculative_tokens(getattr(args, "speculative_tokens", "auto"),
                                                 ModelArgs.from_file(model / "config.json").num_mtp_layers > 0)
    except ValueError as e:
        print(f"streamoe up: {e}", file=sys.stderr)
        return 2
    # lent cores: a busy worker mostly computes on all of them, so calibrate there
    if worker_cpus is not None:  # calibrate where the workers will run
        os.sched_setaffinity(0, worker_cpus)
    numerics = calibrate(model, args, cores if lend else threads)  # before Redis and the services: a refusal
    # leaves nothing running
    others = allowed - worker_cpus if worker_cpus is not None else frozenset()
    if worker_cpus is not None:  # every process but the workers (Redis too, restarts too) on the other CPUs
        os.sched_setaffinity(0, others or allowed)  # (this thread starts them all)
    run_dir = Path(args.run_dir or home() / "runs" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    stopping, hangups = [], []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    signal.signal(signal.SIGHUP, lambda *_: hangups.append(True))  # a rolling restart
    redis_nodes = None  # the embedded Redis: one server, or the nodes of a local cluster
    fsync = ["--appendfsync", getattr(args, "redis_appendfsync", "everysec")]
    redis_url = args.redis_url
    if redis_url is None and getattr(args, "redis_shards", 0):
        redis_nodes = start_cluster(run_dir / "redis-cluster", args.redis_shards, args.redis_replicas,
                                   password=token_hex(24), extra=fsync)
        redis_url = redis_nodes.url
    elif redis_url is None:
        proc, redis_url = start_redis(run_dir / "redis", appendonly=True, password=token_hex(24), extra=fsync)
        redis_nodes = LocalCluster([proc], [redis_url], shards=0, replicas=0)
    cache = [] if args.no_prefix_cache else ["--cache-dir", str(args.cache_dir or home() / "cache"),
                                             "--cache-capacity-mib", str(args.cache_capacity_mib)]
    worker = ["--model", str(model), "--dtype", numerics.dtype, "--moe-backend", numerics.moe_backend,
              "--device", args.device, "--threads", str(threads), "--ep-wire", args.ep_wire,
              "--num-redundant-experts", str(args.num_redundant_experts), "--speculative-tokens", str(speculative),
              *cache, *(["--event-loop-cpus", cpu_list_text(others)] if others else [])]  # the loop beside the hops
    wait = getattr(args, "redis_wait_replicas", None)
    wait = (1 if getattr(args, "redis_replicas", 0) else 0) if wait is None else wait
    slo = getattr(args, "slo", None) or parse_slo(None)
    gateway = ["--model", str(model), "--redis-wait-replicas", str(wait),
               "--progress-timeout-s", str(getattr(args, "progress_timeout_s", 30.0)), "--slo", str(slo)]
    reserve_port(args.port)  # the gateway's: never handed to another service
    lease = run_dir / "core-lease" if lend else None  # one slot per worker (shared/runtime/core_lease.py)
    if lease is not None:
        core_lease.create(lease, num_workers)
    children = [Child("tokenizer", "services.tokenizer", ["--model", str(model)], free_port(),
                      run_dir / "tokenizer.log"),
                Child("cache", "services.cache", ["--model", str(model), "--dtype", numerics.dtype, "--device",
                                                  args.device, *cache], free_port(), run_dir / "cache.log"),
                Child("balancer", "services.balancer", ["--ep-nodes", str(args.ep_nodes)], free_port(),
                      run_dir / "balancer.log"),
                *[Child("prefill", "services.prefill", [*worker, "--rank", str(r), "--ep-size", str(args.prefill_ep),
                                                        "--overlap", args.prefill_overlap],
                        free_port(), run_dir / f"prefill-{r}.log", rank=r, ep_size=args.prefill_ep, env=worker_env,
                        lease_slot=r, lease=lease, lease_mode=lease_mode, cpus=worker_cpus)
                  for r in range(args.prefill_ep if scaling is None else 0)],
                *[Child("decode", "services.decode", [*worker, "--rank", str(r), "--ep-size", str(args.decode_ep),
                                                      "--overlap", args.decode_overlap],
                        free_port(), run_dir / f"decode-{r}.log", rank=r, ep_size=args.decode_ep, env=worker_env,
                        lease_slot=args.prefill_ep + r, lease=lease, lease_mode=lease_mode, cpus=worker_cpus)
                  for r in range(args.decode_ep if scaling is None else 0)],
                Child("gateway", "services.gateway", gateway + ["--host", args.host, "--reuse-port"], args.port,
                      run_dir / "gateway.log", shares_port=True)]
    secrets = {"STREAMOE_REDIS_URL": redis_url, "STREAMOE_REDIS_CLUSTER": "1" if cluster_mode else "0",
               "STREAMOE_STREAM_PARTITIONS": str(partitions)}  # not secret, but every service reads them alike
    if args.api_key:  # only the gateway checks it; every service would read STREAMOE_API_KEY alike
        secrets["STREAMOE_API_KEY"] = args.api_key
    autoscaler = None
    if scaling is not None:
        low, high = scaling
        overlap = {"prefill": args.prefill_overlap, "decode": args.decode_overlap}

        def scaled_worker(role: str, index: int) -> Child:
            """A rank the autoscaler runs: the first of a role in its default group, every other one an EP
            group of its own."""
            group = "" if index == 0 else f"{role}-{index}"
            return Child(role, f"services.{role}", [*worker, "--rank", "0", "--ep-size", "1", "--overlap",
                                                    overlap[role], *(["--ep-group-id", group] if group else [])],
                         free_port(), run_dir / f"{group or role}-0.log", rank=0, group=group, env=worker_env,
                         lease_slot=index + (high.prefill if role == "decode" else 0), lease=lease,
                         lease_mode=lease_mode, cpus=worker_cpus)

        autoscaler = Autoscaler(secrets, scaled_worker)
        children[3:3] = [autoscaler.new_worker(role) for role in ("prefill", "decode")
                         for _ in range(getattr(low, role))]
        children.insert(3, Child("planner", "services.planner", [
            "--profile", str(args.autoscale_profile.resolve()), "--slo", str(slo),
            "--min", f"prefill={low.prefill},decode={low.decode}",
            "--max", f"prefill={high.prefill},decode={high.decode}",
            "--interval-s", str(args.autoscale_interval_s), "--slo-correction", args.autoscale_slo_correction,
            "--actuate", "up"], free_port(), run_dir / "planner.log"))
    handovers = HandoverNotices(secrets)  # before any child starts: none of their notices is missed
    for child in children:
        child.start(secrets)
    record = numerics.health()  # the same keys as each worker's /health
    published = ProcessList(secrets)
    sup = Supervisor(children, secrets, run_dir, redis_nodes, redis_url, record, handovers, stopping,
                     autoscaler=autoscaler, published=published)
    sup.write()
    deadline = time.monotonic() + args.ready_timeout
    ready = False
    code = 0
    next_check = 0.0
    try:
        while not stopping:
            if not ready and time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.5
                if all(c.healthy() for c in children):
                    ready = True
                    print(f"streamoe ready: http://{args.host}:{args.port}", flush=True)
                elif time.monotonic() > deadline:
                    bad = next(c for c in children if not c.healthy())
                    print(f"streamoe up: {bad.name} not healthy within {args.ready_timeout} s; its log "
                          f"({bad.log_path}):\n{bad.tail()}", file=sys.stderr)
                    code = 1
                    break
            if ready and hangups:
                hangups.clear()
                sup.rolling_restart(args.ready_timeout)
            sup.tick()
    finally:
        handovers.close()
        published.close()
        if autoscaler is not None:
            autoscaler.close()
        stop_all(children, redis_nodes)  # the supervisor's list: the autoscaler's ranks included
    return code


def autoscale_bounds(args: argparse.Namespace, cores: int):
    """(floor, ceiling) for --autoscale, or a ValueError naming the flag."""
    from shared.planner.plan import Units, load_profile

    if args.prefill_ep != 1 or args.decode_ep != 1:
        raise ValueError(f"--autoscale with --prefill-ep={args.prefill_ep} --decode-ep={args.decode_ep}: the "
                         "autoscaler adds and drains single ranks; an EP group scales as a whole group "
                         "(deploy/README.md, \"Autoscaling\")")
    if args.autoscale_profile is None:
        raise ValueError("--autoscale needs --autoscale-profile FILE (what one rank serves: "
                         "python -m loadgen.profile --url URL --out FILE)")
    try:
        load_profile(args.autoscale_profile)
    except OSError as e:
        raise ValueError(f"--autoscale-profile {args.autoscale_profile}: {e.strerror}") from None
    low = args.autoscale_min or Units(1, 1)
    high = args.autoscale_max or Units(max(1, low.prefill), max(low.decode, cores - 1))
    for role in ("prefill", "decode"):
        if getattr(low, role) > getattr(high, role):
            raise ValueError(f"--autoscale-min {role}={getattr(low, role)} is above --autoscale-max "
                             f"{role}={getattr(high, role)}")
    return low, high


class Autoscaler:
    """Applies the planner's decisions (the hash streams.PLANNER_DECISIONS, read on a thread of its
    own: the supervisor never waits on Redis). A rank more: started, an EP group of its own. A rank
    fewer: the newest gets SIGTERM and drains (the graceful stop: its running requests go on
    elsewhere), is never restarted, and leaves the process list once it exits."""

    def __init__(self, secrets: dict[str, str], make_worker):
        self.secrets, self.make_worker = secrets, make_worker
        self.made = {"prefill": 0, "decode": 0}  # ranks started per role: the next one's group index
        self.latest: dict[str, str] | None = None
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self.follow, name="autoscale-decisions", daemon=True)
        self.thread.start()

    def follow(self) -> None:
        client = None
        while not self.closing.is_set():
            try:
                if client is None:
                    client = redis_client.connect_sync(self.secrets["STREAMOE_REDIS_URL"],
                                                       self.secrets["STREAMOE_REDIS_CLUSTER"] == "1")
                raw = client.hgetall(streams.PLANNER_DECISIONS)
                self.latest = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes)
                                                                             else v) for k, v in raw.items()}
            except Exception:  # Redis away: the last decision stands
                pass
            self.closing.wait(0.5)
        with contextlib.suppress(Exception):
            client.close()

    def close(self) -> None:
        self.closing.set()
        self.thread.join(2.0)

    def new_worker(self, role: str) -> Child:
        child = self.make_worker(role, self.made[role])
        self.made[role] += 1
        return child

    def apply(self, sup: Supervisor) -> bool:
        """Reap the drained ranks, then start or drain ranks toward the decision; whether the process
        list changed."""
        changed = False
        for child in [c for c in sup.children if c.retiring and c.proc.poll() is not None]:
            sup.children.remove(child)
            if child.proc.returncode != 0:
                announce(child.death_notice(), self.secrets)
            print(f"streamoe up: autoscale: {child.name} {child.instance} drained (exit {child.proc.returncode})",
                  file=sys.stderr, flush=True)
            changed = True
        decision = self.latest
        if decision is None or sup.stopping:
            return changed
        for role in ("prefill", "decode"):
            try:
                want = int(decision[role])
            except (KeyError, ValueError):
                continue
            active = [c for c in sup.children if c.name == role and not c.retiring]
            if want < 1 or want == len(active):
                continue
            print(f"streamoe up: autoscale: {role} {len(active)} -> {want} ({decision.get(f'{role}_reason', '')})",
                  file=sys.stderr, flush=True)
            for _ in range(want - len(active)):
                child = self.new_worker(role)
                child.start(self.secrets)
                sup.children.append(child)
            for child in active[want:][::-1]:  # the newest first
                child.retiring = True
                child.proc.terminate()
            changed = True
        return changed


class HandoverNotices:
    """The instances that asked for a successor (handover notices, shared/runtime/notices.py), read
    from the NOTICES stream on a thread of its own (the supervisor never waits on Redis)."""

    def __init__(self, secrets: dict[str, str]):
        self.asked: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.closing = threading.Event()
        self.secrets, self.client, self.last = secrets, None, None
        self.since = time.time()  # notices older than the supervisor are not its business
        self.thread = threading.Thread(target=self.follow, name="handover-notices", daemon=True)
        self.thread.start()

    def follow(self) -> None:
        while not self.closing.is_set():
            try:
                if self.client is None:
                    self.client = redis_client.connect_sync(self.secrets["STREAMOE_REDIS_URL"],
                                                            self.secrets["STREAMOE_REDIS_CLUSTER"] == "1")
                if self.last is None:  # from the supervisor's start on
                    self.last = f"{int(self.since * 1000) - 1000}-0".encode()
                reply = self.client.xread({streams.NOTICES: self.last}, count=16, block=500)
            except Exception:  # Redis away: the successor comes with the process's exit instead
                self.closing.wait(0.5)
                continue
            for _, entries in (reply.items() if isinstance(reply, dict) else reply or []):
                for entry_id, fields in entries:
                    self.last = entry_id
                    try:
                        notice = notices.decode_notice(fields)
                    except Exception:
                        continue
                    if notice.kind == "handover" and notice.instance_id:
                        self.asked.put(notice.instance_id)

    def take(self) -> list[str]:
        out = []
        while not self.asked.empty():
            out.append(self.asked.get_nowait())
        return out

    def close(self) -> None:
        self.closing.set()
        self.thread.join(2.0)
        with contextlib.suppress(Exception):
            self.client.close()


@dataclass
class Supervisor:
    """Restarts what dies (with backoff, its death announced first), starts the successor of a
    process that asks for one (a handover notice), replaces every service on SIGHUP (a rolling
    restart), and keeps processes.json true."""
    children: list[Child]
    secrets: dict[str, str]
    run_dir: Path
    redis_nodes: object
    redis_url: str
    numerics: dict
    handovers: HandoverNotices
    stopping: list
    rolling_restarts: int = 0
    autoscaler: Autoscaler | None = None
    rolling_now: bool = False
    published: ProcessList | None = None

    def write(self) -> None:
        entries = write_processes(self.run_dir, self.children, self.redis_nodes, self.redis_url, self.numerics,
                                  self.rolling_restarts)
        if self.published is not None:
            self.published.put({"time": time.time(), "supervisor_pid": os.getpid(),
                                "rolling_restarts": self.rolling_restarts, "processes": entries})

    def tick(self) -> None:
        changed = self.autoscaler is not None and not self.rolling_now and self.autoscaler.apply(self)
        changed = supervise(self.children, self.secrets) or changed
        for instance in self.handovers.take():
            child = next((c for c in self.children if c.instance == instance and not c.rolling), None)
            if child is not None and child.proc.poll() is None and not self.stopping:
                print(f"streamoe up: {child.name} {instance} asked for a successor; starting it", file=sys.stderr,
                      flush=True)
                child.start_successor(self.secrets)
                changed = True
        if changed:
            self.write()
        time.sleep(SUPERVISE_PERIOD_S)

    def wait(self, done, timeout_s: float) -> bool:
        """Supervise until done() or timeout_s (or a stop); whether done() came true."""
        deadline = time.monotonic() + timeout_s
        while not self.stopping and time.monotonic() < deadline:
            if done():
                return True
            self.tick()
        return bool(done())

    def rolling_restart(self, ready_timeout_s: float) -> None:
        """Every service replaced, one at a time, none of them missing meanwhile: the successor
        starts, answers /health, and only then is the old process stopped (SIGTERM: it drains; a
        gateway's successor shares its port). A rank of an EP group cannot run beside its
        successor (one rank, one member): it is stopped first (its group goes on without it) and
        its successor asks in."""
        print("streamoe up: rolling restart", file=sys.stderr, flush=True)
        self.rolling_now = True  # the autoscaler waits: the list below is the one replaced
        try:
            self._rolling_restart(ready_timeout_s)
        finally:
            self.rolling_now = False

    def _rolling_restart(self, ready_timeout_s: float) -> None:
        for child in [c for c in self.children if not c.retiring]:
            if self.stopping:
                return
            child.rolling = True
            try:
                old, instance = child.proc, child.instance
                if child.ep_size > 1:
                    old.terminate()
                    self.wait(lambda old=old: old.poll() is not None, DRAIN_WAIT_S)
                    if old.poll() is None:
                        old.kill()
                        old.wait()
                    if old.returncode != 0:
                        announce(child.death_notice(), self.secrets)
                    child.restarts += 1
                    child.start(self.secrets)
                    self.write()
                    self.wait(child.healthy, ready_timeout_s)
                else:
                    child.start_successor(self.secrets)
                    self.write()
                    if not self.wait(child.healthy, ready_timeout_s):
                        print(f"streamoe up: rolling restart: {child.name}'s successor not healthy within "
                              f"{ready_timeout_s} s; the old process goes on", file=sys.stderr, flush=True)
                        continue
                    old.terminate()
                    self.wait(lambda old=old: old.poll() is not None, DRAIN_WAIT_S)
                print(f"streamoe up: rolling restart: {child.name} {instance} -> {child.instance}", file=sys.stderr,
                      flush=True)
            finally:
                child.rolling = False
        self.rolling_restarts += 1
        self.write()
        print(f"streamoe up: rolling restart done ({len(self.children)} services)", file=sys.stderr, flush=True)


def worker_threads(value: str, cores: int, num_workers: int) -> tuple[int, dict[str, str]]:
    """--worker-threads: each worker's torch threads, and what its environment needs besides.

    `share`: the cores split between the workers, so none is oversubscribed, but a worker's cores
    idle while it waits (prefill between bursts). `lend`: the share at least, and step by step every
    core the other workers leave idle; `turns`: every core, the workers taking them in turn, a step
    each (both shared/runtime/core_lease.py). `all` (or a count): each worker computes on that
    many threads, sharing the cores with the others. Where the threads of all workers exceed the
    cores, OpenMP must not spin: a thread spinning at a barrier holds a core another process's
    thread needs, and two busy workers then run several times slower than on a split. So their
    threads wait passively (OMP_WAIT_POLICY=PASSIVE), unless the environment already says how."""
    if value in ("share", "lend", "turns"):
        return max(1, cores // num_workers), {}
    if value == "all":
        threads = cores
    else:
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"--worker-threads={value}: expected share, lend, turns, all or a positive count of "
                             "threads")
    if threads * num_workers <= cores or "OMP_WAIT_POLICY" in os.environ:
        return threads, {}
    return threads, {"OMP_WAIT_POLICY": "PASSIVE"}


def calibrate(model: Path, args: argparse.Namespace, threads: int):
    """The concrete --dtype and --moe-backend for every worker, measured (or cached) here."""
    from shared.runtime.numerics import Shapes, resolve

    numerics = resolve(Shapes.of_model(model), args.device, threads, args.dtype, args.moe_backend)
    print(f"streamoe up: --dtype {numerics.dtype} --moe-backend {numerics.moe_backend} ({numerics.source}, "
          f"{threads} threads per worker)", file=sys.stderr, flush=True)
    return numerics


def supervise(children: list[Child], secrets: dict[str, str]) -> bool:
    """Restart a dead service with backoff, as a process supervisor would; announce its death
    first (a death notice), so that its EP group and the balancer go on without it at once. An
    earlier process that a successor replaced is only reaped (its death announced if it crashed).
    Whether a process started."""
    changed = False
    now = time.monotonic()
    for child in children:
        for proc, instance in list(child.leaving):
            if proc.poll() is not None:
                child.leaving.remove((proc, instance))
                if proc.returncode != 0:
                    announce(child.death_notice(proc, instance), secrets)
        if child.rolling or child.retiring or child.proc.poll() is None:
            continue
        if child.next_start == 0.0:
            delay = BACKOFF_S[min(child.restarts, len(BACKOFF_S) - 1)]
            child.next_start = now + delay
            print(f"streamoe up: {child.name} exited with {child.proc.returncode}; restarting in {delay} s",
                  file=sys.stderr, flush=True)
            if child.proc.returncode != 0:  # 0: it drained, and announced its leave itself
                announce(child.death_notice(), secrets)
        elif now >= child.next_start:
            child.restarts += 1
            child.next_start = 0.0
            child.start(secrets)
            changed = True
    return changed


def announce(notice: Notice, secrets: dict[str, str], timeout_s: float = 5.0) -> None:
    """Publish a notice from the supervisor; with Redis away, the timeouts and TTLs find the death.
    NOTE: on a thread of its own, waited for at most timeout_s: asyncio.run waits for every task it
    cancels, and redis-py (8.1) can swallow a cancel, so the supervisor must never wait on it."""
    def run() -> None:
        try:
            asyncio.run(notices.publish_to(secrets["STREAMOE_REDIS_URL"], secrets["STREAMOE_REDIS_CLUSTER"] == "1",
                                           notice))
        except Exception as e:
            print(f"streamoe up: could not announce the death of {notice.instance_id}: {e!r}", file=sys.stderr,
                  flush=True)

    thread = threading.Thread(target=run, name="announce", daemon=True)
    thread.start()
    thread.join(timeout_s)


def write_processes(run_dir: Path, children: list[Child], redis_nodes, redis_url: str, numerics: dict,
                    rolling_restarts: int = 0) -> list[dict]:
    """processes.json: the Redis URL (no password), each service's running process (its instance
    id; a worker's EP group, and `retiring` while the autoscaler drains it), the numerics every
    worker got, the supervisor's own pid and how many rolling restarts it completed. Returns the
    process entries."""
    entries = [{"name": c.name, "rank": c.rank, "pid": c.proc.pid, "ports": {"http": c.http_port},
                "log": str(c.log_path), "restarts": c.restarts, "instance_id": c.instance}
               | ({"group": c.group or c.name, "retiring": c.retiring} if c.rank is not None else {})
               for c in children]
    if redis_nodes is not None:
        entries += [{"name": "redis", "rank": i if redis_nodes.shards else None, "pid": proc.pid,
                     "ports": {"redis": int(url.rsplit(":", 1)[1].split("/")[0])}, "restarts": 0}
                    for i, (proc, url) in enumerate(zip(redis_nodes.procs, redis_nodes.urls))]
    tmp = run_dir / "processes.json.tmp"
    tmp.write_text(json.dumps({"redis_url": without_password(redis_url), "processes": entries,
                               "numerics": numerics, "supervisor_pid": os.getpid(),
                               "rolling_restarts": rolling_restarts}, indent=2) + "\n")
    tmp.replace(run_dir / "processes.json")
    return entries


class ProcessList:
    """processes.json's list, also in Redis (streams.SUPERVISOR_PROCESSES) for the dashboard, set
    by a thread of its own (the supervisor never waits on Redis); only the latest is written."""

    def __init__(self, secrets: dict[str, str]):
        self.secrets, self.latest, self.changed = secrets, None, threading.Event()
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self.follow, name="process-list", daemon=True)
        self.thread.start()

    def put(self, record: dict) -> None:
        self.latest = record
        self.changed.set()

    def follow(self) -> None:
        client = None
        while not self.closing.is_set():
            self.changed.wait(1.0)
            if self.latest is None:
                continue
            try:
                if client is None:
                    client = redis_client.connect_sync(self.secrets["STREAMOE_REDIS_URL"],
                                                       self.secrets["STREAMOE_REDIS_CLUSTER"] == "1")
                self.changed.clear()
                client.set(streams.SUPERVISOR_PROCESSES, json.dumps(self.latest))
            except Exception:  # Redis away: written again once it is back
                self.changed.set()
                self.closing.wait(1.0)
        with contextlib.suppress(Exception):
            client.close()

    def close(self) -> None:
        self.closing.set()
        self.changed.set()
        self.thread.join(2.0)


def without_password(url: str) -> str:
    """The URL with its password, if any, replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def stop_all(children: list[Child], redis_nodes, timeout: float = 20.0) -> None:
    procs = [p for c in children for p in [c.proc, *(proc for proc, _ in c.leaving)]]
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the whole system stops: drain, no handover
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if redis_nodes is not None:
        redis_nodes.stop()
