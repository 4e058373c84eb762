"""The core lease of `streamoe up --worker-threads lend|turns` (shared/runtime/core_lease.py)."""
from __future__ import annotations

import argparse
import struct
import threading
import time

import pytest
import torch

from shared.runtime import core_lease
from shared.runtime.core_lease import CoreLease, core_lease_flag


def slots(path) -> tuple[int, ...]:
    raw = path.read_bytes()
    return struct.unpack(f"<{len(raw) // 4}i", raw)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_worker_takes_what_the_others_leave_and_at_least_its_share(tmp_path, restore_threads):
    path = tmp_path / "lease"
    core_lease.create(path, 3)
    assert slots(path) == (0, 0, 0)
    a, b, c = (CoreLease(path, i, cores=6, share=2) for i in range(3))
    assert a.take() == 6 and torch.get_num_threads() == 6  # alone: every core
    assert slots(path) == (6, 0, 0)
    start = time.monotonic()
    assert b.take(max_wait_s=0.2) == 2 and slots(path) == (6, 2, 0)  # a held them all: b claims its share,
    assert time.monotonic() - start >= 0.2  # waits for a's next step, and here, where none comes, goes on
    assert a.take() == 4 and torch.get_num_threads() == 4  # a's next step leaves b its share
    assert c.take() == 2 and slots(path) == (4, 2, 2)
    assert a.take() == 2  # everyone busy: the shares, no more than the cores
    b.give_back()
    c.give_back()
    assert slots(path) == (2, 0, 0) and a.take() == 6
    a.close()
    assert slots(path) == (0, 0, 0)
    b.take()
    core_lease.clear(path, 1)  # what `up` does before it starts a dead worker's successor
    assert slots(path) == (0, 0, 0)


def test_a_claim_waits_for_the_holders_next_step(tmp_path, restore_threads):
    """Never more threads than cores: the claimer computes once the holder's next step took less."""
    path = tmp_path / "lease"
    core_lease.create(path, 2)
    decode, prefill = CoreLease(path, 0, cores=2, share=1), CoreLease(path, 1, cores=2, share=1)
    assert decode.take() == 2
    got = {}
    claimer = threading.Thread(target=lambda: got.update(threads=prefill.take(max_wait_s=30),
                                                         at=time.monotonic()))
    claimer.start()
    time.sleep(0.3)
    assert claimer.is_alive() and slots(path) == (2, 1)  # claimed, waiting: decode's step goes on
    stepped = time.monotonic()
    assert decode.take() == 1  # decode's next step sees the claim
    claimer.join(timeout=10)
    assert got["threads"] == 1 and got["at"] >= stepped and got["at"] - stepped < 1.0
    assert slots(path) == (1, 1)
    decode.give_back()
    assert prefill.take() == 2  # decode idle: all of them


def test_more_workers_than_cores_take_their_shares_without_waiting(tmp_path, restore_threads):
    path = tmp_path / "lease"
    core_lease.create(path, 3)
    workers = [CoreLease(path, i, cores=2, share=1) for i in range(3)]
    start = time.monotonic()
    assert workers[0].take(max_wait_s=30) == 2 and workers[1].take(max_wait_s=30) == 1  # 3 threads: the shares
    assert workers[0].take(max_wait_s=30) == 1 and workers[2].take(max_wait_s=30) == 1
    assert slots(path) == (1, 1, 1) and time.monotonic() - start < 5


def test_turns_hand_every_core_to_one_worker_at_a_time(tmp_path, restore_threads, monkeypatch):
    """Turns: a step on every core; a waiter gets them at the end of the holder's step, and the
    holder's next step waits for the waiter's to end, so the two alternate; never both computing."""
    monkeypatch.setattr(core_lease, "HAND_OVER_S", 30.0)  # a loaded CI machine may schedule the waiter late
    path = tmp_path / "lease"
    core_lease.create(path, 2)
    prefill, decode = (CoreLease(path, i, cores=2, share=1, mode="turns") for i in range(2))
    assert decode.take_turn() == 2 and torch.get_num_threads() == 2 and slots(path) == (0, 2)
    decode.end_turn(more=True)
    assert slots(path) == (0, 2)  # no one waits: kept for its next step
    got = {}

    def wait_turn(lease, key):
        threads = lease.take_turn(max_wait_s=30)
        got[key] = (threads, time.monotonic(), slots(path))

    claimer = threading.Thread(target=wait_turn, args=(prefill, "prefill"))
    claimer.start()
    time.sleep(0.3)
    assert claimer.is_alive() and slots(path) == (core_lease.WAITING, 2)  # waiting, while decode computes
    ended = time.monotonic()
    decode.end_turn(more=True)  # hands over, and returns once prefill holds the cores
    claimer.join(timeout=10)
    assert got["prefill"][0] == 2 and got["prefill"][1] >= ended and got["prefill"][2] == (2, 0)
    claimer = threading.Thread(target=wait_turn, args=(decode, "decode"))
    claimer.start()
    time.sleep(0.3)
    assert claimer.is_alive() and slots(path) == (2, core_lease.WAITING)  # decode's next step waits its turn
    prefill.end_turn(more=False)  # nothing left: its slot idle, decode's turn
    claimer.join(timeout=10)
    assert got["decode"][0] == 2 and got["decode"][2] == (0, 2)
    # a holder that kept the cores (no one waited at the end of its step) hands them to a waiter before
    # its next step: the waiter's step first
    decode.end_turn(more=True)
    order = []
    waiter = threading.Thread(target=lambda: (prefill.take_turn(max_wait_s=30), order.append("prefill"),
                                              time.sleep(0.2), prefill.end_turn(more=False)))
    waiter.start()
    while slots(path)[0] != core_lease.WAITING:
        time.sleep(0.001)
    assert decode.take_turn(max_wait_s=30) == 2
    order.append("decode")
    waiter.join(timeout=10)
    assert order == ["prefill", "decode"] and slots(path) == (0, 2)
    decode.end_turn(more=False)
    assert slots(path) == (0, 0)


def test_a_turn_that_never_comes_is_computed_on_the_share(tmp_path, restore_threads):
    path = tmp_path / "lease"
    core_lease.create(path, 2)
    stuck, late = (CoreLease(path, i, cores=2, share=1, mode="turns") for i in range(2))
    assert stuck.take_turn() == 2  # a worker that died mid-step, holding every core
    start = time.monotonic()
    assert late.take_turn(max_wait_s=0.2) == 1 and time.monotonic() - start >= 0.2
    assert slots(path) == (2, 1)
    late.end_turn(more=True)
    assert slots(path) == (2, 1)  # no waiter: it keeps its share for its next step
    core_lease.clear(path, 0)  # `up` restarts the dead worker
    assert late.take_turn() == 2 and slots(path) == (0, 2)


def test_refusals(tmp_path):
    path = tmp_path / "lease"
    core_lease.create(path, 2)
    with pytest.raises(ValueError, match=r"--core-lease=.*lease:2: the file has 2 slots"):
        CoreLease(path, 2, cores=2, share=1)
    with pytest.raises(ValueError, match="--core-lease-mode=steal: expected one of lend, turns"):
        CoreLease(path, 1, cores=2, share=1, mode="steal")
    assert core_lease_flag(f"{path}:1") == (path, 1)
    for bad in ("lease", ":1", f"{path}:x", f"{path}:-1"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"--core-lease={bad}: expected PATH:SLOT"):
            core_lease_flag(bad)
