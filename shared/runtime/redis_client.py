"""One way to reach Redis: a single server (the default) or a Redis Cluster (`--redis-cluster`).

Every process makes its clients here, so the two modes differ in this module only:
- `connect` / `connect_sync` give `redis.asyncio.Redis` or `redis.asyncio.cluster.RedisCluster`
  (and their sync twins) from the same URL; `rediss://` (TLS), a password and an ACL user work in
  both.
- `check_mode` refuses, naming `--redis-cluster`, a cluster node reached without the flag or a
  single server reached with it.
- `mget` never sends a command over keys of two slots: on a cluster it splits it by slot; `by_slot`
  groups streams for the bus's reads, one per slot side by side. On one server each stays one call.
- Pipelines need nothing here: redis-py's cluster pipeline groups its commands per node. Scripts,
  transactions and multi-key commands touch one hash tag each (shared/protocol/streams.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections import defaultdict
from typing import Any

import redis as sync_redis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.crc import key_slot as _key_slot
from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.protocol import streams

CLUSTER_FLAG = "--redis-cluster"
CLUSTER_ENV = "STREAMOE_REDIS_CLUSTER"


# What an outage looks like: one Redis unreachable, or a cluster failing over (a primary gone, its
# replica not yet promoted, slots uncovered for a moment). The services wait these out and go on.
OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError, SlotNotCoveredError)


class RedisModeError(ValueError):
    """--redis-cluster disagrees with the Redis that --redis-url names."""


async def within(awaitable, timeout_s: float):
    """`await awaitable` for at most `timeout_s` (TimeoutError past it). Unlike asyncio.wait_for,
    it never waits for the cancelled task to end: redis-py (8.1) can swallow a cancel that lands
    inside a command and go on, and wait_for would then wait on it forever. The task is left
    cancelled; it ends when its command does."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        raise TimeoutError(f"no answer within {timeout_s} s")
    return task.result()


def connect(url: str, cluster: bool = False, max_connections: int = 128) -> Redis | RedisCluster:
    """An asyncio client. One server: a blocking pool (a burst of callers waits for a connection
    instead of failing). A cluster: a pool of `max_connections` per node; no socket timeout, as on
    one server, so a blocking read may wait its whole BLOCK."""
    if cluster:
        return RedisCluster.from_url(url, max_connections=max_connections, socket_timeout=None)
    return Redis(connection_pool=BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=10))


def connect_sync(url: str, cluster: bool = False) -> sync_redis.Redis | sync_redis.RedisCluster:
    return sync_redis.RedisCluster.from_url(url) if cluster else sync_redis.Redis.from_url(url)


def is_cluster(client: Any) -> bool:
    return isinstance(client, (RedisCluster, sync_redis.RedisCluster))


def key_slot(key: str | bytes) -> int:
    return _key_slot(key.encode() if isinstance(key, str) else key)


def by_slot(keys: list[str]) -> list[list[str]]:
    """`keys` grouped by hash slot, each group in the given order."""
    groups: dict[int, list[str]] = defaultdict(list)
    for key in keys:
        groups[key_slot(key)].append(key)
    return list(groups.values())


def where(client: Any) -> tuple[str, str | None, bool]:
    """(host:port or socket path, ACL user, whether a password was given) of a client, for messages:
    never the password itself."""
    if is_cluster(client):
        node = client.get_default_node() or client.startup_nodes[0]
        kw = node.connection_kwargs
        return f"{node.host}:{node.port}", kw.get("username"), bool(kw.get("password"))
    kw = client.connection_pool.connection_kwargs
    return kw.get("path") or f"{kw.get('host')}:{kw.get('port')}", kw.get("username"), bool(kw.get("password"))


