"""The system on a real 3-primary Redis Cluster (issue: beyond one Redis).

- The core path (gateway -> tokenizer -> cache -> balancer -> prefill -> decode), with EP groups
  of 2 + 2 on the exact wire and prefix-cache hits, gives transformers' tokens.
- The streams of different readers hash to different slots, and land on every primary.
- No command spans slots: the cluster itself refuses one (CROSSSLOT), and no service logged one.
- A cluster node reached without --redis-cluster, or one Redis reached with it, stops the service
  at start, naming the flag; so does a --stream-partitions other than the deployment's.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import aiohttp
import pytest
import redis as sync_redis
import torch
from procs import ServiceProcess, greedy_token_ids, metric, stop_all
from reference import load_reference, reference_greedy

from shared.launcher.redis_cluster import slot_ranges, start_cluster
from shared.protocol import streams
from shared.runtime import redis_client

PARTITIONS = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = start_cluster(tmp_path_factory.mktemp("cluster"), shards=3, password="cluster-test-pw",
                          appendonly=False)
    yield nodes
    nodes.stop()


@pytest.fixture(scope="module")
def cluster_system(tiny_fp32, cluster, tmp_path_factory):
    url = cluster.url
    on_cluster = ["--redis-cluster", "--stream-partitions", str(PARTITIONS)]
    blocks = tmp_path_factory.mktemp("cluster-blocks")
    cache = ["--cache-dir", str(blocks), "--cache-capacity-mib", "64"]
    common = ["--model", str(tiny_fp32), "--dtype", "fp32", "--threads", "1", "--kv-cache-mib", "32",
              "--ep-size", "2", "--ep-wire", "exact", "--ep-timeout-s", "8", *cache, *on_cluster]
    started = {"tokenizer": ServiceProcess("services.tokenizer", url, "--model", str(tiny_fp32), *on_cluster),
               "cache": ServiceProcess("services.cache", url, "--model", str(tiny_fp32), "--dtype", "fp32",
                                       *cache, *on_cluster),
               "balancer": ServiceProcess("services.balancer", url, *on_cluster)}
    for role in ("prefill", "decode"):  # a rank is ready once its whole group has joined
        pending = [ServiceProcess(f"services.{role}", url, *common, "--rank", str(r), wait=False) for r in range(2)]
        for r, service in enumerate(pending):
            service.wait_healthy()
            started[f"{role}{r}"] = service
    started["gateway"] = ServiceProcess("services.gateway", url, "--model", str(tiny_fp32),
                                        "--request-timeout-s", "60", *on_cluster)
    started["blocks"] = blocks
    yield started
    stop_all(s for s in started.values() if isinstance(s, ServiceProcess))


def test_the_embedded_cluster_shares_every_slot():
    ranges = slot_ranges(3)
    assert ranges[0][0] == 0 and ranges[-1][1] == 16383
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))


async def test_core_path_on_a_three_primary_cluster(cluster_system, cluster, tiny_fp32):
    gen = torch.Generator().manual_seed(21)
    shared_prefix = torch.randint(3, 1024, (140,), generator=gen).tolist()  # two whole blocks
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (5, 40, 77, 9, 64)]
    prompts.append(shared_prefix + [11, 12])
    model = tiny_fp32.resolve().name
    async with aiohttp.ClientSession() as session:
        outputs = await asyncio.gather(*[greedy_token_ids(session, cluster_system["gateway"], model, p, 8)
                                         for p in prompts])
        # the long prompt's blocks are on disk once its request finished: these two hit the cache
        deadline = time.monotonic() + 30
        while len(list(cluster_system["blocks"].glob("*/*.blk"))) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        before = metric(cluster_system["cache"], "streamoe_cache_lookup_tokens_total", result="hit")
        again = [shared_prefix + [11, 12], shared_prefix + [13]]
        hits = await asyncio.gather(*[greedy_token_ids(session, cluster_system["gateway"], model, p, 8)
                                      for p in again])
    assert metric(cluster_system["cache"], "streamoe_cache_lookup_tokens_total", result="hit") - before == 2 * 128
    ref = load_reference(tiny_fp32)
    for prompt, tokens in zip(prompts + again, outputs + hits):
        expected = reference_greedy(ref, prompt, 8)
        assert tokens[:expected.trusted] == expected.tokens[:expected.trusted]

    # every reader's stream is in a slot of its own, and the streams lie on every primary
    client = sync_redis.RedisCluster.from_url(cluster.url)
    try:
        readers = [*(streams.requests_stream(p) for p in range(PARTITIONS)),
                   *(streams.tokenized_stream(p) for p in range(PARTITIONS)),
                   *(streams.cached_stream(p) for p in range(PARTITIONS)),
                   *(streams.raw_deltas_stream(p) for p in range(PARTITIONS)),
                   *(streams.prefill_stream("prefill", r) for r in range(2)),
                   *(streams.kv_stream("decode", r) for r in range(2)),
                   *(streams.ep_inbox(role, role, r) for role in ("prefill", "decode") for r in range(2)),
                   streams.delta_stream(cluster_system["gateway"].instance_id), streams.ABORTS]
        assert all(client.exists(name) for name in readers), [n for n in readers if not client.exists(n)]
        slots = [redis_client.key_slot(name) for name in readers]
        assert len(set(slots)) == len(readers)
        holders = {client.get_node_from_key(name).name for name in readers}
        assert len(holders) == 3, holders
    finally:
        client.close()
    for name, service in cluster_system.items():
        if not isinstance(service, ServiceProcess):
            continue
        log = service.log_tail(1_000_000)
        # a cross-slot command comes back as redis-py's ClusterCrossSlotError (CROSSSLOT)
        assert not any(word in log for word in ("CrossSlot", "CROSSSLOT", "same slot", "MOVED")), (name, log[-2000:])


def test_a_cross_slot_command_is_refused_by_the_cluster(cluster):
    """What the services must never send: the cluster answers it with CROSSSLOT."""
    client = sync_redis.Redis.from_url(cluster.url)
    try:
        first, second = streams.requests_stream(0), streams.requests_stream(1)
        assert redis_client.key_slot(first) != redis_client.key_slot(second)
        with pytest.raises(sync_redis.exceptions.ClusterCrossSlotError):
            client.mget([first, second])
    finally:
        client.close()


def _start_fails(module: str, url: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", module, "--redis-url", url, "--http-port", "0", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    return proc.stderr


def test_the_redis_mode_and_partitions_are_checked_at_start(cluster, redis_url):
    client = sync_redis.RedisCluster.from_url(cluster.url)
    client.set(streams.PARTITIONS_KEY, PARTITIONS, nx=True)  # as the first service of the deployment did
    client.close()
    assert "pass --redis-cluster" in _start_fails("services.balancer", cluster.url)
    assert "--redis-cluster is set" in _start_fails("services.balancer", redis_url, "--redis-cluster")
    err = _start_fails("services.balancer", cluster.url, "--redis-cluster", "--stream-partitions", "5")
    assert "--stream-partitions=5" in err and str(PARTITIONS) in err
