"""deploy/: the compose file and the Kubernetes manifests checked against the services' own
parsers, then run as deployed, without containers: every compose command as a process of this
machine, and deploy/README.md's two-machine layout across two network namespaces."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import runpy
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml

from shared.launcher.cli import build_parser as streamoe_parser
from shared.launcher.cliargs import apply_env_defaults, env_name
from shared.launcher.redis_server import free_port, start_redis
from shared.model.presets import preset_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SERVICES = {"tokenizer", "cache", "balancer", "prefill", "decode", "gateway"}
WORKERS = ("prefill", "decode")
STATELESS = ("tokenizer", "cache", "balancer", "gateway")
# what the cache service and every worker must agree on: the dtype is part of each block's hash
ENGINE_SETTINGS = ("model", "dtype", "device", "cache_dir", "cache_capacity_mib")
NON_FLAG_VARIABLES = {"STREAMOE_HOME"}  # read by shared/, not by a flag
SECRET = "secret-{key}"  # what a secretKeyRef resolves to here
API_KEY = "deploy-test-key"
# NOTE: compose services under this profile are the monitoring stack (Prometheus, Grafana), not
# streamoe services: tests/test_grafana.py checks them.
MONITORING_PROFILE = "monitoring"


# --- the services' own parsers ---------------------------------------------------------------

class _Built(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def service_parser(module: str) -> argparse.ArgumentParser:
    """The parser `python -m <module>` builds, taken just before it would parse sys.argv."""
    def capture(parser, argv=None):
        raise _Built(parser)

    with mock.patch("shared.runtime.service.parse_service_args", capture):
        try:
            runpy.run_module(module, run_name="__main__")
        except _Built as built:
            return built.parser
    raise AssertionError(f"python -m {module} returned without building its parser")


def parse_service(argv: list[str], env: dict[str, str], strict: bool = True) -> tuple[str, argparse.Namespace]:
    """`python -m services.<name> ARGS` under `env`, parsed exactly as the service parses it ->
    (name, args). `strict`: every STREAMOE_* variable must be one that service reads."""
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("services."), f"not a service command: {argv}"
    module = argv[2]
    assert argv[2].split(".")[1] in SERVICES and importlib.util.find_spec(f"{module}.__main__"), \
        f"{module}: no such service entry point"
    parser = service_parser(module)

    def fail(message: str):
        raise AssertionError(f"{shlex.join(argv)}: {message}")

    parser.error = fail
    read = {env_name(next(o for o in a.option_strings if o.startswith("--")))
            for a in parser._actions if any(o.startswith("--") for o in a.option_strings)}
    unread = sorted(k for k in env if k.startswith("STREAMOE_") and k not in read | NON_FLAG_VARIABLES)
    assert not (strict and unread), f"{module} reads no flag from {unread}"
    apply_env_defaults(parser, env)
    return module.split(".")[1], parser.parse_args(argv[3:])


def init_model_args(script: str) -> argparse.Namespace:
    """The `streamoe init-model ...` inside a shell one-liner, parsed by the streamoe CLI."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    start = words.index("streamoe")
    end = next((i for i in range(start, len(words)) if words[i] in {"&&", "||", ";", "}"}), len(words))
    return streamoe_parser().parse_args(words[start + 1:end])


def check_groups(workers: dict[str, list[argparse.Namespace]], balancer: argparse.Namespace, preset: str) -> None:
    """Each EP group: ranks 0..N-1 once each, one --ep-size, experts split evenly over the ranks,
    and a balancer --ep-nodes that divides the group."""
    num_experts = preset_config(preset)["n_routed_experts"]
    for role in WORKERS:
        group = workers[role]
        sizes = {a.ep_size for a in group}
        assert len(sizes) == 1, f"{role}: ranks disagree on --ep-size: {sizes}"
        size = sizes.pop()
        ranks = sorted(a.rank for a in group)
        assert ranks == list(range(size)), f"{role}: ranks {ranks} for --ep-size {size}"
        slots = {num_experts + a.num_redundant_experts for a in group}
        assert len(slots) == 1 and slots.pop() % size == 0, f"{role}: expert slots do not split over {size} ranks"
        nodes = balancer.ep_nodes.of(group[0].ep_group_id or role)
        assert size % nodes == 0, f"{role}: EP {size} does not split over --ep-nodes {balancer.ep_nodes}"


