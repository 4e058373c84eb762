"""The on-disk block store: the prefix cache's capacity tier (services/README.md; 3FS's role at DeepSeek).

A block is one 64-token page of a sequence: its chained hash (shared/cache/hashing.py, as `.hex()`), its token
ids, and its payload, the MLA latent KV of every layer for those tokens: a tensor [L, T, W] (L = layers,
T = tokens, W = kv_lora_rank + qk_rope_head_dim) of float32, bfloat16 or float16.

File format, version 1, at `directory/<hh>/<hash>.blk` (hh = the hash's first two hex digits):

    offset  bytes  field
    0       8      magic b"SMOEKVB\\0"
    8       2      format version, u16 = 1
    10      2      header size, u16 = 96
    12      12     dtype name, ASCII, NUL-padded: float32 | bfloat16 | float16
    24      12     shape L, T, W, 3 x u32
    36      4      number of token ids N, u32 (= T)
    40      16     the block hash the file holds (a file under another name is not trusted)
    56      32     blake2b-256 of everything after the header (token ids and payload)
    88      8      reserved, zero
    96      4N     token ids, int32
    96+4N   ...    payload: the tensor's raw bytes in C order, L*T*W*itemsize bytes

Every number, the tensor's elements included, is little-endian. A file is valid only when every field
agrees with its length, its checksum, its name and the token ids the reader asks for; anything else
is a miss, and the file is deleted (best effort).

The directory may be shared by several hosts (NFS, 3FS), so nothing relies on one process: a writer
fills a uniquely named temp file `.<hash>.<uuid>.tmp` beside the target, fsyncs it, and os.replace()s
it into place, so readers see a whole file or none. Concurrent writers of one block each replace a
whole, identical file; the last wins. Last use is the file's mtime: get() sets it, scan() reports it,
so an index lost with Redis can be rebuilt with roughly the right recency. The LRU policy itself
lives in shared/cache/index.py; evict() only deletes what the index chose.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import struct
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from shared.cache.hashing import DIGEST_SIZE

log = logging.getLogger(__name__)

MAGIC = b"SMOEKVB\0"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHH12s3II16s32s8x")  # see the module docstring; 96 bytes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUFFIX = ".blk"
_HASH = re.compile(f"[0-9a-f]{{{2 * DIGEST_SIZE}}}")
_TEMP = re.compile(rf"\.([0-9a-f]{{{2 * DIGEST_SIZE}}})\.[0-9a-f]{{32}}\.tmp")


class BlockStore:
    """Blocks as files under `directory`, one per hash. `capacity_bytes` is the byte budget the
    cache service's index (LRUIndex / RedisIndex) enforces by choosing victims for evict()."""

    def __init__(self, directory: Path, capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.directory = Path(directory)
        self.capacity_bytes = capacity_bytes

    def path_of(self, block_hash: str) -> Path:
        _digest(block_hash)
        return self.directory / block_hash[:2] / f"{block_hash}{SUFFIX}"

    def put(self, block_hash: str, token_ids: Sequence[int], kv: torch.Tensor) -> bool:
        """Store a block atomically -> True, or False (writing nothing) when a good copy is there.

        Raises ValueError for a malformed hash, token ids or tensor, and OSError when the disk
        refuses the write (no temp file is left behind)."""
        digest, id_bytes = _digest(block_hash), _pack_ids(token_ids)
        dtype_name = str(kv.dtype).removeprefix("torch.")
        if dtype_name not in DTYPES:
            raise ValueError(f"kv dtype {kv.dtype} is not one of {sorted(DTYPES)}")
        if kv.dim() != 3 or kv.shape[1] != len(token_ids) or kv.numel() == 0:
            raise ValueError(f"kv must be [layers, {len(token_ids)} tokens, width] and non-empty to match "
                             f"{len(token_ids)} token ids, got shape {list(kv.shape)}")
        path = self.path_of(block_hash)
        if self._load(path, digest, id_bytes) is not None:
            return False
        payload = memoryview(kv.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        checksum = hashlib.blake2b(id_bytes, digest_size=32)
        checksum.update(payload)
        header = HEADER.pack(MAGIC, FORMAT_VERSION, HEADER.size, dtype_name.encode(), *kv.shape,
                             len(token_ids), digest, checksum.digest())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{block_hash}.{uuid.uuid4().hex}.tmp"  # unique across hosts, not only PIDs
        try:
            with open(tmp, "xb") as f:
                for part in (header, id_bytes, payload):
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return True

    def get(self, block_hash: str, token_ids: Sequence[int], now: float | None = None) -> torch.Tensor | None:
        """The block's KV [L, T, W], or None on a miss. A file that is torn, corrupt, or holds other
        token ids is deleted and reported as a miss. A hit sets the file's mtime to `now` (default
        time.time()) as its last use."""
        return self._load(self.path_of(block_hash), _digest(block_hash), _pack_ids(token_ids),
                          time.time() if now is None else now)

    def delete(self, block_hash: str) -> bool:
        """Remove a block's file -> whether there was one."""
        try:
            os.unlink(self.path_of(block_hash))
            return True
        except FileNotFoundError:
            return False

    def size_of(self, block_hash: str) -> int | None:
        """The block's file size in bytes, or None when absent."""
        try:
            return os.stat(self.path_of(block_hash)).st_size
        except FileNotFoundError:
            return None

    def evict(self, victims: list[str]) -> int:
        """Delete the blocks the index chose -> bytes freed (blocks already gone count zero)."""
        freed = 0
        for block_hash in victims:
            size = self.size_of(block_hash)
            if size is not None and self.delete(block_hash):
                freed += size
        return freed

    def scan(self) -> Iterator[tuple[str, int, float]]:
        """(hash, size_bytes, last_use_time) of every block file, for rebuilding an index. Temp
        files and files this store did not name are skipped; contents are not verified (get does)."""
        for fan_out, entry in self._fanned_out():
            block_hash = entry.name.removesuffix(SUFFIX)
            if block_hash == entry.name or not _HASH.fullmatch(block_hash) or block_hash[:2] != fan_out:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # evicted meanwhile
                continue
            if stat.S_ISREG(st.st_mode):
                yield block_hash, st.st_size, st.st_mtime

    def sweep_temps(self, older_than_s: float = 3600.0, now: float | None = None) -> int:
        """Delete temp files a crashed writer left, once older than `older_than_s` (a live writer's
        temp file is seconds old) -> how many were removed."""
        cutoff = (time.time() if now is None else now) - older_than_s
        removed = 0
        for _, entry in self._fanned_out():
            try:
                if _TEMP.fullmatch(entry.name) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _fanned_out(self) -> Iterator[tuple[str, os.DirEntry]]:
        """(fan-out dir name, entry) for everything one level below the two-character dirs."""
        for fan_out in _entries(self.directory):
            if len(fan_out.name) == 2 and fan_out.is_dir(follow_symlinks=False):
                for entry in _entries(Path(fan_out.path)):
                    yield fan_out.name, entry

    def _load(self, path: Path, digest: bytes, id_bytes: bytes, now: float | None = None) -> torch.Tensor | None:
        """Read and verify `path`; a bad file is deleted. `now`: on a hit, record it as the last use."""
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                buf = bytearray(st.st_size)
                problem = _check(buf, f.readinto(buf), digest, id_bytes)
                if problem is None and now is not None:
                    _touch(f.fileno(), now)  # through the fd: the file just verified, not a replacement
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cache block %s unreadable, treated as a miss: %s", path, e)
            return None
        if problem is not None and _is_newer_format(buf):
            return None  # NOTE: a newer replica wrote it during a rolling upgrade: a miss, but not ours to delete
        if problem is not None:
            log.warning("cache block %s is bad (%s); deleting it", path, problem)
            _discard(path, st)
            return None
        _, _, _, dtype_name, layers, tokens, width, num_ids, _, _ = HEADER.unpack_from(buf)
        dtype = DTYPES[dtype_name.rstrip(b"\0").decode()]
        kv = torch.frombuffer(buf, dtype=dtype, offset=HEADER.size + 4 * num_ids, count=layers * tokens * width)
        return kv.view(layers, tokens, width)  # [L, T, W], sharing `buf`: no second copy


def _check(buf: bytearray, num_read: int, digest: bytes, id_bytes: bytes) -> str | None:
    """Why the file in `buf` is not a valid copy of the block, or None when it is."""
    if num_read != len(buf):
        return f"read {num_read} of {len(buf)} bytes"
    if len(buf) < HEADER.size:
        return f"{len(buf)} bytes, shorter than the {HEADER.size}-byte header"
    magic, version, header_size, dtype_raw, layers, tokens, width, num_ids, stored, checksum = HEADER.unpack_from(buf)
    if magic != MAGIC:
        return f"magic {magic!r}, expected {MAGIC!r}"
    if version != FORMAT_VERSION or header_size != HEADER.size:
        return f"format version {version} with a {header_size}-byte header; this reader knows {FORMAT_VERSION}"
    dtype = DTYPES.get(dtype_raw.rstrip(b"\0").decode("ascii", "replace"))
    if dtype is None:
        return f"dtype {dtype_raw!r} unknown"
    if num_ids != tokens or layers * tokens * width == 0:
        return f"shape {[layers, tokens, width]} with {num_ids} token ids"
    expected = HEADER.size + 4 * num_ids + layers * tokens * width * dtype.itemsize
    if len(buf) != expected:
        return f"{len(buf)} bytes where the header implies {expected} (truncated or torn)"
    if stored != digest:
        return f"it holds block {stored.hex()}"
    body = memoryview(buf)[HEADER.size:]
    if hashlib.blake2b(body, digest_size=32).digest() != checksum:
        return "checksum mismatch"
    if body[:4 * num_ids] != id_bytes:
        return "its token ids differ from the requested ones"
    return None


def _is_newer_format(buf: bytearray) -> bool:
    return len(buf) >= 10 and buf[:8] == MAGIC and struct.unpack_from("<H", buf, 8)[0] > FORMAT_VERSION


def _digest(block_hash: str) -> bytes:
    if not isinstance(block_hash, str) or not _HASH.fullmatch(block_hash):
        raise ValueError(f"block hash {block_hash!r} is not {2 * DIGEST_SIZE} lower-case hex digits; "
                         "pass shared.cache.hashing's digest as .hex()")
    return bytes.fromhex(block_hash)


def _pack_ids(token_ids: Sequence[int]) -> bytes:
    if len(token_ids) == 0:
        raise ValueError("a block needs at least one token id, got none")
    try:
        return struct.pack(f"<{len(token_ids)}i", *token_ids)
    except struct.error:
        bad = next((t for t in token_ids if not isinstance(t, int) or not -2**31 <= t < 2**31), None)
        raise ValueError(f"token ids must be int32; {bad!r} is not") from None


def _entries(directory: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _touch(fd: int, now: float) -> None:
    try:
        os.utime(fd, times=(now, now))
    except OSError:  # e.g. a read-only mount or a file owned by another user: recency is advisory
        pass


def _discard(path: Path, read: os.stat_result) -> None:
    """Unlink `path` only if it is still the file that was read: a writer may have just replaced it."""
    try:
        now = os.stat(path)
        if (now.st_dev, now.st_ino) == (read.st_dev, read.st_ino):
            os.unlink(path)
    except OSError:
        pass


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; a filesystem that cannot fsync a directory is left as it is."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
