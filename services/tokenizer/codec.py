"""The tokenizer service: prompts -> token ids (chat template included), and token deltas ->
text, statelessly (shared/model/detok.py), so any replica can take any entry."""
from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from prometheus_client import Counter
from tokenizers import Tokenizer

from shared.cache.reply_memory import reply_key, tokenizer_digest
from shared.model.detok import TokenBytes, delta_text
from shared.protocol import streams
from shared.protocol.messages import Abort, GenerateRequest, TokenDelta, TokenizedRequest
from shared.runtime import redis_client
from shared.runtime.service import Service, ServiceConfig

CONSUMER_GROUP = streams.consumer_group("tokenizer")
MARK = re.compile("\ue000([0-9]+)\ue001")  # where a remembered reply's ids go in the rendered template


class PromptError(ValueError):
    pass


class Encoder:
    """Text, chat messages or ids -> prompt ids, exactly as the model's tokenizer files say."""

    def __init__(self, model_dir: Path):
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.bos_token, self.eos_token = config.get("bos_token"), config.get("eos_token")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(config["chat_template"]) if config.get("chat_template") else None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.specials = tuple(t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special)
        self.digest = tokenizer_digest(model_dir)

    def remembered_keys(self, req: GenerateRequest) -> dict[int, str]:
        """Message index -> reply-memory key, for each assistant message of a chat request."""
        if req.chat is None:
            return {}
        return {i: reply_key(self.digest, req.cache_salt, m["content"]) for i, m in enumerate(req.chat)
                if m.get("role") == "assistant" and isinstance(m.get("content"), str) and m["content"]}

    def encode(self, req: GenerateRequest, remembered: dict[int, list[int]] | None = None) -> list[int]:
        if req.prompt_ids is not None:
            for i, t in enumerate(req.prompt_ids):
                if not 0 <= t < self.vocab_size:
                    raise PromptError(f"prompt[{i}]: token id {t} is outside the vocabulary [0, {self.vocab_size})")
            ids = list(req.prompt_ids)
        elif req.chat is not None:
            if self.template is None:
                raise PromptError("messages: this model has no chat template")
            ids = (self._spliced(req.chat, remembered) if remembered else None) or \
                self.tokenizer.encode(self._render(req.chat), add_special_tokens=False).ids
        else:
            ids = self.tokenizer.encode(req.prompt_text or "").ids
        if not ids:
            raise PromptError("prompt: empty after tokenization")
        return ids

    def _render(self, messages: list[dict]) -> str:
        try:
            return self.template.render(messages=messages, bos_token=self.bos_token, eos_token=self.eos_token,
                                        add_generation_prompt=True)
        except TemplateError as e:
            raise PromptError(f"messages: {e}") from None

    def _spliced(self, messages: list[dict], remembered: dict[int, list[int]]) -> list[int] | None:
        """The template rendered with remembered replies' ids in place of their text, or None where a
        reply is not framed by special tokens (then the text is tokenized whole, as always)."""
        if any("\ue000" in str(m.get("content")) for m in messages):
            return None  # the marker's own character in a message: do not guess
        marked = [dict(m, content=f"\ue000{i}\ue001") if i in remembered else m for i, m in enumerate(messages)]
        pieces = MARK.split(self._render(marked))  # text, index, text, index, ..., text
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2:
                before, after = pieces[k - 1], pieces[k + 1]
                if not (before.endswith(self.specials) and after.startswith(self.specials)):
                    return None
                ids += remembered[int(piece)]
            else:
                ids += self.tokenizer.encode(piece, add_special_tokens=False).ids
        return ids


def _raise(message: str):
    raise TemplateError(message)