def check_engines(cache: argparse.Namespace, workers: dict[str, list[argparse.Namespace]]) -> None:
    for args in workers["prefill"] + workers["decode"]:
        for setting in ENGINE_SETTINGS:
            assert getattr(args, setting) == getattr(cache, setting), \
                f"--{setting.replace('_', '-')}: the cache service has {getattr(cache, setting)}, " \
                f"{args.role} rank {args.rank} {getattr(args, setting)}"
    assert cache.cache_dir is not None, "the prefix cache is off"


def mounted(path: Path | None, mounts: dict[str, str]) -> str:
    """The volume holding `path` (mounts: mount path -> volume)."""
    assert path is not None, "a directory the service needs is not set"
    found = [v for m, v in mounts.items() if path == Path(m) or Path(m) in path.parents]
    assert found, f"{path} is on no volume ({mounts})"
    return found[0]


# --- compose ---------------------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def interpolate(value, values: dict[str, str]) -> str:
    """Compose's ${VAR} and ${VAR:-default}, from `values` only."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: values.get(m[1]) or m[2] or "", str(value))


def compose_service(spec: dict, values: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    return ([interpolate(w, values) for w in spec["command"]],
            {k: interpolate(v, values) for k, v in (spec.get("environment") or {}).items()})


def health_port(spec: dict) -> int:
    found = re.findall(r"http://127\.0\.0\.1:(\d+)/health\b", " ".join(spec["healthcheck"]["test"]))
    assert len(found) == 1, f"healthcheck does not ask one /health: {spec['healthcheck']}"
    return int(found[0])


def monitoring(spec: dict) -> bool:
    return MONITORING_PROFILE in spec.get("profiles", [])


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_compose_matches_the_services():
    """Every compose command parses with its service's parser under its environment, and what
    the services must share (Redis, ports, volumes, EP groups, engine settings) agrees."""
    services = compose()["services"]
    assert flag(services["redis"]["command"], "--appendonly") == "yes", "Redis loses the streams on restart"
    init = init_model_args(services["init-model"]["command"][-1])
    parsed: dict[str, list[argparse.Namespace]] = {name: [] for name in SERVICES}
    volumes: dict[str, set[str]] = {}
    for key, spec in services.items():
        if key in ("redis", "init-model") or monitoring(spec):
            continue
        name, args = parse_service(*compose_service(spec, {}))
        replicas = spec.get("deploy", {}).get("replicas", 1)
        parsed[name] += [args] * replicas
        assert args.host == "0.0.0.0", f"{key} listens on {args.host}"
        redis = urlsplit(args.redis_url)
        assert redis.hostname in services and services[redis.hostname]["image"].startswith("redis"), args.redis_url
        assert health_port(spec) == args.http_port, f"{key}: healthcheck port is not --http-port {args.http_port}"
        mounts = {v.split(":")[1]: v.split(":")[0] for v in spec.get("volumes", [])}
        if name != "balancer":
            assert mounted(args.model, mounts) == "models", f"{key}: the model is not on the models volume"
            assert str(args.model) in services["init-model"]["command"][-1], f"{key}: no init-model for {args.model}"
            assert spec["depends_on"]["init-model"]["condition"] == "service_completed_successfully", key
        assert spec["depends_on"]["redis"]["condition"] == "service_healthy", key
        if name in ("cache", *WORKERS):
            volumes.setdefault(mounted(args.cache_dir, mounts), set()).add(key)
        if name in WORKERS:
            assert replicas == 1, f"{key}: a replica would duplicate rank {args.rank}"
        if name == "gateway":
            assert any(p.endswith(f":{args.http_port}") for p in spec["ports"]), spec["ports"]
    assert {n for n, a in parsed.items() if a} == SERVICES
    assert len(parsed["tokenizer"]) >= 2 and len(parsed["gateway"]) >= 2, "replicas of the stateless front"
    assert len(parsed["balancer"]) == 1, "EPLB publishes placements: one balancer"
    assert len(volumes) == 1, f"the cache service and the workers must share one block store: {volumes}"
    check_engines(parsed["cache"][0], parsed)
    check_groups(parsed, parsed["balancer"][0], init.preset)


def merged(base: dict, override: dict) -> dict:
    """Compose's merge of an override file: maps merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def test_compose_cluster_override_runs_every_service_on_a_redis_cluster():
    """deploy/compose.cluster.yaml over compose.yaml: six cluster nodes joined as 3 primaries with a
    replica each, every service with --redis-cluster and one partition count, after the join, and
    the gateway waiting for a replica."""
    override = yaml.safe_load((DEPLOY / "compose.cluster.yaml").read_text())
    services = merged(compose(), override)["services"]
    nodes = sorted(k for k, v in services.items() if str(v.get("image", "")).startswith("redis") and
                   "redis-server" in v.get("command", []))
    assert len(nodes) == 6
    for node in nodes:
        command = services[node]["command"]
        assert flag(command, "--cluster-enabled") == "yes" and flag(command, "--appendonly") == "yes", node
    volumes = {services[n]["volumes"][0].split(":")[0] for n in nodes}
    assert len(volumes) == 6, "each node keeps its append-only file and nodes.conf on a volume of its own"
    join = services["redis-cluster-init"]
    script = join["command"][-1]
    assert all(f"getent hosts {n} " in script for n in nodes) and "--cluster-replicas 1" in script
    assert {k for k, v in join["depends_on"].items() if v["condition"] == "service_healthy"} == set(nodes)
    partitions = set()
    for key, spec in services.items():
        if not str(spec.get("command", [""])[0]).startswith("python"):
            continue
        assert spec["depends_on"]["redis-cluster-init"]["condition"] == "service_completed_successfully", key
        name, args = parse_service(*compose_service(spec, {}))
        assert args.redis_cluster, f"{key}: not on the cluster"
        partitions.add(args.stream_partitions)
        if name == "gateway":
            assert args.redis_wait_replicas == 1, "the gateway accepts a request before a replica has it"
    assert partitions == {3}


