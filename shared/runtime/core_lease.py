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
    def __init__(self, path: Path, slot: int, cores: int, share: int):
        self.fd = os.open(path, os.O_RDWR)
        self.num_slots = os.fstat(self.fd).st_size // SLOT.size
        if not 0 <= slot < self.num_slots:
            os.close(self.fd)
            raise ValueError(f"--core-lease={path}:{slot}: the file has {self.num_slots} slots")
        self.slot, self.cores, self.share = slot, cores, max(1, share)
        self.held = 0  # what our slot says
        self.threads = 0  # what this thread computes with (torch.set_num_threads)

    def _swap(self, want: int | None) -> tuple[int, int]:
        """Under the lock: our slot set to `want` (None: all the others leave free, at least the
        share) -> (our slot, the others' sum)."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(self.fd, SLOT.size * self.num_slots, 0)
            others = sum(SLOT.unpack_from(raw, i * SLOT.size)[0] for i in range(self.num_slots) if i != self.slot)
            mine = max(self.share, self.cores - others) if want is None else want
            os.pwrite(self.fd, SLOT.pack(mine), self.slot * SLOT.size)
            return mine, others
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

    def give_back(self) -> None:
        """No work left: our slot idle (the threads stay set until the next take)."""
        if self.held:
            self.held, _ = self._swap(0)

    def close(self) -> None:
        self.give_back()
        os.close(self.fd)