class TokenizerService(Service):
    name = "tokenizer"

    def __init__(self, config: ServiceConfig, model_dir: Path):
        super().__init__(config)
        self.encoder = Encoder(model_dir)
        self.token_bytes = TokenBytes(self.encoder.tokenizer)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")  # never on the event loop
        self.reply_memory = Counter("streamoe_reply_memory_total", "Assistant messages of chat requests whose "
                                    "generated ids were remembered (hit) or not (miss)", ["outcome"],
                                    registry=self.registry)

    def kinds(self) -> dict[str, type]:
        """What the tokenizer reads: every partition of the requests and of the workers' deltas."""
        n = self.config.stream_partitions
        return {**{streams.requests_stream(p): GenerateRequest for p in range(n)},
                **{streams.raw_deltas_stream(p): TokenDelta for p in range(n)}}

    async def setup(self) -> None:
        for stream in self.kinds():
            await self.bus.ensure_consumer_group(stream, CONSUMER_GROUP)

    async def loop(self) -> None:
        while not self.stopping.is_set():
            taken = await self.bus.take(CONSUMER_GROUP, self.kinds(), self.config.claim_idle_ms)
            deltas = [(stream, entry) for stream, entry in taken if isinstance(entry.message, TokenDelta)]
            for stream, entry in taken:
                if isinstance(entry.message, GenerateRequest):
                    await self.tokenize(entry.message)
                    await self.done(stream, [entry.entry_id])  # after what it produced is written
            if deltas:
                await self.detokenize(deltas)

    async def done(self, stream: str, entry_ids: list[str]) -> None:
        await self.bus.ack(stream, CONSUMER_GROUP, *entry_ids)
        self.messages.labels(stream=stream, outcome="ok").inc(len(entry_ids))

    async def tokenize(self, req: GenerateRequest) -> None:
        loop = asyncio.get_running_loop()
        try:
            remembered = await self.remembered(req)
            ids = await loop.run_in_executor(self.pool, self.encoder.encode, req, remembered)
        except PromptError as e:
            self.log.info(json.dumps({"event": "bad_prompt", "trace_id": req.trace_id, "error": str(e)}))
            await self.bus.publish(streams.delta_stream(req.gateway_id), TokenDelta(
                req.request_id, req.trace_id, req.gateway_id, 0, [], finish_reason="error", error=str(e), status=400))
            return
        await self.bus.publish(streams.tokenized_stream(self.config.partition(req.request_id)), TokenizedRequest(
            req.request_id, req.trace_id, req.gateway_id, req.sampling, req.deadline, ids, req.cache_salt))

    async def remembered(self, req: GenerateRequest) -> dict[int, list[int]]:
        """The ids the gateway remembered for this chat's assistant messages (shared/cache/reply_memory.py)."""
        keys = self.encoder.remembered_keys(req)
        if not keys:
            return {}
        found = {}
        for i, raw in zip(keys, await redis_client.mget(self.redis, list(keys.values()))):
            ids = msgpack.unpackb(raw) if raw is not None else None
            if isinstance(ids, list) and ids and all(type(t) is int and 0 <= t < self.encoder.vocab_size for t in ids):
                found[i] = ids
        self.reply_memory.labels(outcome="hit").inc(len(found))
        self.reply_memory.labels(outcome="miss").inc(len(keys) - len(found))
        return found

    async def detokenize(self, taken: list[tuple[str, object]]) -> None:
        """The text of every delta taken (a decode step sends one per running request): written in
        one round trip, then acked in one per stream, not two round trips a token."""
        writes, read = [], {}
        for stream, entry in taken:
            delta = entry.message
            final = delta.finish_reason is not None
            text = delta_text(self.token_bytes, delta.prefix_ids or [], delta.token_ids, delta.stop, final=final)
            finish = "stop" if text.stopped else delta.finish_reason
            writes.append((streams.delta_stream(delta.gateway_id), TokenDelta(
                delta.request_id, delta.trace_id, delta.gateway_id, delta.index, delta.token_ids,
                finish_reason=finish, text=text.text, num_prompt_tokens=delta.num_prompt_tokens,
                num_cached_tokens=delta.num_cached_tokens, prompt_ids=delta.prompt_ids, error=delta.error,
                status=delta.status)))
            if text.stopped and not final:
                writes.append((streams.ABORTS, Abort(delta.request_id, delta.trace_id, "stop string")))
            read.setdefault(stream, []).append(entry.entry_id)
        await self.bus.publish_many(writes)
        for stream, entry_ids in read.items():
            await self.done(stream, entry_ids)  # after what they produced is written

    def trimmed_streams(self) -> list[str]:
        return list(self.kinds())

    async def teardown(self) -> None:
        self.pool.shutdown(wait=False)
