"""Who runs a request on the decode side, and how a dead rank's requests are resumed (services/README.md, "Delivery").

A decode instance registers itself in one set, and for each request it admits keeps, in Redis:
  - `owner:{id}` (hash): rank, instance, the request as it was handed off, and `end` while a
    finished reply's last delta is held unsent (its blocks being stored): that delta's index and finish;
  - `owner:{id}:ids` (string): every output token id sent to the client so far, int32 LE (its
    length / 4 is how many were sent);
  - `owned:{instance}` (set): the request ids it runs.
Each step's tokens are recorded before the step's deltas go out, and a delta goes out only if
its record was written (the writer still owns the request), so the record never lags what the
client was sent and a rank that owns a request no more sends nothing for it. Records expire a
minute past the request's deadline.

When an instance's heartbeat is gone (or a notice says it died or left), the balancer takes each
of its requests (`take`: one script, the owner becomes a `resuming:` tombstone) and resumes it: each becomes a new
TokenizedRequest whose prompt is the original prompt plus every token already sent, whose
`max_tokens` is what was left, and whose `resumed` says how many of the prompt's last ids are
output. It goes through the cache service (the prompt's blocks are on disk) and the balancer to
a live prefill and decode rank; its first new token carries index `resumed`, so the client's
stream goes on with no token missing or repeated (the gateway drops any duplicate by index).
"""
from __future__ import annotations

import dataclasses
import struct
import time
from collections.abc import Callable, Iterable

from shared.model.detok import prefix_window
from shared.protocol import streams
from shared.protocol.messages import TokenDelta, TokenizedRequest
from shared.protocol.wire import WireError, decode, encode

DECODE_INSTANCES = streams.DECODE_INSTANCES
EXPIRE_AFTER_DEADLINE_S = 60


def owned_key(instance_id: str) -> str:
    return streams.owned_key(instance_id)


def ids_key(request_id: str) -> str:
    return streams.owner_key(request_id) + ":ids"


def pack_ids(ids: Iterable[int]) -> bytes:
    ids = list(ids)
    return struct.pack(f"<{len(ids)}i", *ids)


