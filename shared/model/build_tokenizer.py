"""Train the project's byte-level BPE tokenizers and write them as data files.

Run once with ``python -m shared.model.build_tokenizer``; the outputs
``shared/model/data/tokenizer-{1024,8192}.json`` are committed, so every
machine uses byte-identical tokenizers and nobody needs to rerun this.

The corpus is the Python standard library's own source (a fixed, sorted list
of modules) plus the multilingual text below, so training needs no download.
Training is deterministic for a given corpus; a different Python version
ships different stdlib source and would produce different merges, which is
why the files, not this script, are the source of truth.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from shared.model.tokenizer_files import BOS_ID, BOS_TOKEN, DATA_DIR, SPECIAL_TOKENS, VOCAB_SIZES

# Standard-library files present (with these paths) in CPython 3.11 to 3.13.
# Sorted so the corpus order never depends on how the list is edited.
STDLIB_FILES: tuple[str, ...] = tuple(
    sorted(
        (
            "_pydecimal.py", "argparse.py", "ast.py", "asyncio/base_events.py",
            "base64.py", "bisect.py", "calendar.py", "collections/__init__.py",
            "configparser.py", "contextlib.py", "copy.py", "csv.py",
            "dataclasses.py", "difflib.py", "dis.py", "doctest.py",
            "email/message.py", "enum.py", "fractions.py", "functools.py",
            "gettext.py", "heapq.py", "http/client.py", "inspect.py",
            "ipaddress.py", "json/decoder.py", "json/encoder.py", "locale.py",
            "logging/__init__.py", "optparse.py", "os.py", "pickle.py",
            "pprint.py", "pydoc.py", "random.py", "shlex.py", "shutil.py",
            "socket.py", "ssl.py", "statistics.py", "string.py",
            "subprocess.py", "tarfile.py", "textwrap.py", "threading.py",
            "tokenize.py", "traceback.py", "typing.py", "unittest/case.py",
            "urllib/parse.py", "uuid.py",
        )
    )
)

# The stdlib is almost pure ASCII. This text gives Chinese, emoji and
# accented Latin some merges so they do not always cost one token per byte.
MULTILINGUAL_TEXT = """\
深度学习是机器学习的一个分支，它使用多层神经网络从数据中学习表示。
大型语言模型通过预测下一个词来训练，然后可以回答问题、编写代码、翻译文本。
混合专家模型把每一层的前馈网络分成许多专家，每个词只激活其中少数几个专家，
因此模型的参数很多，但每次计算的成本却不高。
我们的系统在多个图形处理器上运行推理，并把专家分布在不同的设备上。
今天天气很好，我们一起去公园散步吧。你好，世界！谢谢你的帮助。
中文、日本語、한국어都是使用广泛的语言。请问这个问题应该怎么解决？
这是一个测试句子，用来检查分词器能否正确处理中文字符和标点符号。

Emoji: 😀 😃 😄 😁 😆 😅 😂 🤣 😊 😇 🙂 🙃 😉 😍 🥰 😘 🤔 🤖 🚀 🔥 ✨ 🎉 👍 👋 ❤️ 💡 ✅ ❌ ⚠️
Families and flags: 👨‍👩‍👧‍👦 👩‍💻 🧑‍🔬 👍🏽 🏳️‍🌈 🇨🇳 🇫🇷 🇩🇪 🇪🇸 🇯🇵 🇺🇸 🇬🇧 🇧🇷

Français : Le garçon a mangé une crème brûlée à la pâtisserie près de l'hôtel.
Où est la bibliothèque ? C'était déjà très intéressant, n'est-ce pas ?
Deutsch: Die Größe des Modells überrascht viele; schöne Grüße aus München.
Fünf Bären gehen über die Straße, während ein Mädchen Äpfel isst.
Español: El niño comió piñata en la montaña; ¿Dónde está la estación? ¡Olé!
Português: A educação e a atenção são importantes; não há razão para pressa.
Polski: Zażółć gęślą jaźń. Łódź jest dużym miastem w środkowej Polsce.
Čeština: Příliš žluťoučký kůň úpěl ďábelské ódy.
Svenska och norsk: Blåbärssylt, smörgås och ærlig østers på fjorden.
Ελληνικά: Καλημέρα κόσμε, η γλώσσα είναι όμορφη.
Русский: Съешь же ещё этих мягких французских булок, да выпей чаю.
"""

# How often the multilingual text is repeated: its pairs need counts
# comparable to frequent code pairs to win merges at these small vocab sizes
# (at 1024 this still buys only a handful of CJK/punctuation merges).
MULTILINGUAL_REPEATS = 40


def corpus() -> Iterator[str]:
    """Yield the training text, one document at a time, in a fixed order."""
    stdlib = sysconfig.get_paths()["stdlib"]
    for relative in STDLIB_FILES:
        with open(os.path.join(stdlib, relative), encoding="utf-8") as f:
            yield f.read()
    for _ in range(MULTILINGUAL_REPEATS):
        yield MULTILINGUAL_TEXT


def train(vocab_size: int) -> Tokenizer:
    """Train one tokenizer whose total vocabulary is exactly ``vocab_size``."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        # The trainer puts special tokens first, in this order, so they get
        # ids 0..5; they count toward vocab_size.
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        # All 256 byte symbols, seen in the corpus or not, so any UTF-8
        # string is encodable without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # The repeated multilingual text would otherwise become whole-sentence
        # tokens, and comment rulers 80-character tokens; 16 byte symbols is
        # still room for any indentation run a model cares about.
        max_token_length=16,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    # Same template transformers builds from add_bos_token=True, so the
    # tokenizers and transformers encodings agree, type ids included.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    check(tokenizer, vocab_size)
    return tokenizer


def check(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Fail loudly rather than commit a tokenizer that breaks the contract."""
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"vocab size {tokenizer.get_vocab_size()} != {vocab_size}")
    vocab = tokenizer.get_vocab()
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if vocab.get(token) != token_id:
            raise RuntimeError(f"special token {token!r} has id {vocab.get(token)}, not {token_id}")
    missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
    if missing:
        raise RuntimeError(f"byte alphabet symbols missing from vocab: {missing!r}")
    sample = "def f(x):\n\treturn x  # 你好 👩‍💻 café\n"
    ids = tokenizer.encode(sample, add_special_tokens=False).ids
    if tokenizer.decode(ids) != sample:
        raise RuntimeError("round trip failed")


def main() -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for vocab_size in VOCAB_SIZES:
        path = DATA_DIR / f"tokenizer-{vocab_size}.json"
        # Compact JSON keeps the committed files small.
        train(vocab_size).save(str(path), pretty=False)
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
