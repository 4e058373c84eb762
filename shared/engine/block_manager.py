"""Which KV blocks belong to whom. Pure logic: no torch, no I/O.

The latent KV cache is paged in blocks of BLOCK_SIZE tokens. A block has a reference count; a
full block whose tokens were all computed gets the chained block hash of its content and can be
shared by any later sequence with the same prefix (same model, same cache_salt). Blocks with no
reference sit in a free list in eviction order: the least recently freed first. A free block
keeps its content (and hash) until it is handed out again, so a prefix can hit after its owner
finished.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from shared.cache.hashing import BLOCK_SIZE, block_hash
from shared.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and computed
    token_ids: tuple[int, ...] = ()  # its content, to verify a hash hit


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE, share_prefixes: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: the KV budget holds no block")
        self.block_size = block_size
        self.share_prefixes = share_prefixes
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head = evict first
        self.hash_to_block: dict[bytes, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    # -- admission --------------------------------------------------------------------------------
    def prefix_hits(self, seq: Sequence) -> list[int]:
        """Block ids holding this sequence's leading full blocks, verified token by token.
        NOTE: never the block holding the last prompt token: it is recomputed for its logits."""
        if not self.share_prefixes:
            return []
        tokens = seq.token_ids
        usable = (len(tokens) - 1) // self.block_size
        hits, parent = [], seq.root_hash
        for i in range(usable):
            chunk = tokens[i * self.block_size:(i + 1) * self.block_size]
            parent = block_hash(parent, chunk)
            block_id = self.hash_to_block.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tuple(chunk):
                break
            hits.append(block_id)
        return hits

    def can_admit(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `num_tokens` of the sequence fit, counting its prefix hits as already there."""
        hits = self.prefix_hits(seq)
        needed = self.blocks_for(num_tokens) - len(hits)
        free_hits = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # reusing them takes them off the free list
        return needed + free_hits <= self.num_free

    def admit(self, seq: Sequence, num_tokens: int) -> None:
        """Give the sequence its shared prefix blocks and fresh blocks up to `num_tokens`."""
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        hits = self.prefix_hits(seq)
        for block_id in hits:
            self._take(block_id)
            seq.block_table.append(block_id)
        seq.num_computed = seq.num_cached_prompt = len(hits) * self.block_size
        if seq.external_kv is not None:
            # the engine writes the external prefix past the in-memory hits (nothing if they cover it)
            seq.external_from = min(seq.num_computed, seq.external_kv.shape[1])
            seq.num_computed = seq.num_cached_prompt = max(seq.num_computed, seq.external_kv.shape[1])
        self.grow(seq, num_tokens)

    # -- growth and release -----------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make the block table cover `num_tokens` tokens."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free:
            raise RuntimeError(f"{seq.request_id}: needs {needed} blocks, {self.num_free} free")
        for _ in range(needed):
            block_id = next(iter(self.free))
            self._evict(block_id)
            self._take(block_id)
            seq.block_table.append(block_id)

    def commit(self, seq: Sequence) -> None:
        """Hash the sequence's blocks that are now full and computed, so others can share them."""
        if not self.share_prefixes:
            return
        tokens = seq.token_ids
        parent = seq.root_hash
        for i in range(seq.num_computed // self.block_size):
            block = self.blocks[seq.block_table[i]]
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            if block.block_hash is not None and block.token_ids == chunk:
                parent = block.block_hash
                continue
            parent = block_hash(parent, chunk)
            block.block_hash, block.token_ids = parent, chunk
            self.hash_to_block.setdefault(parent, block.block_id)

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks at ref 0 join the free list, last block first
        (so a prefix outlives the tail that only this sequence had)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} released twice"
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    # -- internals --------------------------------------------------------------------------------
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None and self.hash_to_block.get(block.block_hash) == block_id:
            del self.hash_to_block[block.block_hash]
        block.block_hash, block.token_ids = None, ()