async def check_mode(client: Redis | RedisCluster) -> None:
    """Raise RedisModeError when the server's cluster mode is not the client's: a cluster node needs
    --redis-cluster, and --redis-cluster needs a cluster node. Other Redis errors pass through."""
    if is_cluster(client):
        try:
            await client.initialize()
        except RedisClusterException as e:
            if "cluster" in str(e).lower() and "disabled" in str(e).lower() or "not enabled" in str(e).lower():
                raise RedisModeError(f"{CLUSTER_FLAG} is set ({CLUSTER_ENV}), but --redis-url names a Redis "
                                     "without cluster mode; drop the flag, or point --redis-url at a node of "
                                     "the cluster") from None
            raise
        return
    # a command over two slots: one Redis answers it, a cluster node refuses it (CROSSSLOT). Not
    # INFO or CLUSTER INFO: an ACL user without @dangerous may not run those.
    probe = [streams.tagged("probe:0"), streams.tagged("probe:1")]
    try:
        await client.exists(*probe)
    except ResponseError as e:
        if "slot" in str(e).lower() or str(e).startswith(("MOVED", "CROSSSLOT")):
            raise RedisModeError(f"--redis-url names a node of a Redis Cluster: pass {CLUSTER_FLAG} "
                                 f"(or {CLUSTER_ENV}=1)") from None
        raise


async def mget(client: Redis | RedisCluster, keys: list[str]) -> list[bytes | None]:
    """MGET that never spans slots on a cluster."""
    if not keys:
        return []
    if is_cluster(client):
        return await client.mget_nonatomic(keys)
    return await client.mget(keys)


_REDIS_PARAMETERS = frozenset(inspect.signature(Redis.__init__).parameters) - {"self", "host", "port"}


class ReplicatedWriter:
    """XADD, then WAIT for `replicas` replicas, on one connection to the primary that holds the
    stream: WAIT counts the writes of its own connection only, so the two must share one. On a
    cluster, a plain client per primary (redis-py's cluster client would send WAIT to a node of its
    choosing); after a failover moves the slot, the next write finds the new primary."""

    def __init__(self, client: Redis | RedisCluster, replicas: int, timeout_ms: int):
        self.client, self.replicas, self.timeout_ms = client, replicas, timeout_ms
        self._primaries: dict[str, Redis] = {}

    async def xadd(self, stream: str, fields: dict) -> tuple[bytes, int]:
        """-> (entry id, replicas that acknowledged it within the timeout)."""
        target = self.client
        if is_cluster(self.client):
            target = await self._primary(stream)
        try:
            async with target.pipeline(transaction=False) as pipe:
                pipe.xadd(stream, fields)
                pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
                entry_id, acked = await pipe.execute()
        except ResponseError as e:
            if is_cluster(self.client) and str(e).startswith(("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN")):
                await self._forget_topology()
                raise ClusterDownError(f"the slot of {stream} moved: {e}") from None
            raise
        except OUTAGE_ERRORS:
            if is_cluster(self.client):
                await self._forget_topology()
            raise
        return entry_id, int(acked)

    async def _primary(self, stream: str) -> Redis:
        await self.client.initialize()
        node = self.client.get_node_from_key(stream)
        if node is None:
            raise SlotNotCoveredError(f"no primary serves the slot of {stream}")
        client = self._primaries.get(node.name)
        if client is None:
            # the node's credentials, TLS settings and timeouts, without the cluster client's own keys
            kwargs = {k: v for k, v in node.connection_kwargs.items() if k in _REDIS_PARAMETERS}
            kwargs["ssl"] = issubclass(node.connection_class, SSLConnection)
            client = Redis(**{**kwargs, "host": node.host, "port": node.port})
            self._primaries[node.name] = client
        return client

    async def _forget_topology(self) -> None:
        """The next write asks the cluster again which primary holds the slot."""
        with contextlib.suppress(Exception):
            await self.client.nodes_manager.initialize()
        clients, self._primaries = list(self._primaries.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def aclose(self) -> None:
        for client in self._primaries.values():
            with contextlib.suppress(Exception):
                await client.aclose()
