"""A real service process for tests and benchmarks: started on a free port, waited for until its
/health answers 200, stopped with one SIGTERM."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from shared.launcher.redis_server import free_port


class ServiceProcess:
    """A service (`python -m MODULE`) on a port of its own, its stderr in a log file; by default
    the constructor returns once its /health answers 200."""

    def __init__(self, module: str, redis_url: str, *args: str, instance_id: str | None = None,
                 timeout: float = 120.0, wait: bool = True, log_dir: str | Path | None = None):
        self.port = free_port()
        self._terminated = False
        self.instance_id = instance_id or f"{module}-{self.port}"
        # NOTE: logs go to a file, not a pipe nobody reads: a full pipe would block the service.
        if log_dir is None:
            self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{module}-", suffix=".log", delete=False)
        else:
            self.log = open(Path(log_dir) / f"{module}-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", module, "--redis-url", redis_url,
                                      "--http-port", str(self.port), "--instance-id", self.instance_id, *args],
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        self.module, self.timeout = module, timeout
        if wait:
            self.wait_healthy()

    def wait_healthy(self) -> None:
        """Until /health answers 200 (the process exiting, or the timeout, raises)."""
        module, timeout = self.module, self.timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{module} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.proc.kill()
        raise TimeoutError(f"{module} not healthy in {timeout} s: {self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        with open(self.log.name) as f:
            return f.read()[-n:]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def terminate(self) -> None:
        """One SIGTERM: a second one could land after the service removed its handler."""
        if self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.terminate()

    def stop(self, timeout: float = 30.0) -> int:
        self.terminate()
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
