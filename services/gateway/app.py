"""The gateway: OpenAI-compatible HTTP (and SSE) in front of the Redis streams.

Each request gets an id and a trace id, goes to the request stream, and waits on a queue fed by
this instance's delta stream (deltas are reordered by index; duplicates dropped). Admission is
bounded: past `--max-inflight` requests, or when the request stream is at its cap, the answer
is a fast 429 with Retry-After.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
from aiohttp import web
from prometheus_client import generate_latest
from redis.exceptions import RedisError

from shared.cache.reply_memory import DEFAULT_TTL_S, reply_key, tokenizer_digest
from shared.model.detok import prefix_window
from shared.planner.slo import SLO, parse_slo
from shared.protocol import streams
from shared.protocol.messages import Abort, GenerateRequest, TokenDelta, TokenizedRequest
from shared.runtime import ownership, redis_client
from shared.runtime.bus import StreamFull
from shared.runtime.discovery import live_services
from shared.runtime.service import Service, ServiceConfig
from shared.runtime.usage import exposition, read_usage

from .dashboard import Dashboard, static_files
from .metrics import GatewayMetrics, RequestTimes
from .protocol import ApiError, ParsedRequest, decode_body, now, parse, usage

CONSUMER_GROUP = streams.consumer_group("gateway")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's, for /v1/completions
STATIC = Path(__file__).parent / "static"
# what a key guards when keys are configured: the API and everything that shows the system's data;
# /health, /metrics and the dashboard's page (HTML, JS, CSS: no data) stay open
KEYED_PREFIXES = ("/v1",)
KEYED_PATHS = frozenset({"/services", "/usage", "/dashboard/state"})
_LEADING_FIELD = re.compile(r"([a-z_]+(?:\[\d+\])?): ")


@dataclass
class Inflight:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    next_index: int = 0
    held: dict[int, TokenDelta] = field(default_factory=dict)  # arrived ahead of their turn
    finished: bool = False
    outcome: str = "aborted"  # until the backend ends it, or the deadline passes
    times: RequestTimes = field(default_factory=RequestTimes)
    request: GenerateRequest | None = None  # as published: published again when it shows no progress
    prompt_ids: list[int] | None = None  # from the first delta
    token_ids: list[int] = field(default_factory=list)  # every output id delivered, in order
    progress_at: float = field(default_factory=time.monotonic)  # the last delta delivered in order


@dataclass(frozen=True)
class GatewaySettings:
    model_dir: Path
    served_model_name: str
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 8 << 20
    max_inflight: int = 256
    request_stream_cap: int = 4096
    request_timeout_s: float = 600.0
    max_tokens_limit: int = 4096
    chat_default_max_tokens: int = 256
    reply_memory_ttl_s: int = DEFAULT_TTL_S
    redis_wait_replicas: int = 0  # replicas that must have a request before it is accepted (WAIT)
    redis_wait_timeout_ms: int = 200
    progress_timeout_s: float = 30.0  # a request with no new delta for this long is repaired (0: never)
    slo: SLO = field(default_factory=lambda: parse_slo(None))  # the targets a dashboard measures against
    dashboard: bool = True  # GET /dashboard and its sampler (--no-dashboard: neither)
    dashboard_interval_s: float = 5.0
    dashboard_history_s: float = 600.0


class GatewayService(Service):
    name = "gateway"
    serves_clients = True

    def __init__(self, config: ServiceConfig, settings: GatewaySettings):
        super().__init__(config)
        self.settings = settings
        self.inflight: dict[str, Inflight] = {}
        self.defaults = _generation_defaults(settings.model_dir)
        self.delta_stream = streams.delta_stream(config.instance_id)
        self._live, self._live_checked = False, -1e9
        self.metrics = GatewayMetrics(self.registry)
        self.metrics.slo_targets(settings.slo)
        self.tokenizer_digest = tokenizer_digest(settings.model_dir)
        self.dashboard = None
        if settings.dashboard:
            # NOTE: its own metrics from the registry, not through its own port
            self.dashboard = Dashboard(config.instance_id, lambda: generate_latest(self.registry).decode(),
                                       settings.slo, settings.model_dir, config.stream_partitions,
                                       settings.dashboard_interval_s, settings.dashboard_history_s, self.log)
        self.dashboard_task: asyncio.Task | None = None

    def make_app(self) -> web.Application:
        # NOTE: aiohttp refuses a body over client_max_size with 413 before reading it all.
        return web.Application(client_max_size=self.settings.max_body_bytes, middlewares=[self._errors])

    def add_routes(self, app: web.Application) -> None:
        # NOTE: partials of a coroutine function: aiohttp deprecates plain functions as handlers
        app.router.add_post("/v1/completions", functools.partial(self.complete, chat=False))
        app.router.add_post("/v1/chat/completions", functools.partial(self.complete, chat=True))
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/services", self.services)
        app.router.add_get("/usage", self.usage_totals)
        if self.dashboard is not None:
            self.static = static_files(STATIC)
            app.router.add_get("/dashboard", self.dashboard_page)
            app.router.add_get("/dashboard/state", self.dashboard_state)
            app.router.add_get("/dashboard/static/{name}", self.dashboard_static)

    async def setup(self) -> None:
        await self.bus.ensure_consumer_group(self.delta_stream, CONSUMER_GROUP)
        self.writer = None
        if self.settings.redis_wait_replicas > 0:
            self.writer = redis_client.ReplicatedWriter(self.redis, self.settings.redis_wait_replicas,
                                                        self.settings.redis_wait_timeout_ms)
        self.watchdog = None
        if self.settings.progress_timeout_s > 0:
            self.watchdog = asyncio.create_task(self.watch_progress())
        if self.dashboard is not None:  # from the start, so a page opened later shows the last minutes
            self.dashboard_task = asyncio.create_task(self.dashboard.run(self.redis, self._closing))

    async def teardown(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        if self.dashboard_task is not None:  # it ends at _closing; a scrape under way is cut
            self.dashboard_task.cancel()
            await asyncio.wait({self.dashboard_task}, timeout=2.0)
        if self.writer is not None:
            await self.writer.aclose()

    def trimmed_streams(self) -> list[str]:
        return [self.delta_stream]

    async def loop(self) -> None:
        # draining (SIGTERM): the listener and the idle connections are closed; what is in flight
        # is answered (each response closes its connection), until every connection has closed or
        # the drain deadline passes
        while not self.stopping.is_set() or self.inflight or self.open_connections():
            entries = await self.bus.read(self.delta_stream, CONSUMER_GROUP, TokenDelta, count=256, block_ms=200)
            entries += await self.bus.reclaim_lost(self.delta_stream, CONSUMER_GROUP, TokenDelta)
            for entry in entries:
                self.dispatch(entry.message)
            await self.bus.ack(self.delta_stream, CONSUMER_GROUP, *[e.entry_id for e in entries])

    def drain_report(self) -> dict:
        return {"open_connections": self.open_connections(), "inflight": [
            {"request_id": rid, "trace_id": st.request.trace_id if st.request else None, "next_index": st.next_index,
             "held": sorted(st.held), "idle_s": round(time.monotonic() - st.progress_at, 2)}
            for rid, st in list(self.inflight.items())[:20]]}

    def dispatch(self, delta: TokenDelta) -> None:
        state = self.inflight.get(delta.request_id)
        if state is None or delta.index < state.next_index or delta.index in state.held:
            return  # finished, or a duplicate
        state.held[delta.index] = delta
        while state.next_index in state.held:
            d = state.held.pop(state.next_index)
            state.queue.put_nowait(d)
            state.next_index += max(1, len(d.token_ids))
            state.token_ids += d.token_ids
            state.progress_at = time.monotonic()
            if d.index == 0 and d.prompt_ids is not None:
                state.prompt_ids = list(d.prompt_ids)

    # -- repairs: what a Redis failover (or any lost entry) can leave undone -------------------------
    async def watch_progress(self) -> None:
        """Every request that showed no progress for --progress-timeout-s is repaired (`repair`)."""
        timeout = self.settings.progress_timeout_s
        while not self._closing.is_set():
            await self._pause(min(1.0, timeout / 4))
            now = time.monotonic()
            for request_id, state in list(self.inflight.items()):
                if state.finished or state.request is None or now - state.progress_at < timeout:
                    continue
                state.progress_at = now  # the next repair of this one waits another whole timeout
                try:
                    await self.repair(request_id, state)
                except RedisError as e:  # Redis away: the next round tries again
                    self.log.warning(json.dumps({"event": "repair_failed", "trace_id": state.request.trace_id,
                                                 "error": repr(e)}))

    async def repair(self, request_id: str, state: Inflight) -> None:
        """A request whose entries may have vanished (an acknowledged XADD lost in a failover):
        - no first token: publish it again, the same id (each hop takes a duplicate harmlessly, and
          the seed pinned at admission makes a second run draw the same tokens);
        - a gap, and the decode rank's ownership record holds the missing ids: send them again
          through the tokenizer (which makes their text);
        - no record (the handoff was lost, or the end of the reply): resume from the ids this
          gateway has, as the balancer resumes a dead rank's requests."""
        req = state.request
        if state.next_index == 0:
            await self.publish_request(req)
            self._repaired(req, "republished")
            return
        async with self.redis.pipeline(transaction=False) as pipe:  # one request's keys: one slot
            pipe.exists(streams.owner_key(request_id))
            pipe.get(ownership.ids_key(request_id))
            owned, raw_ids = await pipe.execute()
        sent = ownership.unpack_ids(raw_ids)
        start = state.next_index
        if owned and len(sent) > start:
            end = min([len(sent), *state.held])
            prompt = state.prompt_ids or []
            window = prefix_window(req.sampling.stop)
            await self.bus.publish(streams.raw_deltas_stream(self.config.partition(request_id)), TokenDelta(
                request_id, req.trace_id, req.gateway_id, start, sent[start:end],
                prefix_ids=(prompt + sent[:start])[-window:], stop=req.sampling.stop, num_prompt_tokens=len(prompt)))
            self._repaired(req, "resent")
        elif not owned and state.prompt_ids is not None:
            original = TokenizedRequest(request_id, req.trace_id, req.gateway_id, req.sampling, req.deadline,
                                        state.prompt_ids, req.cache_salt)
            resumed = ownership.resumed_request(original, state.token_ids)
            if resumed is None:  # every token came; only the end was lost
                self.dispatch(TokenDelta(request_id, req.trace_id, req.gateway_id, start, [], finish_reason="length"))
            else:
                await self.bus.publish(streams.tokenized_stream(self.config.partition(request_id)), resumed)
            self._repaired(req, "resumed")

    def _repaired(self, req: GenerateRequest, how: str) -> None:
        self.metrics.repairs.labels(how=how).inc()
        self.log.warning(json.dumps({"event": "request_repaired", "how": how, "trace_id": req.trace_id,
                                     "after_s": self.settings.progress_timeout_s}))

    async def publish_request(self, req: GenerateRequest) -> None:
        """Into the request's partition; with --redis-wait-replicas, only once that many replicas
        have it (else 503: the client was never told it was accepted, and the abort the caller
        publishes stops whatever copy survived)."""
        stream = streams.requests_stream(self.config.partition(req.request_id))
        if self.writer is None:
            await self.bus.publish(stream, req, cap=self.settings.request_stream_cap)
            return
        acked = await self.bus.publish_replicated(stream, req, self.writer, cap=self.settings.request_stream_cap)
        if acked < self.settings.redis_wait_replicas:
            self.metrics.unreplicated.inc()
            raise ApiError(503, f"the request queue has {acked} of {self.settings.redis_wait_replicas} replicas "
                                f"(--redis-wait-replicas) within {self.settings.redis_wait_timeout_ms} ms; retry",
                           None, "backend_unavailable", headers={"Retry-After": "1", "retry-after-ms": "1000"})

    # -- HTTP ---------------------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            if request.path.startswith(KEYED_PREFIXES) or request.path in KEYED_PATHS:
                self._authorize(request)  # as vLLM: the API needs a key; /health and /metrics stay open
            response = await handler(request)
        except ApiError as e:
            response = _error_response(e)
        except web.HTTPRequestEntityTooLarge:
            response = _error_response(ApiError(413, f"the body is over {self.settings.max_body_bytes} bytes", None))
        except web.HTTPException as e:  # aiohttp's own 404/405: in OpenAI's shape too
            response = _error_response(_routing_error(request, e)) if 400 <= e.status < 500 else e
        except RedisError as e:  # Redis away or saturated: the backend is unavailable, not broken input
            self.log.warning("redis error on %s: %r", request.path, e)
            response = _error_response(ApiError(503, "the request queue is unavailable; retry later", None,
                                                "backend_unavailable",
                                                headers={"Retry-After": "1", "retry-after-ms": "1000"}))
        except ConnectionError:
            raise  # the client went away mid-answer: there is no one to answer
        except Exception:  # a bug: still OpenAI's shape for the client, the traceback in our log
            self.log.exception("unhandled error on %s %s", request.method, request.path)
            response = _error_response(ApiError(500, "internal error; the gateway's log has the details", None,
                                                "internal_error"))
        route = request.match_info.route.resource
        self.metrics.http.labels(route=route.canonical if route is not None else "other",
                                 code=str(response.status)).inc()
        if isinstance(response, web.HTTPException):
            raise response
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.settings.served_model_name, "object": "model", "created": 0, "owned_by": "streamoe"}]})

    async def services(self, request: web.Request) -> web.Response:
        """Every live service and where its metrics are (for `streamoe cost --url`)."""
        return web.json_response({"services": [{k: s[k] for k in ("name", "instance_id", "metrics_url")}
                                               for s in await live_services(self.redis)]})

    async def usage_totals(self, request: web.Request) -> web.Response:
        """Every service's usage counters as ever added to Redis (shared/runtime/usage.py), as
        Prometheus text: what `streamoe cost --url` totals, drained and restarted ranks included."""
        return web.Response(text=exposition(await read_usage(self.redis)), content_type="text/plain")

    async def dashboard_page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "dashboard.html", headers={"Content-Type": "text/html; charset=utf-8",
                                                                     "Cache-Control": "no-cache"})

    async def dashboard_static(self, request: web.Request) -> web.FileResponse:
        found = self.static.get(request.match_info["name"])
        if found is None:
            raise ApiError(404, f"Invalid URL (GET {request.path[:200]})")
        path, content_type = found
        return web.FileResponse(path, headers={"Content-Type": f"{content_type}; charset=utf-8",
                                               "Cache-Control": "no-cache"})

    async def dashboard_state(self, request: web.Request) -> web.Response:
        """The history and the system now (services/README.md, "Dashboard"); 200 even when parts
        are down: they say so."""
        try:
            state = self.dashboard.state()
        except Exception as e:  # a bug: the page says so, and polls on
            self.log.exception("dashboard state failed")
            state = {"version": 1, "time": time.time(), "history": [], "errors": [f"state failed: {e!r}"]}
        return web.json_response(state, headers={"Cache-Control": "no-store"})

    def _authorize(self, request: web.Request) -> None:
        if not self.settings.api_keys:
            return
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not any(hmac.compare_digest(given.encode(), k.encode()) for k in self.settings.api_keys):
            raise ApiError(401, "missing or wrong API key", None, "invalid_api_key")

    async def complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > self.settings.max_body_bytes:
            raise ApiError(413, f"the body is over {self.settings.max_body_bytes} bytes")
        body = decode_body(await request.read())
        parsed = parse(body, chat, self.defaults, self.settings.max_tokens_limit,
                       self.settings.chat_default_max_tokens if chat else COMPLETION_DEFAULT_MAX_TOKENS)
        if parsed.model != self.settings.served_model_name:
            raise ApiError(404, f"model={parsed.model[:80]!r} does not exist; this server serves "
                                f"{self.settings.served_model_name!r}", "model", "model_not_found")
        if not await self._backend_live():
            raise ApiError(503, "no prefill or no decode worker is live; retry later", None, "backend_unavailable",
                           headers={"Retry-After": "1", "retry-after-ms": "1000"})
        if len(self.inflight) >= self.settings.max_inflight:  # NOTE: no await from here to the slot taken
            raise _overloaded(f"{len(self.inflight)} requests in flight (the limit)")
        request_id, trace_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
        deadline = time.time() + self.settings.request_timeout_s
        self.inflight[request_id] = state = Inflight()
        self.metrics.inflight.inc()
        sampling = parsed.sampling
        if sampling.seed is None:  # pinned: a request run twice (a repair) draws the same tokens both times
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
        try:
            try:
                req = GenerateRequest(request_id, trace_id, self.config.instance_id, sampling, deadline,
                                      prompt_text=parsed.prompt_text, prompt_ids=parsed.prompt_ids,
                                      chat=parsed.messages, cache_salt=parsed.cache_salt)
                await self.publish_request(req)
                state.request, state.progress_at = req, time.monotonic()
            except StreamFull as e:
                raise _overloaded(str(e)) from None
            if parsed.stream:
                response = await self._stream(request, parsed, request_id, state, deadline)
            else:
                response = await self._whole(parsed, request_id, state, deadline)
            return response
        except ApiError as e:
            state.outcome = "timeout" if e.status == 504 else "error"
            raise
        finally:
            self.inflight.pop(request_id, None)
            self.metrics.inflight.dec()
            self.metrics.finished(state.times, state.outcome)
            if not state.finished:  # a disconnect, a deadline, an error: stop the work everywhere
                try:
                    await asyncio.shield(self.bus.publish(streams.ABORTS, Abort(request_id, trace_id, "not finished")))
                except RedisError as e:
                    self.log.warning(json.dumps({"event": "abort_not_sent", "trace_id": trace_id, "error": repr(e)}))

    async def _backend_live(self) -> bool:
        """At least one prefill and one decode rank report load (remembered for a second)."""
        now_ = time.monotonic()
        if now_ - self._live_checked < 1.0:
            return self._live
        roles = set()
        async for key in self.redis.scan_iter(match=streams.scan_pattern("load"), count=1000):
            roles.add(streams.role_of_load_key(key.decode() if isinstance(key, bytes) else key))
        self._live, self._live_checked = {"prefill", "decode"} <= roles, now_
        return self._live

    async def _next(self, state: Inflight, deadline: float) -> TokenDelta:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # NOTE: redis-py (8.1) can swallow a cancel that lands inside a command and go on; the
            # task still counts it. A client gone while we published must not hold its slot to the end.
            raise asyncio.CancelledError
        if not state.queue.empty():  # a step's delta is usually there already: no timer, no await
            delta = state.queue.get_nowait()
        else:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.time())):
                    delta = await state.queue.get()
            except TimeoutError:
                raise ApiError(504, "the request's deadline passed", None, "timeout") from None
        state.finished = delta.finish_reason is not None  # the backend has ended it (error included)
        if delta.finish_reason == "error":
            state.outcome = "error"
        else:
            self.metrics.delta(state.times, len(delta.token_ids), delta.num_prompt_tokens, delta.num_cached_tokens)
            if state.finished:
                state.outcome = "completed"
        return delta

    async def _whole(self, parsed: ParsedRequest, request_id: str, state: Inflight, deadline: float) -> web.Response:
        deltas = []
        while True:
            delta = await self._next(state, deadline)
            if delta.finish_reason == "error":
                raise _failed(delta, parsed.chat)
            deltas.append(delta)
            if delta.finish_reason:
                break
        text = "".join(d.text or "" for d in deltas)
        token_ids = [t for d in deltas for t in d.token_ids]
        first = deltas[0]
        choice = {"index": 0, "finish_reason": deltas[-1].finish_reason, "logprobs": None}
        if parsed.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if parsed.return_token_ids:
            choice["token_ids"] = token_ids
        body = {"id": ("chatcmpl-" if parsed.chat else "cmpl-") + request_id, "created": now(),
                "object": "chat.completion" if parsed.chat else "text_completion", "model": parsed.model,
                "choices": [choice], "usage": usage(first.num_prompt_tokens, len(token_ids), first.num_cached_tokens)}
        if parsed.return_token_ids:
            body["prompt_token_ids"] = first.prompt_ids
        await self._remember(parsed, text, token_ids, deltas[-1].finish_reason)
        return web.json_response(body)

    async def _remember(self, parsed: ParsedRequest, text: str, token_ids: list[int], finish_reason: str) -> None:
        """A finished chat reply's ids, for the tokenizer to find when the client sends the text back
        (shared/cache/reply_memory.py). Written before the client has the end of the reply, so its next
        turn finds them. A reply cut by a stop string is not remembered: its ids go past its text."""
        if not (parsed.chat and self.settings.reply_memory_ttl_s > 0 and text and token_ids) or \
                finish_reason not in ("stop", "length") or parsed.sampling.stop:
            return
        try:
            await self.redis.set(reply_key(self.tokenizer_digest, parsed.cache_salt, text), msgpack.packb(token_ids),
                                 ex=self.settings.reply_memory_ttl_s)
            self.metrics.replies_remembered.inc()
        except RedisError as e:  # an optimisation only: the reply itself is not at stake
            self.log.warning(json.dumps({"event": "reply_not_remembered", "error": repr(e)}))

    async def _stream(self, request: web.Request, parsed: ParsedRequest, request_id: str, state: Inflight,
                      deadline: float) -> web.StreamResponse:
        first = await self._next(state, deadline)  # errors before the stream starts keep their status
        if first.finish_reason == "error":
            raise _failed(first, parsed.chat)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        kind = "chat.completion.chunk" if parsed.chat else "text_completion"
        head = {"id": ("chatcmpl-" if parsed.chat else "cmpl-") + request_id, "object": kind, "created": now(),
                "model": parsed.model}
        completion = 0
        text, token_ids = [], []
        delta: TokenDelta | None = first
        try:
            while delta is not None:
                if delta.finish_reason == "error":
                    await _event(response, {"error": ApiError(500, delta.error or "failed").body()["error"]})
                    break
                completion += len(delta.token_ids)
                text.append(delta.text or "")
                token_ids += delta.token_ids
                if delta.finish_reason:
                    await self._remember(parsed, "".join(text), token_ids, delta.finish_reason)
                choice = {"index": 0, "finish_reason": delta.finish_reason, "logprobs": None}
                if parsed.chat:
                    choice["delta"] = {"content": delta.text or ""} if delta.index else \
                        {"role": "assistant", "content": delta.text or ""}
                else:
                    choice["text"] = delta.text or ""
                if parsed.return_token_ids:
                    choice["token_ids"] = delta.token_ids
                chunk = {**head, "choices": [choice]}
                if parsed.return_token_ids and delta.index == 0:
                    chunk["prompt_token_ids"] = delta.prompt_ids
                await _event(response, chunk)
                delta = None if delta.finish_reason else await self._next(state, deadline)
            if parsed.include_usage:
                await _event(response, {**head, "choices": [],
                                        "usage": usage(first.num_prompt_tokens, completion, first.num_cached_tokens)})
        except ApiError as e:  # the deadline passed mid-stream
            state.outcome = "timeout"
            await _event(response, e.body())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _event(response: web.StreamResponse, payload: dict) -> None:
    await response.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")


