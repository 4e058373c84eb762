"""The project's one block hash (services/README.md, the cache service).

A block's hash is blake2b over (parent hash, the block's token ids as little-endian int32, extra
keys). The chain starts from a root derived from the model's fingerprint and the request's
optional `cache_salt`, so blocks of different models, or of tenants that ask not to share, never
collide. The engine's block manager and the cache service both call these functions.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

BLOCK_SIZE = 64  # tokens per KV block, everywhere (engine pages, prefix cache, usage accounting)
DIGEST_SIZE = 16


def root_hash(model_fingerprint: str, cache_salt: str | None = None) -> bytes:
    """The parent of a sequence's first block."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=b"streamoe-root")
    h.update(model_fingerprint.encode())
    h.update(b"\x00")
    if cache_salt is not None:
        h.update(b"salt:" + cache_salt.encode())
    return h.digest()


def block_hash(parent: bytes, token_ids: Sequence[int], extra_keys: bytes = b"") -> bytes:
    """Hash of one block given its parent's hash."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=b"streamoe-block")
    h.update(parent)
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    h.update(extra_keys)
    return h.digest()


def chain_hashes(root: bytes, token_ids: Sequence[int], block_size: int = BLOCK_SIZE) -> list[bytes]:
    """Hashes of every full block of `token_ids`, in order."""
    hashes, parent = [], root
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


def model_fingerprint(weight_files: Iterable[Path], dtype: str, numerics: str = "",
                      cache_dir: Path | None = None) -> str:
    """A digest of the weights' bytes plus the settings that change the KV they produce.

    Each file's checksum is remembered in `cache_dir` keyed by its path, size and mtime, so a
    large checkpoint is read in full once, not at every start."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=b"streamoe-model")
    for path in sorted(Path(p).resolve() for p in weight_files):
        h.update(_file_checksum(path, cache_dir))
    h.update(f"|dtype={dtype}|{numerics}".encode())
    return h.hexdigest()


def _file_checksum(path: Path, cache_dir: Path | None) -> bytes:
    stat = path.stat()
    key = hashlib.blake2b(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode(), digest_size=16).hexdigest()
    memo = cache_dir / f"{key}.checksum" if cache_dir is not None else None
    if memo is not None and memo.exists():
        return bytes.fromhex(memo.read_text().strip())
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "blake2b").digest()
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        # a name of its own: processes starting together (the ranks of a group) write the same memo
        tmp = memo.with_suffix(f".{os.getpid()}-{secrets.token_hex(4)}.tmp")
        tmp.write_text(digest.hex())
        tmp.replace(memo)  # atomic: a concurrent reader sees all or nothing
    return digest
