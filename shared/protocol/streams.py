"""Every Redis stream, consumer group and key name, in one place.

One stream carries one struct type (shared/protocol/messages.py). Names carry hash tags chosen by
reader, so that a Redis Cluster spreads them over its primaries: each consumer's input stream (a
worker rank's tasks, a decode rank's KV handoffs, a gateway's replies, an EP rank's inbox, each
partition of the request queue) hashes to a slot of its own, and what changes atomically (an EP
group's membership, one request's ownership record, the prefix cache's LRU index) shares one tag.
No command spans two tags (shared/runtime/redis_client.py splits what would).
"""
from __future__ import annotations

import zlib

NAMESPACE = "streamoe"


def tagged(tag: str, rest: str = "") -> str:
    """`{streamoe:<tag>}` then `rest`: every key of the system is made here."""
    return f"{{{NAMESPACE}:{tag}}}{rest}"


# The request queue (gateway -> tokenizer -> cache -> balancer) and the workers' deltas are split
# into `--stream-partitions` partitions; a request keeps to the partition of its id throughout.

def partition_of(request_id: str, partitions: int) -> int:
    return zlib.crc32(request_id.encode()) % partitions


def requests_stream(partition: int) -> str:
    return tagged(f"requests:{partition}")  # GenerateRequest: gateway -> tokenizer


def tokenized_stream(partition: int) -> str:
    return tagged(f"tokenized:{partition}")  # TokenizedRequest: tokenizer -> cache


def cached_stream(partition: int) -> str:
    return tagged(f"cached:{partition}")  # TokenizedRequest with its cached prefix found: cache -> balancer


def raw_deltas_stream(partition: int) -> str:
    return tagged(f"raw-deltas:{partition}")  # TokenDelta (ids): prefill/decode -> tokenizer


ABORTS = tagged("aborts")  # Abort: gateway or tokenizer (stop string) -> every worker
NOTICES = tagged("notices")  # Notice: a process gone (death) or going (leave) -> balancer (shared/runtime/notices.py)
DEAD_LETTERS = tagged("dead")  # entries that did not decode, with the reason
PARTITIONS_KEY = tagged("config", ":stream-partitions")  # the deployment's --stream-partitions (SET NX)


# A worker rank is named by its EP group and its rank in that group: several EP groups of one role may
# share a Redis (`--ep-group-id`, by default the role; a worker without EP is an EP group of one).

def prefill_stream(group_id: str, rank: int | str) -> str:
    return tagged(f"prefill:{group_id}:{rank}")  # PrefillTask


def kv_stream(group_id: str, rank: int | str) -> str:
    return tagged(f"kv:{group_id}:{rank}")  # KVChunk: prefill -> this decode rank


def delta_stream(gateway_id: str) -> str:
    return tagged(f"deltas:{gateway_id}")  # TokenDelta: workers -> tokenizer -> this gateway


def load_key(role: str, group_id: str, rank: int | str) -> str:
    return tagged("load", f":{role}:{group_id}:{rank}")  # LoadReport of a worker rank, refreshed with a TTL


def consumer_group(service: str) -> str:
    return f"{NAMESPACE}:group:{service}"  # a consumer group's name, not a key


def heartbeat_key(service: str, instance_id: str) -> str:
    return tagged("hb", f":{service}:{instance_id}")


def owner_key(request_id: str) -> str:
    return tagged(f"owner:{request_id}")  # which decode rank runs a request, tokens emitted so far


def ep_inbox(role: str, group_id: str, rank: int) -> str:
    return tagged(f"ep:{role}:{group_id}:inbox:{rank}")  # all-to-all payloads and join hellos for one EP rank


def expert_load_key(role: str, group_id: str, rank: int) -> str:
    return tagged("eplb", f":load:{role}:{group_id}:{rank}")  # ExpertLoad of an EP rank, with a TTL


def placement_key(role: str, group_id: str) -> str:
    return tagged("eplb", f":placement:{role}:{group_id}")  # the latest PlacementUpdate of an EP group


def numerics_key(weights_checksum: str) -> str:
    """The deployment's calibrated dtype and MoE plan for one checkpoint (shared/runtime/numerics.py):
    set once (SET NX) by the first worker that calibrates; every rank and the cache adopt it."""
    return tagged("numerics", f":{weights_checksum}")


def numerics_lock_key(weights_checksum: str) -> str:
    return tagged("numerics", f":{weights_checksum}:lock")  # held (with a TTL) by the worker calibrating now


def ep_group_key(role: str, group_id: str, name: str) -> str:
    """An EP group's membership keys (shared/ep/membership.py): `epoch`, `record`, `rollcall:E`,
    `alive:R`, `join:R`, all under the group's one tag (its commit is a script over two of them)."""
    return tagged(f"ep:{role}:{group_id}", f":{name}")


# What outlives the processes (shared/runtime/usage.py): each service adds what its usage counters
# (GPU-seconds, tokens) gained since its last tick; `streamoe cost` and the dashboard read the totals.
USAGE = tagged("usage")  # hash: a counter sample, as Prometheus writes it -> its total
# The autoscaler's decisions (services/planner): one hash, read by `streamoe up --autoscale` or any
# external actuator (services/README.md, "planner", for its fields).
PLANNER_DECISIONS = tagged("planner", ":decisions")
# `streamoe up`'s process list (processes.json's, with each process's instance id and restarts),
# JSON, rewritten as it changes: the dashboard shows services up and their restarts from it
SUPERVISOR_PROCESSES = tagged("supervisor", ":processes")

DECODE_INSTANCES = tagged("decode-instances")  # every decode instance that may own requests


def owned_key(instance_id: str) -> str:
    return tagged(f"owned:{instance_id}")  # the requests a decode instance owns (shared/runtime/ownership.py)


def reply_key(digest: str) -> str:
    return tagged("reply", f":{digest}")  # a chat reply's generated ids, by a digest of its text


def cache_index_key(namespace: str, name: str) -> str:
    """The prefix-cache LRU index's keys (shared/cache/index.py): `lru`, `size`, `seq`, `total`,
    `next-seq`, all under one hash tag, as its Lua scripts require."""
    return tagged(f"cache:{namespace}", f":{name}")


def scan_pattern(kind: str) -> str:
    """The SCAN match of every key of one kind: `hb` (heartbeats), `load` (load reports)."""
    return tagged(kind, ":*")


def worker_of_stream(name: str) -> tuple[str, int] | None:
    """(group, rank) of a `prefill_stream` or `kv_stream` name, None for another name."""
    inner = name.partition("{")[2].partition("}")[0]  # streamoe:<kind>:<group>:<rank>
    parts = inner.split(":")
    if len(parts) < 4 or not parts[-1].isdigit():
        return None
    return ":".join(parts[2:-1]), int(parts[-1])


def role_of_load_key(name: str) -> str:
    """The role of a `load_key` name."""
    return name.partition("}:")[2].split(":")[0]
