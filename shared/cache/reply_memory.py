"""Reply memory: the token ids a chat reply was generated as, found again by its exact text.

A reply's text does not always tokenize back to the ids the model generated: a byte-level token
that is not valid UTF-8 on its own decodes to U+FFFD, and BPE may prefer other merges than the
model sampled. The next turn of the conversation would then differ from the stored sequence at
that token, and miss the prefix cache from there on. So the gateway remembers each finished chat
reply's ids under a digest of (tokenizer, cache_salt, text) for a while, and the tokenizer, given
an assistant message whose content is exactly such a text, uses the ids the model produced. Turn
n+1 is then an exact extension of turn n, which services/README.md promises and the cache relies on.

The ids are spliced in only where the chat template frames the message with special tokens on
both sides: the tokenizer splits its input at special tokens before anything else, so encoding
the pieces apart is the same as encoding the whole. A model whose template does not frame replies
that way is tokenized from the text, as before.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from shared.protocol import streams

DEFAULT_TTL_S = 3600


def tokenizer_digest(model_dir: Path) -> str:
    """Which vocabulary the ids belong to: a digest of tokenizer.json."""
    return hashlib.blake2b((Path(model_dir) / "tokenizer.json").read_bytes(), digest_size=16).hexdigest()


def reply_key(tokenizer: str, cache_salt: str | None, text: str) -> str:
    h = hashlib.blake2b(digest_size=16, person=b"streamoe-reply")
    h.update(tokenizer.encode() + b"\x00")
    if cache_salt is not None:  # tenants that ask not to share the cache do not share replies either
        h.update(b"salt:" + cache_salt.encode() + b"\x00")
    h.update(text.encode("utf-8", "surrogatepass"))
    return streams.reply_key(h.hexdigest())
