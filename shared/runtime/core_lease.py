"""The cores of one machine lent between its workers, step by step, never oversubscribed.

`streamoe up --worker-threads lend` gives its W workers one small file of W slots, each the threads
that worker computes on now (0: idle). Before a step a worker claims every core the others do not
hold, and at least its share (cores ÷ W); once it has no work left it gives them back. So while
prefill waits for requests, decode computes on its core too. The moment prefill has work it claims
its share, and waits until decode's next step, which sees the claim and takes only what is left:
the threads of all workers never outnumber the cores (OpenMP threads spin at their barriers, and
two processes spinning on shared cores run several times slower than on a split). The wait is at
most one step of the other worker, and at most MAX_WAIT_S (a worker that died holding cores, or a
peer of an EP group that needs this rank's step to end its own): then it computes anyway.

`--worker-threads turns` uses the same file the other way: the workers take every core in turn,
one step each. A worker that wants a step while another computes marks its slot waiting (-1) and
polls; the one computing hands the cores over at the end of its step (and waits the millisecond
until the waiter holds them) instead of starting its next. So each step runs on all the cores and
none on a core another worker's threads spin on, and a decode rank does not run its small batches
beside a prefill (each re-reading the weights on half the cores): while prompts arrive, prefill
and decode alternate step by step, as one engine mixing them would. A waiter computes anyway after
MAX_WAIT_S, on its share.

The file is read and written under an exclusive `flock`, a few microseconds a claim. A worker that
dies holding cores keeps its slot until `streamoe up` clears it.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import struct
import time
from pathlib import Path

SLOT = struct.Struct("<i")
MAX_WAIT_S = 2.0  # a claim waits at most this long for the other workers to leave it its cores
POLL_S = 0.001
WAITING = -1  # turns: the slot of a worker polling for its turn
HAND_OVER_S = 0.2  # turns: how long a worker ending its step waits for a waiter to take the cores
MODES = ("lend", "turns")


def create(path: Path, num_slots: int) -> None:
    """The lease file of `num_slots` workers, every one idle."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(bytes(SLOT.size * num_slots))
    tmp.replace(path)


def clear(path: Path, slot: int) -> None:
    """Slot `slot` idle (its worker died, or was replaced)."""
    with open(path, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(slot * SLOT.size)
        f.write(SLOT.pack(0))


def core_lease_flag(text: str) -> tuple[Path, int]:
    """--core-lease PATH:SLOT (an argparse type)."""
    path, _, slot = text.rpartition(":")
    if not path or not slot.isdigit():
        raise argparse.ArgumentTypeError(f"--core-lease={text}: expected PATH:SLOT (the lease file and this "
                                         "worker's slot in it)")
    return Path(path), int(slot)


class CoreLease:
    def __init__(self, path: Path, slot: int, cores: int, share: int, mode: str = "lend"):
        self.fd = os.open(path, os.O_RDWR)
        self.num_slots = os.fstat(self.fd).st_size // SLOT.size
        if not 0 <= slot < self.num_slots:
            os.close(self.fd)
            raise ValueError(f"--core-lease={path}:{slot}: the file has {self.num_slots} slots")
        if mode not in MODES:
            os.close(self.fd)
            raise ValueError(f"--core-lease-mode={mode}: expected one of {', '.join(MODES)}")
        self.slot, self.cores, self.share, self.mode = slot, cores, max(1, share), mode
        self.held = 0  # what our slot says
        self.threads = 0  # what this thread computes with (torch.set_num_threads)

    def _swap(self, want: int | None) -> tuple[int, int]:
        """Under the lock: our slot set to `want` (None: all the others leave free, at least the
        share) -> (our slot, the others' sum)."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            others = sum(self._others())
            self._set(max(self.share, self.cores - others) if want is None else want)
            return self.held, others
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def take(self, max_wait_s: float = MAX_WAIT_S) -> int:
        """Before a step, on the thread that computes it: the threads to compute with, set, once the
        other workers leave them free (or after `max_wait_s`)."""
        import torch  # here: `streamoe up` creates and clears lease files without loading torch

        deadline = time.monotonic() + max_wait_s
        enough = max(self.cores, self.share * self.num_slots)  # more workers than cores: their shares
        self.held, others = self._swap(None)
        while self.held + others > enough and time.monotonic() < deadline:
            time.sleep(POLL_S)
            self.held, others = self._swap(None)
        if self.held != self.threads:
            torch.set_num_threads(self.held)
            self.threads = self.held
        return self.held

    def before_step(self) -> int:
        """The threads of the next step, once the mode gives them."""
        return self.take() if self.mode == "lend" else self.take_turn()

    def after_step(self, more: bool) -> None:
        """A step done; `more`: this worker has unfinished work."""
        if self.mode == "turns":
            self.end_turn(more)
        elif not more:
            self.give_back()

    def _others(self) -> list[int]:
        raw = os.pread(self.fd, SLOT.size * self.num_slots, 0)
        return [SLOT.unpack_from(raw, i * SLOT.size)[0] for i in range(self.num_slots) if i != self.slot]

    def _set(self, value: int) -> None:
        self.held = value
        os.pwrite(self.fd, SLOT.pack(value), self.slot * SLOT.size)

    def take_turn(self, max_wait_s: float = MAX_WAIT_S) -> int:
        """Turns: every core, once no other worker computes; while one does, wait (polling) for the
        end of its step. Holding the cores from a step no one waited after, hand them to a waiter
        first. After `max_wait_s` compute anyway, on the share."""
        import torch

        deadline = time.monotonic() + max_wait_s
        while True:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                others = self._others()
                busy, waiting = any(v > 0 for v in others), WAITING in others
                if self.held > 0 and waiting and not busy:
                    self._hand_over()
                    continue
                if not busy or time.monotonic() >= deadline:
                    self._set(self.share if busy else self.cores)
                    break
                self._set(WAITING)
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            time.sleep(POLL_S)
        if self.held != self.threads:
            torch.set_num_threads(self.held)
            self.threads = self.held
        return self.held

    def end_turn(self, more: bool) -> None:
        """Turns, after a step: the cores to a waiter; else kept for the next step, or given back
        when this worker has nothing left."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            if not more:
                self._set(0)
            elif WAITING in self._others():
                self._hand_over()
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _hand_over(self) -> None:
        """Under the lock, a waiter seen: our slot idle, then (the lock released meanwhile) wait till a
        waiter holds the cores, so that our next claim does not take them back first."""
        self._set(0)
        deadline = time.monotonic() + HAND_OVER_S
        while time.monotonic() < deadline:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            time.sleep(POLL_S / 4)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            others = self._others()
            if any(v > 0 for v in others) or WAITING not in others:
                return

    def give_back(self) -> None:
        """No work left: our slot idle (the threads stay set until the next take)."""
        if self.held:
            self.held, _ = self._swap(0)

    def close(self) -> None:
        self.give_back()
        os.close(self.fd)
