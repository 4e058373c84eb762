"""The balancer service: picks each request's prefill rank and decode rank at admission, from
the ranks' load reports plus what it has sent them since (policies.py). A rank is a worker of one
group: (group id, rank), so several groups of a role can share the work."""
from __future__ import annotations

import asyncio
import json
import time

from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from shared.cache.hashing import BLOCK_SIZE
from shared.protocol import streams
from shared.protocol.messages import (
    KVChunk,
    LoadReport,
    Notice,
    PrefillTask,
    TokenDelta,
    TokenizedRequest,
    attention_compute,
)
from shared.protocol.wire import WireError, decode
from shared.runtime import notices, ownership, redis_client
from shared.runtime.bus import Entry
from shared.runtime.service import Service, ServiceConfig

from .expert_lb import EPLBSettings, ExpertBalancer
from .policies import DecodeLoad, PrefillLoad, choose_decode_rank, choose_prefill_rank

CONSUMER_GROUP = streams.consumer_group("balancer")
# a worker role -> its ranks' input streams, what they carry, and the group its ranks read them in
ORPHANED = {"prefill": (streams.prefill_stream, PrefillTask, streams.consumer_group("prefill")),
            "decode": (streams.kv_stream, KVChunk, streams.consumer_group("decode"))}
DEAD_LETTERS_KEPT = 10_000  # nobody consumes them: the newest are kept for inspection


