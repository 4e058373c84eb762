"""A prefill rank: batches prompts under a token budget, streams each layer's latent KV to the
request's decode rank as soon as that layer is computed, and sends the first token at once."""
from __future__ import annotations

import asyncio
import json
import time

from prometheus_client import Counter

from shared.engine.engine import RequestError
from shared.model.detok import prefix_window
from shared.protocol import streams
from shared.protocol.messages import KVChunk, PrefillTask, TokenDelta, attention_compute
from shared.protocol.tensors import checksum, to_blob
from shared.protocol.wire import TensorBlob
from shared.runtime.bus import claim_interval_s
from shared.runtime.engine_service import EngineService, sampling_params

CONSUMER_GROUP = streams.consumer_group("prefill")
NO_KV = TensorBlob("float32", [0], b"")  # the final chunk of a handoff carries no KV


class PrefillService(EngineService):
    name = role = "prefill"

    async def setup(self) -> None:
        self.stream = streams.prefill_stream(self.group_id, self.rank)
        await self.bus.ensure_consumer_group(self.stream, CONSUMER_GROUP)
        self.tasks: dict[str, tuple[str, PrefillTask]] = {}  # request id -> (entry id, task)
        self.handoff_bytes = Counter("streamoe_kv_handoff_bytes", "Latent KV bytes sent to decode ranks",
                                     list(self.metric_labels), registry=self.registry).labels(**self.metric_labels)
        await self.setup_engine_service()

    async def loop(self) -> None:
        # draining (SIGTERM): no new task is read; the prompts in hand are prefilled and handed off
        while not self.stopping.is_set() or self.tasks:
            entries = [] if self.stopping.is_set() else await self.bus.read(
                self.stream, CONSUMER_GROUP, PrefillTask, count=32, block_ms=100 if self.idle else None)
            if not self.stopping.is_set():
                entries += await self.bus.claim_stale(self.stream, CONSUMER_GROUP, PrefillTask,
                                                      self.config.claim_idle_ms,
                                                      every_s=claim_interval_s(self.config.claim_idle_ms))
            for entry in entries:
                if entry.message.request.request_id in self.aborted:
                    await self.bus.ack(self.stream, CONSUMER_GROUP, entry.entry_id)
                    continue
                await self.admit(entry.entry_id, entry.message)
            for request_id in await self.take_aborts():
                if request_id in self.tasks:
                    entry_id, _ = self.tasks.pop(request_id)
                    await self.bus.ack(self.stream, CONSUMER_GROUP, entry_id)
            await self.group_step(self.step)
            queued = [t.request for _, t in self.tasks.values()]
            await self.report_load(
                pending_compute=sum(attention_compute(len(r.prompt_ids) - r.num_cached_tokens, r.num_cached_tokens)
                                    for r in queued),
                pending_tokens=sum(len(r.prompt_ids) - r.num_cached_tokens for r in queued))

    def engine_requests(self) -> list[str]:
        return list(self.tasks)

    async def drop_all(self) -> None:
        await super().drop_all()
        self.tasks.clear()  # their entries were claimed and routed again by the balancer

    async def admit(self, entry_id: str, task: PrefillTask) -> None:
        req = task.request
        if req.request_id in self.tasks:
            if self.tasks[req.request_id][0] != entry_id:  # the same request published again (a repair)
                await self.bus.ack(self.stream, CONSUMER_GROUP, entry_id)
            return  # else a redelivery of the entry already running here
        prefix = None
        if req.num_cached_tokens and self.prefix_cache is not None:  # read and verified off the loop
            prefix = await asyncio.to_thread(self.prefix_cache.load, req.prompt_ids, req.cache_salt,
                                             req.num_cached_tokens)
        try:
            await self.compute(self.engine.add_request, req.request_id, req.prompt_ids,
                               sampling_params(req.sampling, req.resumed), req.cache_salt, prefix)
        except RequestError as e:
            await self.bus.publish(self.raw_deltas(req.request_id), TokenDelta(
                req.request_id, req.trace_id, req.gateway_id, 0, [], finish_reason="error", error=str(e), status=400))
            await self.bus.ack(self.stream, CONSUMER_GROUP, entry_id)
            return
        self.tasks[req.request_id] = (entry_id, task)

    async def step(self) -> None:
        loop = asyncio.get_running_loop()
        layers: asyncio.Queue = asyncio.Queue()

        def on_layer_kv(layer, items):  # compute thread: hand the layer to the event loop, go on
            loop.call_soon_threadsafe(layers.put_nowait, (layer, items, time.time()))

        sender = asyncio.create_task(self.send_layers(layers))
        try:
            deltas = await self.timed_step(on_layer_kv)
        finally:  # a failed step (its group lost a rank) still sends what it computed: it is the same
            layers.put_nowait(None)
            await sender
        for delta in deltas:
            await self.finish(delta)

    async def send_layers(self, layers: asyncio.Queue) -> None:
        while (item := await layers.get()) is not None:
            layer, kvs, computed_at = item
            writes = []
            for request_id, kv in kvs:
                _, task = self.tasks[request_id]
                blob = to_blob(kv)
                self.handoff_bytes.inc(len(blob.data))
                writes.append((streams.kv_stream(task.decode_group, task.decode_rank), KVChunk(
                    request_id, task.request.trace_id, layer, self.num_kv_layers, blob, checksum(blob.data),
                    computed_at=computed_at, sent_at=time.time())))
            await self.until_written(lambda writes=writes: self.bus.publish_many(writes))

    async def finish(self, delta) -> None:
        entry_id, task = self.tasks.pop(delta.request_id)
        req = task.request
        first = delta.token_ids[0] if delta.token_ids else -1
        self.tokens.labels(**self.metric_labels, kind="input_cache_hit").inc(delta.num_cached_tokens)
        self.tokens.labels(**self.metric_labels, kind="input_cache_miss").inc(
            len(req.prompt_ids) - delta.num_cached_tokens)
        done = delta.finish_reason if delta.finish_reason != "prefilled" else None
        window = prefix_window(req.sampling.stop)
        hidden = to_blob(delta.hidden) if delta.hidden is not None and done is None else None
        writes = [(streams.kv_stream(task.decode_group, task.decode_rank), KVChunk(
            req.request_id, req.trace_id, -1, self.num_kv_layers, NO_KV, checksum(hidden.data) if hidden else "",
            request=req, first_token=first, finish_reason=done, sent_at=time.time(), final=True, hidden=hidden))]
        # a resumed request (its decode rank died) goes on at output index `resumed`
        writes.append((self.raw_deltas(req.request_id), TokenDelta(
            req.request_id, req.trace_id, req.gateway_id, req.resumed, list(delta.token_ids), finish_reason=done,
            prefix_ids=req.prompt_ids[-window:], stop=req.sampling.stop,
            num_prompt_tokens=len(req.prompt_ids) - req.resumed, num_cached_tokens=delta.num_cached_tokens,
            prompt_ids=None if req.resumed else req.prompt_ids)))
        await self.until_written(lambda: self.bus.publish_many(writes))
        await self.bus.ack(self.stream, CONSUMER_GROUP, entry_id)  # after the handoff and the first token are written
        if self.prefix_cache is not None and delta.kv is not None:  # the prompt's new full blocks, off the step
            self.write_blocks(req.prompt_ids, req.cache_salt, delta.kv, skip_blocks=req.num_cached_tokens // 64)
        self.log.info(json.dumps({"event": "prefilled", "trace_id": req.trace_id, "decode_rank": task.decode_rank,
                                  "finish": done}))
