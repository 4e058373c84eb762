"""The prefix cache's disk tier and LRU indexes: file format, verification, atomic concurrent writes, and
exact eviction order (in memory and in a real Redis)."""
from __future__ import annotations

import multiprocessing
import os
import struct
from pathlib import Path

import pytest
import torch

from shared.cache.hashing import block_hash, root_hash
from shared.cache.index import LRUIndex, RedisIndex
from shared.cache.store import HEADER, BlockStore

ROOT = root_hash("test-model")
TOKENS = list(range(100, 164))
HASH = block_hash(ROOT, TOKENS).hex()


def payload(dtype: torch.dtype = torch.float32, seed: int = 0, layers: int = 3, width: int = 80) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 64, width, generator=g).to(dtype)  # [L, T, W]


def block(i: int) -> tuple[str, list[int]]:
    tokens = [i * 64 + t for t in range(64)]
    return block_hash(ROOT, tokens).hex(), tokens


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.fixture()
def store(tmp_path) -> BlockStore:
    return BlockStore(tmp_path / "blocks", capacity_bytes=1 << 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_and_second_put_writes_nothing(store, dtype):
    kv = payload(dtype)
    assert store.put(HASH, TOKENS, kv) is True
    path = store.directory / HASH[:2] / f"{HASH}.blk"
    assert files_under(store.directory) == [f"{HASH[:2]}/{HASH}.blk"]
    assert store.size_of(HASH) == path.stat().st_size == 96 + 4 * 64 + kv.numel() * kv.element_size()
    got = store.get(HASH, TOKENS)
    assert got.dtype == dtype and got.shape == (3, 64, 80) and torch.equal(got, kv)
    inode = path.stat().st_ino
    assert store.put(HASH, TOKENS, kv) is False
    assert path.stat().st_ino == inode and files_under(store.directory) == [f"{HASH[:2]}/{HASH}.blk"]


def test_file_layout_is_the_documented_one(store):
    kv = payload(torch.bfloat16, layers=2, width=8)
    store.put(HASH, TOKENS, kv)
    data = store.path_of(HASH).read_bytes()
    magic, version, header_size, dtype, layers, tokens, width, num_ids, digest, _ = HEADER.unpack_from(data)
    assert (magic, version, header_size, dtype) == (b"SMOEKVB\0", 1, 96, b"bfloat16\0\0\0\0")
    assert (layers, tokens, width, num_ids, digest.hex()) == (2, 64, 8, 64, HASH)
    assert data[96:96 + 256] == struct.pack("<64i", *TOKENS)
    assert data[96 + 256:] == kv.view(torch.uint8).numpy().tobytes() and len(data) == 96 + 256 + 2 * 64 * 8 * 2


def test_wrong_token_ids_are_a_miss_and_delete_the_file(store):
    store.put(HASH, TOKENS, payload())
    assert store.get(HASH, TOKENS[:-1] + [7]) is None
    assert not store.path_of(HASH).exists()
    assert store.get(HASH, TOKENS) is None


def flip(offset: int):
    def damage(data: bytearray) -> bytes:
        data[offset] ^= 0x01
        return bytes(data)
    return damage


@pytest.mark.parametrize("damage", [
    flip(-1),  # last payload byte
    flip(96 + 5),  # a token id byte
    flip(60),  # a checksum byte
    flip(0),  # magic
    flip(8),  # format version
    flip(24),  # number of layers: the length no longer matches
    lambda data: bytes(data[:-100]),  # truncated payload
    lambda data: bytes(data[:50]),  # torn inside the header
    lambda data: b"",
    lambda data: bytes(data) + b"\0",  # trailing garbage
], ids=["payload", "token", "checksum", "magic", "version", "shape", "truncated", "torn-header", "empty", "longer"])
def test_damaged_files_are_a_miss_and_deleted(store, damage):
    store.put(HASH, TOKENS, payload())
    path = store.path_of(HASH)
    path.write_bytes(damage(bytearray(path.read_bytes())))
    assert store.get(HASH, TOKENS) is None
    assert not path.exists()


def test_a_newer_format_is_a_miss_but_kept_for_the_replicas_that_read_it(store):
    store.put(HASH, TOKENS, payload())
    path = store.path_of(HASH)
    data = bytearray(path.read_bytes())
    data[8:10] = struct.pack("<H", 2)
    path.write_bytes(data)
    assert store.get(HASH, TOKENS) is None and path.read_bytes() == data


def test_a_file_under_another_blocks_name_is_not_trusted(store):
    other, other_tokens = block(1)
    store.put(other, other_tokens, payload())
    store.path_of(HASH).parent.mkdir(parents=True, exist_ok=True)
    store.path_of(HASH).write_bytes(store.path_of(other).read_bytes())
    assert store.get(HASH, other_tokens) is None and not store.path_of(HASH).exists()
    assert torch.equal(store.get(other, other_tokens), payload())


def test_put_replaces_a_damaged_copy(store):
    store.put(HASH, TOKENS, payload())
    store.path_of(HASH).write_bytes(b"junk")
    assert store.put(HASH, TOKENS, payload()) is True
    assert torch.equal(store.get(HASH, TOKENS), payload())


@pytest.mark.parametrize("args, message", [
    (("../../etc/passwd", TOKENS, payload()), "block hash '../../etc/passwd' is not 32 lower-case hex"),
    ((HASH.upper(), TOKENS, payload()), "is not 32 lower-case hex"),
    ((HASH, TOKENS[:-1] + [2**31], payload()), "2147483648 is not"),
    ((HASH, TOKENS, payload().double()), "kv dtype torch.float64 is not one of"),
    ((HASH, TOKENS[:32], payload()), "got shape [3, 64, 80]"),
    ((HASH, [], payload()), "at least one token id"),
])
def test_bad_arguments_name_the_value(store, args, message):
    with pytest.raises(ValueError) as err:
        store.put(*args)
    assert message in str(err.value)
    assert not store.directory.exists() or files_under(store.directory) == []


def test_scan_reports_blocks_only_and_get_records_last_use(store):
    (h0, t0), (h1, t1) = block(0), block(1)
    store.put(h0, t0, payload(layers=1))
    store.put(h1, t1, payload(layers=2))
    os.utime(store.path_of(h0), (100.0, 100.0))
    os.utime(store.path_of(h1), (200.0, 200.0))
    fan = store.directory / h0[:2]
    (store.directory / "README").write_text("not a block")
    (fan / "notes.txt").write_text("foreign")
    (fan / f".{h0}.{'0' * 32}.tmp").write_bytes(b"half a block")
    (fan / ("zz" * 16 + ".blk")).write_bytes(b"not hex")
    wrong = store.directory / ("00" if h0[:2] != "00" else "01")
    wrong.mkdir(exist_ok=True)
    (wrong / f"{h0}.blk").write_bytes(b"wrong fan-out dir")
    (store.directory / "abc").mkdir()
    (store.directory / "abc" / f"{h0}.blk").write_bytes(b"not a fan-out dir")
    assert sorted(store.scan()) == sorted([(h0, store.size_of(h0), 100.0), (h1, store.size_of(h1), 200.0)])
    assert torch.equal(store.get(h0, t0, now=300.0), payload(layers=1))
    assert dict((h, t) for h, _, t in store.scan()) == {h0: 300.0, h1: 200.0}


def test_delete_size_of_evict_and_sweep(store):
    (h0, t0), (h1, t1), (h2, _) = block(0), block(1), block(2)
    store.put(h0, t0, payload(layers=1))
    store.put(h1, t1, payload(layers=2))
    sizes = store.size_of(h0), store.size_of(h1)
    assert sizes == (96 + 256 + 64 * 80 * 4, 96 + 256 + 2 * 64 * 80 * 4)
    assert store.evict([h0, h1, h2]) == sum(sizes)
    assert store.size_of(h0) is None and store.delete(h0) is False and list(store.scan()) == []
    store.put(h0, t0, payload())
    fan = store.path_of(h0).parent
    old, fresh = fan / f".{h0}.{'1' * 32}.tmp", fan / f".{h0}.{'2' * 32}.tmp"
    old.write_bytes(b"crashed writer")
    fresh.write_bytes(b"live writer")
    os.utime(old, (1000.0, 1000.0))
    os.utime(fresh, (5000.0, 5000.0))
    assert store.sweep_temps(older_than_s=3600, now=5000.0) == 1
    assert sorted(p.name for p in fan.iterdir()) == sorted([fresh.name, f"{h0}.blk"])


def _race_writer(directory: str, rounds: int, barrier, wins) -> None:
    torch.set_num_threads(1)
    store = BlockStore(Path(directory), capacity_bytes=1 << 30)
    kv = payload(torch.bfloat16, layers=4, width=576)
    for _ in range(rounds):
        barrier.wait(timeout=60)
        wins.put(store.put(HASH, TOKENS, kv))
        barrier.wait(timeout=60)  # the parent checks and deletes
        barrier.wait(timeout=60)


def _race_reader(directory: str, rounds: int, barrier, torn) -> None:
    """Reads the raw file while the writers race: it is absent or whole, never partly written."""
    path, whole, num_torn = Path(directory) / HASH[:2] / f"{HASH}.blk", 96 + 4 * 64 + 4 * 64 * 576 * 2, 0
    for _ in range(rounds):
        barrier.wait(timeout=60)
        for _ in range(50):
            try:
                num_torn += len(path.read_bytes()) != whole
            except FileNotFoundError:
                pass
        barrier.wait(timeout=60)
        barrier.wait(timeout=60)
    torn.put(num_torn)


def test_two_processes_putting_one_block_leave_one_good_file(tmp_path):
    rounds = 25
    ctx = multiprocessing.get_context("spawn")
    barrier, wins, torn = ctx.Barrier(4), ctx.Queue(), ctx.Queue()
    directory = tmp_path / "shared-fs"
    procs = [ctx.Process(target=_race_writer, args=(str(directory), rounds, barrier, wins)) for _ in range(2)]
    procs.append(ctx.Process(target=_race_reader, args=(str(directory), rounds, barrier, torn)))
    for p in procs:
        p.start()
    store, expected = BlockStore(directory, 1 << 30), payload(torch.bfloat16, layers=4, width=576)
    try:
        for r in range(rounds):
            barrier.wait(timeout=120)  # the writers put, the reader reads
            barrier.wait(timeout=60)  # all done
            assert files_under(directory) == [f"{HASH[:2]}/{HASH}.blk"], f"round {r}"
            assert torch.equal(store.get(HASH, TOKENS), expected), f"round {r}"
            if r < rounds - 1:
                assert store.delete(HASH)
            barrier.wait(timeout=60)
    finally:
        for p in procs:
            p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert sum(wins.get(timeout=10) for _ in range(2 * rounds)) >= rounds  # every round wrote the block
    assert torn.get(timeout=10) == 0
    assert files_under(directory) == [f"{HASH[:2]}/{HASH}.blk"]


# (op, hash, size or expected victims, now or expected total); "check" asserts victims() and total_bytes().
SCENARIO = [
    ("add", "a", 300, 1.0), ("add", "b", 300, 2.0), ("add", "c", 300, 2.0),
    ("check", None, [], 900),
    ("add", "d", 300, 3.0),
    ("check", None, ["a"], 1200),
    ("touch", "a", None, 4.0),
    ("check", None, ["b"], 1200),
    ("touch", "c", None, 2.0), ("touch", "b", None, 2.0),  # equal times: insertion order, not touch order
    ("check", None, ["b"], 1200),
    ("touch", "b", None, 5.0), ("touch", "d", None, 2.0),  # d now ties with c, inserted after it
    ("check", None, ["c"], 1200),
    ("add", "f", 250, 0.5),
    ("check", None, ["f", "c"], 1450),
    ("touch", "gone", None, 0.1),  # absent: not added
    ("remove", "f", None, None), ("remove", "gone", None, None),
    ("check", None, ["c"], 1200),
    ("remove", "a", None, None),
    ("check", None, [], 900),
    ("add", "e", 50, 2.0),
    ("add", "d", 300, 2.0),  # re-added: keeps its place among ties (before e)
    ("add", "g", 400, 6.0),
    ("check", None, ["c", "d"], 1350),
    ("add", "g", 100, 6.0),  # a new size counts
    ("check", None, ["c"], 1050),
]
FINAL_AFTER_EVICTION = 750


def test_lru_index_exact_eviction_order():
    index = LRUIndex(capacity_bytes=1000)
    for op, h, a, b in SCENARIO:
        if op == "add":
            index.add(h, a, b)
        elif op == "touch":
            assert index.touch(h, b) is (h != "gone")
        elif op == "remove":
            assert index.remove(h) is (h != "gone")
        else:
            assert (index.victims(), index.total_bytes()) == (a, b), (op, a, b)
    for h in index.victims():
        index.remove(h)
    assert index.total_bytes() == FINAL_AFTER_EVICTION <= index.capacity_bytes and index.victims() == []
    assert len(index) == 4 and "c" not in index and index.contains("d")
    with pytest.raises(ValueError, match="size of block 'x' must be a non-negative int of bytes, got -1"):
        index.add("x", -1, 0.0)
    with pytest.raises(ValueError, match="capacity_bytes must be a positive int, got 0"):
        LRUIndex(0)


async def test_redis_index_exact_eviction_order(redis):
    index = RedisIndex(redis, "cache", capacity_bytes=1000)
    assert index.lru_key == "{streamoe:cache:cache}:lru" and index.size_key == "{streamoe:cache:cache}:size"
    for op, h, a, b in SCENARIO:
        if op == "add":
            await index.add(h, a, b)
        elif op == "touch":
            await index.touch_many([h], b)
        elif op == "remove":
            assert await index.remove(h) is (h != "gone")
        else:
            assert (await index.victims(), await index.total_bytes()) == (a, b), (op, a, b)
    assert await redis.zscore(index.lru_key, "gone") is None
    assert await index.remove_many(await index.victims()) == 1
    assert await index.total_bytes() == FINAL_AFTER_EVICTION and await index.victims() == []
    assert await index.count() == 4 and await index.sizes(["d", "c", "g"]) == {"d": 300, "g": 100}


@pytest.mark.parametrize("page_size", [1, 2, 256])
async def test_redis_index_matches_lru_index_across_pages_and_ties(redis, page_size):
    oracle, index = LRUIndex(200), RedisIndex(redis, "cache", 200, page_size=page_size)
    for i in range(20):  # names sort opposite to insertion, so Redis's own tie order would be wrong
        h, size, now = f"h{99 - i}", 10 + (i * 13) % 30, float((i * 7) % 4)
        oracle.add(h, size, now)
        await index.add(h, size, now)
    await index.touch_many(["h99", "h90", "h85"], 1.0)
    for h in ["h99", "h90", "h85"]:
        oracle.touch(h, 1.0)
    expected = oracle.victims()
    assert len(expected) > 3 and await index.victims() == expected
    assert await index.total_bytes() == oracle.total_bytes()


async def test_redis_index_rebuilds_from_the_store_after_flushdb(redis, store):
    index = RedisIndex(redis, "cache", capacity_bytes=2 * (96 + 256 + 64 * 80 * 4))
    blocks = [block(i) for i in range(3)]
    for (h, tokens), layers, last_use in zip(blocks, [1, 2, 1], [30.0, 10.0, 20.0]):
        store.put(h, tokens, payload(layers=layers))
        os.utime(store.path_of(h), (last_use, last_use))
        await index.add(h, store.size_of(h), last_use)
    hashes = [h for h, _ in blocks]
    before = (await index.victims(), await index.total_bytes(), await index.sizes(hashes))
    assert before[0] == [hashes[1]]
    await redis.flushdb()
    assert await index.victims() == [] and await index.total_bytes() == 0
    assert await index.rebuild(store.scan(), batch_size=2) == 3
    assert (await index.victims(), await index.total_bytes(), await index.sizes(hashes)) == before
    assert await index.rebuild(store.scan()) == 0 and await index.total_bytes() == before[1]
    victims = await index.victims()
    assert store.evict(victims) == before[2][hashes[1]]
    await index.remove_many(victims)
    assert await index.total_bytes() <= index.capacity_bytes and await index.victims() == []
    assert sorted(h for h, _, _ in store.scan()) == sorted([hashes[0], hashes[2]])
