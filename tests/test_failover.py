"""Nothing accepted is lost when Redis loses entries it acknowledged (a primary killed before its
replica had them): the gateway, which holds each request end to end, repairs what shows no progress.

- A hop lost before the first token (a tokenized request deleted unread): the request is published
  again, the same id, and completes with transformers' tokens.
- A token delta lost mid-reply: the missing ids come again from the decode rank's ownership record,
  through the tokenizer, and the reply completes, no token missing or repeated.
- A real failover: kill -9 of a Redis Cluster primary under load, with replicas and a short
  cluster-node-timeout. Every request either completes with the right tokens or is refused (503)
  before it was accepted; none is lost, none has a token twice.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest
import redis as sync_redis
import torch
from procs import ServiceProcess, metric, stop_all
from reference import load_reference, reference_greedy

from shared.launcher.redis_cluster import start_cluster
from shared.protocol import streams

PROGRESS_S = 2.0


async def complete(session, gateway: ServiceProcess, model: str, prompt: list[int],
                   max_tokens: int) -> tuple[int, dict]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    async with session.post(gateway.url("/v1/completions"), json=body) as r:
        return r.status, await r.json()


def start_system(url: str, model, *extra: str, gateway: tuple[str, ...] = ()) -> dict[str, ServiceProcess]:
    worker = ["--model", str(model), "--dtype", "fp32", "--threads", "1", "--kv-cache-mib", "32", *extra]
    return {"tokenizer": ServiceProcess("services.tokenizer", url, "--model", str(model), *extra),
            "cache": ServiceProcess("services.cache", url, "--model", str(model), "--dtype", "fp32", *extra),
            "balancer": ServiceProcess("services.balancer", url, *extra),
            "prefill": ServiceProcess("services.prefill", url, *worker),
            "decode": ServiceProcess("services.decode", url, *worker),
            "gateway": ServiceProcess("services.gateway", url, "--model", str(model), "--request-timeout-s", "90",
                                      "--progress-timeout-s", str(PROGRESS_S), *extra, *gateway)}


@pytest.fixture(scope="module")
def system(tiny_fp32, redis_url):
    sync_redis.Redis.from_url(redis_url).flushdb()
    started = start_system(redis_url, tiny_fp32)
    yield started
    stop_all(started.values())


class Paused:
    """A service stopped (SIGSTOP) with no read of its own outstanding in Redis: its blocking read
    has timed out, so what is added to its stream waits undelivered and can be deleted unseen."""

    def __init__(self, service: ServiceProcess):
        self.service = service

    def __enter__(self):
        os.kill(self.service.proc.pid, signal.SIGSTOP)
        time.sleep(0.6)  # past its 200 ms BLOCK
        return self

    def __exit__(self, *exc):
        os.kill(self.service.proc.pid, signal.SIGCONT)


async def undelivered(client, stream: str, group: str, count: int) -> list[bytes]:
    """The ids of `count` entries of `stream` that `group` has not been handed yet."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = {g["name"].decode(): g for g in await client.xinfo_groups(stream)}
        last = info[group]["last-delivered-id"]
        last = last.decode() if isinstance(last, bytes) else last
        ms, _, seq = last.partition("-")
        entries = await client.xrange(stream, min=f"{ms}-{int(seq) + 1}")
        if len(entries) >= count:
            return [entry_id for entry_id, _ in entries]
        await asyncio.sleep(0.02)
    pytest.fail(f"{stream} never held {count} entries undelivered to {group}")


async def test_a_hop_lost_before_the_first_token_is_published_again(system, tiny_fp32, redis_url):
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    prompt = torch.randint(3, 1024, (40,), generator=torch.Generator().manual_seed(61)).tolist()
    async with aiohttp.ClientSession() as session:
        with Paused(system["cache"]):
            running = asyncio.create_task(complete(session, system["gateway"], tiny_fp32.resolve().name, prompt, 12))
            (lost,) = await undelivered(client, streams.tokenized_stream(0), streams.consumer_group("cache"), 1)
            await client.xdel(streams.tokenized_stream(0), lost)  # as a failover would: acknowledged, then gone
        status, reply = await asyncio.wait_for(running, 60)
    await client.aclose()
    assert status == 200, reply
    expected = reference_greedy(load_reference(tiny_fp32), prompt, 12)
    tokens = reply["choices"][0]["token_ids"]
    assert len(tokens) == 12 and tokens[:expected.trusted] == expected.tokens[:expected.trusted]
    assert metric(system["gateway"], "streamoe_requests_repaired_total", how="republished") >= 1


async def test_a_lost_token_delta_is_sent_again_from_the_ownership_record(system, tiny_fp32, redis_url):
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    prompt = torch.randint(3, 1024, (30,), generator=torch.Generator().manual_seed(62)).tolist()
    max_tokens = 1500  # still decoding when the gap is repaired, PROGRESS_S later
    before = metric(system["gateway"], "streamoe_requests_repaired_total", how="resent")
    async with aiohttp.ClientSession() as session:
        running = asyncio.create_task(complete(session, system["gateway"], tiny_fp32.resolve().name, prompt,
                                               max_tokens))
        deadline = time.monotonic() + 30
        while not [k async for k in client.scan_iter(match=streams.owner_key("*"))]:  # decoding now
            assert time.monotonic() < deadline, "the request never reached decode"
            await asyncio.sleep(0.02)
        with Paused(system["tokenizer"]):
            ids = await undelivered(client, streams.raw_deltas_stream(0), streams.consumer_group("tokenizer"), 3)
            await client.xdel(streams.raw_deltas_stream(0), ids[1])  # a decode step's tokens, mid-reply
        status, reply = await asyncio.wait_for(running, 120)
    await client.aclose()
    assert status == 200, reply
    tokens = reply["choices"][0]["token_ids"]
    assert len(tokens) == max_tokens == reply["usage"]["completion_tokens"]  # none missing, none twice
    expected = reference_greedy(load_reference(tiny_fp32), prompt, 64)
    assert tokens[:expected.trusted] == expected.tokens[:expected.trusted]
    assert metric(system["gateway"], "streamoe_requests_repaired_total", how="resent") > before


