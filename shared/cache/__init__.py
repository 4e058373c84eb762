"""The on-disk prefix KV cache: block hashes, the block store, the Redis LRU index, the lookup that
prefill and the cache service share, and the gateway's reply memory."""