class BalancerService(Service):
    name = "balancer"

    def __init__(self, config: ServiceConfig, eplb: EPLBSettings | None = None,
                 eplb_interval_s: float = 30.0):
        super().__init__(config)
        self.experts = ExpertBalancer(eplb or EPLBSettings(), self.log)
        self.eplb_interval_s = eplb_interval_s

    async def setup(self) -> None:
        for stream in self.cached_streams():
            await self.bus.ensure_consumer_group(stream, CONSUMER_GROUP)
        self.backlog: list[tuple[str, Entry[TokenizedRequest]]] = []  # (its stream, the entry): no rank had room yet
        # what we sent since each rank's last report: (role, group, rank) -> [(time, compute, tokens, blocks)]
        self.sent: dict[tuple[str, str, int], list[tuple[float, float, int, int]]] = {}
        if self.eplb_interval_s > 0:
            self.eplb_task = asyncio.create_task(self.balance_experts())
        self.resumed = Counter("streamoe_requests_resumed", "Requests of dead decode instances resumed on a live "
                               "rank (by what was left: resumed, finished, expired)", ["outcome"],
                               registry=self.registry)
        self.heartbeat_missing: dict[str, float] = {}  # decode instance -> when its heartbeat was first missed
        self.rank_missing: dict[tuple[str, str, int], float] = {}  # (role, group, rank) -> load report first missed
        self.moved = Counter("streamoe_orphaned_requests_moved", "Requests taken from the input stream of a dead "
                             "worker rank (a prefill task; a decode rank's unadmitted handoff) and routed again",
                             ["role"], registry=self.registry)
        self.stream_length = Gauge("streamoe_stream_length", "Entries in each stream (sampled by the balancer)",
                                   ["stream"], registry=self.registry)
        self.notices = Counter("streamoe_notices", "Death and leave notices this balancer acted on "
                               "(shared/runtime/notices.py)", ["kind", "role"], registry=self.registry)
        self.orphans = asyncio.Lock()  # a notice and the housekeeping never resume one request twice
        latest = await self.redis.xrevrange(streams.NOTICES, count=1)
        self.notices_task = asyncio.create_task(self.follow_notices(latest[0][0] if latest else b"0-0"))

    async def loop(self) -> None:
        while not self.stopping.is_set():
            entries = await self.bus.take(CONSUMER_GROUP, dict.fromkeys(self.cached_streams(), TokenizedRequest),
                                          self.config.claim_idle_ms, block_ms=50 if self.backlog else 200)
            pending, self.backlog = self.backlog + entries, []
            for stream, entry in pending:
                await self.route(stream, entry)

    def cached_streams(self) -> list[str]:
        return [streams.cached_stream(p) for p in range(self.config.stream_partitions)]

    async def balance_experts(self) -> None:
        while not self._closing.is_set():
            await self._pause(self.eplb_interval_s)
            try:
                await self.experts.tick(self.redis)
            except Exception as e:  # Redis away: next interval
                self.log.warning("EPLB tick failed: %r", e)

    def trimmed_streams(self) -> list[str]:
        return [*self.cached_streams(), streams.ABORTS]

    async def housekeeping(self) -> None:
        """The balancer keeps the shared streams: abort groups of dead workers go (they would hold
        the aborts stream forever), streams are trimmed, lengths exported."""
        async with self.orphans:
            await self.resume_orphans()
            await self.move_orphaned_work()
        await self.reap_abort_groups()
        await super().housekeeping()
        await self.redis.xtrim(streams.DEAD_LETTERS, maxlen=DEAD_LETTERS_KEPT, approximate=True)
        names = [stream_of(p) for stream_of in (streams.requests_stream, streams.tokenized_stream,
                                                streams.cached_stream, streams.raw_deltas_stream)
                 for p in range(self.config.stream_partitions)] + [streams.ABORTS, streams.DEAD_LETTERS]
        for pattern in (streams.prefill_stream("*", "*"), streams.kv_stream("*", "*"), streams.delta_stream("*")):
            names += [k.decode() async for k in self.redis.scan_iter(match=pattern, count=1000, _type="stream")]
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.xlen(name)
            for name, length in zip(names, await pipe.execute()):
                self.stream_length.labels(stream=name).set(length)

    async def follow_notices(self, last: bytes) -> None:
        """Act on each notice published after `last` (this balancer's start): a dead decode
        instance's requests resume and a dead rank's queued work moves at once, not a heartbeat TTL
        later. Notices published while no balancer ran are left to the TTL path."""
        while not self._closing.is_set():
            try:
                reply = await self.redis.xread({streams.NOTICES: last}, count=16, block=1000)
            except redis_client.OUTAGE_ERRORS as e:
                self.log.warning(json.dumps({"event": "notices_unreadable", "error": repr(e)}))
                await self._pause(0.5)
                continue
            for _, entries in (reply.items() if isinstance(reply, dict) else reply or []):
                for entry_id, fields in entries:
                    last = entry_id
                    try:
                        notice = notices.decode_notice(fields)
                    except (KeyError, WireError) as e:
                        self.log.error(json.dumps({"event": "bad_notice", "entry": entry_id.decode(), "error": str(e)}))
                        continue
                    try:
                        async with self.orphans:
                            await self.on_notice(notice)
                    except RedisError as e:  # the TTL path finds it later
                        self.log.warning(json.dumps({"event": "notice_not_acted_on", "error": repr(e)}))

    async def on_notice(self, notice: Notice) -> None:
        self.log.info(json.dumps({"event": "notice", "kind": notice.kind, "role": notice.role,
                                  "instance": notice.instance_id, "group": notice.group_id, "rank": notice.rank,
                                  "reason": notice.reason}))
        self.notices.labels(kind=notice.kind, role=notice.role).inc()
        if notice.kind == "handover":  # it still serves; its leave notice follows once a successor does
            return
        # a leaving worker has stopped reading and stepping: what it holds goes on elsewhere, as a dead one's
        if notice.role == "decode" and notice.instance_id:
            owned = ownership.owned_key(notice.instance_id)
            for request_id in await self.redis.smembers(owned):
                await self.resume(notice.instance_id, request_id.decode())
            if not await self.redis.scard(owned):
                await self.redis.srem(ownership.DECODE_INSTANCES, notice.instance_id)
        if notice.role in ORPHANED and notice.rank >= 0:
            # a successor that reports load for the rank reads the same input stream: only what
            # the instance that went held is routed again
            successor = await notices.other_reporter(self.redis, notice.role, notice.group_id, notice.rank,
                                                     notice.instance_id)
            await self.move_from(notice.role, notice.group_id, notice.rank,
                                 only_of=notice.instance_id if successor else None)

    async def resume_orphans(self) -> None:
        """The requests of decode instances whose heartbeat is gone (kill -9, a crash, a drain cut
        short) go on elsewhere, from the tokens their client already has (shared/runtime/ownership.py)."""
        try:
            instances = [raw.decode() for raw in await self.redis.smembers(ownership.DECODE_INSTANCES)]
            alive = [await self.redis.exists(streams.heartbeat_key("decode", i)) for i in instances]
        except RedisError:
            self.heartbeat_missing.clear()  # after an outage, every instance gets a whole TTL to be seen again
            raise
        now = time.monotonic()
        for instance, is_alive in zip(instances, alive):
            if is_alive:
                self.heartbeat_missing.pop(instance, None)
                continue
            # dead only once its heartbeat has been missing a whole TTL while Redis was up here: the
            # keys of live ranks also lapse when Redis restarts or is out for a while
            if now - self.heartbeat_missing.setdefault(instance, now) < self.config.heartbeat_ttl_s:
                continue
            for request_id in await self.redis.smembers(ownership.owned_key(instance)):
                await self.resume(instance, request_id.decode())
            if not await self.redis.scard(ownership.owned_key(instance)):  # gone once it owns nothing
                await self.redis.srem(ownership.DECODE_INSTANCES, instance)
                self.heartbeat_missing.pop(instance, None)

    async def move_orphaned_work(self) -> None:
        """What waits in the input stream of a worker rank that is gone (no load report for a whole
        heartbeat TTL while Redis was up here; a live rank renews it even mid-step) is routed again,
        to the live ranks: entries delivered to it and never acked, and those it never read. A
        prefill task goes back to routing; a KV handoff to a decode rank that never admitted it
        sends its request to be prefilled again (the first token then repeats an index the gateway
        drops). Its successor, if it comes, finds the stream empty."""
        try:
            found = []
            for role, (stream_of, _, _) in ORPHANED.items():
                names = [k.decode() async for k in self.redis.scan_iter(match=stream_of("*", "*"), count=1000,
                                                                          _type="stream")]
                found += [(role, *w) for w in map(streams.worker_of_stream, names) if w is not None]
            live = [await self.redis.exists(streams.load_key(*worker)) for worker in found]
        except RedisError:
            self.rank_missing.clear()  # after an outage, every rank gets a whole TTL to report again
            raise
        now = time.monotonic()
        for worker, is_live in zip(found, live):
            if is_live:
                self.rank_missing.pop(worker, None)
            elif now - self.rank_missing.setdefault(worker, now) >= self.config.heartbeat_ttl_s:
                await self.move_from(*worker)

    async def move_from(self, role: str, group_id: str, rank: int, only_of: str | None = None) -> None:
        """Route again what waits in a gone rank's input stream; with `only_of`, only what that
        instance had read and not finished (a successor reads the same stream: the rest is its)."""
        stream_of, kind, group = ORPHANED[role]
        stream = stream_of(group_id, rank)
        if only_of is not None:
            entries = await self.bus.claim_from(stream, group, kind, only_of)
        else:
            entries = await self.bus.claim_stale(stream, group, kind, 0, count=256)
            entries += await self.bus.read(stream, group, kind, count=256, block_ms=None)
        for entry in entries:
            msg = entry.message
            if role == "prefill":  # loop() routes it again
                request, to = msg.request, streams.cached_stream
            else:  # a handoff's final chunk carries the request: prefilled again, elsewhere
                done = not msg.final or msg.finish_reason is not None
                request, to = (None if done else msg.request), streams.tokenized_stream
            if request is not None:
                await self.bus.publish(to(self.config.partition(request.request_id)), request)
                self.moved.labels(role=role).inc()
                self.log.info(json.dumps({"event": "orphaned_request_moved", "role": role, "group": group_id,
                                          "dead_rank": rank, "trace_id": request.trace_id}))
            await self.bus.ack(stream, group, entry.entry_id)
            await self.redis.xdel(stream, entry.entry_id)

    async def resume(self, instance: str, request_id: str) -> None:
        """A dead (or leaving) instance's request, taken from it in one step (ownership.take: it can
        record, and so send, nothing more) and run again from the tokens its client has."""
        done = await ownership.resume(self.redis, self.bus, self.config.stream_partitions, instance, request_id)
        if done is None:  # finished, or owned by a live rank now
            return
        if done.original is None:
            self.log.error(json.dumps({"event": "bad_owner_record", "request_id": request_id}))
        self.resumed.labels(outcome=done.outcome).inc()
        self.log.info(json.dumps({"event": "request_resumed", "request_id": request_id, "outcome": done.outcome,
                                  "trace_id": done.original.trace_id if done.original else None,
                                  "dead_instance": instance, "emitted": done.emitted}))

    async def reap_abort_groups(self) -> None:
        prefix = streams.consumer_group("aborts-")
        try:
            groups = await self.redis.xinfo_groups(streams.ABORTS)
        except Exception:
            return  # no aborts stream yet
        for g in groups:
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            if not name.startswith(prefix):
                continue
            instance = name[len(prefix):]
            alive = await self.redis.exists(*[streams.heartbeat_key(role, instance) for role in ("prefill", "decode")])
            if not alive:
                await self.redis.xgroup_destroy(streams.ABORTS, name)
                self.log.info(json.dumps({"event": "reaped_abort_group", "instance": instance}))

    async def route(self, stream: str, entry: Entry[TokenizedRequest]) -> None:
        req = entry.message
        if time.time() > req.deadline:
            await self.fail(stream, entry, "no worker could take the request before its deadline", 503)
            return
        prefill, decode_ranks, workers = await self.loads()
        new = len(req.prompt_ids) - req.num_cached_tokens
        reserve = -(-(len(req.prompt_ids) + req.sampling.max_tokens) // BLOCK_SIZE)
        decode_index = choose_decode_rank(decode_ranks, reserve) if decode_ranks else None
        if not prefill or decode_index is None:
            self.backlog.append((stream, entry))
            return
        _, prefill_group, prefill_rank = prefill_worker = workers[choose_prefill_rank(prefill, new,
                                                                                      req.num_cached_tokens)]
        _, decode_group, decode_rank = decode_worker = workers[decode_index]
        await self.bus.publish(streams.prefill_stream(prefill_group, prefill_rank),
                               PrefillTask(req, decode_rank, decode_group))
        await self.bus.ack(stream, CONSUMER_GROUP, entry.entry_id)
        now = time.time()
        self.sent.setdefault(prefill_worker, []).append((now, attention_compute(new, req.num_cached_tokens), new, 0))
        self.sent.setdefault(decode_worker, []).append((now, 0.0, 0, reserve))
        self.messages.labels(stream=stream, outcome="routed").inc()

    async def fail(self, stream: str, entry: Entry[TokenizedRequest], reason: str, status: int) -> None:
        req = entry.message
        await self.bus.publish(streams.delta_stream(req.gateway_id), TokenDelta(
            req.request_id, req.trace_id, req.gateway_id, 0, [], finish_reason="error", error=reason, status=status))
        await self.bus.ack(stream, CONSUMER_GROUP, entry.entry_id)

    async def loads(self) -> tuple[list[PrefillLoad], list[DecodeLoad], list[tuple[str, str, int]]]:
        """Live ranks (a report key exists), each adjusted by what we sent after its report. The
        policies see each as an index into the list of (role, group, rank) returned last."""
        keys = sorted([k async for k in self.redis.scan_iter(match=streams.scan_pattern("load"), count=1000)])
        reports = [r for r in await redis_client.mget(self.redis, keys) if r is not None]  # ties: in key order
        prefill, decode_ranks, workers = [], [], []
        for raw in reports:
            try:
                report = decode(raw, LoadReport)
            except WireError:
                continue
            worker = (report.role, report.group_id or report.role, report.rank)
            since = [s for s in self.sent.get(worker, []) if s[0] > report.time]
            self.sent[worker] = since
            workers.append(worker)
            if report.role == "prefill":
                prefill.append(PrefillLoad(len(workers) - 1, report.pending_compute + sum(s[1] for s in since),
                                           report.pending_input_tokens + sum(s[2] for s in since)))
            else:
                decode_ranks.append(DecodeLoad(len(workers) - 1, report.kv_blocks_used + sum(s[3] for s in since),
                                               report.kv_blocks_total, report.running + len(since),
                                               report.max_running))
        return prefill, decode_ranks, workers
