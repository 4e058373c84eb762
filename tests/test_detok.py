"""Stateless incremental detokenization against decoding the whole sequence at once."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from shared.model.detok import TokenBytes, delta_text, prefix_window
from shared.model.tokenizer_files import EOS_ID, tokenizer_json_path

TEXTS = [
    "def fib(n):\n\treturn n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！这是一个测试。深度求索的模型。",
    "emoji 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, skin 👍🏽; done",
    "naïve café – «quoted» — Ελληνικά ✓",
]


@pytest.fixture(scope="module", params=[1024, 8192])
def tok(request):
    tokenizer = Tokenizer.from_file(str(tokenizer_json_path(request.param)))
    return tokenizer, TokenBytes(tokenizer)


def stream(token_bytes, ids, stop=None, seed=0, window=None):
    """Split ids into random deltas; detokenize each from its own prefix window only."""
    rng = random.Random(seed)
    window = window or prefix_window(stop)
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        final = i + n >= len(ids)
        d = delta_text(token_bytes, ids[max(0, i - window):i], ids[i:i + n], stop, final=final)
        out.append(d.text)
        i += n
        if d.stopped:
            return "".join(out), True, i
    return "".join(out), False, i


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("seed", range(3))
def test_concatenated_deltas_equal_whole_decode(tok, text, seed):
    tokenizer, token_bytes = tok
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    got, stopped, _ = stream(token_bytes, ids, seed=seed)
    assert got == text == tokenizer.decode(ids) and not stopped


def test_split_character_is_never_emitted_in_halves(tok):
    tokenizer, token_bytes = tok
    ids = tokenizer.encode("🙂x", add_special_tokens=False).ids
    pieces = [delta_text(token_bytes, ids[:i], [ids[i]]).text for i in range(len(ids))]
    assert "".join(pieces) == "🙂x" and all("\ufffd" not in p for p in pieces)


def test_special_tokens_are_skipped(tok):
    tokenizer, token_bytes = tok
    ids = tokenizer.encode("hi", add_special_tokens=False).ids + [EOS_ID]
    assert delta_text(token_bytes, ids[:-1], ids[-1:]).text == ""


@pytest.mark.parametrize("stop", [["lazy"], ["o"], ["世界"], ["xyz-never"], ["fox j", "brown"], ["\n\t"]])
@pytest.mark.parametrize("text", TEXTS[:3])
def test_stop_strings_across_delta_boundaries(tok, text, stop):
    tokenizer, token_bytes = tok
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    hits = [text.find(s) for s in stop if s in text]
    expected = text[:min(hits)] if hits else text
    for seed in range(3):
        got, stopped, _ = stream(token_bytes, ids, stop=stop, seed=seed)
        assert got == expected and stopped == bool(hits), (seed, got)


def test_holdback_flushes_at_the_end(tok):
    """Text that looked like the start of a stop string is emitted once the stream ends."""
    tokenizer, token_bytes = tok
    ids = tokenizer.encode("say fo", add_special_tokens=False).ids
    got, stopped, _ = stream(token_bytes, ids, stop=["foo"])
    assert got == "say fo" and not stopped


def test_prefix_window_covers_the_longest_stop():
    assert prefix_window(None) == 4
    assert prefix_window(["ab", "hello"]) == 24