def unpack_ids(raw: bytes | None) -> list[int]:
    raw = raw or b""
    return list(struct.unpack(f"<{len(raw) // 4}i", raw[:len(raw) // 4 * 4]))


def original_prompt_len(req: TokenizedRequest) -> int:
    return len(req.prompt_ids) - req.resumed


# KEYS: owner, ids; ARGV: instance, rank, request, packed ids, expire-at. The first admission wins:
# a request's records are made only where none exist (or they are this instance's already), so a
# handoff admitted twice (routed again while a frozen rank still held it) has one owner.
ADMIT_IF_FREE = """
local owner = redis.call('HGET', KEYS[1], 'instance_id')
if owner and owner ~= ARGV[1] and string.sub(owner, 1, 9) ~= 'resuming:' then return 0 end
redis.call('HSET', KEYS[1], 'rank', ARGV[2], 'instance_id', ARGV[1], 'request', ARGV[3])
redis.call('HDEL', KEYS[1], 'end')
redis.call('SET', KEYS[2], ARGV[4])
redis.call('EXPIREAT', KEYS[1], ARGV[5])
redis.call('EXPIREAT', KEYS[2], ARGV[5])
return 1
"""


def record_admission(pipe, instance_id: str, rank: int, req: TokenizedRequest, first_token: int) -> None:
    """Queue the records of a request just admitted (its first token came from prefill); the
    pipeline's first result says whether this instance owns it now (1) or another does (0)."""
    emitted = req.prompt_ids[original_prompt_len(req):] + [first_token]
    expire_at = int(req.deadline + EXPIRE_AFTER_DEADLINE_S)
    pipe.eval(ADMIT_IF_FREE, 2, streams.owner_key(req.request_id), ids_key(req.request_id), instance_id, rank,
              encode(req), pack_ids(emitted), expire_at)
    pipe.sadd(owned_key(instance_id), req.request_id)
    pipe.sadd(DECODE_INSTANCES, instance_id)  # the balancer watches the instances that own requests


# Fencing: a rank writes a request's records only while it owns them, and sends a step's token
# delta only once its record was written (services/decode/decode_rank.py, `step`). A rank cut out of its group
# while it did not answer (frozen, then thawed) finds its requests resumed and owned by another
# instance, or their records gone: its late writes change nothing. Both keys share the request's
# hash tag; the instance's `owned` set is another tag, updated after the script.

# KEYS: owner, ids; ARGV: instance, byte offset, packed ids
RECORD_IF_OWNER = """
if redis.call('HGET', KEYS[1], 'instance_id') == ARGV[1] then
    redis.call('SETRANGE', KEYS[2], tonumber(ARGV[2]), ARGV[3])
    return 1
end
return 0
"""

# KEYS: owner; ARGV: instance, "<index>:<finish reason>". A finished request whose last delta is held
# unsent while its blocks are stored (services/decode/decode_rank.py): where that instance owns it,
# the record says so, so that a resume sends the held tokens and the end instead of running on.
END_IF_OWNER = """
if redis.call('HGET', KEYS[1], 'instance_id') == ARGV[1] then
    redis.call('HSET', KEYS[1], 'end', ARGV[2])
    return 1
end
return 0
"""

# KEYS: owner, ids; ARGV: instance. Deletes a request's records only if that instance still owns
# them (a resumed request may already be owned, and recorded, by its new rank).
FORGET_IF_OWNER = """
if redis.call('HGET', KEYS[1], 'instance_id') == ARGV[1] then
    redis.call('DEL', KEYS[1], KEYS[2])
end
return 1
"""


# KEYS: owner, ids; ARGV: instance, its tombstone, whether the tombstone is taken too ('1' or '0').
# A dead instance's request, taken in one step: the owner becomes `resuming:<instance>`, so the
# dead instance can record (and so send) nothing more that the resumed request would not start
# after; the record stays, so a balancer that dies before the resumed request is published takes
# it again (the tombstone is taken like the owner), and the resumed request's admission replaces
# it (ADMIT_IF_FREE).
TAKE_IF_OWNER = """
local owner = redis.call('HGET', KEYS[1], 'instance_id')
if owner ~= ARGV[1] and (ARGV[3] ~= '1' or owner ~= ARGV[2]) then return false end
redis.call('HSET', KEYS[1], 'instance_id', ARGV[2])
return {redis.call('HGET', KEYS[1], 'request'), redis.call('GET', KEYS[2]) or ''}
"""


def record_tokens(pipe, instance_id: str, request_id: str, new_ids: list[int], emitted: int) -> None:
    """`new_ids` are to be sent, `emitted` in all: idempotent, so a write retried after an outage is
    safe; fenced, so a write from an instance that owns the request no more is dropped. Its result
    in the pipeline: 1 if this instance owns the request (send), 0 if not (fenced: do not send).
    With no new ids it only asks whether this instance owns the request."""
    pipe.eval(RECORD_IF_OWNER, 2, streams.owner_key(request_id), ids_key(request_id), instance_id,
              (emitted - len(new_ids)) * 4, pack_ids(new_ids))


# KEYS: the owner and ids keys of each request in turn; ARGV: instance, then each request's byte
# offset and packed ids. RECORD_IF_OWNER for every request of a decode step, in one command.
RECORD_MANY_IF_OWNER = """
local owned = {}
for i = 1, #KEYS / 2 do
    if redis.call('HGET', KEYS[2 * i - 1], 'instance_id') == ARGV[1] then
        redis.call('SETRANGE', KEYS[2 * i], tonumber(ARGV[2 * i]), ARGV[2 * i + 1])
        owned[i] = 1
    else
        owned[i] = 0
    end
end
return owned
"""


def record_tokens_many(pipe, instance_id: str, items: list[tuple[str, list[int], int]],
                       one_script: bool) -> Callable[[list], list[int]]:
    """`record_tokens` for each (request id, new ids, emitted) of `items`. With `one_script` (every key
    on one Redis: not a cluster, where the requests' keys lie in different slots) in one script, which
    costs the client a fraction of one command per request. Returns how to read the results (1 owned,
    0 fenced; in `items`' order) from the front of the pipeline's results."""
    if not one_script or len(items) < 2:
        for request_id, new_ids, emitted in items:
            record_tokens(pipe, instance_id, request_id, new_ids, emitted)
        return lambda results: list(results[:len(items)])
    keys, args = [], [instance_id]
    for request_id, new_ids, emitted in items:
        keys += [streams.owner_key(request_id), ids_key(request_id)]
        args += [(emitted - len(new_ids)) * 4, pack_ids(new_ids)]
    pipe.eval(RECORD_MANY_IF_OWNER, len(keys), *keys, *args)
    return lambda results: [int(owned) for owned in results[0]]


def record_held_end(pipe, instance_id: str, request_id: str, index: int, finish_reason: str) -> None:
    """Queue the mark of a finished request whose last delta (output index `index` on) is held unsent,
    fenced like `record_tokens` (its result: 1 where this instance owns the request)."""
    pipe.eval(END_IF_OWNER, 1, streams.owner_key(request_id), instance_id, f"{index}:{finish_reason}")


def tombstone(instance_id: str) -> str:
    return f"resuming:{instance_id}"


async def take(redis, instance_id: str, request_id: str,
               again: bool = True) -> tuple[bytes | None, list[int]] | None:
    """A dead instance's request, taken over: (its request as handed off, the ids sent), or None
    when that instance owns it no more (finished, or resumed and admitted again). With `again`, a
    request taken already and not admitted since (its tombstone) is taken again."""
    taken = await redis.eval(TAKE_IF_OWNER, 2, streams.owner_key(request_id), ids_key(request_id), instance_id,
                             tombstone(instance_id), "1" if again else "0")
    return None if not taken else (taken[0], unpack_ids(taken[1]))


@dataclasses.dataclass
class Resumed:
    """What `resume` did with a request taken from an instance: `outcome` is "resumed" (run again
    from the tokens sent), "finished" (every token was sent, only its end was not: the end is sent
    now; or it finished with its last delta held unsent: that delta is sent now) or "expired" (its
    deadline passed: its gateway has answered; or its record is unreadable, `original` None)."""
    outcome: str
    original: TokenizedRequest | None
    emitted: int


async def resume(redis, bus, partitions: int, instance_id: str, request_id: str,
                 again: bool = True) -> Resumed | None:
    """Take `request_id` from `instance_id` (see `take`) and run it again elsewhere: a TokenizedRequest
    of the prompt plus the tokens sent goes to the tokenized stream (through the cache, its
    prompt's blocks are on disk, and the balancer). None when that instance owned it no more. The
    request leaves the instance's `owned` set either way."""
    taken = await take(redis, instance_id, request_id, again)
    result = None
    if taken is not None:
        raw_request, emitted = taken
        try:
            original = decode(raw_request, TokenizedRequest) if raw_request is not None else None
        except WireError:
            original = None
        req = resumed_request(original, emitted) if original is not None else None
        end = await redis.hget(streams.owner_key(request_id), "end")
        if original is None or time.time() >= original.deadline:
            outcome = "expired"
        elif end is not None:  # it finished; its last delta was held (blocks being stored) and never sent
            index, _, reason = end.decode().partition(":")
            await bus.publish(streams.raw_deltas_stream(streams.partition_of(request_id, partitions)),
                              held_end(original, emitted, int(index), reason))
            outcome = "finished"
        elif req is not None:
            await bus.publish(streams.tokenized_stream(streams.partition_of(request_id, partitions)), req)
            outcome = "resumed"
        else:
            await bus.publish(streams.delta_stream(original.gateway_id), TokenDelta(
                request_id, original.trace_id, original.gateway_id, len(emitted), [], finish_reason="length"))
            outcome = "finished"
        if outcome != "resumed":
            await drop_taken(redis, instance_id, request_id)
        result = Resumed(outcome, original, len(emitted))
    await redis.srem(owned_key(instance_id), request_id)  # its own slot: not in the script
    return result


async def drop_taken(redis, instance_id: str, request_id: str) -> None:
    """The records of a request taken from `instance_id` that will not run again (expired, or
    every token sent): gone, unless it was admitted again meanwhile."""
    await redis.eval(FORGET_IF_OWNER, 2, streams.owner_key(request_id), ids_key(request_id), tombstone(instance_id))


def forget(pipe, instance_id: str, request_ids: list[str]) -> None:
    """A request finished or was cancelled: its records go, if this instance still owns them."""
    if request_ids:
        for r in request_ids:
            pipe.eval(FORGET_IF_OWNER, 2, streams.owner_key(r), ids_key(r), instance_id)
        pipe.srem(owned_key(instance_id), *request_ids)


def held_end(req: TokenizedRequest, emitted_ids: list[int], index: int, finish_reason: str) -> TokenDelta:
    """The last delta of `req` as its decode rank held it: the output ids from `index` on, and the
    finish (with the preceding ids and stop strings the tokenizer makes its text from)."""
    prompt = req.prompt_ids[:original_prompt_len(req)]
    window = prefix_window(req.sampling.stop)
    return TokenDelta(req.request_id, req.trace_id, req.gateway_id, index, emitted_ids[index:],
                      finish_reason=finish_reason, prefix_ids=(prompt + emitted_ids[:index])[-window:],
                      stop=req.sampling.stop, num_prompt_tokens=len(prompt))


def resumed_request(req: TokenizedRequest, emitted_ids: list[int]) -> TokenizedRequest | None:
    """The request `req` (as its dead decode rank held it) to run again after `emitted_ids` were
    sent, or None when nothing is left to do."""
    prompt = req.prompt_ids[:original_prompt_len(req)]
    max_tokens = req.sampling.max_tokens + req.resumed  # the client's max_tokens
    left = max_tokens - len(emitted_ids)
    if left <= 0:
        return None
    sampling = dataclasses.replace(req.sampling, max_tokens=left)
    return TokenizedRequest(req.request_id, req.trace_id, req.gateway_id, sampling, req.deadline,
                            prompt + emitted_ids, req.cache_salt, resumed=len(emitted_ids))

