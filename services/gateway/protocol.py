"""OpenAI-compatible request parsing and response shapes (pure: no I/O).

Bad input raises `ApiError` naming the field path (`param`) and the value; the app turns it into
OpenAI's error shape with the right status code. Never a 500 for bad input.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from shared.protocol.messages import Sampling


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if 400 <= self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    chat: bool
    model: str
    sampling: Sampling
    stream: bool
    include_usage: bool
    return_token_ids: bool
    prompt_text: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    cache_salt: str | None = None


INT64 = (-(1 << 63), (1 << 63) - 1)  # what msgpack and torch take: a larger seed is refused here, not later
MAX_TOKEN_ID = (1 << 31) - 1  # no vocabulary is larger; the tokenizer checks the model's own


def _show(value: Any, limit: int = 80) -> str:
    """A value for an error message: its repr, cut (a huge one is not echoed back whole)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _number(body: dict, key: str, kind: type, default: Any, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"{key}={_show(value)}: must be {'an integer' if kind is int else 'a number'}", key)
    if isinstance(value, float) and not math.isfinite(value):  # a literal past float's range (1e400)
        raise ApiError(400, f"{key}={_show(value)}: must be a finite number", key)
    if low is not None and (value <= low if low_open else value < low):
        raise ApiError(400, f"{key}={_show(value)}: must be {'>' if low_open else '>='} {low}", key)
    if high is not None and value > high:
        raise ApiError(400, f"{key}={_show(value)}: must be <= {high}", key)
    return kind(value)


def _text(value: str, param: str) -> str:
    """A string that is valid Unicode: JSON's \\ud800 escapes can smuggle in a lone surrogate,
    which no UTF-8 encoder (msgpack's included) takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{param}: an unpaired surrogate {value[e.start]!r} at character {e.start} is not "
                            "text; send valid UTF-8", param) from None
    return value


def decode_body(raw: bytes) -> Any:
    """The body, decoded as strict JSON (no NaN or Infinity), or a 400 that says why."""
    try:
        return json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise ApiError(400, "the body nests too deeply to decode; flatten it") from None
    except ValueError as e:  # bad JSON or UTF-8, NaN, an integer past Python's 4300 digits
        why = "a number has too many digits" if "integer string conversion" in str(e) else str(e)
        raise ApiError(400, f"the body is not valid JSON: {why}") from None


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON value")


def parse(body: Any, chat: bool, defaults: dict, max_tokens_limit: int, default_max_tokens: int) -> ParsedRequest:
    """A decoded JSON body -> ParsedRequest. `defaults` come from generation_config.json;
    `default_max_tokens` is the length of a request that sets none (or sets null)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"model={_show(model)}: a model name is required", "model")
    n = _number(body, "n", int, 1)
    if n != 1:
        raise ApiError(400, f"n={n!r}: only n=1 is supported", "n")
    length_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, length_key, int, default_max_tokens, 1, max_tokens_limit)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
                             or len(stop) > 4):
        raise ApiError(400, f"stop={_show(stop)}: a string or a list of up to 4 non-empty strings", "stop")
    for i, s in enumerate(stop or []):
        _text(s, f"stop[{i}]")
    top_k = _number(body, "top_k", int, defaults.get("top_k", 0), -1, MAX_TOKEN_ID)
    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", float, defaults.get("temperature", 1.0), 0, 2),
        top_p=_number(body, "top_p", float, defaults.get("top_p", 1.0), 0, 1, low_open=True),
        top_k=0 if top_k == -1 else top_k,
        seed=_number(body, "seed", int, None, *INT64),
        stop=stop,
        ignore_eos=_flag(body, "ignore_eos"),
    )
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options={_show(options)}: must be an object", "stream_options")
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise ApiError(400, f"cache_salt={_show(salt)}: must be a string", "cache_salt")
    parsed = ParsedRequest(chat, model, sampling, stream, _flag(options, "include_usage", "stream_options."),
                           _flag(body, "return_token_ids"),
                           cache_salt=None if salt is None else _text(salt, "cache_salt"))
    if chat:
        parsed.messages = _messages(body.get("messages"))
    else:
        _prompt(body.get("prompt"), parsed)
    return parsed


def _flag(body: dict, key: str, path: str = "") -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{path}{key}={_show(value)}: must be true or false", path + key)
    return value


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: a non-empty list is required", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}]: must be an object", f"messages[{i}]")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role={_show(role)}: must be system, user or assistant",
                           f"messages[{i}].role")
        if isinstance(content, list):  # OpenAI's content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content: must be a string", f"messages[{i}].content")
        out.append({"role": role, "content": _text(content, f"messages[{i}].content")})
    return out


def _prompt(prompt: Any, parsed: ParsedRequest, batch: bool = True) -> None:
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt: must not be empty", "prompt")
        parsed.prompt_text = _text(prompt, "prompt")
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        for i, t in enumerate(prompt):
            if not 0 <= t <= MAX_TOKEN_ID:
                raise ApiError(400, f"prompt[{i}]={_show(t)}: a token id is in [0, {MAX_TOKEN_ID}]", f"prompt[{i}]")
        parsed.prompt_ids = prompt
    elif batch and isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        _prompt(prompt[0], parsed, batch=False)  # a batch of one
    else:
        raise ApiError(400, f"prompt={_show(prompt)}: a string or a list of token ids is required", "prompt")


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
            "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": prompt_tokens - cached}


def now() -> int:
    return int(time.time())
