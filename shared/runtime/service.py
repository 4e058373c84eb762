"""The one service lifecycle: Redis, /health and /metrics on the service's own port, a heartbeat
key with a TTL, SIGTERM/SIGINT -> stop reading, drain until a deadline, cancel the rest.

A service subclasses `Service`, creates its groups in `setup` and runs its main loop in `loop`,
which returns when `self.stopping` is set. Every default that matters is a field of ServiceConfig.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, RedisError

from shared.launcher.cliargs import apply_env_defaults, positive_int
from shared.protocol import streams
from shared.runtime import redis_client
from shared.runtime.bus import Bus
from shared.runtime.listen import listening_socket
from shared.runtime.usage import UsageFlusher


@dataclass(frozen=True)
class ServiceConfig:
    redis_url: str
    instance_id: str
    host: str = "127.0.0.1"  # loopback unless a deployment asks for more
    http_port: int = 0  # 0: any free port (written to the log)
    heartbeat_ttl_s: float = 10.0
    drain_timeout_s: float = 10.0
    claim_idle_ms: int = 30_000  # entries pending this long on a dead consumer are taken over
    housekeeping_s: float = 5.0  # how often streams are trimmed (and other periodic upkeep)
    redis_connections: int = 128  # the pool's size; more callers wait their turn
    redis_cluster: bool = False  # --redis-url names a node of a Redis Cluster
    stream_partitions: int = 1  # the request queue's partitions, the same on every service
    reuse_port: bool = False  # share the port with a successor (SO_REUSEPORT; shared/runtime/listen.py)
    advertise_host: str | None = None  # where others reach this service (its heartbeat says so)

    def partition(self, request_id: str) -> int:
        return streams.partition_of(request_id, self.stream_partitions)


def add_service_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--redis-cluster", action="store_true",
                        help="--redis-url names a node of a Redis Cluster (STREAMOE_REDIS_CLUSTER=1)")
    parser.add_argument("--stream-partitions", type=positive_int, default=1,
                        help="partitions of the request queue and the workers' deltas; the same on every service")
    parser.add_argument("--instance-id", default=None, help="unique per process (default: host-pid-random)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--reuse-port", action="store_true",
                        help="bind --http-port with SO_REUSEPORT, so that a successor can bind it while this "
                        "process drains (streamoe up's rolling restart; shared/runtime/listen.py)")
    parser.add_argument("--advertise-host", default=None,
                        help="the address others reach this service's HTTP port at, written in its heartbeat "
                        "(the gateway's /services, streamoe cost, the planner read it); default: --host, or this "
                        "machine's name when --host is a wildcard (Kubernetes: the pod's IP, status.podIP)")
    parser.add_argument("--heartbeat-ttl-s", type=float, default=10.0)
    parser.add_argument("--drain-timeout-s", type=float, default=10.0)
    parser.add_argument("--claim-idle-ms", type=int, default=30_000)
    parser.add_argument("--housekeeping-s", type=float, default=5.0, help="stream trimming period")
    parser.add_argument("--log-level", default="INFO")


def parse_service_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    apply_env_defaults(parser)
    args = parser.parse_args(argv)
    if args.instance_id is None:
        args.instance_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format=_LOG_FORMAT)
    return args


def service_config(args: argparse.Namespace) -> ServiceConfig:
    return ServiceConfig(args.redis_url, args.instance_id, args.host, args.http_port, args.heartbeat_ttl_s,
                         args.drain_timeout_s, args.claim_idle_ms, args.housekeeping_s,
                         redis_cluster=args.redis_cluster, stream_partitions=args.stream_partitions,
                         reuse_port=getattr(args, "reuse_port", False),
                         advertise_host=getattr(args, "advertise_host", None))


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


async def can_authenticate(redis: Redis, log: logging.Logger) -> bool:
    """False (with one clear log line, and the client closed) when Redis refuses our credentials
    or is not in the mode --redis-cluster says: no retry can fix either. Also what a worker checks
    before it calibrates."""
    try:
        await redis_client.check_mode(redis)
        await redis.ping()
        return True
    except redis_client.RedisModeError as e:
        log.error(str(e))
    except AuthenticationError as e:
        where, user, has_password = redis_client.where(redis)
        # NOTE: never the password itself, nor the URL that holds it
        given = "with the password given" if has_password else "with no password given"
        log.error(f"redis authentication failed for user {user or 'default'!r} at {where} "
                  f"{given} ({str(e).rstrip('.')}); check the user and password in --redis-url "
                  "(or STREAMOE_REDIS_URL)")
    except RedisError:
        return True  # unreachable or else: left to the paths below, as before this check
    with contextlib.suppress(Exception):
        await redis_client.within(redis.aclose(), 2.0)
    return False


class Service:
    name = "service"
    # a port clients connect to (the gateway's): on SIGTERM the listener closes (the successor, or
    # the load balancer's other replicas, take new connections) while the open ones drain
    serves_clients = False

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.log = logging.getLogger(f"streamoe.{self.name}")
        self.registry = CollectorRegistry()
        self.messages = Counter("streamoe_messages_total", "Messages handled, by stream and outcome",
                                ["stream", "outcome"], registry=self.registry)
        self.stopping = asyncio.Event()
        self._closing = asyncio.Event()  # ends the heartbeat and housekeeping loops
        self.ready = False
        self.redis: Redis | None = None
        self.bus: Bus | None = None
        self.http_port: int | None = None
        self.usage = UsageFlusher(self.registry)  # GPU-seconds and tokens that outlive the process

    async def setup(self) -> None:
        """Create consumer groups, load what the service needs."""

    async def loop(self) -> None:
        """The main loop; returns once `self.stopping` is set and in-flight work is done."""
        await self.stopping.wait()

    async def teardown(self) -> None:
        """Release what setup took."""

    def trimmed_streams(self) -> list[str]:
        """The streams this service consumes and keeps bounded: trimmed by MINID below what every
        group has acked, so no unread or pending entry is ever dropped."""
        return []

    async def housekeeping(self) -> None:
        """Periodic upkeep, off the main loop; by default trims `trimmed_streams()`."""
        for stream in self.trimmed_streams():
            await self.bus.trim(stream)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # SIGTERM: leave (a worker that is its role's only rank hands over first); SIGINT: the
        # whole system stops (streamoe up's stop, or up gone), so drain at once
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        # NOTE: a blocking pool: a burst of requests waits for a connection instead of failing
        self.redis = redis_client.connect(self.config.redis_url, self.config.redis_cluster,
                                          self.config.redis_connections)
        self.bus = Bus(self.redis, self.config.instance_id)
        if not await self._can_authenticate() or not await self._same_partitions():
            return 2
        runner = await self._start_http()
        background = [asyncio.create_task(self._heartbeat())]
        failed = False
        try:
            await self.setup()
            self.ready = True
            with contextlib.suppress(Exception):  # say so now, not at the next beat
                await redis_client.within(self.beat(), 2.0)
            self.log.info(json.dumps({"event": "ready", "service": self.name, "instance": self.config.instance_id,
                                      "http_port": self.http_port}))
            background.append(asyncio.create_task(self._housekeeping()))
            main = asyncio.create_task(self._loop_through_outages())
            stop = asyncio.create_task(self.stopping.wait())
            await asyncio.wait({main, stop}, return_when=asyncio.FIRST_COMPLETED)
            self.ready = False  # draining: /health answers 503
            self.log.info(json.dumps({"event": "draining", "service": self.name}))
            if self.serves_clients:
                await self._stop_listening()
            await asyncio.wait({main}, timeout=self.config.drain_timeout_s)
            if not main.done():
                self.log.warning(json.dumps({"event": "drain_deadline_passed", **self.drain_report()}))
                main.cancel()
                # NOTE: never wait on a loop that swallows its cancellation: exit regardless.
                await asyncio.wait({main}, timeout=2.0)
            elif main.exception() is not None:
                self.log.error("the main loop failed: %r", main.exception(), exc_info=main.exception())
                failed = True
            stop.cancel()
            if self.stopping.is_set():  # a drain, not a failure: say so, so others take over now
                try:
                    await redis_client.within(self.drained(), 5.0)
                except Exception as e:  # Redis away: the TTLs find us gone
                    self.log.warning(json.dumps({"event": "leave_not_announced", "error": repr(e)}))
        finally:
            # NOTE: the loops end on their own at _closing; a cancel inside a Redis call can come
            # out as a ConnectionError, so cancelling them is only the fallback, never awaited.
            self._closing.set()
            await asyncio.wait(background, timeout=3.0)
            for task in background:
                task.cancel()
            try:
                await redis_client.within(self.usage.flush(self.redis), 2.0)  # the last seconds and tokens
            except (TimeoutError, Exception) as e:
                self.log.warning(json.dumps({"event": "usage_not_flushed", "error": repr(e)}))
            try:
                await redis_client.within(self.teardown(), 5.0)
                await redis_client.within(self.redis.delete(streams.heartbeat_key(self.name, self.config.instance_id)),
                                       2.0)
            except (TimeoutError, Exception) as e:  # Redis away: the TTLs clean up after us
                self.log.warning("teardown incomplete: %r", e)
            with contextlib.suppress(Exception):
                await redis_client.within(self.bus.close(), 2.0)
                await redis_client.within(self.redis.aclose(), 2.0)
            await runner.cleanup()
            self.log.info(json.dumps({"event": "stopped", "service": self.name}))
        return 1 if failed else 0

    async def _can_authenticate(self) -> bool:
        return await can_authenticate(self.redis, self.log)

    async def _same_partitions(self) -> bool:
        """The first service to start records --stream-partitions; one with another count refuses to
        start (its requests would sit in partitions nobody reads)."""
        try:
            await self.redis.set(streams.PARTITIONS_KEY, self.config.stream_partitions, nx=True)
            recorded = int(await self.redis.get(streams.PARTITIONS_KEY))
        except RedisError:
            return True  # unreachable: checked by whoever records it
        if recorded == self.config.stream_partitions:
            return True
        self.log.error(f"--stream-partitions={self.config.stream_partitions}: this deployment runs with "
                       f"{recorded} (recorded in Redis at {streams.PARTITIONS_KEY}); give every service the same "
                       "count")
        with contextlib.suppress(Exception):
            await redis_client.within(self.redis.aclose(), 2.0)
        return False

    def drain_report(self) -> dict:
        """What a drain left undone when its deadline passed (logged before it is cancelled)."""
        return {}

    def request_stop(self) -> None:
        """SIGTERM: drain (a worker may first hand its work over, engine_service.py)."""
        self.stopping.set()

    def draining(self) -> bool:
        """What the heartbeat says: this process stops, or is about to (its successor takes over)."""
        return self.stopping.is_set()

    async def drained(self) -> None:
        """After a drain (SIGTERM), before teardown: what the service owes the others on leaving
        (a worker's leave notice)."""

    def health_fields(self) -> dict:
        """More fields for /health (a worker's numerics)."""
        return {}

    def make_app(self) -> web.Application:
        return web.Application()

    def add_routes(self, app: web.Application) -> None:
        """More routes on the service's port (the gateway's API)."""

    async def _start_http(self) -> web.AppRunner:
        app = self.make_app()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self.add_routes(app)
        # NOTE: handler_cancellation: a client that goes away cancels its handler, which aborts the request
        app.on_response_prepare.append(self._close_when_draining)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, handler_cancellation=True)
        await runner.setup()
        sock = listening_socket(self.config.host, self.config.http_port, self.config.reuse_port)
        self.http_port = sock.getsockname()[1]
        self.site = web.SockSite(runner, sock)
        await self.site.start()
        self.http_runner = runner
        return runner

    async def _close_when_draining(self, request: web.Request, response: web.StreamResponse) -> None:
        """While draining, every response says `Connection: close`: the client opens its next
        connection elsewhere (the successor), and never sends a request on a connection this
        process is about to close."""
        if self.stopping.is_set():
            response.force_close()

    async def _stop_listening(self) -> None:
        """No new connection from now on. A short wait first: a successor on the same port steers
        new connections to itself, and what the kernel queued here before that is accepted, not
        reset. Then every open connection closes: an idle keep-alive one at once, one with a
        request in flight once its response is out (that response says `Connection: close`), so
        the drain ends with the last in-flight request; a client's next request opens a new
        connection, to the successor. (Served on, an idle connection would be reused, later, for
        a request the drain deadline cuts.)"""
        await asyncio.sleep(0.2)
        with contextlib.suppress(Exception):
            await self.site.stop()
        for conn in self._http_connections():
            # NOTE: aiohttp's own idle test (its keep-alive timer's): a handler waiting for the next
            # request. close() alone would only cancel that wait and leave the socket open.
            waiter = getattr(conn, "_waiter", None)
            if waiter is not None and not waiter.done():
                conn.force_close()
            else:
                conn.close()
        self.log.info(json.dumps({"event": "listener_closed", "service": self.name, "port": self.http_port}))

    def open_connections(self) -> int:
        """Client connections still open on this process's port (a keep-alive one included)."""
        return len(self._http_connections())

    def _http_connections(self) -> list:
        server = getattr(getattr(self, "http_runner", None), "server", None)
        return server.connections if server is not None else []

    async def _health(self, request: web.Request) -> web.Response:
        status = 200 if self.ready else 503
        body = {"status": "ok" if self.ready else ("draining" if self.stopping.is_set() else "starting"),
                "service": self.name, "instance_id": self.config.instance_id, **self.health_fields()}
        return web.json_response(body, status=status)

    def before_scrape(self) -> None:
        """Bring counters kept elsewhere up to date, right before /metrics reads them."""

    async def _metrics(self, request: web.Request) -> web.Response:
        self.before_scrape()
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _loop_through_outages(self) -> None:
        """The main loop, re-entered with backoff when Redis is unreachable (redis-py reconnects on
        the next command); state lives on the service, so nothing accepted is dropped."""
        backoff = 0.1
        while True:
            try:
                await self.loop()
                return
            except redis_client.OUTAGE_ERRORS as e:
                if self.stopping.is_set():
                    return
                self.log.warning(json.dumps({"event": "redis_unreachable", "error": repr(e), "retry_in_s": backoff}))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), backoff)
                backoff = min(backoff * 2, 5.0)

    async def until_written(self, write):
        """`await write()` until Redis takes it, with backoff through an outage: for writes of what
        exists nowhere else (a step's tokens). A write retried must be idempotent, or harmless twice
        (token deltas are: the gateway drops a repeated index)."""
        backoff = 0.1
        while True:
            try:
                return await write()
            except redis_client.OUTAGE_ERRORS as e:
                if self._closing.is_set():
                    raise
                self.log.warning(json.dumps({"event": "write_retried", "error": repr(e), "retry_in_s": backoff}))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _pause(self, seconds: float) -> None:
        """Sleep, waking early when the service closes."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _housekeeping(self) -> None:
        while not self._closing.is_set():
            await self._pause(self.config.housekeeping_s)
            if self._closing.is_set():
                break
            try:
                await self.housekeeping()
            except Exception as e:  # Redis away, a stream not made yet: next round
                self.log.warning("housekeeping failed: %r", e)
            try:
                await self.usage.flush(self.redis)
            except Exception as e:  # Redis away: the next tick adds both ticks' gains
                self.log.warning("usage not flushed: %r", e)

    async def _heartbeat(self) -> None:
        while not self._closing.is_set():
            try:
                await self.beat()
            except Exception as e:  # Redis away: keep serving what we can, try again
                self.log.warning("heartbeat failed: %s", e)
            await self._pause(self.config.heartbeat_ttl_s / 3)

    async def beat(self) -> None:
        """Write the heartbeat key: when, ready, where /metrics is, draining."""
        # where others reach this service's /metrics: as told, else a wildcard bind by the host's name
        host = self.config.advertise_host or (socket.gethostname() if self.config.host in ("0.0.0.0", "::", "")
                                              else self.config.host)
        await self.redis.set(streams.heartbeat_key(self.name, self.config.instance_id), json.dumps(
            {"time": time.time(), "ready": self.ready, "host": host, "http_port": self.http_port,
             "draining": self.draining()}), px=int(self.config.heartbeat_ttl_s * 1000))
