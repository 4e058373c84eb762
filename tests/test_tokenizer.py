"""Tests for the committed byte-level BPE tokenizers and their HF packaging."""

from __future__ import annotations

import json

import pytest
from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoTokenizer

from shared.model.tokenizer_files import (
    ASSISTANT_ID,
    ASSISTANT_TOKEN,
    BOS_ID,
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_ID,
    EOS_TOKEN,
    PAD_ID,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    SYSTEM_ID,
    SYSTEM_TOKEN,
    USER_ID,
    USER_TOKEN,
    VOCAB_SIZES,
    tokenizer_json_path,
    write_tokenizer_files,
)

SAMPLES = {
    "code": (
        "class Foo:\n"
        "\tdef bar(self, x):\n"
        "        if x:\n"
        "\t\treturn {'a': [1, 2.5]}  # trailing comment   \n"
        "\n\n"
        "    pass\r\n"
    ),
    "english": "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?",
    "chinese": "深度学习模型需要大量数据。今天天气很好，我们去散步吧！",
    "emoji": "😀🚀 👨‍👩‍👧‍👦 👩‍💻 🏳️‍🌈 🇨🇳🇫🇷🇯🇵 👍🏽 ❤️",
    "accented": "Crème brûlée, Größe, mañana, Zażółć gęślą jaźń, Příliš žluťoučký, Ελληνικά",
    "rare": "\x00\x07\x7f \ufffd 𝔘𐍈 \U0010ffff",
    "space": " ",
    "spaces": "    ",
    "newline": "\n",
    "tabs": "\t\t",
    "mixed_whitespace": " \n\t \r\n  \u3000",
}

# A conversation with Chinese and emoji, and replies whose leading/trailing
# whitespace would merge with neighbouring text if turns were not separated.
CONVERSATION = [
    {"role": "system", "content": "You are concise. 回答要简洁。"},
    {"role": "user", "content": "你好！What is 2+2? 🤔"},
    {"role": "assistant", "content": " 4 ✅\n\n"},
    {"role": "user", "content": "Translate 'good morning' to Chinese 🇨🇳 "},
    {"role": "assistant", "content": "早上好 🌅"},
    {"role": "user", "content": "\tAnd in French? 🇫🇷"},
    {"role": "assistant", "content": "Bonjour ! ☀️ "},
]

EXPECTED_RENDERING = (
    f"{BOS_TOKEN}{SYSTEM_TOKEN}You are concise. 回答要简洁。"
    f"{USER_TOKEN}你好！What is 2+2? 🤔{ASSISTANT_TOKEN} 4 ✅\n\n{EOS_TOKEN}"
    f"{USER_TOKEN}Translate 'good morning' to Chinese 🇨🇳 {ASSISTANT_TOKEN}早上好 🌅{EOS_TOKEN}"
    f"{USER_TOKEN}\tAnd in French? 🇫🇷{ASSISTANT_TOKEN}Bonjour ! ☀️ {EOS_TOKEN}"
)


@pytest.fixture(scope="module", params=VOCAB_SIZES, ids=lambda n: f"vocab{n}")
def vocab_size(request) -> int:
    return request.param


@pytest.fixture(scope="module")
def raw(vocab_size) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_json_path(vocab_size)))


@pytest.fixture(scope="module")
def hf_dir(vocab_size, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"tok{vocab_size}")
    write_tokenizer_files(directory, vocab_size, model_max_length=4096)
    return directory


@pytest.fixture(scope="module")
def hf(hf_dir):
    return AutoTokenizer.from_pretrained(hf_dir)


def render(hf, messages, add_generation_prompt=False) -> list[int]:
    return hf.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )


def test_vocab_size_is_exact(raw, vocab_size):
    assert raw.get_vocab_size() == vocab_size
    assert raw.get_vocab_size(with_added_tokens=False) == vocab_size


