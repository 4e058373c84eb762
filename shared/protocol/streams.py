"""Every Redis stream, consumer group and key name, in one place.

One stream carries one struct type (shared/protocol/messages.py). Names share the `{streamoe}` hash tag
so a Redis Cluster keeps them in one slot where a script touches several.
"""
from __future__ import annotations

PREFIX = "{streamoe}"

REQUESTS = f"{PREFIX}:requests"  # GenerateRequest: gateway -> tokenizer
TOKENIZED = f"{PREFIX}:tokenized"  # TokenizedRequest: tokenizer -> cache
CACHED = f"{PREFIX}:cached"  # TokenizedRequest with its cached prefix found: cache -> balancer
RAW_DELTAS = f"{PREFIX}:raw-deltas"  # TokenDelta (ids): prefill/decode -> tokenizer
ABORTS = f"{PREFIX}:aborts"  # Abort: gateway or tokenizer (stop string) -> every worker
DEAD_LETTERS = f"{PREFIX}:dead"  # entries that did not decode, with the reason


# A worker rank is named by its EP group and its rank in that group: several EP groups of one role may
# share a Redis (`--ep-group-id`, by default the role; a worker without EP is an EP group of one).

def prefill_stream(group_id: str, rank: int | str) -> str:
    return f"{PREFIX}:prefill:{group_id}:{rank}"  # PrefillTask


def kv_stream(group_id: str, rank: int | str) -> str:
    return f"{PREFIX}:kv:{group_id}:{rank}"  # KVChunk: prefill -> this decode rank


def delta_stream(gateway_id: str) -> str:
    return f"{PREFIX}:deltas:{gateway_id}"  # TokenDelta: workers -> tokenizer -> this gateway


def load_key(role: str, group_id: str, rank: int | str) -> str:
    return f"{PREFIX}:load:{role}:{group_id}:{rank}"  # LoadReport of a worker rank, refreshed with a TTL


def consumer_group(service: str) -> str:
    return f"{PREFIX}:group:{service}"


def heartbeat_key(service: str, instance_id: str) -> str:
    return f"{PREFIX}:hb:{service}:{instance_id}"


def owner_key(request_id: str) -> str:
    return f"{PREFIX}:owner:{request_id}"  # which decode rank runs a request, tokens emitted so far


def ep_inbox(role: str, group_id: str, rank: int) -> str:
    return f"{PREFIX}:ep:{role}:{group_id}:inbox:{rank}"  # all-to-all payloads and join hellos for one EP rank


def expert_load_key(role: str, group_id: str, rank: int) -> str:
    return f"{PREFIX}:eplb:load:{role}:{group_id}:{rank}"  # ExpertLoad of an EP rank, with a TTL


def placement_key(role: str, group_id: str) -> str:
    return f"{PREFIX}:eplb:placement:{role}:{group_id}"  # the latest PlacementUpdate of an EP group


def numerics_key(weights_checksum: str) -> str:
    """The deployment's calibrated dtype and MoE plan for one checkpoint (shared/runtime/numerics.py):
    set once (SET NX) by the first worker that calibrates; every rank and the cache adopt it."""
    return f"{PREFIX}:numerics:{weights_checksum}"


def numerics_lock_key(weights_checksum: str) -> str:
    return f"{PREFIX}:numerics-lock:{weights_checksum}"  # held (with a TTL) by the worker calibrating now


def ep_group_key(role: str, group_id: str, name: str) -> str:
    """An EP group's membership keys (shared/ep/membership.py): `epoch`, `record`, `rollcall:E`,
    `alive:R`, `join:R`."""
    return f"{PREFIX}:ep:{role}:{group_id}:{name}"


DECODE_INSTANCES = f"{PREFIX}:decode-instances"  # every decode instance that may own requests


def owned_key(instance_id: str) -> str:
    return f"{PREFIX}:owned:{instance_id}"  # the requests a decode instance owns (shared/runtime/ownership.py)


def reply_key(digest: str) -> str:
    return f"{PREFIX}:reply:{digest}"  # a chat reply's generated ids, by a digest of its text


def cache_index_key(namespace: str, name: str) -> str:
    """The prefix-cache LRU index's keys (shared/cache/index.py): `lru`, `size`, `seq`, `total`,
    `next-seq`, all under one hash tag, as its Lua scripts require."""
    return f"{PREFIX}:{namespace}:{name}"


def scan_pattern(kind: str) -> str:
    """The SCAN match of every key of one kind: `hb` (heartbeats), `load` (load reports)."""
    return f"{PREFIX}:{kind}:*"
