"""The prefix cache as its users see it: the cache service (lookups, eviction), prefill (loads a
cached prefix, writes the prompt's new full blocks) and decode (writes the full blocks of prompt +
reply when a request finishes). Blocks live in the on-disk store (shared/cache/store.py, a
directory several machines may share); the LRU index lives in Redis (shared/cache/index.py).

Blocks are keyed by the project's one block hash (shared/cache/hashing.py), rooted in the model
fingerprint and the request's `cache_salt`, so other models or salts never share a block. A
block is used only after its token ids and checksum are verified; the last prompt token is never
cached for its own request (it is recomputed for its logits).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from shared.cache.hashing import BLOCK_SIZE, chain_hashes, root_hash
from shared.cache.index import RedisIndex
from shared.cache.store import BlockStore


class PrefixCache:
    def __init__(self, directory: Path, capacity_bytes: int, redis, model_fingerprint: str,
                 write_delay_s: float = 0.0):
        self.store = BlockStore(Path(directory), capacity_bytes)
        self.write_delay_s = write_delay_s  # fault injection: a slow shared filesystem
        self.index = RedisIndex(redis, "cache", capacity_bytes)
        self.fingerprint = model_fingerprint

    def hashes(self, token_ids: Sequence[int], cache_salt: str | None) -> list[str]:
        """The hex hashes of every full block of `token_ids`."""
        return [h.hex() for h in chain_hashes(root_hash(self.fingerprint, cache_salt), list(token_ids))]

    def load(self, token_ids: Sequence[int], cache_salt: str | None, max_tokens: int) -> torch.Tensor | None:
        """Blocking (run it off the event loop): the verified KV [layers, n, C+R] of the longest
        cached prefix of at most `max_tokens` tokens (whole blocks), or None."""
        limit = min(max_tokens, len(token_ids) - 1) // BLOCK_SIZE
        blocks = []
        for i, h in enumerate(self.hashes(token_ids[:limit * BLOCK_SIZE], cache_salt)):
            kv = self.store.get(h, token_ids[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
            if kv is None:
                break
            blocks.append(kv)
        return torch.cat(blocks, dim=1) if blocks else None

    def write(self, token_ids: Sequence[int], cache_salt: str | None, kv: torch.Tensor,
              skip_blocks: int = 0) -> list[tuple[str, int]]:
        """Blocking: store the full blocks of `token_ids` whose KV [layers, >= len, C+R] is given,
        from block `skip_blocks` on -> (hash, size) of the blocks written."""
        if self.write_delay_s:
            time.sleep(self.write_delay_s)
        written = []
        num_blocks = min(len(token_ids), kv.shape[1]) // BLOCK_SIZE
        hashes = self.hashes(token_ids[:num_blocks * BLOCK_SIZE], cache_salt)
        for i in range(skip_blocks, num_blocks):
            span = slice(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE)
            if self.store.put(hashes[i], token_ids[span], kv[:, span].contiguous()):
                written.append((hashes[i], self.store.size_of(hashes[i]) or 0))
        return written

    async def lookup(self, token_ids: Sequence[int], cache_salt: str | None) -> int:
        """Prompt tokens the cache holds for this request: whole verified blocks, never the last
        token; each hit counts as a use for the LRU."""
        usable = (len(token_ids) - 1) // BLOCK_SIZE
        hashes = self.hashes(token_ids[:usable * BLOCK_SIZE], cache_salt)
        if not hashes:
            return 0
        known = await self.index.sizes(hashes)
        hits = 0
        for h in hashes:
            if h not in known:
                break
            hits += 1
        if hits:
            kv = await asyncio.to_thread(self.load, token_ids, cache_salt, hits * BLOCK_SIZE)  # verified on disk
            hits = 0 if kv is None else kv.shape[1] // BLOCK_SIZE
            if hits:
                await self.index.touch_many(hashes[:hits], time.time())
        return hits * BLOCK_SIZE

    async def insert(self, token_ids: Sequence[int], cache_salt: str | None, kv: torch.Tensor,
                     skip_blocks: int = 0) -> int:
        """Write off the event loop, then record the new blocks in the index; -> blocks written."""
        written = await asyncio.to_thread(self.write, token_ids, cache_salt, kv, skip_blocks)
        now = time.time()
        for h, size in written:
            await self.index.add(h, size, now)
        return len(written)

    async def evict(self) -> int:
        """Keep the store under its capacity, least recently used first; -> blocks evicted."""
        victims = await self.index.victims()
        if victims:
            await asyncio.to_thread(self.store.evict, victims)
            await self.index.remove_many(victims)
        return len(victims)
