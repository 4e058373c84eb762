"""`streamoe up` for the benchmarks: started, waited for, and stopped however the run ends."""
from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def running_system(*up_args: str) -> Iterator[str]:
    """`streamoe up ARGS` until its ready line -> its URL; SIGTERM (everything stops) on exit, a
    SIGTERM to this process included (`timeout` sends one), which would otherwise leave `up`,
    in a session of its own, running."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    up = subprocess.Popen([sys.executable, "-m", "shared.launcher.cli", "up", *up_args], stdout=subprocess.PIPE,
                          text=True, start_new_session=True)
    try:
        line = up.stdout.readline().strip()
        if not line.startswith("streamoe ready: "):
            raise SystemExit(f"streamoe up did not get ready: {line!r}")
        yield line.removeprefix("streamoe ready: ")
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=120)
