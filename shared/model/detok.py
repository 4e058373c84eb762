"""Stateless incremental detokenization: the text of one token delta from that delta alone.

A delta carries the few token ids that precede it (`prefix_ids`, see `prefix_window`), so any
tokenizer replica can turn it into text; no per-request state lives in a replica.

Rules, at the byte level of a byte-level BPE:
- a character belongs to the delta that holds its last byte (a character split across deltas is
  emitted once, whole, never as U+FFFD halves);
- with stop strings, text that could still become the start of a stop string is held back and
  emitted by a later delta (or dropped, if the stop string completes); the final delta flushes;
- the window may begin mid-character: its leading continuation bytes are skipped, and since
  the same bytes open both the "before" and the "after" text, their difference is exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from tokenizers import Tokenizer


def prefix_window(stop: list[str] | None) -> int:
    """How many preceding token ids a delta must carry: enough bytes for the longest stop string
    (a character is at most 4 bytes, a token at least 1) plus one split character."""
    longest = max((len(s) for s in stop or ()), default=0)
    return 4 * longest + 4


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return {c: b for b, c in enumerate(chars)}


class TokenBytes:
    """token id -> the bytes it stands for (special tokens: nothing, when skipped)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        decoder = _byte_decoder()
        specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        self.table: list[bytes] = []
        for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
            piece = tokenizer.id_to_token(token_id)
            if piece is None:
                self.table.append(b"")
            elif piece in specials:
                self.table.append(b"" if skip_special_tokens else piece.encode())
            elif all(c in decoder for c in piece):
                self.table.append(bytes(decoder[c] for c in piece))
            else:  # an added, non-special token is kept as literal text
                self.table.append(piece.encode())

    def __call__(self, ids: list[int]) -> bytes:
        return b"".join(self.table[i] if 0 <= i < len(self.table) else b"" for i in ids)


@dataclass
class DeltaText:
    text: str
    stopped: bool = False  # a stop string completed: the request ends here, text cut before it


def delta_text(token_bytes: TokenBytes, prefix_ids: list[int], new_ids: list[int],
               stop: list[str] | None = None, final: bool = False) -> DeltaText:
    """The text `new_ids` add after `prefix_ids`."""
    window = token_bytes(prefix_ids)
    start = 0
    while start < len(window) and window[start] & 0xC0 == 0x80:
        start += 1  # the window opened mid-character: that character was emitted earlier
    before = window[start:]
    after = before + token_bytes(new_ids)
    text_before = _complete(before)
    text_after = after.decode("utf-8", errors="replace") if final else _complete(after)
    visible_before = text_before[:len(text_before) - _holdback(text_before, stop)]
    cut = _first_stop(text_after, stop, len(text_before))
    if cut is not None:
        return DeltaText(text_after[len(visible_before):cut], stopped=True)
    visible_after = text_after if final else text_after[:len(text_after) - _holdback(text_after, stop)]
    return DeltaText(visible_after[len(visible_before):])


def _complete(data: bytes) -> str:
    """Decode up to the last complete character; a trailing partial one waits for its bytes."""
    end = len(data)
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # continuation: keep looking for its lead byte
        need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 \
            else 4 if byte >> 3 == 0b11110 else 1
        if need > back:
            end = len(data) - back  # lead byte whose character is not finished yet
        break
    return data[:end].decode("utf-8", errors="replace")


def _holdback(text: str, stop: list[str] | None) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stop or ():
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _first_stop(text: str, stop: list[str] | None, already: int) -> int | None:
    """Where the earliest stop string that ends past `already` begins, if any."""
    found = None
    for s in stop or ():
        if not s:
            continue
        i = text.find(s, max(0, already - len(s) + 1))
        if i != -1 and (found is None or i < found):
            found = i
    return found
