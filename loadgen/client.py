"""One streamed request to an OpenAI-compatible server, timed from its SSE stream.

TTFT is the time to the first chunk that carries content or tokens, each later such chunk adds
one ITL (as `vllm bench serve`), and token counts come from the final `usage` chunk
(`stream_options.include_usage`). A non-200 answer is recorded by its status code (a 429 is
recorded, not retried); a `data: {"error": ...}` event inside the stream is recorded as `stream`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from .workloads import Request

READ_BUFSIZE = 1 << 22  # an SSE line may carry a long prompt's token ids: allow lines of several MiB


@dataclass
class Result:
    output_len: int  # requested max_tokens
    start_s: float  # when it was sent, seconds after the run started
    error: str | None = None  # an HTTP status ("429"), or "stream", "connection", "timeout", "cancelled"
    message: str = ""
    ttft_s: float | None = None
    e2el_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    token_times_s: list[tuple[float, int]] = field(default_factory=list)  # (since the run started, tokens)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # every streamed chunk's, in order (return_token_ids)

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft_s is not None

    @property
    def tpot_s(self) -> float | None:
        """(E2E − TTFT) / (output tokens − 1); None for a one-token reply."""
        if not self.ok or self.completion_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.completion_tokens - 1)


def base_url(url: str) -> str:
    """`http://host:port[/prefix]` from a URL that may name an endpoint (`.../v1/completions`)."""
    parts = urlsplit(url.rstrip("/"))
    path = parts.path.split("/v1")[0] if "/v1" in parts.path else parts.path
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def make_session(request_timeout_s: float | None) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=request_timeout_s), read_bufsize=READ_BUFSIZE,
                                 connector=aiohttp.TCPConnector(limit=0))


async def first_model(session: aiohttp.ClientSession, url: str, api_key: str | None) -> str:
    """The first model id GET /v1/models lists."""
    async with session.get(f"{url}/v1/models", headers=headers(api_key)) as r:
        body = await r.text()
        if r.status != 200:
            raise RuntimeError(f"GET {url}/v1/models answered {r.status}: {_error_message(body)}; "
                               f"pass --model (and --api-key if the server needs one)")
    models = json.loads(body).get("data") or []
    if not models:
        raise RuntimeError(f"GET {url}/v1/models lists no model; pass --model")
    return models[0]["id"]


class Client:
    def __init__(self, session: aiohttp.ClientSession, url: str, model: str, *, api_key: str | None = None,
                 temperature: float = 0.0, ignore_eos: bool = True, t0: float | None = None):
        self.session, self.url, self.model = session, url, model
        self.headers = headers(api_key)
        self.temperature, self.ignore_eos = temperature, ignore_eos
        self.t0 = time.perf_counter() if t0 is None else t0  # the run's start: Result times count from it

    def body(self, request: Request) -> tuple[str, dict]:
        body = {"model": self.model, "max_tokens": request.output_len, "temperature": self.temperature,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": self.ignore_eos,
                "return_token_ids": True}
        if request.conversation is not None:
            return f"{self.url}/v1/chat/completions", {**body, "messages": request.messages()}
        return f"{self.url}/v1/completions", {**body, "prompt": request.prompt}

    async def send(self, request: Request, result: Result) -> None:
        """Send `request` and fill `result` in place (so a cancelled request keeps what it measured)."""
        endpoint, body = self.body(request)
        sent = time.perf_counter()
        result.start_s = sent - self.t0
        try:
            async with self.session.post(endpoint, json=body, headers=self.headers) as r:
                if r.status != 200:
                    result.error, result.message = str(r.status), _error_message(await r.text())
                    result.e2el_s = time.perf_counter() - sent  # how fast the refusal came
                    return
                await self._read_stream(r, sent, result)
        except TimeoutError:
            result.error, result.message = "timeout", "no answer within --request-timeout"
        except (aiohttp.ClientError, OSError) as e:
            result.error, result.message = "connection", f"{type(e).__name__}: {e}"

    async def _read_stream(self, response: aiohttp.ClientResponse, sent: float, result: Result) -> None:
        last, counted, pieces = sent, 0, []
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            now = time.perf_counter()
            try:
                event = json.loads(data)
            except json.JSONDecodeError:
                result.error, result.message = "stream", f"an SSE event is not JSON: {data[:80]!r}"
                return
            if "error" in event:
                result.error, result.message = "stream", _error_message(json.dumps(event))
                return
            if event.get("usage"):
                _take_usage(event["usage"], result)
            n = _chunk_tokens(event, pieces, result.token_ids)
            if n:
                if result.ttft_s is None:
                    result.ttft_s = now - sent
                else:
                    result.itl_s.append(now - last)
                last, counted = now, counted + n
                result.token_times_s.append((now - self.t0, n))
        result.e2el_s = time.perf_counter() - sent
        result.text = "".join(pieces)
        if result.ttft_s is None:
            result.error, result.message = "stream", "the stream ended without a token"
        elif not result.completion_tokens:
            result.completion_tokens = counted  # no usage chunk: count what arrived


def _chunk_tokens(event: dict, pieces: list[str], ids: list[int]) -> int:
    """Tokens a chunk carries (its token_ids, else 1 when it has text); appends its text to pieces
    and its token ids to ids."""
    choices = event.get("choices") or []
    if not choices:
        return 0
    choice = choices[0]
    delta = choice.get("delta") or {}
    piece = choice.get("text") or delta.get("content") or delta.get("reasoning_content") or ""
    pieces.append(piece)
    token_ids = choice.get("token_ids")
    ids += token_ids or []
    return len(token_ids) if token_ids else (1 if piece else 0)


def _take_usage(usage: dict, result: Result) -> None:
    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    result.completion_tokens = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    result.cached_tokens = int(details.get("cached_tokens") or usage.get("prompt_cache_hit_tokens") or 0)


def _error_message(body: str) -> str:
    try:
        error = json.loads(body).get("error")
        return str(error.get("message") if isinstance(error, dict) else error)[:300]
    except (json.JSONDecodeError, AttributeError):
        return body[:300]