# --- Kubernetes ------------------------------------------------------------------------------

def manifests(directory: Path = DEPLOY / "k8s") -> list[dict]:
    return [d for f in sorted(directory.glob("*.yaml")) if f.name != "kustomization.yaml"
            for d in yaml.safe_load_all(f.read_text()) if d]


def strategic_merge(base, patch):
    """Kubernetes' strategic merge, as far as our overlays use it: maps merge key by key; lists of
    named items (containers, env) merge by name, new items first (as kustomize puts them)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: strategic_merge(base[k], v) if k in base else v for k, v in patch.items()}}
    named = isinstance(base, list) and isinstance(patch, list) and \
        all(isinstance(x, dict) and "name" in x for x in base + patch)
    if named:
        patched = {x["name"]: x for x in patch}
        return [x for x in patch if x["name"] not in {b["name"] for b in base}] + \
            [strategic_merge(b, patched[b["name"]]) if b["name"] in patched else b for b in base]
    return patch


def by_name(docs: list[dict]) -> list[dict]:
    return sorted(docs, key=lambda d: (d["kind"], d["metadata"]["name"]))


def kustomized(directory: Path) -> list[dict]:
    """`kubectl kustomize DIRECTORY` for the forms our overlays use: resources (files, or a base
    directory), delete patches, strategic-merge patches by name or by a kind/name regex target."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for resource in spec["resources"]:
        path = directory / resource
        docs += kustomized(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for entry in spec.get("patches", []):
        body = yaml.safe_load(entry["patch"] if "patch" in entry else (directory / entry["path"]).read_text())
        if "target" in entry:
            target = entry["target"]
            targets = [d for d in docs if re.fullmatch(target["kind"], d["kind"])
                       and re.fullmatch(target["name"], d["metadata"]["name"])]
            body = {k: v for k, v in body.items() if k not in ("apiVersion", "kind", "metadata")}
        else:
            targets = [find(docs, body["kind"], body["metadata"]["name"])]
        assert targets, f"{directory.name}: a patch matches nothing: {entry}"
        for doc in targets:
            i = next(i for i, d in enumerate(docs) if d is doc)
            if body.get("$patch") == "delete":
                del docs[i]
            else:
                docs[i] = strategic_merge(doc, body)
    return docs


def find(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), value)


