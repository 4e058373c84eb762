"""A decode rank: receives a prompt's KV layer by layer (checksums verified), joins the request
into its continuous batch, records that it owns the request, and emits indexed token deltas
every step."""
from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Container
from dataclasses import dataclass, field

import torch
from prometheus_client import Counter, Gauge, Histogram

from shared.engine.engine import RequestError
from shared.model.detok import prefix_window
from shared.protocol import streams
from shared.protocol.messages import KVChunk, TokenDelta, TokenizedRequest
from shared.protocol.tensors import checksum, from_blob
from shared.protocol.wire import WireError
from shared.runtime import ownership, redis_client
from shared.runtime.bus import Entry, claim_interval_s
from shared.runtime.engine_service import EngineService, sampling_params

CONSUMER_GROUP = streams.consumer_group("decode")
# A handoff that got no chunk this long is dropped: its prefill died mid-way (the prefill that
# claims the task sends it whole again) or the request was cancelled before it ended.
HANDOFF_IDLE_S = 60.0
# Two instances reading one stream (a rank and its successor, or a rank back from a freeze and
# the one that replaced it) can each get part of a handoff. Prefill adds a handoff's chunks in
# order, the final last, so the one that reads the final claims the chunks it lacks from the
# stream, where they wait pending on the other (`Bus.claim_matching`); one that leaves returns
# its part (`return_handoffs`). What is still missing after this long is prefilled again.
HANDOFF_GRACE_S = 2.0


def handoff_verdict(final: KVChunk, running: TokenizedRequest | None, held: bool, aborted: bool,
                    finished: Container[tuple[str, int]]) -> str:
    """What a rank does with a whole handoff (its `final` chunk): "drop" it (the request finished at
    prefill, was cancelled, or this incarnation ran here already or runs now: a duplicate), "wait",
    or "admit" it. A later incarnation (a larger `resumed`) of a request this rank still runs, or
    holds finished while its blocks are stored, is the request resumed elsewhere after this rank was
    taken for dead (frozen, then thawed): it waits until this rank's next record of the earlier one
    is refused and drops it (`fence`), then joins as new work. Dropping it as a duplicate would lose
    the request: the earlier incarnation can send nothing more."""
    req = final.request
    if (final.finish_reason is not None or aborted or (final.request_id, req.resumed) in finished
            or (running is not None and running.resumed >= req.resumed)):
        return "drop"
    return "wait" if running is not None or held else "admit"


@dataclass
class Handoff:
    chunks: dict[int, KVChunk] = field(default_factory=dict)
    entry_ids: list[str] = field(default_factory=list)
    layer0_received_at: float | None = None
    last_at: float = 0.0  # monotonic time of the latest chunk
    fetched: bool = False  # its missing chunks were looked for in the stream (claimed from another reader)
    replacing: bool = False  # a later incarnation of a request this rank runs: it waits for the earlier to go


