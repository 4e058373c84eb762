"""Who is up, read from Redis: the services' heartbeats (where each one's /metrics is) and the
worker ranks' load reports. The gateway's `/services`, `streamoe cost --url` and the planner read
the system through these."""
from __future__ import annotations

import json

from redis.exceptions import ResponseError

from shared.protocol import streams
from shared.protocol.messages import LoadReport
from shared.protocol.wire import WireError, decode
from shared.runtime import redis_client


async def live_services(redis) -> list[dict]:
    """Every service with a live heartbeat and an HTTP port: name, instance_id, metrics_url,
    draining; sorted by name, then instance."""
    out = []
    async for key in redis.scan_iter(match=streams.scan_pattern("hb"), count=1000):
        raw = await redis.get(key)
        if raw is None:
            continue  # expired between the scan and the read
        beat = json.loads(raw)
        name, instance = (key.decode() if isinstance(key, bytes) else key).split(":", 3)[2:]
        if beat.get("http_port"):
            out.append({"name": name, "instance_id": instance, "draining": bool(beat.get("draining")),
                        "metrics_url": f"http://{beat.get('host', '127.0.0.1')}:{beat['http_port']}/metrics"})
    return sorted(out, key=lambda s: (s["name"], s["instance_id"]))


async def load_reports(redis) -> list[LoadReport]:
    """The live worker ranks' load reports (a draining rank has withdrawn its own), in key order."""
    keys = sorted([k async for k in redis.scan_iter(match=streams.scan_pattern("load"), count=1000)])
    out = []
    for raw in await redis_client.mget(redis, keys):
        if raw is None:
            continue
        try:
            out.append(decode(raw, LoadReport))
        except WireError:
            continue
    return out


async def request_backlog(redis, partitions: int) -> int:
    """Requests accepted and not yet routed to a prefill rank: the lag (entries no consumer of the
    group has read yet) of the tokenizer, cache and balancer groups on the request queue's streams.
    Redis reports a group's lag from 7.0 on; an older Redis (or a lag it cannot tell) counts 0."""
    hops = [(stream(p), streams.consumer_group(group)) for p in range(partitions)
            for stream, group in ((streams.requests_stream, "tokenizer"), (streams.tokenized_stream, "cache"),
                                  (streams.cached_stream, "balancer"))]
    total = 0
    for stream, group in hops:
        try:
            infos = await redis.xinfo_groups(stream)
        except ResponseError:  # no such stream yet
            continue
        for info in infos:
            name = info.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == group and info.get("lag") is not None:
                total += int(info["lag"])
    return total