POD_IP = "10.244.1.7"  # what status.podIP resolves to


def pod_env(container: dict, docs: list[dict], workload: dict, ordinal: int) -> dict[str, str]:
    """The container's environment as the kubelet builds it (secrets as placeholders)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        ref = var["valueFrom"]
        if "configMapKeyRef" in ref:
            source = ref["configMapKeyRef"]
            env[var["name"]] = find(docs, "ConfigMap", source["name"])["data"][source["key"]]
        elif "secretKeyRef" in ref:
            env[var["name"]] = SECRET.format(key=ref["secretKeyRef"]["key"])
        elif ref["fieldRef"]["fieldPath"] == "status.podIP":
            assert var["name"] == "STREAMOE_ADVERTISE_HOST", var  # what the heartbeat tells others
            env[var["name"]] = POD_IP
        else:
            assert ref["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']", ref
            assert workload["kind"] == "StatefulSet", "only a StatefulSet pod has an ordinal"
            env[var["name"]] = str(ordinal)
    unresolved = {k: v for k, v in env.items() if "$(" in v}
    assert not unresolved, f"references Kubernetes leaves as they are: {unresolved}"
    return env


def port_of(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def check_pod(workload: dict, container: dict, args: argparse.Namespace, docs: list[dict]) -> dict[str, str]:
    """Probes, scraping, resources, volumes of one service's pod -> its mounts (path -> claim)."""
    pod = workload["spec"]["template"]
    what = f"{workload['kind']} {workload['metadata']['name']}"
    assert args.host == "0.0.0.0", f"{what} listens on {args.host}"
    assert pod["spec"].get("enableServiceLinks") is False, f"{what}: Service links inject STREAMOE_*-like variables"
    labels = pod["metadata"]["labels"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items(), what
    assert port_of(container, "http") == args.http_port, f"{what}: port 'http' is not --http-port {args.http_port}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and port_of(container, get["port"]) == args.http_port, f"{what} {probe}"
    notes = pod["metadata"]["annotations"]
    assert notes == {"prometheus.io/scrape": "true", "prometheus.io/port": str(args.http_port),
                     "prometheus.io/path": "/metrics"}, f"{what}: {notes}"
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][bound].keys(), f"{what}: {bound}"
    # SIGTERM: a worker that is its role's only rank serves until a successor does (at most
    # --handover-timeout-s), then drains (--drain-timeout-s), announces its leave and tears down
    # (~10 s): all of it, after any preStop hook, within the grace period, else the kubelet kills it
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    waits = float(pre_stop[-1].split()[-1]) if pre_stop else 0.0
    waits += getattr(args, "handover_timeout_s", 0.0)
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    assert grace >= waits + args.drain_timeout_s + 10, f"{what}: {grace} s of grace, {args.drain_timeout_s} s of drain"
    redis = urlsplit(args.redis_url)
    service = find(docs, "Service", redis.hostname)
    assert redis.port in [p["port"] for p in service["spec"]["ports"]], args.redis_url
    assert redis.password == SECRET.format(key="redis-password"), f"{what}: the Redis password is not the Secret's"
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"].get("volumes", [])}
    return {m["mountPath"]: claims[m["name"]] for m in container.get("volumeMounts", [])}


def test_manifests_match_the_services():
    """The same for Kubernetes, pod by pod: each StatefulSet ordinal's environment as the kubelet
    would build it, parsed by its service; probes, scraping, GPUs, claims and Services agree."""
    resources = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"]
    assert sorted(resources) == sorted(f.name for f in (DEPLOY / "k8s").glob("*.yaml")
                                       if f.name != "kustomization.yaml")
    assert by_name(kustomized(DEPLOY / "k8s")) == by_name(manifests())
    check_manifests(manifests())