def _failed(delta: TokenDelta, chat: bool) -> ApiError:
    """A backend's refusal. Its 400s begin with the field at fault (`prompt: 2100 tokens; ...`):
    that is the `param`, and a chat's prompt is its messages."""
    status = delta.status or 503
    message = delta.error or "the request failed"
    field = _LEADING_FIELD.match(message) if status == 400 else None
    param = None if field is None else field[1]
    if param is not None and chat and param.startswith("prompt"):
        param, message = "messages", "messages (as the chat template renders them): " + message[field.end():]
    return ApiError(status, message, param, "backend_unavailable" if status == 503 else None)


def _error_response(e: ApiError) -> web.Response:
    return web.json_response(e.body(), status=e.status, headers=e.headers)


def _routing_error(request: web.Request, e: web.HTTPException) -> ApiError:
    where = f"{request.method} {request.path[:200]}"
    if isinstance(e, web.HTTPMethodNotAllowed):
        return ApiError(405, f"{where}: use {', '.join(sorted(e.allowed_methods))}", None, "method_not_allowed",
                        headers={"Allow": e.headers.get("Allow", "")})
    return ApiError(e.status, f"{where}: {e.reason}" if e.status != 404 else f"Invalid URL ({where})", None)


def _overloaded(why: str) -> ApiError:
    return ApiError(429, f"overloaded: {why}; retry later", None, "overloaded",
                    headers={"Retry-After": "1", "retry-after-ms": "1000"})


def _generation_defaults(model_dir: Path) -> dict:
    """Unset sampling parameters take generation_config.json, else OpenAI's defaults."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    out = {key: config[key] for key in ("temperature", "top_p", "top_k") if key in config}
    if config.get("do_sample") is False:
        out["temperature"] = 0.0
    return out
