"""Which blocks the cache holds, their sizes and last uses, and which to evict (services/README.md, "Shape": cache).

`LRUIndex` is the policy as plain Python (no Redis, no torch). `RedisIndex` keeps the same state in
Redis so that every cache-service replica shares one view of the on-disk store.

Both follow one rule. Each entry has a size in bytes, a last-use time, and an insertion number given
when it is first added. `victims()` names the entries with the oldest last use first, equal times in
insertion order, up to the first point where total_bytes minus their sizes is at or under the
capacity. It only names them: the caller deletes their files (BlockStore.evict) and then removes them
from the index, so a crash in between leaves an entry without a file (a miss that get() reports),
never a file that no index will ever evict. Adding a hash that is present updates its size and last
use and keeps its insertion number. Touching or removing an absent hash does nothing: another replica
may have evicted it.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from shared.protocol.streams import cache_index_key


@dataclass
class _Entry:
    size: int
    last_use: float
    seq: int  # insertion number: breaks ties between equal last-use times


class LRUIndex:
    """The eviction policy in memory, for one process (and the oracle RedisIndex is tested against)."""

    def __init__(self, capacity_bytes: int):
        _check_capacity(capacity_bytes)
        self.capacity_bytes = capacity_bytes
        self._entries: dict[str, _Entry] = {}
        self._num_added = 0
        self._total_bytes = 0

    def add(self, block_hash: str, size: int, now: float) -> None:
        _check_size(block_hash, size)
        entry = self._entries.get(block_hash)
        if entry is None:
            self._entries[block_hash] = _Entry(size, now, self._num_added)
            self._num_added += 1
            self._total_bytes += size
        else:
            self._total_bytes += size - entry.size
            entry.size, entry.last_use = size, now

    def touch(self, block_hash: str, now: float) -> bool:
        """Record a use -> whether the hash is indexed."""
        entry = self._entries.get(block_hash)
        if entry is not None:
            entry.last_use = now
        return entry is not None

    def remove(self, block_hash: str) -> bool:
        entry = self._entries.pop(block_hash, None)
        if entry is not None:
            self._total_bytes -= entry.size
        return entry is not None

    def contains(self, block_hash: str) -> bool:
        return block_hash in self._entries

    __contains__ = contains

    def total_bytes(self) -> int:
        return self._total_bytes

    def victims(self) -> list[str]:
        """The least recently used hashes whose removal brings total_bytes to the capacity or under."""
        excess = self._total_bytes - self.capacity_bytes
        if excess <= 0:
            return []
        order = sorted(self._entries.items(), key=lambda item: (item[1].last_use, item[1].seq))
        return _take_until(((h, e.size) for h, e in order), excess)

    def __len__(self) -> int:
        return len(self._entries)


# KEYS: lru, size, seq, total, next_seq. ARGV: only_if_absent ("0" | "1"), then (hash, size, last_use) triples.
_ADD = """
local added = 0
for i = 2, #ARGV, 3 do
  local h, size, t = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local old = redis.call('HGET', KEYS[2], h)
  if not (old and ARGV[1] == '1') then
    redis.call('HSET', KEYS[2], h, size)
    redis.call('ZADD', KEYS[1], t, h)
    redis.call('INCRBY', KEYS[4], tonumber(size) - tonumber(old or 0))
    if not old then
      redis.call('HSET', KEYS[3], h, redis.call('INCR', KEYS[5]))
      added = added + 1
    end
  end
end
return added
"""

# KEYS: lru, size, seq, total. ARGV: hashes.
_REMOVE = """
local removed = 0
for i = 1, #ARGV do
  local old = redis.call('HGET', KEYS[2], ARGV[i])
  if old then
    redis.call('HDEL', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[3], ARGV[i])
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('DECRBY', KEYS[4], old)
    removed = removed + 1
  end
