"""The project's committed byte-level BPE tokenizers and their HF packaging.

Two tokenizers are committed as data files, one per model preset vocab size
(see ``shared/model/build_tokenizer.py`` for how they were trained). This
module names their special tokens, locates the files, and writes a directory
that ``transformers.AutoTokenizer.from_pretrained`` can load, including a
DeepSeek-style chat template.

Nothing is read or computed at import time.
"""

from __future__ import annotations

import json
import pathlib
import shutil

# DeepSeek's spelling: fullwidth vertical bar U+FF5C and "▁" U+2581.
PAD_TOKEN = "<\uff5cpad\uff5c>"
BOS_TOKEN = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
EOS_TOKEN = "<\uff5cend\u2581of\u2581sentence\uff5c>"
USER_TOKEN = "<\uff5cUser\uff5c>"
ASSISTANT_TOKEN = "<\uff5cAssistant\uff5c>"
SYSTEM_TOKEN = "<\uff5cSystem\uff5c>"

# Order is significant: a token's position is its id in every vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
    SYSTEM_TOKEN,
)
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
USER_ID = 3
ASSISTANT_ID = 4
SYSTEM_ID = 5

# Vocab sizes for which a tokenizer file is committed.
VOCAB_SIZES: tuple[int, ...] = (1024, 8192)

DATA_DIR = pathlib.Path(__file__).parent / "data"

# Every turn starts with a special token and assistant turns end with EOS.
# Special tokens are split out before BPE runs, so no merge can span a turn
# boundary: the ids of a conversation with one more turn are always the ids
# of the shorter conversation followed by the ids of the new turn. That is
# what lets a server keep the KV cache of earlier turns.
# The template has no whitespace between tags on purpose: any literal
# newline or space here would become part of the prompt.
CHAT_TEMPLATE: str = "".join(
    (
        "{{ bos_token }}",
        "{% for message in messages %}",
        "{% if message['role'] == 'system' %}",
        SYSTEM_TOKEN,
        "{{ message['content'] }}",
        "{% elif message['role'] == 'user' %}",
        USER_TOKEN,
        "{{ message['content'] }}",
        "{% elif message['role'] == 'assistant' %}",
        ASSISTANT_TOKEN,
        "{{ message['content'] }}",
        EOS_TOKEN,
        "{% else %}",
        "{{ raise_exception('Unsupported chat role: ' + message['role']",
        " + ' (expected system, user or assistant)') }}",
        "{% endif %}",
        "{% endfor %}",
        "{% if add_generation_prompt %}",
        ASSISTANT_TOKEN,
        "{% endif %}",
    )
)


def tokenizer_json_path(vocab_size: int) -> pathlib.Path:
    """Return the committed ``tokenizer.json`` for ``vocab_size``.

    Raises ValueError when no tokenizer was built for that size.
    """
    path = DATA_DIR / f"tokenizer-{vocab_size}.json"
    if vocab_size not in VOCAB_SIZES or not path.is_file():
        raise ValueError(
            f"no tokenizer file for vocab_size={vocab_size}; "
            f"available sizes: {', '.join(map(str, VOCAB_SIZES))}"
        )
    return path


def write_tokenizer_files(directory, vocab_size: int, model_max_length: int) -> None:
    """Write an HF tokenizer directory (tokenizer.json + tokenizer_config.json).

    The result loads with ``transformers.AutoTokenizer.from_pretrained``.
    ``directory`` is created if needed; existing files are overwritten.
    """
    source = tokenizer_json_path(vocab_size)
    target = pathlib.Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        # transformers rebuilds the post-processor from these two flags; the
        # committed tokenizer.json already has the identical template, so
        # both libraries encode the same way.
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": model_max_length,
        # The byte-level decoder already reproduces the text exactly; the
        # legacy clean-up would delete spaces before punctuation.
        "clean_up_tokenization_spaces": False,
        "legacy": False,
    }
    with open(target / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
        f.write("\n")
