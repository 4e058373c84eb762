"""Fuzzing the live gateway's HTTP API (hypothesis, derandomized: the same examples every run).

Generated request bodies (valid-ish JSON with wrong types, ranges, unknown fields, huge numbers,
lone surrogates and nested junk; raw bytes under any content type) and odd methods and paths go to
the real gateway of the `system` fixture. Whatever comes in: never a 500, every 4xx in OpenAI's
error shape, and the gateway still serves a good request afterwards.
"""
from __future__ import annotations

import http.client
import json
import urllib.parse

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

VOCAB = 1024  # the tiny preset's
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ROUTES = ("/v1/completions", "/v1/chat/completions")


class Raw(str):
    """A JSON token written as is (a number json.dumps would refuse or round)."""


def to_json(value) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return json.dumps(value)  # NaN and Infinity as Python's json writes (and reads) them


surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
texts = st.text(max_size=12) | surrogates | st.sampled_from(["", " ", "🌍", "\x00", "<|im_end|>", "é" * 40])
huge = st.sampled_from(["1" * 5000, "1" + "0" * 400, "-" + "9" * 30, "1e400", "-1e400", "1e-400", "-0",
                        "18446744073709551616", "9223372036854775808", "0.0000001"]).map(Raw)
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70) | huge
           | st.floats(allow_nan=True, allow_infinity=True) | texts)
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(texts, inner, max_size=3), max_leaves=6)
# nested lists: just under Python's recursion limit, and far past it
deep = st.sampled_from([500, 990, 10_000, 30_000]).map(lambda n: Raw("[" * n + "]" * n))


# NOTE: every generated body that is valid really generates: its length fields stay at 1..4
# tokens, and their junk never holds a usable count nor null (a null max_tokens means the default).
lengths = st.integers(1, 4)
bad_lengths = st.one_of(st.integers(max_value=0), st.integers(min_value=4097), st.floats(allow_nan=True), texts,
                        st.booleans(), huge, deep, st.lists(lengths, max_size=2), st.dictionaries(texts, lengths))
token_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)
parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}), min_size=1, max_size=2)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": st.text(max_size=20) | parts}), min_size=1, max_size=3)
sampling = {"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50),
            "seed": st.integers(-2**63, 2**63 - 1), "stop": st.text(min_size=1, max_size=4)
            | st.lists(st.text(min_size=1, max_size=4), max_size=4), "stream": st.booleans(),
            "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
            "n": st.just(1), "ignore_eos": st.booleans(), "return_token_ids": st.booleans(),
            "cache_salt": st.text(max_size=8), "user": st.text(max_size=8)}
REQUIRED = {"/v1/completions": "prompt", "/v1/chat/completions": "messages"}
numbers = st.integers() | st.integers(-2**70, 2**70) | huge | st.floats(allow_nan=True, allow_infinity=True)
JUNK = {"max_tokens": bad_lengths, "max_completion_tokens": bad_lengths, "model": texts | junk,
        **{key: numbers | junk for key in ("temperature", "top_p", "top_k", "seed", "n")}}
# Inputs that once got a 500 (or a crash) from the gateway, kept as explicit examples
FOUND = [("/v1/completions", {"model": Raw("[" * 20_000 + "]" * 20_000)}),  # RecursionError in json.loads
         ("/v1/completions", {"prompt": "x", "seed": Raw("1" * 5000)}),  # int past 4300 digits: ValueError
         ("/v1/completions", {"prompt": "x", "temperature": Raw("1" + "0" * 400)}),  # float(): OverflowError
         ("/v1/completions", {"prompt": "x", "seed": 2**70}),  # msgpack: int too big
         ("/v1/completions", {"prompt": "x", "top_k": 2**70}),
         ("/v1/completions", {"prompt": [2**70]}),
         ("/v1/completions", {"prompt": "a\ud800"}),  # a lone surrogate: msgpack cannot encode it
         ("/v1/completions", {"prompt": "x", "stop": ["\udfff"]}),
         ("/v1/completions", {"prompt": "x", "cache_salt": "\ud800"}),
         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}),
         ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}),
         ("/v1/completions", {"prompt": "x", "temperature": float("nan")})]  # reached the engine unchecked


@st.composite
def bodies(draw, model: str):
    """A valid body, then up to three of its fields (or of its message's) made junk or dropped."""
    path = draw(st.sampled_from(ROUTES))
    chat = path == "/v1/chat/completions"
    prompt = st.text(min_size=1, max_size=40) | token_ids
    required = {"model": st.just(model), "max_tokens": lengths, REQUIRED[path]: messages if chat else prompt}
    optional = {**sampling, "max_completion_tokens": lengths} if chat else sampling
    body = draw(st.fixed_dictionaries(required, optional=optional))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from([*required, *optional, "messages[0]", "unknown", "drop"]))
        if key == "drop":  # not max_tokens: a chat without one generates its default of 256 tokens
            body.pop(draw(st.sampled_from(["model", REQUIRED[path]])), None)
        elif key == "messages[0]" and chat and isinstance(body.get("messages"), list) and body["messages"] \
                and isinstance(body["messages"][0], dict):
            field = draw(st.sampled_from(["role", "content", "name"]))
            body["messages"][0] = {**body["messages"][0], field: draw(junk)}
        else:
            body[key] = draw(JUNK.get(key, junk | deep))
    return path, body


