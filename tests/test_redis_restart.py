"""Redis killed (kill -9) under load and started again on its append-only file: no request hangs
past its deadline, each one admitted either completes with the right tokens or fails cleanly
(503/504, or an error event on its stream), and the system serves again afterwards. In both modes:
one Redis, and a primary of a 3-primary Redis Cluster without replicas (its slots down meanwhile:
the cluster answers CLUSTERDOWN until the node is back with its nodes.conf and AOF)."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import torch
from procs import ServiceProcess, greedy_token_ids, sse_events, stop_all
from reference import load_reference, reference_greedy

from shared.launcher.redis_cluster import start_cluster
from shared.launcher.redis_server import free_port, start_redis
from shared.protocol import streams

FAST = ["--heartbeat-ttl-s", "2", "--claim-idle-ms", "2000", "--housekeeping-s", "0.5"]
DEADLINE_S = 40


class OneRedis:
    def __init__(self, directory):
        self.directory, self.port = directory, free_port()
        self.proc, self.url = start_redis(directory, port=self.port, appendonly=True, extra=["--appendfsync", "always"])
        self.flags: list[str] = []

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> None:
        self.proc, _ = start_redis(self.directory, port=self.port, appendonly=True, extra=["--appendfsync", "always"])

    def stop(self) -> None:
        self.kill()


class ClusterPrimary:
    """A 3-primary cluster; the node killed is the primary of the decode rank's handoffs (or of
    another hot stream), never the node the services were given."""

    def __init__(self, directory):
        import redis as sync_redis

        self.cluster = start_cluster(directory, shards=3, node_timeout_ms=2000, extra=["--appendfsync", "always"])
        self.url, self.flags = self.cluster.url, ["--redis-cluster", "--stream-partitions", "3"]
        client = sync_redis.RedisCluster.from_url(self.url)
        hot = [streams.kv_stream("decode", 0), streams.prefill_stream("prefill", 0),
               *(streams.raw_deltas_stream(p) for p in range(3))]
        ports = [client.get_node_from_key(k).port for k in hot]
        client.close()
        self.node = self.cluster.ports.index(next(p for p in ports if p != self.cluster.ports[0]))

    def kill(self) -> None:
        self.cluster.procs[self.node].kill()
        self.cluster.procs[self.node].wait()

    def restart(self) -> None:
        self.cluster.restart(self.node)

    def stop(self) -> None:
        self.cluster.stop()


@pytest.fixture(scope="module", params=["one-redis", "cluster"])
def own_redis(request, tmp_path_factory):
    state = (OneRedis if request.param == "one-redis" else ClusterPrimary)(tmp_path_factory.mktemp("aof"))
    yield state
    state.stop()


@pytest.fixture(scope="module")
def services(tiny_fp32, own_redis):
    url, on = own_redis.url, own_redis.flags
    worker = ["--model", str(tiny_fp32), "--dtype", "fp32", "--rank", "0", "--threads", "1", "--kv-cache-mib", "64",
              *FAST, *on]
    started = [ServiceProcess("services.tokenizer", url, "--model", str(tiny_fp32), *FAST, *on),
               ServiceProcess("services.cache", url, "--model", str(tiny_fp32), *FAST, *on),
               ServiceProcess("services.balancer", url, *FAST, *on),
               ServiceProcess("services.prefill", url, *worker),
               ServiceProcess("services.decode", url, *worker),
               ServiceProcess("services.gateway", url, "--model", str(tiny_fp32), "--request-timeout-s",
                              str(DEADLINE_S), *FAST, *on)]
    yield started
    stop_all(started)


async def stream(session, gateway: ServiceProcess, body: dict) -> dict:
    """-> {"status", "tokens", "error", "seconds"} of one streamed request."""
    start, tokens, error = time.monotonic(), [], None
    async with session.post(gateway.url("/v1/completions"), json={**body, "stream": True}) as r:
        if r.status != 200:
            return {"status": r.status, "tokens": [], "error": await r.text(), "seconds": time.monotonic() - start}
        async for event in sse_events(r):
            if "error" in event:
                error = event["error"]
                continue
            for choice in event.get("choices") or []:
                tokens += choice.get("token_ids") or []
    return {"status": 200, "tokens": tokens, "error": error, "seconds": time.monotonic() - start}


async def test_requests_survive_or_fail_cleanly_across_a_redis_restart(services, own_redis, tiny_fp32):
    gateway = services[-1]
    model = tiny_fp32.resolve().name
    gen = torch.Generator().manual_seed(31)
    prompts = [torch.randint(3, 1024, (int(n),), generator=gen).tolist()
               for n in torch.randint(10, 150, (24,), generator=gen)]
    max_tokens = 100
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    timeout = aiohttp.ClientTimeout(total=DEADLINE_S + 30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await greedy_token_ids(session, gateway, model, prompts[0][:8], 2)  # warm
        running = [asyncio.create_task(stream(session, gateway, {**body, "prompt": p})) for p in prompts]
        await asyncio.sleep(1.5)
        own_redis.kill()  # kill -9
        await asyncio.sleep(3)
        own_redis.restart()
        results = await asyncio.gather(*running)
        # every service rode it out
        assert all(s.proc.poll() is None for s in services), [s.log_tail() for s in services if s.proc.poll()]
        # and serves again once it has reconnected
        prompt = torch.randint(3, 1024, (30,), generator=gen).tolist()
        deadline = time.monotonic() + 60
        while True:
            try:
                tokens = await greedy_token_ids(session, gateway, model, prompt, 10)
                break
            except AssertionError:  # 503 while the workers report load again
                assert time.monotonic() < deadline, "the system does not serve after Redis came back"
                await asyncio.sleep(0.5)
    ref = load_reference(tiny_fp32)
    expected = reference_greedy(ref, prompt, 10)
    assert tokens[:expected.trusted] == expected.tokens[:expected.trusted]
    completed = 0
    for prompt, result in zip(prompts, results):
        assert result["seconds"] < DEADLINE_S + 10, result  # nothing hangs past its deadline
        if result["status"] == 200 and result["error"] is None:
            assert len(result["tokens"]) == max_tokens
            expected = reference_greedy(ref, prompt, max_tokens)
            assert result["tokens"][:expected.trusted] == expected.tokens[:expected.trusted]
            completed += 1
        else:  # a clean failure: 503/504 before the stream, or an error event in it
            assert result["status"] in (200, 503, 504), result
            if result["status"] == 200:
                assert result["error"]["code"] in ("timeout", "backend_unavailable", None), result
    assert completed == len(prompts), [(i, r["status"], len(r["tokens"]), r["error"], round(r["seconds"], 1))
                                       for i, r in enumerate(results) if r["status"] != 200 or r["error"]]
