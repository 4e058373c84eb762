"""Start a real service process and wait until its /health answers 200; read its metrics and SSE replies."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.request

from shared.launcher.redis_server import free_port


class ServiceProcess:
    def __init__(self, module: str, redis_url: str, *args: str, instance_id: str | None = None,
                 timeout: float = 120.0, wait: bool = True):
        self.port = free_port()
        self._terminated = False
        self.instance_id = instance_id or f"{module}-{self.port}"
        # NOTE: logs go to a file, not a pipe nobody reads: a full pipe would block the service.
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{module}-", suffix=".log", delete=False)
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


def metric(service: ServiceProcess, name: str, **labels: str) -> float:
    """The sum of a service's /metrics samples with this name and these labels (0 when absent)."""
    from shared.cost.metrics_report import sample_sum

    try:
        with urllib.request.urlopen(service.url("/metrics"), timeout=10) as r:
            text = r.read().decode()
    except OSError:
        if service.proc.poll() is not None:  # say why it is gone: CI keeps only the test's output
            raise RuntimeError(f"{service.module} exited with {service.proc.returncode}: "
                               f"{service.log_tail()}") from None
        raise
    return sample_sum(text, name, **labels)


async def greedy_token_ids(session, gateway: ServiceProcess, model: str, prompt: list[int],
                           max_tokens: int) -> list[int]:
    """One greedy, EOS-ignoring completion through the gateway -> its token ids."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    async with session.post(gateway.url("/v1/completions"), json=body) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["choices"][0]["token_ids"]


async def sse_events(response):
    """The JSON events of an OpenAI-style SSE response (aiohttp), without the closing [DONE]."""
    async for line in response.content:
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            yield json.loads(line[6:])


def stop_all(services) -> None:
    """SIGTERM every still-running service at once, then wait for each (the killed ones included)."""
    services = list(services)
    for service in services:
        service.terminate()
    for service in services:
        if service.proc.poll() is None:
            service.stop()