def example_each(cases):
    """hypothesis's @example, once for each case."""
    def apply(test):
        for case in cases:
            test = example(case=case)(test)
        return test
    return apply


def request(gateway, method: str, path: str, body: bytes | None, headers: dict[str, str]):
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def check(status: int, content_type: str, raw: bytes, method: str = "POST") -> None:
    """What every answer must be, whatever was asked."""
    assert status < 500 or status in (503, 504), (status, raw[:500])
    if 400 <= status < 500 and method != "HEAD":
        assert content_type.startswith("application/json"), (status, content_type, raw[:200])
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["type"] == "invalid_request_error" and isinstance(error["message"], str) and error["message"]
        assert error["param"] is None or isinstance(error["param"], str), error
        assert error["code"] is None or isinstance(error["code"], str), error
    elif status == 200 and content_type.startswith("text/event-stream"):
        assert raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw, raw[-300:]
    elif status == 200 and method == "POST":
        assert json.loads(raw)["choices"][0]["finish_reason"] in ("stop", "length"), raw[:300]


@pytest.fixture(scope="module")
def gateway(system):
    return system[5]


@pytest.fixture(scope="module")
def model(tiny_fp32) -> str:
    return tiny_fp32.resolve().name


@pytest.fixture(scope="module")
def answers():
    """Every status the fuzzer saw, by test: a fuzzer that only ever hits one branch proves little."""
    return {}


def test_generated_bodies(gateway, model, answers):
    seen = answers.setdefault("bodies", {})

    @settings(FUZZ, max_examples=300)
    @given(case=bodies(model))
    # a model it does not serve (404), always: whether the generated junk hits one varies
    @example_each([(path, {"model": model, "max_tokens": 2, **body}) for path, body in FOUND]
                  + [("/v1/completions", {"model": model + "-not-served", "max_tokens": 2, "prompt": "x"})])
    def one(case):
        path, body = case
        status, content_type, raw = request(gateway, "POST", path, to_json(body).encode(),
                                            {"Content-Type": "application/json"})
        check(status, content_type, raw)
        seen[status] = seen.get(status, 0) + 1
        if status == 400:
            param = json.loads(raw)["error"]["param"]
            root = None if param is None else param.split("[")[0].split(".")[0]
            assert root is None or root in body or root in ("model", REQUIRED[path]), (param, body)

    one()
    # both the refusals and real generations were exercised
    assert seen.get(200, 0) >= 20 and seen.get(400, 0) >= 100 and seen.get(404, 0) >= 1, seen


def test_raw_bytes_and_content_types(gateway, answers):
    seen = answers.setdefault("raw", {})
    content_types = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "multipart/form-data; boundary=x", "application/json; charset=utf-16",
                                     "application/msgpack", ""])
    payloads = (st.binary(max_size=300) | st.sampled_from([
        b"", b"null", b"[]", b"{", b'{"model": }', b"\xff\xfe{\x00}\x00", b'{"a": NaN}', b"\xef\xbb\xbf{}",
        b'"\\ud800"', b"1" * 5000, b'{"model": "x", "prompt": "' + b"\xc3\x28" + b'"}', b"[" * 100_000])
        | st.text(max_size=200).map(lambda t: t.encode("utf-16")))

    @settings(FUZZ, max_examples=120)
    @given(path=st.sampled_from(ROUTES), body=payloads, content_type=content_types)
    def one(path, body, content_type):
        headers = {"Content-Type": content_type} if content_type else {}
        status, got_type, raw = request(gateway, "POST", path, body, headers)
        check(status, got_type, raw)
        seen[status] = seen.get(status, 0) + 1

    one()
    assert seen.get(400, 0) >= 50, seen


def test_odd_methods_and_paths(gateway, answers):
    seen = answers.setdefault("paths", {})
    paths = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/", "/v1", "/",
                             "/v1/embeddings", "/v2/completions", "/v1/completions/", "/v1/models/x",
                             "/v1/../health", "/%2e%2e/metrics", "/services"]) \
        | st.text(max_size=20).map(lambda t: "/v1/" + urllib.parse.quote(t, safe=""))
    methods = st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND", "POST",
                               "FOO"])

    @settings(FUZZ, max_examples=150)
    @given(method=methods, path=paths, body=st.none() | st.binary(max_size=40))
    def one(method, path, body):
        status, content_type, raw = request(gateway, method, path, body, {})
        if method == "FOO":  # not HTTP: aiohttp's parser refuses it before any route, as a plain 400
            assert status == 400, (status, raw)
        else:
            check(status, content_type, raw, method)
        seen[status] = seen.get(status, 0) + 1

    one()
    assert seen.get(404, 0) >= 10 and seen.get(405, 0) >= 10, seen


def test_the_gateway_survived(gateway, model):
    """Last in the file: after all of the above the same process serves a good request and never
    logged an unhandled exception."""
    assert gateway.proc.poll() is None, gateway.log_tail()
    body = {"model": model, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    status, _, raw = request(gateway, "POST", "/v1/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 3, raw
    with open(gateway.log.name) as f:
        log = f.read()
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]