@pytest.fixture(scope="module")
def replicated_cluster(tmp_path_factory):
    nodes = start_cluster(tmp_path_factory.mktemp("failover"), shards=3, replicas=1, node_timeout_ms=1000,
                          appendonly=False)
    yield nodes
    nodes.stop()


async def test_a_primary_killed_under_load_loses_nothing(replicated_cluster, tiny_fp32):
    cluster = replicated_cluster
    system = start_system(cluster.url, tiny_fp32, "--redis-cluster", "--stream-partitions", "3",
                          gateway=("--redis-wait-replicas", "1"))
    try:
        client = sync_redis.RedisCluster.from_url(cluster.url)
        # the primary (not the node the services were given) that holds the decode rank's handoffs
        # or else another hot stream
        hot = [streams.kv_stream("decode", 0), streams.prefill_stream("prefill", 0),
               *(streams.raw_deltas_stream(p) for p in range(3)), *(streams.requests_stream(p) for p in range(3))]
        ports = [client.get_node_from_key(k).port for k in hot]
        client.close()
        victim_port = next(p for p in ports if p != cluster.ports[0])
        victim = cluster.procs[cluster.ports.index(victim_port)]
        gen = torch.Generator().manual_seed(63)
        prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (9, 40, 70, 17, 33, 100) * 3]
        max_tokens = 160
        async with aiohttp.ClientSession() as session:
            running = [asyncio.create_task(complete(session, system["gateway"], tiny_fp32.resolve().name, p,
                                                    max_tokens)) for p in prompts]
            deadline = time.monotonic() + 60
            while len(await asyncio.to_thread(_owned, cluster.url)) < 3:  # several requests decoding
                assert time.monotonic() < deadline, "the requests never reached decode"
                await asyncio.sleep(0.02)
            unfinished_at_kill = [not task.done() for task in running]
            killed_at = time.monotonic()
            victim.kill()
            recovered_s = await asyncio.to_thread(_until_recovered, cluster, victim_port, killed_at)
            results = await asyncio.wait_for(asyncio.gather(*running), 180)
        repaired = {how: metric(system["gateway"], "streamoe_requests_repaired_total", how=how)
                    for how in ("republished", "resent", "resumed")}
        print(f"\nthe cluster recovered {recovered_s:.2f} s after the kill -9 of its primary :{victim_port}; "
              f"{sum(s == 200 for s, _ in results)} served, {sum(s == 503 for s, _ in results)} refused, "
              f"{sum(unfinished_at_kill)} were running at the kill; repairs {repaired}")
        ref = load_reference(tiny_fp32)
        served = 0
        for prompt, (status, reply) in zip(prompts, results):
            if status == 503:  # refused before it was accepted: the client was never told otherwise
                assert reply["error"]["code"] == "backend_unavailable", reply
                continue
            assert status == 200, (reply, system["gateway"].log_tail(6000))
            tokens = reply["choices"][0]["token_ids"]
            assert len(tokens) == max_tokens == reply["usage"]["completion_tokens"]  # none lost, none twice
            expected = reference_greedy(ref, prompt, max_tokens)
            assert tokens[:expected.trusted] == expected.tokens[:expected.trusted]
            served += 1
        assert served >= len(prompts) // 2, f"only {served} of {len(prompts)} served"
        assert sum(unfinished_at_kill) >= len(prompts) // 2  # the kill landed under load
        for name, service in system.items():
            assert service.proc.poll() is None, f"{name} exited: {service.log_tail()}"
    finally:
        stop_all(system.values())


def _owned(url: str) -> list[bytes]:
    """The ownership records on the cluster: the requests decoding now."""
    client = sync_redis.RedisCluster.from_url(url)
    try:
        return list(client.scan_iter(match=streams.owner_key("*")))
    finally:
        client.close()


def _until_recovered(cluster, victim_port: int, since: float) -> float:
    """Seconds from `since` until a surviving node sees the cluster whole again (its replica promoted)."""
    survivor = sync_redis.Redis.from_url(next(u for u, p in zip(cluster.urls, cluster.ports) if p != victim_port))
    try:
        while time.monotonic() - since < 60:
            nodes = survivor.execute_command("CLUSTER NODES")  # {"host:port": {"flags": ..., ...}}
            flags = next((v.get("flags", "") for k, v in nodes.items() if k.endswith(f":{victim_port}")), "")
            if "fail" in flags.split(",") and survivor.cluster("info").get("cluster_state") == "ok":
                return time.monotonic() - since
            time.sleep(0.05)
    finally:
        survivor.close()
    pytest.fail("the cluster never recovered from the kill")
