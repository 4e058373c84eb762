"""BlockManager: exact block ids, reference counts and eviction order (block size 4 for reading)."""
from __future__ import annotations

import pytest

from shared.cache.hashing import block_hash, chain_hashes, root_hash
from shared.engine.block_manager import BlockManager
from shared.engine.sequence import SamplingParams, Sequence

ROOT = root_hash("test-model")


def seq(name: str, tokens: list[int], root: bytes = ROOT) -> Sequence:
    return Sequence(name, tokens, SamplingParams(max_tokens=4), arrival=0, root_hash=root)


def computed(bm: BlockManager, s: Sequence, n: int) -> None:
    s.num_computed = n
    bm.commit(s)


def refs(bm: BlockManager) -> list[int]:
    return [b.ref_count for b in bm.blocks]


def test_admit_share_release_and_eviction_order():
    bm = BlockManager(5, block_size=4)
    a = seq("a", list(range(10)))
    bm.admit(a, a.num_tokens)
    assert a.block_table == [0, 1, 2] and refs(bm) == [1, 1, 1, 0, 0] and list(bm.free) == [3, 4]
    computed(bm, a, 10)
    assert bm.blocks[0].block_hash is not None and bm.blocks[1].block_hash is not None
    assert bm.blocks[2].block_hash is None  # 2 of 4 tokens: not full

    b = seq("b", list(range(8)) + [99, 98, 97])  # shares a's first two blocks
    assert bm.prefix_hits(b) == [0, 1]
    bm.admit(b, b.num_tokens)
    assert b.block_table == [0, 1, 3] and b.num_computed == 8 and b.num_cached_prompt == 8
    assert refs(bm) == [2, 2, 1, 1, 0] and list(bm.free) == [4]

    bm.release(a)  # only a's private tail block reaches ref 0
    assert refs(bm) == [1, 1, 0, 1, 0] and list(bm.free) == [4, 2]
    bm.release(b)  # last block first: the shared prefix is evicted last
    assert refs(bm) == [0, 0, 0, 0, 0] and list(bm.free) == [4, 2, 3, 1, 0]

    c = seq("c", list(range(8)) + [5])  # hits blocks 0 and 1 while they sit on the free list
    assert bm.can_admit(c, c.num_tokens)
    bm.admit(c, c.num_tokens)
    assert c.block_table == [0, 1, 4] and list(bm.free) == [2, 3]

    d = seq("d", [7] * 12)
    assert bm.can_admit(d, d.num_tokens) is False  # needs 3 blocks, 2 free
    assert bm.can_admit(d, 8)
    bm.release(c)
    assert list(bm.free) == [2, 3, 4, 1, 0]
    bm.admit(d, 12)  # takes the three least recently freed: 2, 3, 4
    assert d.block_table == [2, 3, 4] and list(bm.free) == [1, 0]


def test_eviction_forgets_the_hash():
    bm = BlockManager(2, block_size=4)
    a = seq("a", [1, 2, 3, 4, 5])
    bm.admit(a, 5)
    computed(bm, a, 5)
    bm.release(a)  # free order: [1, 0]; block 0 holds [1, 2, 3, 4]
    assert bm.prefix_hits(seq("x", [1, 2, 3, 4, 9])) == [0]
    b = seq("b", [8, 8])
    bm.admit(b, 2)  # takes block 1 (no hash)
    c = seq("c", [6, 6])
    bm.admit(c, 2)  # takes block 0: its content is gone
    assert bm.prefix_hits(seq("x", [1, 2, 3, 4, 9])) == []
    assert bm.hash_to_block == {}


def test_last_prompt_token_is_never_served_from_cache():
    bm = BlockManager(4, block_size=4)
    a = seq("a", list(range(8)))
    bm.admit(a, 8)
    computed(bm, a, 8)
    assert bm.prefix_hits(seq("same", list(range(8)))) == [0]  # block 1 holds the last token
    assert bm.prefix_hits(seq("longer", list(range(9)))) == [0, 1]


def test_hash_hit_is_verified_against_tokens():
    bm = BlockManager(4, block_size=4)
    a = seq("a", [1, 2, 3, 4, 5])
    bm.admit(a, 5)
    computed(bm, a, 5)
    bm.blocks[0].token_ids = (9, 9, 9, 9)  # as if two contents collided on one hash
    assert bm.prefix_hits(seq("b", [1, 2, 3, 4, 5])) == []


def test_salt_and_model_separate_chains():
    bm = BlockManager(4, block_size=4)
    a = seq("a", [1, 2, 3, 4, 5], root=root_hash("m", "tenant-1"))
    bm.admit(a, 5)
    computed(bm, a, 5)
    assert bm.prefix_hits(seq("b", [1, 2, 3, 4, 5], root=root_hash("m", "tenant-1"))) == [0]
    assert bm.prefix_hits(seq("c", [1, 2, 3, 4, 5], root=root_hash("m", "tenant-2"))) == []
    assert bm.prefix_hits(seq("d", [1, 2, 3, 4, 5], root=root_hash("m"))) == []
    assert bm.prefix_hits(seq("e", [1, 2, 3, 4, 5], root=root_hash("other", "tenant-1"))) == []


def test_block_hash_is_chained_and_fixed():
    root = root_hash("fingerprint")
    h1 = block_hash(root, [1, 2, 3])
    assert h1 == block_hash(root, [1, 2, 3]) and len(h1) == 16
    assert h1 != block_hash(root, [1, 2, 4]) and h1 != block_hash(root_hash("other"), [1, 2, 3])
    assert chain_hashes(root, list(range(130)), block_size=64) == [
        block_hash(root, list(range(64))), block_hash(block_hash(root, list(range(64))), list(range(64, 128)))]
    # blake2b over parent + little-endian int32 ids: pinned so every process and version agrees
    import hashlib
    manual = hashlib.blake2b(b"\x01\x00\x00\x00", digest_size=16, person=b"streamoe-block").digest()
    assert block_hash(b"", [1]) == manual
    assert block_hash(b"", [1]).hex() == "ada6eca50211bf76ef31c227a4015b7c"
    assert root_hash("x", None) != root_hash("x", "")


def test_grow_and_no_leak():
    bm = BlockManager(3, block_size=4)
    a = seq("a", [1, 2, 3])
    bm.admit(a, 3)
    bm.grow(a, 4)
    assert a.block_table == [0]
    bm.grow(a, 5)
    assert a.block_table == [0, 1]
    with pytest.raises(RuntimeError, match="needs 2 blocks, 1 free"):
        bm.grow(a, 13)
    bm.release(a)
    assert bm.num_free == 3 and refs(bm) == [0, 0, 0]
    with pytest.raises(AssertionError):
        a.block_table = [0]
        bm.release(a)