end
return removed
"""


class RedisIndex:
    """LRUIndex's state and rule in Redis, shared by every cache-service replica.

    Keys (`streams.cache_index_key`) `{streamoe:cache:<namespace>}:lru` (sorted set, score = last use),
    `:size` (hash -> bytes), `:seq` (hash -> insertion number), `:total` (bytes, kept by the
    scripts) and `:next-seq`. Changes that touch several keys run as one Lua script, so they are
    atomic; their one hash tag keeps them in one slot of a Redis Cluster, as scripts require."""

    def __init__(self, redis, namespace: str, capacity_bytes: int, page_size: int = 256):
        _check_capacity(capacity_bytes)
        self.capacity_bytes = capacity_bytes
        self._redis = redis
        self._page_size = page_size
        self.lru_key, self.size_key, self.seq_key, self.total_key, self.next_seq_key = (
            cache_index_key(namespace, name) for name in ("lru", "size", "seq", "total", "next-seq"))
        self._add = redis.register_script(_ADD)
        self._remove = redis.register_script(_REMOVE)

    async def add(self, block_hash: str, size: int, now: float) -> None:
        _check_size(block_hash, size)
        await self._add(keys=self._add_keys(), args=[0, block_hash, size, repr(float(now))])

    async def touch_many(self, block_hashes: Iterable[str], now: float) -> None:
        """Record a use of each indexed hash; absent ones are not added back."""
        mapping = dict.fromkeys(block_hashes, float(now))
        if mapping:
            await self._redis.zadd(self.lru_key, mapping, xx=True)

    async def remove(self, block_hash: str) -> bool:
        return await self.remove_many([block_hash]) == 1

    async def remove_many(self, block_hashes: list[str]) -> int:
        """Forget these hashes -> how many were indexed."""
        if not block_hashes:
            return 0
        return await self._remove(keys=[self.lru_key, self.size_key, self.seq_key, self.total_key],
                                  args=list(block_hashes))

    async def sizes(self, block_hashes: list[str]) -> dict[str, int]:
        """Size in bytes of each of `block_hashes` that is indexed (absent ones are left out)."""
        if not block_hashes:
            return {}
        values = await self._redis.hmget(self.size_key, block_hashes)
        return {h: int(v) for h, v in zip(block_hashes, values) if v is not None}

    async def total_bytes(self) -> int:
        return int(await self._redis.get(self.total_key) or 0)

    async def count(self) -> int:
        return await self._redis.zcard(self.lru_key)

    async def victims(self) -> list[str]:
        """As LRUIndex.victims. Reads the sorted set page by page from the oldest until the excess is
        covered and every entry tied with the last one taken has been read, then orders ties by
        insertion number. Read-only: replicas that race evict the same blocks, which is harmless."""
        excess = await self.total_bytes() - self.capacity_bytes
        if excess <= 0:
            return []
        candidates: list[tuple[float, int, str, int]] = []  # (last use, seq, hash, size)
        seen: set[str] = set()  # a hash touched while paging can show up twice
        covered = 0
        async for block_hash, last_use, seq, size in self._oldest_first():
            if covered >= excess and last_use > candidates[-1][0]:
                break
            if block_hash not in seen:
                seen.add(block_hash)
                candidates.append((last_use, seq, block_hash, size))
                covered += size
        candidates.sort()
        return _take_until(((h, size) for _, _, h, size in candidates), excess)

    async def rebuild(self, entries: Iterable[tuple[str, int, float]], batch_size: int = 512) -> int:
        """Index (hash, size, last_use) entries, e.g. BlockStore.scan() after Redis lost the index ->
        how many were new. Entries already indexed (added meanwhile by a live replica) are kept as
        they are; insertion numbers follow the order of `entries`."""
        added, batch = 0, []
        for block_hash, size, last_use in entries:
            _check_size(block_hash, size)
            batch += [block_hash, size, repr(float(last_use))]
            if len(batch) >= 3 * batch_size:
                added += await self._add(keys=self._add_keys(), args=[1, *batch])
                batch = []
        if batch:
            added += await self._add(keys=self._add_keys(), args=[1, *batch])
        return added

    async def _oldest_first(self) -> AsyncIterator[tuple[str, float, int, int]]:
        """(hash, last use, seq, size) in sorted-set order, a page at a time; entries removed while
        paging are skipped."""
        start = 0
        while rows := await self._redis.zrange(self.lru_key, start, start + self._page_size - 1, withscores=True):
            hashes = [_text(member) for member, _ in rows]
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hmget(self.size_key, hashes)
                pipe.hmget(self.seq_key, hashes)
                sizes, seqs = await pipe.execute()
            for block_hash, (_, last_use), size, seq in zip(hashes, rows, sizes, seqs):
                if size is not None:
                    yield block_hash, last_use, int(seq or 0), int(size)
            start += len(rows)

    def _add_keys(self) -> list[str]:
        return [self.lru_key, self.size_key, self.seq_key, self.total_key, self.next_seq_key]


def _take_until(ordered: Iterable[tuple[str, int]], excess: int) -> list[str]:
    """The leading hashes of `ordered` whose sizes first sum to `excess` or more (all, if they never do)."""
    chosen, freed = [], 0
    for block_hash, size in ordered:
        if freed >= excess:
            break
        chosen.append(block_hash)
        freed += size
    return chosen


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _check_capacity(capacity_bytes: int) -> None:
    if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
        raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")


def _check_size(block_hash: str, size: int) -> None:
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"size of block {block_hash!r} must be a non-negative int of bytes, got {size!r}")