def test_the_kubernetes_cluster_overlay_runs_every_service_on_a_redis_cluster():
    """deploy/k8s-cluster over deploy/k8s: the one Redis replaced by six cluster nodes joined as
    3 primaries with a replica each, every service on the cluster with one partition count and
    waiting for the join, the gateway waiting for a replica."""
    docs = kustomized(DEPLOY / "k8s-cluster")
    assert not [d for d in docs if d["metadata"]["name"] == "streamoe-redis"], "the single Redis is still there"
    parsed = check_manifests(docs)
    assert {a.redis_cluster for runs in parsed.values() for a in runs} == {True}
    assert {a.stream_partitions for runs in parsed.values() for a in runs} == {3}
    assert {a.redis_wait_replicas for a in parsed["gateway"]} == {1}
    nodes = find(docs, "StatefulSet", "streamoe-redis-cluster")
    (node,) = nodes["spec"]["template"]["spec"]["containers"]
    script = node["command"][-1]
    for setting in ("--cluster-enabled yes", "--appendonly yes", '--masterauth "$REDIS_PASSWORD"',
                    "--cluster-config-file /data/nodes.conf"):
        assert setting in script, f"the nodes lack {setting}"
    assert nodes["spec"]["podManagementPolicy"] == "Parallel"
    assert node["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    headless = find(docs, "Service", "streamoe-redis-cluster")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert {p["port"] for p in headless["spec"]["ports"]} == {6379, 16379}  # clients and the cluster bus
    (join,) = find(docs, "Job", "streamoe-redis-cluster-init")["spec"]["template"]["spec"]["containers"]
    count = {e["name"]: e.get("value") for e in join["env"]}["NODES"]
    assert count == {e["name"]: e.get("value") for e in node["env"]}["NODES"] == str(nodes["spec"]["replicas"]) == "6"
    assert "--cluster-replicas 1" in join["command"][-1] and "cluster_state:ok" in join["command"][-1]
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d is not nodes):
        waits = [c for c in workload["spec"]["template"]["spec"]["initContainers"]
                 if c["name"] == "wait-for-redis-cluster"]
        assert waits and "-h streamoe-redis-cluster " in waits[0]["command"][-1], workload["metadata"]["name"]