class DecodeService(EngineService):
    name = role = "decode"

    async def setup(self) -> None:
        self.stream = streams.kv_stream(self.group_id, self.rank)
        await self.bus.ensure_consumer_group(self.stream, CONSUMER_GROUP)
        self.handoffs: dict[str, Handoff] = {}
        self.ready_to_admit: list[str] = []
        self.history: dict[str, list[int]] = {}  # prompt + output so far, for the deltas' prefix ids
        self.requests = {}
        # (request id, resumed) of the incarnations this rank ran to the end, refused, or lost to another
        # instance: a late duplicate handoff of one must not run it again. A later incarnation of the
        # same request (resumed elsewhere after this rank was taken for dead, then handed to this rank's
        # stream) has a larger `resumed` (the tokens sent by then) and is new work.
        self.finished: deque[tuple[str, int]] = deque(maxlen=4096)
        self._swept_at = 0.0
        rank = self.metric_labels
        self.handoffs_done = Counter(
            "streamoe_kv_handoffs", "KV handoffs received; layerwise=yes when layer 0 arrived before prefill "
            "had computed the last layer", [*rank, "layerwise"], registry=self.registry)
        self.handoff_bytes = Counter("streamoe_kv_handoff_received_bytes", "Latent KV bytes received",
                                     list(rank), registry=self.registry).labels(**rank)
        self.handoff_latency = Histogram(
            "streamoe_kv_handoff_seconds", "From prefill computing the last layer to the whole handoff here",
            list(rank), registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)).labels(**rank)
        self.handoff_lead = Gauge(
            "streamoe_kv_handoff_lead_seconds", "Last handoff: prefill's last-layer compute time minus the "
            "arrival of layer 0 here (positive: streamed while prefill still ran)", list(rank),
            registry=self.registry).labels(**rank)
        self.fenced = Counter("streamoe_fenced_writes", "Writes refused because this instance owned the request "
                              "no more (it was resumed or admitted elsewhere while this rank was taken for dead): "
                              "admission, or a step's delta (not sent)", [*rank, "write"], registry=self.registry)
        self.reprefills = Counter("streamoe_kv_reprefills", "Handoffs refused (missing or corrupt KV) and "
                                  "sent back to prefill", list(rank), registry=self.registry).labels(**rank)
        self.held: dict[str, tuple[TokenDelta, str | None]] = {}  # request -> its final delta, cache salt
        await self.setup_engine_service()
        self.engine.keep_finished_kv = self.prefix_cache is not None

    async def loop(self) -> None:
        while not self.stopping.is_set():
            idle = self.idle and not self.ready_to_admit
            entries = await self.bus.read(self.stream, CONSUMER_GROUP, KVChunk, count=256,
                                          block_ms=100 if idle else None)
            entries += await self.bus.claim_stale(self.stream, CONSUMER_GROUP, KVChunk, self.config.claim_idle_ms,
                                                  count=256, every_s=claim_interval_s(self.config.claim_idle_ms))
            for entry in entries:
                self.receive(entry)
            cancelled = []
            for request_id in await self.take_aborts():
                self.history.pop(request_id, None)
                if self.requests.pop(request_id, None) is not None or self.held.pop(request_id, None):
                    cancelled.append(request_id)
            if cancelled:
                async with self.redis.pipeline(transaction=False) as pipe:
                    ownership.forget(pipe, self.config.instance_id, cancelled)
                    await pipe.execute()
            await self.admit_ready()
            await self.drop_stale_handoffs()
            await self.group_step(self.step)
            await self.report_load()

    def engine_requests(self) -> list[str]:
        return list(self.requests)

    async def drained(self) -> None:
        await self.return_handoffs()
        await super().drained()

    async def return_handoffs(self) -> None:
        """Leaving: the chunks of every handoff read and not admitted go back to the stream, as new
        entries, for the rank's successor (which reads the same stream) or, where none comes, for
        the balancer to route again; the entries read are acked and deleted."""
        for request_id, handoff in list(self.handoffs.items()):
            await self.bus.publish_many([(self.stream, chunk) for chunk in handoff.chunks.values()])
            await self.consumed(request_id)
            self.log.info(json.dumps({"event": "handoff_returned", "request_id": request_id,
                                      "chunks": len(handoff.chunks)}))

    async def drop_all(self) -> None:
        """Cut out of its EP group (it did not answer), this rank drops what it ran, unsent. A
        request the balancer took from it already (a death notice) runs elsewhere; one it still owns
        (admitted after it thawed and before it found itself cut out) is taken and resumed from here
        (ownership.resume), or nothing would ever send the rest: this instance is alive, so no
        heartbeat lapses for it. A finished request whose end is held while its blocks are stored
        keeps it: `store_then_send` sends the end where this instance still owns the request and
        fences it where not (resuming it would run it on past its stop). The handoffs it read and
        did not admit stay pending in its stream, where the next read claims them (`claim_stale`)."""
        mine = list(self.requests)
        await super().drop_all()
        for held in (self.requests, self.history, self.handoffs):
            held.clear()
        self.ready_to_admit.clear()
        for request_id in mine:
            done = await ownership.resume(self.redis, self.bus, self.config.stream_partitions,
                                          self.config.instance_id, request_id, again=False)
            if done is not None:
                self.log.warning(json.dumps({"event": "request_handed_back", "request_id": request_id,
                                             "outcome": done.outcome, "emitted": done.emitted}))

    def receive(self, entry: Entry[KVChunk]) -> None:
        chunk = entry.message
        handoff = self.handoffs.setdefault(chunk.request_id, Handoff())
        handoff.chunks[chunk.layer] = chunk
        handoff.entry_ids.append(entry.entry_id)
        handoff.last_at = time.monotonic()
        if chunk.layer == 0:
            handoff.layer0_received_at = time.time()
        if chunk.final and chunk.request_id not in self.ready_to_admit:
            self.ready_to_admit.append(chunk.request_id)  # once, though a re-sent handoff brings two ends

    async def admit_ready(self) -> None:
        waiting = []
        for request_id in self.ready_to_admit:
            handoff = self.handoffs.get(request_id)
            if handoff is None:
                continue  # consumed already
            final = handoff.chunks[-1]
            verdict = handoff_verdict(final, self.requests.get(request_id), request_id in self.held,
                                      request_id in self.aborted, self.finished)
            if verdict == "drop":
                await self.consumed(request_id)  # finished at prefill, a duplicate handoff, or cancelled
                continue
            if verdict == "wait":  # the incarnation it replaces is dropped first (fenced at its next record)
                if not handoff.replacing:
                    handoff.replacing = True
                    self.log.info(json.dumps({"event": "handoff_waits_for_fence", "request_id": request_id,
                                              "resumed": final.request.resumed}))
                waiting.append(request_id)
                continue
            if any(layer not in handoff.chunks for layer in range(self.num_kv_layers)):
                if not handoff.fetched:  # another instance reading this stream has them
                    handoff.fetched = True
                    for entry in await self.bus.claim_matching(
                            self.stream, CONSUMER_GROUP, KVChunk,
                            lambda c, r=request_id, h=handoff: c.request_id == r and c.layer not in h.chunks):
                        self.receive(entry)
                if (any(layer not in handoff.chunks for layer in range(self.num_kv_layers))
                        and time.monotonic() - handoff.last_at < HANDOFF_GRACE_S):
                    waiting.append(request_id)  # the rest may be on its way back from a rank that left
                    continue
            refusal = self.foreign_dtype(request_id, handoff)
            if refusal is not None:
                await self.refuse(request_id, final, refusal)
                continue
            try:
                kv, hidden = self.assemble(handoff)
            except WireError as e:
                await self.reprefill(request_id, final, str(e))
                continue
            req = final.request
            try:
                admitted = await self.compute(self.engine.add_prefilled, request_id, req.prompt_ids,
                                              sampling_params(req.sampling, req.resumed), final.first_token, kv,
                                              req.cache_salt, hidden)
            except RequestError as e:  # KV of another model's shape: prefilling again would send the same
                await self.refuse(request_id, final, f"KV handoff of request {request_id}: {e}")
                continue
            if not admitted:
                waiting.append(request_id)  # reserved by the balancer, freed by a request finishing soon
                continue
            async with self.redis.pipeline(transaction=False) as pipe:
                ownership.record_admission(pipe, self.config.instance_id, self.rank, req, final.first_token)
                owned = (await pipe.execute())[0]
            if not owned:  # admitted elsewhere first (the handoff was routed again while this rank held it)
                await self.compute(self.engine.abort, request_id)
                self.fenced.labels(**self.metric_labels, write="admission").inc()
                self.log.warning(json.dumps({"event": "fenced", "write": "admission", "request_id": request_id}))
                self.finished.append((request_id, req.resumed))
                await self.consumed(request_id)
                continue
            self.history[request_id] = req.prompt_ids + [final.first_token]
            self.requests[request_id] = req
            self.note_handoff(handoff)
            await self.consumed(request_id)
        self.ready_to_admit = waiting

    async def drop_stale_handoffs(self) -> None:
        now = time.monotonic()
        if now - self._swept_at < 1.0:
            return
        self._swept_at = now
        waiting = set(self.ready_to_admit)
        for request_id, handoff in list(self.handoffs.items()):
            if request_id not in waiting and now - handoff.last_at > HANDOFF_IDLE_S:
                self.log.warning(json.dumps({"event": "stale_handoff_dropped", "request_id": request_id,
                                             "layers": len(handoff.chunks)}))
                await self.consumed(request_id)

    def assemble(self, handoff: Handoff) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt's KV [layers, P, C+R] (the MTP layer's last) and, with an MTP layer, the last
        position's hidden state [D]; any missing layer or hidden state, or checksum mismatch, fails loudly."""
        layers = []
        for layer in range(self.num_kv_layers):
            chunk = handoff.chunks.get(layer)
            if chunk is None:
                raise WireError(f"layer {layer} of the KV handoff is missing")
            if checksum(chunk.kv.data) != chunk.checksum:
                raise WireError(f"layer {layer} of the KV handoff fails its checksum")
            layers.append(from_blob(chunk.kv))
        final, hidden = handoff.chunks[-1], None
        if self.engine.tracks_mtp:
            if final.hidden is None:
                raise WireError("the KV handoff has no hidden state for the MTP layer")
            if checksum(final.hidden.data) != final.checksum:
                raise WireError("the KV handoff's hidden state fails its checksum")
            hidden = from_blob(final.hidden)
        return torch.stack(layers), hidden

    def note_handoff(self, handoff: Handoff) -> None:
        last = handoff.chunks[self.num_kv_layers - 1]
        self.handoff_bytes.inc(sum(len(c.kv.data) for c in handoff.chunks.values()))
        self.handoff_latency.observe(max(0.0, time.time() - last.computed_at))
        lead = last.computed_at - handoff.layer0_received_at
        self.handoff_lead.set(lead)
        self.handoffs_done.labels(**self.metric_labels, layerwise="yes" if lead > 0 else "no").inc()

    def foreign_dtype(self, request_id: str, handoff: Handoff) -> str | None:
        """Why a handoff's KV cannot join this rank's batch when it is in another dtype than this
        rank computes in (None: it is in ours). Never cast: the values would not be the ones a
        prefill in our dtype computes, and the blocks would be cached under the wrong fingerprint."""
        mine = str(self.engine.model.dtype).removeprefix("torch.")
        theirs = {c.kv.dtype for layer, c in handoff.chunks.items() if layer >= 0} - {mine}
        if not theirs:
            return None
        return (f"KV handoff of request {request_id} is {', '.join(sorted(theirs))}; this decode rank computes in "
                f"{mine}: give prefill and decode the same --dtype (or both auto, on one Redis)")

    async def refuse(self, request_id: str, final: KVChunk, reason: str) -> None:
        """End a request whose handoff no retry can fix (a prefill computing in another dtype) with an
        error to its client: re-prefilling would send the same KV again, forever."""
        self.log.error(json.dumps({"event": "kv_refused", "trace_id": final.trace_id, "reason": reason}))
        req = final.request
        # index resumed + 1: right after the first token, which prefill has sent
        await self.until_written(lambda: self.bus.publish(self.raw_deltas(request_id), TokenDelta(
            request_id, req.trace_id, req.gateway_id, req.resumed + 1, [], finish_reason="error", error=reason,
            status=500)))
        self.finished.append((request_id, req.resumed))  # a redelivered handoff is dropped, not refused twice
        await self.consumed(request_id)

    async def reprefill(self, request_id: str, final: KVChunk, reason: str) -> None:
        """Never decode on wrong KV: send the request back through the balancer."""
        self.log.error(json.dumps({"event": "bad_kv", "trace_id": final.trace_id, "reason": reason}))
        self.reprefills.inc()
        await self.bus.publish(streams.tokenized_stream(self.config.partition(request_id)), final.request)
        await self.consumed(request_id)

    async def consumed(self, request_id: str) -> None:
        """KV handoff entries are acked and deleted once consumed."""
        handoff = self.handoffs.pop(request_id)
        await self.bus.ack(self.stream, CONSUMER_GROUP, *handoff.entry_ids)
        await self.redis.xdel(self.stream, *handoff.entry_ids)

    async def step(self) -> None:
        """One engine step, then its deltas, fenced: first every request's record takes the step's
        tokens, only where this instance still owns the request (ownership.record_tokens); then
        the deltas of those go out. A request resumed elsewhere meanwhile (this rank was taken for
        dead: frozen, cut out) sends nothing more from here and is dropped, so no client gets a
        token that its resumed run does not start after."""
        deltas = await self.timed_step()
        steps = []  # (delta, new token ids, emitted so far, finished)
        output_tokens = self.tokens.labels(**self.metric_labels, kind="output")  # once a step, not a token
        for d in deltas:
            req = self.requests[d.request_id]
            history = self.history[d.request_id]
            window = prefix_window(req.sampling.stop)
            prompt_len = ownership.original_prompt_len(req)
            delta = TokenDelta(d.request_id, req.trace_id, req.gateway_id, req.resumed + d.index, d.token_ids,
                               finish_reason=d.finish_reason, prefix_ids=history[-window:], stop=req.sampling.stop,
                               num_prompt_tokens=prompt_len)
            history.extend(d.token_ids)
            output_tokens.inc(len(d.token_ids))
            steps.append((delta, d.token_ids, len(history) - prompt_len, req.cache_salt))
            if d.finish_reason is not None:
                del self.history[d.request_id], self.requests[d.request_id]
                self.finished.append((d.request_id, req.resumed))
        held = [delta for delta, *_ in steps if self.holds_end(delta)]

        async def record() -> list:
            async with self.redis.pipeline(transaction=False) as pipe:
                owned = ownership.record_tokens_many(
                    pipe, self.config.instance_id, [(delta.request_id, token_ids, num_emitted)
                                                    for delta, token_ids, num_emitted, _ in steps],
                    one_script=not redis_client.is_cluster(self.redis))
                for delta in held:  # a death while their blocks are stored sends these ends (ownership.resume)
                    ownership.record_held_end(pipe, self.config.instance_id, delta.request_id, delta.index,
                                              delta.finish_reason)
                return owned(await pipe.execute())

        owned = await self.until_written(record) if steps else []
        writes, finished = [], []
        for (delta, _, _, salt), mine in zip(steps, owned):
            if not mine:
                await self.fence(delta)
            elif self.holds_end(delta):
                # the end of the reply goes out once its blocks are stored, so the client's next turn
                # finds its whole history; the records stay until then (a death resumes the end)
                self.held[delta.request_id] = (delta, salt)
            else:
                writes.append((self.raw_deltas(delta.request_id), delta))
                if delta.finish_reason is not None:
                    finished.append(delta.request_id)
        if writes:
            await self.until_written(lambda: self.bus.publish_many(
                writes, then=lambda pipe: ownership.forget(pipe, self.config.instance_id, finished)))
        for request_id, token_ids, kv in self.engine.finished_kv:  # prompt + reply, for the next turn
            self.in_background(self.store_then_send(request_id, token_ids, kv))
        self.engine.finished_kv.clear()

    def holds_end(self, delta: TokenDelta) -> bool:
        """Whether this delta ends its reply and waits for the reply's blocks to be stored."""
        return delta.finish_reason in ("stop", "length") and self.prefix_cache is not None

    async def fence(self, delta: TokenDelta) -> None:
        """This instance owns the request no more: its delta is not sent and the request is dropped."""
        if delta.finish_reason is None:
            await self.compute(self.engine.abort, delta.request_id)
            self.history.pop(delta.request_id, None)
            req = self.requests.pop(delta.request_id, None)
            if req is not None:
                self.finished.append((delta.request_id, req.resumed))
        self.fenced.labels(**self.metric_labels, write="delta").inc()
        self.log.warning(json.dumps({"event": "fenced", "write": "delta", "request_id": delta.request_id,
                                     "index": delta.index}))

    async def store_then_send(self, request_id: str, token_ids: list[int], kv: torch.Tensor | None) -> None:
        """Store a finished request's blocks, then send the end of its reply (held till now)."""
        delta, salt = self.held.get(request_id, (None, None))
        if kv is not None:
            try:
                await self.store_blocks(token_ids, salt, kv)
            except Exception as e:  # the cache is an optimisation: the reply goes out regardless
                self.log.warning(json.dumps({"event": "blocks_not_stored", "request_id": request_id,
                                             "error": repr(e)}))
        self.held.pop(request_id, None)
        if delta is None:
            return

        async def owns() -> int:
            async with self.redis.pipeline(transaction=False) as pipe:
                ownership.record_tokens(pipe, self.config.instance_id, request_id, [], 0)
                return (await pipe.execute())[0]

        if not await self.until_written(owns):  # resumed elsewhere while its blocks were stored
            await self.fence(delta)
            return
        await self.until_written(lambda: self.bus.publish_many(
            [(self.raw_deltas(request_id), delta)],
            then=lambda pipe: ownership.forget(pipe, self.config.instance_id, [request_id])))
