"""OpenAI-compatible request parsing and response shapes (pure: no I/O).

Bad input raises `ApiError` naming the field path (`param`) and the value; the app turns it into
OpenAI's error shape with the right status code. Never a 500 for bad input.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from shared.messages import Sampling


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


def _number(body: dict, key: str, kind: type, default: Any, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"{key}={value!r}: must be {'an integer' if kind is int else 'a number'}", key)
    if low is not None and (value <= low if low_open else value < low):
        raise ApiError(400, f"{key}={value!r}: must be {'>' if low_open else '>='} {low}", key)
    if high is not None and value > high:
        raise ApiError(400, f"{key}={value!r}: must be <= {high}", key)
    return kind(value)


def parse(body: Any, chat: bool, defaults: dict, max_tokens_limit: int) -> ParsedRequest:
    """A decoded JSON body -> ParsedRequest. `defaults` come from generation_config.json."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"model={model!r}: a model name is required", "model")
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, f"n={n!r}: only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens")
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", int, 16 if not chat else max_tokens_limit, 1,
                         max_tokens_limit)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
                             or len(stop) > 4):
        raise ApiError(400, f"stop={stop!r}: a string or a list of up to 4 non-empty strings", "stop")
    top_k = _number(body, "top_k", int, defaults.get("top_k", 0), -1)
    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", float, defaults.get("temperature", 1.0), 0, 2),
        top_p=_number(body, "top_p", float, defaults.get("top_p", 1.0), 0, 1, low_open=True),
        top_k=0 if top_k == -1 else top_k,
        seed=_number(body, "seed", int, None),
        stop=stop,
        ignore_eos=_flag(body, "ignore_eos"),
    )
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise ApiError(400, f"cache_salt={salt!r}: must be a string", "cache_salt")
    parsed = ParsedRequest(chat, model, sampling, stream, bool(options.get("include_usage")),
                           _flag(body, "return_token_ids"), cache_salt=salt)
    if chat:
        parsed.messages = _messages(body.get("messages"))
    else:
        _prompt(body.get("prompt"), parsed)
    return parsed


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{key}={value!r}: must be true or false", key)
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
            raise ApiError(400, f"messages[{i}].role={role!r}: must be system, user or assistant",
                           f"messages[{i}].role")
        if isinstance(content, list):  # OpenAI's content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content: must be a string", f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


def _prompt(prompt: Any, parsed: ParsedRequest) -> None:
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt: must not be empty", "prompt")
        parsed.prompt_text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        parsed.prompt_ids = prompt
    elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        _prompt(prompt[0], parsed)  # a batch of one
    else:
        raise ApiError(400, f"prompt={json.dumps(prompt)[:80]}: a string or a list of token ids is required",
                       "prompt")


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
            "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": prompt_tokens - cached}


def now() -> int:
    return int(time.time())
