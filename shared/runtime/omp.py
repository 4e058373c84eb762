"""One OpenMP master per worker process: the compute thread.

GNU OpenMP (the runtime torch's CPU build and our native kernels share) gives every thread that
starts a parallel region a team of its own, whose threads stay parked for that thread's next region
until it exits. A worker whose main thread ever ran a parallel region (a load, a tensor op on the
event loop) or whose `asyncio.to_thread` helper did (an EPLB placement staged, a prefix-cache read)
while its compute thread runs the steps holds two teams: more OpenMP threads than cores. libgomp then
cuts every waiting thread's spin to at most a thousand iterations (whatever GOMP_SPINCOUNT or
OMP_WAIT_POLICY say) before it sleeps in the kernel, and a decode step's ~1,400 regions pay a wake-up
at most of them: on 2 cores a 32-row bf16 `small` step took 1.20x as long (`python -m
loadgen.bench_omp`; loadgen/README.md, "One OpenMP team per worker process").

So a worker computes on one thread (shared/runtime/engine_service.py: the model loads, the
calibration measures and the steps run there), and every other thread of the process that may touch
tensors (the event loop, `asyncio.to_thread`'s helpers) is made serial with `serial_thread()`: its
regions run on itself alone and no team is ever started for it. The compute thread and its OpenMP
threads are named "compute", the helpers "serial" (`top -H` shows them so).
"""
from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor

import torch

_RUNTIMES = ("libgomp", "libiomp", "libomp")  # GNU, Intel, LLVM: all export omp_set_num_threads
_PR_SET_NAME = 15


@functools.cache
def _runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime this process has loaded (torch's), or None (none, or not Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = [line.split(maxsplit=5)[-1].strip() for line in maps if "/" in line]
    except OSError:
        return None
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        if name.startswith(_RUNTIMES) and ".so" in name:
            return ctypes.CDLL(path)
    return None


def name_thread(name: str) -> None:
    """The calling thread's name as the kernel shows it (`top -H`, /proc/PID/task/TID/comm; 15 bytes at
    most). Threads it starts, OpenMP's included, begin with the same name."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (AttributeError, OSError):  # not Linux: names are only for the eye
        pass


def serial_thread(name: str | None = None) -> bool:
    """Make the calling thread's OpenMP regions run on itself alone, leaving torch's process-wide
    thread count (what other threads start with) as it is, and name it if `name`. False where no
    OpenMP runtime is loaded."""
    if name:
        name_thread(name)
    torch.get_num_threads()  # torch's per-thread set-up first (it would set the count again later)
    runtime = _runtime()
    if runtime is None:
        return False
    runtime.omp_set_num_threads(1)
    return True


def serial_pool(max_workers: int | None = None) -> ThreadPoolExecutor:
    """A thread pool of serial threads named "serial" (for `loop.set_default_executor`:
    `asyncio.to_thread`'s helpers never start OpenMP teams of their own)."""
    return ThreadPoolExecutor(max_workers, thread_name_prefix="serial", initializer=serial_thread,
                              initargs=("serial",))
