"""The cache service: between the tokenizer and the balancer, it finds each request's longest
prefix of verified cached blocks (services/README.md) so prefill computes only the rest and
the prefill balancer counts only uncached tokens; it also keeps the store under its capacity.

With the cache off it passes requests through (num_cached_tokens stays 0).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter

from shared.cache.prefix_cache import PrefixCache
from shared.model.loader import DTYPE_NAMES, checkpoint_fingerprint
from shared.protocol import streams
from shared.protocol.messages import TokenizedRequest
from shared.runtime.numerics import wait_published, weights_checksum
from shared.runtime.service import Service, ServiceConfig

CONSUMER_GROUP = streams.consumer_group("cache")


@dataclass(frozen=True)
class CacheSettings:
    model_dir: Path
    directory: Path | None  # None: the cache is off
    capacity_bytes: int = 8 << 30
    dtype: str = "auto"  # auto: the value the workers published (shared/runtime/numerics.py), waited for
    device: str = "cpu"


class CacheService(Service):
    name = "cache"

    def __init__(self, config: ServiceConfig, settings: CacheSettings):
        super().__init__(config)
        self.settings = settings
        self.cache: PrefixCache | None = None
        self.tokens = Counter("streamoe_cache_lookup_tokens", "Prompt tokens looked up, by result (hit, miss)",
                              ["result"], registry=self.registry)
        self.evicted = Counter("streamoe_cache_evicted_blocks", "Blocks evicted to keep the store under capacity",
                               registry=self.registry)

    async def setup(self) -> None:
        for stream in self.trimmed_streams():
            await self.bus.ensure_consumer_group(stream, CONSUMER_GROUP)
        if self.settings.directory is None:
            return
        dtype = self.settings.dtype
        if dtype == "auto":  # never measured here: the workers' calibrated dtype keys their blocks
            published = await wait_published(self.redis, weights_checksum(self.settings.model_dir), self.stopping)
            if published is None:
                return  # stopped while waiting
            dtype = published.dtype
            self.log.info(json.dumps({"event": "numerics_adopted", "dtype": dtype}))
        self.cache = PrefixCache(self.settings.directory, self.settings.capacity_bytes, self.redis,
                                 checkpoint_fingerprint(self.settings.model_dir, DTYPE_NAMES[dtype]))
        if await self.cache.index.count() == 0:  # Redis lost the index (or a fresh one): the disk still holds blocks
            found = await self.cache.index.rebuild(self.cache.store.scan())
            self.log.info(json.dumps({"event": "index_rebuilt", "blocks": found}))

    async def loop(self) -> None:
        while not self.stopping.is_set():
            kinds = dict.fromkeys(self.trimmed_streams(), TokenizedRequest)
            for stream, entry in await self.bus.take(CONSUMER_GROUP, kinds, self.config.claim_idle_ms):
                req = entry.message
                cached = await self.cache.lookup(req.prompt_ids, req.cache_salt) if self.cache else 0
                self.tokens.labels(result="hit").inc(cached)
                self.tokens.labels(result="miss").inc(len(req.prompt_ids) - cached)
                await self.bus.publish(streams.cached_stream(self.config.partition(req.request_id)),
                                       dataclasses.replace(req, num_cached_tokens=cached))
                await self.bus.ack(stream, CONSUMER_GROUP, entry.entry_id)  # after the downstream write

    def trimmed_streams(self) -> list[str]:
        """Every partition of the tokenized requests (the streams this service reads)."""
        return [streams.tokenized_stream(p) for p in range(self.config.stream_partitions)]

    async def housekeeping(self) -> None:
        await super().housekeeping()
        if self.cache is not None:
            self.evicted.inc(await self.cache.evict())