def check_manifests(docs: list[dict]) -> dict[str, list[argparse.Namespace]]:
    """Every service's pods in `docs` checked; their parsed arguments by service."""
    job = find(docs, "Job", "streamoe-init-model")
    init = init_model_args(job_script(job))
    parsed: dict[str, list[argparse.Namespace]] = {name: [] for name in SERVICES}
    cache_claims = set()
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        if container["command"][:2] != ["python", "-m"]:
            continue  # Redis
        replicas = workload["spec"]["replicas"]
        for ordinal in range(replicas if workload["kind"] == "StatefulSet" else 1):
            env = pod_env(container, docs, workload, ordinal)
            name, args = parse_service(container["command"] + container.get("args", []), env)
            parsed[name] += [args] * (1 if workload["kind"] == "StatefulSet" else replicas)
        mounts = check_pod(workload, container, args, docs)
        if name != "balancer":
            assert mounted(args.model, mounts) == "streamoe-models" and str(args.model) in job_script(job)
        if name in ("cache", *WORKERS):
            cache_claims.add(mounted(args.cache_dir, mounts))
        if name in WORKERS:
            assert workload["kind"] == "StatefulSet", f"{name}: an EP group is a StatefulSet"
            assert workload["spec"].get("podManagementPolicy") == "Parallel", \
                f"{name}: a rank is Ready only once its group joined; OrderedReady never creates rank 1"
            headless = find(docs, "Service", workload["spec"]["serviceName"])
            assert headless["spec"]["clusterIP"] == "None"
            assert headless["spec"]["selector"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            assert gpus == container["resources"]["requests"].get("nvidia.com/gpu") == 1, f"{name}: GPUs {gpus}"
            assert args.device == "cuda", f"{name}: a GPU pod on --device {args.device}"
            assert args.threads == int(container["resources"]["requests"]["cpu"]), f"{name}: --threads vs its CPUs"
        else:
            assert name in STATELESS and workload["kind"] == "Deployment", f"{name} is stateless: a Deployment"
        if name == "gateway":
            assert args.api_key == SECRET.format(key="api-keys"), "the API keys are not the Secret's"
            service = find(docs, "Service", "streamoe-gateway")
            assert service["spec"]["selector"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()
            assert port_of(container, service["spec"]["ports"][0]["targetPort"]) == args.http_port
    assert {n for n, a in parsed.items() if a} == SERVICES
    assert len(parsed["balancer"]) == 1, "EPLB publishes placements: one balancer"
    assert find(docs, "Deployment", "streamoe-balancer")["spec"]["strategy"]["type"] == "Recreate"
    assert len(cache_claims) == 1, f"the cache service and the workers must share one block store: {cache_claims}"
    for claim in ("streamoe-models", *cache_claims):
        assert find(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"], claim
    check_engines(parsed["cache"][0], parsed)
    check_groups(parsed, parsed["balancer"][0], init.preset)
    return parsed


def job_script(job: dict) -> str:
    return job["spec"]["template"]["spec"]["containers"][0]["command"][-1]


# --- running a layout as processes -----------------------------------------------------------

@dataclass
class Running:
    name: str
    proc: subprocess.Popen
    health: str  # the /health URL, as seen from this machine
    log: Path

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def start(name: str, argv: list[str], env: dict[str, str], health: str, logs: Path,
          netns: str | None = None) -> Running:
    """The command as deployed, `python` being this interpreter, under `env` plus this process's
    environment less its STREAMOE_* variables (so nothing set here leaks into the deployment)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("STREAMOE_")}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"  # `streamoe`
    argv = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
    log = logs / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*(["ip", "netns", "exec", netns] if netns else []), *argv], env={**base, **env},
                                stdout=out, stderr=subprocess.STDOUT, cwd=logs, start_new_session=True)
    return Running(name, proc, health, log)


def wait_healthy(processes: list[Running], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(processes)
    while waiting:
        for p in list(waiting):
            assert p.proc.poll() is None, f"{p.name} exited with {p.proc.returncode}:\n{p.tail()}"
            try:
                with urllib.request.urlopen(p.health, timeout=1) as r:
                    if r.status == 200:
                        waiting.remove(p)
            except OSError:
                pass
        assert time.monotonic() < deadline, f"not healthy in {timeout} s: {waiting[0].name}:\n{waiting[0].tail()}"
        time.sleep(0.2)


def stop(processes: list[Running]) -> None:
    for p in processes:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    for p in processes:
        try:
            p.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()


def http_port(argv: list[str], taken: set[int], host: str = "0.0.0.0") -> list[str]:
    """argv with its --http-port kept, or replaced when that port is taken on this machine."""
    i = argv.index("--http-port") + 1
    port = int(argv[i])
    if port in taken or not port_is_free(port, host):
        port = free_port(host)
    taken.add(port)
    return [*argv[:i], str(port), *argv[i + 1:]]


def port_is_free(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def request(url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def completion(gateway: str, prompt: list[int], key: str | None = None) -> tuple[int, dict]:
    return request(f"{gateway}/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 8,
                                                 "temperature": 0, "ignore_eos": True, "return_token_ids": True}, key)


def served(gateway: str, key: str | None = None) -> Counter:
    """Live instances by service name, from their heartbeats (what the gateway's /services lists)."""
    return Counter(s["name"] for s in request(f"{gateway}/services", key=key)[1]["services"])


# --- compose, as processes -------------------------------------------------------------------

def test_compose_commands_serve_a_completion(tmp_path, redis_url):
    """Every compose service's command and environment, run as processes with only the volumes
    (-> directories), the Redis host (-> the test's redis-server) and taken ports replaced."""
    import redis as sync_redis

    sync_redis.Redis.from_url(redis_url).flushdb()
    test_redis = urlsplit(redis_url).netloc
    doc = compose()
    volumes = {name: tmp_path / "volumes" / name for name in doc["volumes"]}

    def localize(value: str, mounts: dict[str, str]) -> str:
        value = value.replace("redis://redis:6379/", f"redis://{test_redis}/")
        for target, volume in mounts.items():
            value = re.sub(rf"(?<![\w.]){re.escape(target)}(?=/|\b|$)", str(volumes[volume]), value)
        return value

    (tmp_path / "logs").mkdir()
    home = {"STREAMOE_HOME": str(tmp_path / "home")}  # a container's fresh home (checksum cache)
    processes, taken = [], set()
    try:
        for key, spec in doc["services"].items():
            if key == "redis" or monitoring(spec):
                continue
            argv, env = compose_service(spec, {"STREAMOE_API_KEY": API_KEY})
            mounts = {v.split(":")[1]: v.split(":")[0] for v in spec.get("volumes", [])}
            argv, env = [localize(w, mounts) for w in argv], {k: localize(v, mounts) for k, v in env.items()}
            for volume in mounts.values():
                volumes[volume].mkdir(parents=True, exist_ok=True)
            if key == "init-model":  # one shot, before the rest (depends_on)
                init = start(key, argv, home, "", tmp_path / "logs")
                assert init.proc.wait(timeout=120) == 0, init.tail()
                continue
            # NOTE: every replica compose asks for; on two cores the tokenizer and gateway replicas
            # are cheap next to the four EP ranks.
            for replica in range(spec.get("deploy", {}).get("replicas", 1)):
                command = http_port(argv, taken)
                processes.append(start(f"{key}-{replica}", command, {**home, **env},
                                       f"http://127.0.0.1:{flag(command, '--http-port')}/health", tmp_path / "logs"))
        wait_healthy(processes)
        gateways = [p.health.removesuffix("/health") for p in processes if p.name.startswith("gateway")]
        assert served(gateways[0], API_KEY) == {"tokenizer": 2, "cache": 1, "balancer": 1, "prefill": 2,
                                                "decode": 2, "gateway": 2}
        prompt = list(range(3, 133))  # two whole 64-token blocks and two tokens
        assert completion(gateways[0], prompt)[0] == 401, "STREAMOE_API_KEY did not reach the gateway"
        status, body = completion(gateways[0], prompt, API_KEY)
        assert status == 200, body
        assert len(body["choices"][0]["token_ids"]) == body["usage"]["completion_tokens"] == 8
        # the blocks prefill wrote are found by the cache service: one store on the shared volume
        deadline = time.monotonic() + 30
        while True:
            status, body = completion(gateways[1], prompt, API_KEY)
            assert status == 200, body
            if body["usage"]["prompt_tokens_details"]["cached_tokens"] == 128 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 128, body["usage"]
        assert any(volumes["prefix-cache"].rglob("*")), "no block reached the prefix-cache volume"
    finally:
        stop(processes)


# --- two machines: two network namespaces ----------------------------------------------------

def readme_machine(marker: str) -> list[str]:
    """The shell lines of the README block under <!-- marker -->."""
    text = (DEPLOY / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\s*```sh\n(.*?)```", text, re.S)
    assert block, f"deploy/README.md has no ```sh block under <!-- {marker} -->"
    return [line for line in block[1].splitlines() if line.strip() and not line.lstrip().startswith("#")]


def machine_commands(lines: list[str]) -> tuple[list[list[str]], dict[str, str]]:
    """(commands, exported environment) of a machine's block: `export` lines, then one command a
    line, each ending in `&`."""
    env, commands = {}, []
    for line in lines:
        words = shlex.split(line)
        if words[0] == "export":
            env.update(w.split("=", 1) for w in words[1:])
            continue
        assert words[-1] == "&", f"not started in the background: {line}"
        commands.append(words[:-1])
    return commands, env


class Namespaces:
    """Machine A is this namespace, machine B a new one, joined by a veth pair on a /24 of
    10.77.0.0/16 that no interface here uses yet. Unique names per run; removed on exit."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.netns, self.veth_a, self.veth_b = f"streamoe-{tag}", f"smo{tag}a", f"smo{tag}b"
        used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
        subnet = random.choice([n for n in range(1, 255) if f"10.77.{n}." not in used])
        self.a, self.b = f"10.77.{subnet}.1", f"10.77.{subnet}.2"

    def __enter__(self) -> Namespaces:
        steps = [["ip", "netns", "add", self.netns],
                 ["ip", "link", "add", self.veth_a, "type", "veth", "peer", "name", self.veth_b],
                 ["ip", "link", "set", self.veth_b, "netns", self.netns],
                 ["ip", "addr", "add", f"{self.a}/24", "dev", self.veth_a],
                 ["ip", "link", "set", self.veth_a, "up"],
                 ["ip", "netns", "exec", self.netns, "ip", "addr", "add", f"{self.b}/24", "dev", self.veth_b],
                 ["ip", "netns", "exec", self.netns, "ip", "link", "set", self.veth_b, "up"],
                 ["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"]]
        for i, step in enumerate(steps):
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                self.__exit__()
                if i == 0:
                    pytest.skip(f"cannot create a network namespace: {done.stderr.strip()}")
                raise RuntimeError(f"{shlex.join(step)}: {done.stderr.strip()}")
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)  # takes veth_b, so veth_a
        subprocess.run(["ip", "link", "del", self.veth_a], capture_output=True)  # if it outlived it


@pytest.fixture()
def machines():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2)")
    with Namespaces() as namespaces:
        yield namespaces


def test_two_machine_layout_serves_across_namespaces(tmp_path, machines, tiny_fp32):
    """deploy/README.md's two machines: A (this namespace) runs Redis, the gateway, a tokenizer
    and the balancer; B (its own namespace) the cache service and both EP groups, reaching
    Redis only through A's address."""
    doc_a, doc_b = "10.0.0.1", "10.0.0.2"  # the addresses the README uses
    a_commands, a_env = machine_commands(readme_machine("machine-a"))
    b_commands, b_env = machine_commands(readme_machine("machine-b"))
    (redis_line,) = [c for c in a_commands if c[0] == "redis-server"]
    assert flag(redis_line, "--bind") == doc_a and flag(redis_line, "--appendonly") == "yes", redis_line
    directories = {"a": tmp_path / "a", "b": tmp_path / "b"}
    # machine A holds only the model's small files: the tokenizer and gateway read no weights
    shutil.copytree(tiny_fp32, directories["b"] / "models" / "tiny")
    shutil.copytree(tiny_fp32, directories["a"] / "models" / "tiny", ignore=shutil.ignore_patterns("*.safetensors"))
    redis_port = 6379 if port_is_free(6379, machines.a) else free_port(machines.a)

    def localize(value: str, side: str) -> str:
        value = value.replace(f"{doc_a}:6379", f"{machines.a}:{redis_port}").replace(doc_a, machines.a)
        value = value.replace(doc_b, machines.b).replace("/var/cache/streamoe", str(directories["b"] / "cache"))
        return value.replace("/models", str(directories[side] / "models"))

    (tmp_path / "logs").mkdir()
    redis, _ = start_redis(directories["a"] / "redis", port=redis_port, host=machines.a, appendonly=True)
    processes, taken = [], set()
    try:
        for side, commands, env, address in (("a", a_commands, a_env, machines.a),
                                             ("b", b_commands, b_env, machines.b)):
            local = {k: localize(v, side) for k, v in env.items()}
            local["STREAMOE_HOME"] = str(directories[side] / "home")  # the machine's own home
            for command in commands:
                if command[0] == "redis-server":
                    continue  # started above, bound to machine A's address as the README's
                name, args = parse_service(command, env, strict=False)
                assert args.host == "0.0.0.0" and urlsplit(args.redis_url).hostname == doc_a, command
                command = [localize(w, side) for w in command]
                if side == "a":  # this namespace's ports are shared with everything else here
                    command = http_port(command, taken)
                label = f"{side}-{name}" + (f"-{args.rank}" if name in WORKERS else "")
                health = f"http://{address}:{flag(command, '--http-port')}/health"
                processes.append(start(label, command, local, health, tmp_path / "logs",
                                       netns=machines.netns if side == "b" else None))
        wait_healthy(processes)
        here = os.readlink("/proc/self/ns/net")
        for p in processes:
            assert (os.readlink(f"/proc/{p.proc.pid}/ns/net") != here) == p.name.startswith("b-"), p.name
        (gateway,) = [p.health.removesuffix("/health") for p in processes if p.name == "a-gateway"]
        assert served(gateway) == {"tokenizer": 1, "cache": 1, "balancer": 1, "prefill": 2, "decode": 2,
                                   "gateway": 1}
        status, body = completion(gateway, list(range(3, 40)))
        assert status == 200, body
        assert len(body["choices"][0]["token_ids"]) == body["usage"]["completion_tokens"] == 8
    finally:
        stop(processes)
        redis.terminate()
        redis.wait(timeout=10)