def test_special_token_ids(raw):
    assert [raw.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    added = raw.get_added_tokens_decoder()
    assert sorted(added) == [0, 1, 2, 3, 4, 5]
    for token_id, token in added.items():
        assert token.content == SPECIAL_TOKENS[token_id]
        assert token.special
        assert not (token.lstrip or token.rstrip or token.normalized or token.single_word)


def test_byte_alphabet_complete(raw):
    vocab = raw.get_vocab()
    assert all(symbol in vocab for symbol in pre_tokenizers.ByteLevel.alphabet())
    assert len(pre_tokenizers.ByteLevel.alphabet()) == 256


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip(raw, name):
    text = SAMPLES[name]
    ids = raw.encode(text, add_special_tokens=False).ids
    assert ids
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)
    assert raw.decode(ids) == text


def test_empty_string(raw):
    assert raw.encode("", add_special_tokens=False).ids == []
    assert raw.encode("").ids == [BOS_ID]
    assert raw.decode([]) == ""


def test_encode_adds_bos_only(raw):
    plain = raw.encode("hi", add_special_tokens=False).ids
    assert raw.encode("hi").ids == [BOS_ID] + plain
    assert BOS_ID not in plain and EOS_ID not in plain
    pair = raw.encode("hi", "there")
    assert pair.ids == [BOS_ID] + plain + [BOS_ID] + raw.encode("there", add_special_tokens=False).ids
    assert pair.type_ids == [0] * (1 + len(plain)) + [1] * (len(pair.ids) - 1 - len(plain))


def test_tokenizer_config(hf_dir):
    config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
    }


def test_transformers_special_ids(hf, vocab_size):
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert len(hf) == vocab_size
    assert hf.model_max_length == 4096
    assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("name", sorted(SAMPLES) + ["empty"])
def test_transformers_matches_tokenizers(hf, raw, name):
    text = SAMPLES.get(name, "")
    plain = raw.encode(text, add_special_tokens=False).ids
    assert hf.encode(text, add_special_tokens=False) == plain
    assert hf.encode(text) == [BOS_ID] + plain
    assert hf(text)["input_ids"] == raw.encode(text).ids
    assert hf.decode(plain) == text
    assert hf.decode([BOS_ID] + plain, skip_special_tokens=True) == text


def test_chat_template_renders_expected_string(hf):
    assert hf.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_RENDERING
    prompt = hf.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        f"{BOS_TOKEN}{SYSTEM_TOKEN}You are concise. 回答要简洁。"
        f"{USER_TOKEN}你好！What is 2+2? 🤔{ASSISTANT_TOKEN}"
    )
    no_system = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(no_system, tokenize=False) == f"{BOS_TOKEN}{USER_TOKEN}hi"


def test_chat_template_tokenized(hf, raw):
    ids = render(hf, CONVERSATION)
    # Exactly one BOS: the template supplies it, so tokenizing must not add another.
    assert ids == raw.encode(EXPECTED_RENDERING, add_special_tokens=False).ids
    assert ids[:2] == [BOS_ID, SYSTEM_ID] and ids.count(BOS_ID) == 1
    assert ids.count(USER_ID) == ids.count(ASSISTANT_ID) == ids.count(EOS_ID) == 3
    assert ids[-1] == EOS_ID
    assert hf.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"] == ids
    assert hf.decode(ids) == EXPECTED_RENDERING


def test_turns_extend_token_ids(hf, raw):
    for n in range(1, len(CONVERSATION)):
        message = CONVERSATION[n]
        before = render(hf, CONVERSATION[:n])
        after = render(hf, CONVERSATION[: n + 1])
        assert after[: len(before)] == before
        if message["role"] == "assistant":
            prompt = render(hf, CONVERSATION[:n], add_generation_prompt=True)
            reply = raw.encode(message["content"], add_special_tokens=False).ids
            assert after == prompt + reply + [EOS_ID]


def test_unknown_role_raises(hf):
    with pytest.raises(TemplateError, match="Unsupported chat role: tool"):
        hf.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)


def test_unknown_vocab_size_raises():
    with pytest.raises(ValueError, match="1000"):
        tokenizer_json_path(1000)
