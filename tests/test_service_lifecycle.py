"""The service lifecycle: SIGTERM always ends a service promptly and cleanly — while its
background loops are inside Redis calls, and when Redis is already gone."""
from __future__ import annotations

import time

from procs import ServiceProcess


def test_sigterm_during_busy_housekeeping_exits_cleanly(redis_url):
    """Housekeeping every 20 ms keeps a Redis call in flight most of the time; a cancel landing in
    one must not keep the loop (or the process) alive."""
    for _ in range(4):
        service = ServiceProcess("services.balancer", redis_url, "--housekeeping-s", "0.02")
        time.sleep(0.7)
        started = time.monotonic()
        assert service.stop(timeout=20) == 0, service.log_tail()
        assert time.monotonic() - started < 8
        assert '"event": "stopped"' in service.log_tail()


def test_sigterm_after_redis_died_exits(tmp_path):
    from shared.launcher.redis_server import start_redis

    redis_proc, url = start_redis(tmp_path / "redis", appendonly=False)
    service = ServiceProcess("services.balancer", url, "--housekeeping-s", "0.05", "--heartbeat-ttl-s", "0.3")
    try:
        time.sleep(0.5)
        redis_proc.kill()
        redis_proc.wait()
        time.sleep(0.5)
        started = time.monotonic()
        assert service.stop(timeout=25) == 0, service.log_tail()
        assert time.monotonic() - started < 15
    finally:
        service.kill()
