"""Start a real service process and wait until its /health answers 200; read its metrics and SSE replies."""
from __future__ import annotations

import json
import urllib.request

from shared.launcher.service_process import ServiceProcess  # noqa: F401  (tests import it from here)


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
