"""deploy/k8s/autoscale and deploy/k8s-cluster/autoscale, checked without a cluster: each component
built over its base the way `kubectl kustomize` would, then every KEDA trigger against what the
services really read (streams, consumer groups, the planner's metric), every reference against the
manifests, and the planner's Deployment against its own parser."""
from __future__ import annotations

import argparse
import copy
import functools
import re
import zoneinfo
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from test_deploy import strategic_merge

from shared.launcher.cliargs import TRUE_WORDS, apply_env_defaults, env_name
from shared.planner.plan import Interval, decode_capacity, load_profile, parse_units, prefill_capacity
from shared.planner.slo import parse_slo
from shared.protocol import metric_names, streams
from shared.runtime.service import add_service_args

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
LAYOUTS = {  # each autoscaled layout: its base and the component a kustomization of one's own lists over it
    "k8s": (DEPLOY / "k8s", DEPLOY / "k8s" / "autoscale"),
    "k8s-cluster": (DEPLOY / "k8s-cluster", DEPLOY / "k8s-cluster" / "autoscale"),
}
PROMETHEUS_OPERATOR = DEPLOY / "k8s" / "autoscale" / "prometheus-operator"
HAND_MADE = {"streamoe": {"redis-password", "api-keys"}}  # the Secret made by hand (deploy/README.md)
SECRET = "secret-{key}"  # what a secretKeyRef resolves to here
POD_NAME = "streamoe-{role}-7c9d8f6b5d-x2x7q"  # what metadata.name resolves to: a Deployment pod's name
KEDA_API = "keda.sh/v1alpha1"
REQUIRED = {  # each trigger type's required metadata (keda.sh's scaler pages); the address comes apart
    "redis-streams": {"stream", "consumerGroup", "lagCount"},
    "redis-cluster-streams": {"stream", "consumerGroup", "lagCount"},
    "prometheus": {"serverAddress", "query", "threshold"},
    "cron": {"timezone", "start", "end", "desiredReplicas"},
}
ADDRESS = {"redis-streams": ("address", "addressFromEnv"), "redis-cluster-streams": ("addresses", "addressesFromEnv")}
STREAM_OF = {"tokenizer": streams.requests_stream, "cache": streams.tokenized_stream}  # each group's input
WORKERS = ("prefill", "decode")
# the variables that make a worker an EP group: set by the component's patch, the base's otherwise
EP_VARIABLES = {"STREAMOE_RANK", "STREAMOE_EP_SIZE", "STREAMOE_EP_GROUP_ID", "STREAMOE_NUM_REDUNDANT_EXPERTS"}


# --- building a layout as kustomize does ------------------------------------------------------

def kind_of(directory: Path) -> str:
    return yaml.safe_load((directory / "kustomization.yaml").read_text()).get("kind", "Kustomization")


def build(directory: Path, docs: list[dict] | None = None) -> list[dict]:
    """`kubectl kustomize` for the forms used here: resources (files, or a base directory), then
    components (each over what is built so far), then patches. A Component works on `docs`, its
    parent's resources."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs = list(docs or [])
    for resource in spec.get("resources", []):
        path = directory / resource
        if path.is_dir():
            assert kind_of(path) == "Kustomization", f"{path}: a resource directory must be a Kustomization"
            docs += build(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for component in spec.get("components", []):
        assert kind_of(directory / component) == "Component", f"{directory / component}: not a Component"
        docs = build(directory / component, docs)
    for entry in spec.get("patches", []):
        docs = patched(docs, entry, directory)
    return docs


def patched(docs: list[dict], entry: dict, directory: Path) -> list[dict]:
    """One `patches` entry: a JSON patch (a list of operations) on its target, or a strategic merge
    (or a `$patch: delete`) on its target or on the object it names."""
    body = yaml.safe_load(entry["patch"] if "patch" in entry else (directory / entry["path"]).read_text())
    if isinstance(body, list) or "target" in entry:
        target = entry["target"]
        targets = [d for d in docs if re.fullmatch(target["kind"], d["kind"])
                   and re.fullmatch(target["name"], d["metadata"]["name"])]
    else:
        targets = [find(docs, body["kind"], body["metadata"]["name"])]
    assert targets, f"{directory.name}: a patch matches nothing: {entry}"
    if isinstance(body, list):
        return [json_patched(d, body) if any(d is t for t in targets) else d for d in docs]
    if "target" in entry:
        body = {k: v for k, v in body.items() if k not in ("apiVersion", "kind", "metadata")}
    if body.get("$patch") == "delete":
        return [d for d in docs if not any(d is t for t in targets)]
    return [strategic_merge(d, body) if any(d is t for t in targets) else d for d in docs]


def json_patched(doc: dict, operations: list[dict]) -> dict:
    """RFC 6902's add, replace and remove, `-` appending to a list."""
    doc = copy.deepcopy(doc)
    for op in operations:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] == "remove":
            assert (int(last) < len(node)) if isinstance(node, list) else last in node, f"nothing at {op['path']}"
            del node[int(last) if isinstance(node, list) else last]
        elif isinstance(node, list):
            assert op["op"] == "add", op
            node.insert(len(node) if last == "-" else int(last), op["value"])
        else:
            assert op["op"] == "add" or last in node, f"replace: nothing at {op['path']}"
            node[last] = op["value"]
    return doc


@functools.cache
def layout_docs(name: str) -> tuple[dict, ...]:
    """The layout's objects: its base with its component, as a kustomization listing both builds."""
    base, component = LAYOUTS[name]
    assert kind_of(component) == "Component"
    return tuple(build(component, build(base)))


def find(docs, kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def container(workload: dict) -> dict:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def service_of(workload: dict) -> str:
    """The service a workload runs: `python -m services.<name>`."""
    command = container(workload)["command"]
    assert command[:2] == ["python", "-m"] and command[2].startswith("services."), command
    return command[2].split(".")[1]


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name}: not given once in {argv}"
    return argv[argv.index(name) + 1]


def configmap_data(docs, name: str) -> dict[str, str]:
    return find(docs, "ConfigMap", name)["data"]


def pod_env(workload: dict, docs, kubelet: bool = True) -> dict[str, str]:
    """The container's environment as the kubelet builds it (secrets as placeholders, the pod's name
    as a Deployment pod's), or, `kubelet=False`, as KEDA resolves it for `...FromEnv` (no fieldRef)."""
    spec = container(workload)
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        env.update(configmap_data(docs, source["configMapRef"]["name"]))
    for var in spec.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
            continue
        ref = var["valueFrom"]
        if "configMapKeyRef" in ref:
            env[var["name"]] = configmap_data(docs, ref["configMapKeyRef"]["name"])[ref["configMapKeyRef"]["key"]]
        elif "secretKeyRef" in ref:
            env[var["name"]] = SECRET.format(key=ref["secretKeyRef"]["key"])
        elif kubelet and ref["fieldRef"]["fieldPath"] == "status.podIP":
            assert var["name"] == "STREAMOE_ADVERTISE_HOST", var  # what the heartbeat tells others
            env[var["name"]] = "10.244.1.7"
        elif kubelet:
            assert ref["fieldRef"]["fieldPath"] == "metadata.name", ref
            env[var["name"]] = POD_NAME.format(role=service_of(workload))
    return env


def scaled_objects(name: str) -> dict[str, dict]:
    """The layout's ScaledObjects by the service of the Deployment each scales."""
    docs = layout_docs(name)
    return {service_of(find(docs, "Deployment", so["spec"]["scaleTargetRef"]["name"])): so
            for so in of_kind(docs, "ScaledObject")}


def planner(docs) -> dict:
    (found,) = [d for d in of_kind(docs, "Deployment") if service_of(d) == "planner"]
    return found


def profile_text(workload: dict, docs) -> str:
    """The file the planner's --profile names, followed through its mount to the ConfigMap key."""
    c, pod = container(workload), workload["spec"]["template"]["spec"]
    profile = Path(flag(c["command"], "--profile"))
    (mount,) = [m for m in c["volumeMounts"] if Path(m["mountPath"]) in profile.parents]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    data = configmap_data(docs, volume["configMap"]["name"])
    key = str(profile.relative_to(mount["mountPath"]))
    assert key in data, f"{profile}: no key {key} in ConfigMap {volume['configMap']['name']}"
    return data[key]


# --- the tests ---------------------------------------------------------------------------------

def test_autoscaling_is_a_component_the_bases_leave_out():
    """Both autoscale directories are kustomize Components that reach no directory above them: an
    overlay there over `..` could not build (kustomize refuses a base that contains its overlay).
    The bases, `kubectl apply -k deploy/k8s` above all, build as before: no KEDA object, the EP
    groups still StatefulSets."""
    for base, component in LAYOUTS.values():
        assert kind_of(component) == "Component", f"{component}: an overlay inside its base cannot build"
        for directory in [component, *(p.parent for p in component.glob("*/kustomization.yaml"))]:
            spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
            for entry in spec.get("resources", []) + spec.get("components", []):
                target = (directory / entry).resolve()
                assert target.is_file() or target not in directory.resolve().parents, \
                    f"{directory}: {entry} contains it (kustomize: cycle detected)"
        docs = build(base)
        assert not [d for d in docs if d["apiVersion"].startswith("keda.sh/")], f"{base} scales"
        assert {service_of(d) for d in of_kind(docs, "StatefulSet") if container(d)["command"][0] == "python"} \
            == set(WORKERS)
    base_images, added_images = (yaml.safe_load((d / "kustomization.yaml").read_text())["images"]
                                 for d in LAYOUTS["k8s"])
    assert added_images == base_images, "the Deployments deploy/k8s/autoscale adds run another image than the base's"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scaled_objects_are_well_formed(layout):
    """Every ScaledObject: KEDA's kind, a Deployment of the layout as its target, min <= max, and
    triggers of the types used here with their required metadata; every Redis trigger reaches the
    Redis Service the pods use, from KEDA's namespace, with the pods' password."""
    docs = layout_docs(layout)
    objects = of_kind(docs, "ScaledObject")
    assert {o["metadata"]["name"] for o in objects} == {f"streamoe-{s}" for s in (*STREAM_OF, *WORKERS)}
    redis_host, _, redis_port = configmap_data(docs, "streamoe")["REDIS_ADDRESS"].partition("/")[0].partition(":")
    for so in objects:
        name, spec = so["metadata"]["name"], so["spec"]
        assert so["apiVersion"] == KEDA_API, name
        target = spec["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
        workload = find(docs, "Deployment", target["name"])
        assert "replicas" not in workload["spec"], f"{name}: every apply would reset what the HPA set"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        assert spec["triggers"], f"{name}: no trigger"
        for trigger in spec["triggers"]:
            kind, meta = trigger["type"], trigger["metadata"]
            assert kind in REQUIRED, f"{name}: trigger {kind}"
            assert REQUIRED[kind] <= meta.keys(), f"{name} {kind}: lacks {REQUIRED[kind] - meta.keys()}"
            assert all(isinstance(v, str) for v in meta.values()), f"{name}: KEDA's metadata are strings: {meta}"
            if kind not in ADDRESS:
                continue
            assert int(meta["lagCount"]) >= 1, name
            literal, from_env = ADDRESS[kind]
            assert (literal in meta) != (from_env in meta), f"{name}: give one of {literal}, {from_env}"
            addresses = meta[literal] if literal in meta else pod_env(workload, docs, kubelet=False)[meta[from_env]]
            for address in addresses.split(","):
                host, port = urlsplit(f"//{address.strip()}").hostname, urlsplit(f"//{address.strip()}").port
                # NOTE: KEDA's operator dials from its own namespace: the Service's name with the pods'
                assert host.split(".")[0] == redis_host and len(host.split(".")) >= 3, f"{name}: {address}"
                assert port == int(redis_port), f"{name}: {address}"
                service = find(docs, "Service", redis_host)
                assert port in [p["port"] for p in service["spec"]["ports"]], f"{name}: {address}"
            auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
            (password,) = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "password"]
            pods = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in container(workload)["env"]
                    if "secretKeyRef" in v.get("valueFrom", {})}
            assert {"name": password["name"], "key": password["key"]} == pods["REDIS_PASSWORD"], name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stream_triggers_read_what_the_services_read(layout):
    """The tokenizer and the cache scale on their own consumer group's lag on their input stream,
    one trigger for each partition the layout runs, of the trigger type of its Redis."""
    docs = layout_docs(layout)
    settings = configmap_data(docs, "streamoe")
    defaults = argparse.ArgumentParser()
    add_service_args(defaults)
    partitions = int(settings.get(env_name("--stream-partitions"), defaults.parse_args([]).stream_partitions))
    cluster = settings.get(env_name("--redis-cluster"), "").strip().lower() in TRUE_WORDS
    objects = scaled_objects(layout)
    for service, stream_of in STREAM_OF.items():
        triggers = objects[service]["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"redis-cluster-streams" if cluster else "redis-streams"}, service
        read = sorted((t["metadata"]["stream"], t["metadata"]["consumerGroup"]) for t in triggers)
        assert read == sorted((stream_of(p), streams.consumer_group(service)) for p in range(partitions)), service


@pytest.mark.parametrize("layout", LAYOUTS)
def test_workers_scale_to_the_planners_decision(layout):
    """Prefill and decode follow the planner's gauge for their own role, one replica per desired
    rank (AverageValue, threshold 1), within the planner's --min and --max, over a day floor set by
    a cron trigger with valid 5-field expressions."""
    docs = layout_docs(layout)
    argv = container(planner(docs))["command"]
    bounds = {"min": parse_units(flag(argv, "--min")), "max": parse_units(flag(argv, "--max"))}
    servers = set()
    for role in WORKERS:
        spec = scaled_objects(layout)[role]["spec"]
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == \
            (getattr(bounds["min"], role), getattr(bounds["max"], role)), f"{role}: not the planner's --min/--max"
        by_type = {t["type"]: t for t in spec["triggers"]}
        assert sorted(by_type) == ["cron", "prometheus"] and len(spec["triggers"]) == 2, role
        prometheus = by_type["prometheus"]
        # NOTE: Value would scale the replicas running by gauge / threshold, not set them to the gauge
        assert prometheus.get("metricType", "AverageValue") == "AverageValue" and \
            float(prometheus["metadata"]["threshold"]) == 1, role
        query = prometheus["metadata"]["query"]
        assert re.fullmatch(r"(max|sum|min|avg)\(.*\)", query), f"{role}: KEDA needs one sample: {query}"
        selectors = re.findall(rf"\b{re.escape(metric_names.PLANNER_DESIRED)}\{{([^}}]*)\}}", query)
        assert len(selectors) == 1, f"{role}: {query} does not read {metric_names.PLANNER_DESIRED}{{...}}"
        assert dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', selectors[0])) == {"role": role}, query
        assert prometheus["metadata"].get("ignoreNullValues") == "false", \
            f"{role}: without the planner's series KEDA would read 0 and drop to the floor"
        servers.add(prometheus["metadata"]["serverAddress"])
        cron = by_type["cron"]["metadata"]
        assert cron_ok(cron["start"]) and cron_ok(cron["end"]) and cron["start"] != cron["end"], cron
        zoneinfo.ZoneInfo(cron["timezone"])  # an IANA name, or this raises
        assert spec["minReplicaCount"] <= int(cron["desiredReplicas"]) <= spec["maxReplicaCount"], role
    assert len(servers) == 1 and urlsplit(servers.pop()).scheme in ("http", "https")
    assert not cron_ok("0 24 * * *") and not cron_ok("0 8 * *") and not cron_ok("0 22-8 * * *")


def cron_ok(expression: str) -> bool:
    """A 5-field cron expression (minute hour day month weekday) of numbers, `*`, ranges, steps and
    lists. NOTE: names (MON, JAN), which KEDA's parser also takes, are refused here."""
    fields = expression.split()
    if len(fields) != 5:
        return False
    for text, (low, high) in zip(fields, ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))):
        for item in text.split(","):
            body, slash, step = item.partition("/")
            if slash and not (step.isdigit() and int(step) > 0):
                return False
            if body == "*":
                continue
            ends = body.split("-")
            if len(ends) > 2 or not all(e.isdigit() and low <= int(e) <= high for e in ends) or \
                    int(ends[0]) > int(ends[-1]):
                return False
    return True


@pytest.mark.parametrize("layout", LAYOUTS)
def test_workers_are_ep_groups_of_one(layout):
    """The autoscaled workers are Deployments whose every pod is an EP group of one: size 1 and
    the pod's name as --ep-group-id (a name the flag accepts); the base's StatefulSets and their
    headless Services are gone, and each pod is otherwise the base's."""
    from shared.runtime.engine_service import group_id

    base = build(LAYOUTS[layout][0])
    docs = layout_docs(layout)
    for role in WORKERS:
        name = f"streamoe-{role}"
        assert not [d for d in docs if d["metadata"]["name"] == name and d["kind"] in ("StatefulSet", "Service")]
        workload = find(docs, "Deployment", name)
        env = {v["name"]: v for v in container(workload)["env"]}
        assert env["STREAMOE_EP_SIZE"].get("value") == "1", role
        assert env["STREAMOE_EP_GROUP_ID"].get("valueFrom") == {"fieldRef": {"fieldPath": "metadata.name"}}, role
        assert "STREAMOE_RANK" not in env and "STREAMOE_RANK" not in pod_env(workload, docs), role
        group_id(pod_env(workload, docs)["STREAMOE_EP_GROUP_ID"])  # a pod's name is a valid id, or this raises

        def without_ep(template: dict) -> dict:
            template = copy.deepcopy(template)
            (c,) = template["spec"]["containers"]
            c["env"] = [v for v in c["env"] if v["name"] not in EP_VARIABLES]
            return template

        assert without_ep(workload["spec"]["template"]) == \
            without_ep(find(base, "StatefulSet", name)["spec"]["template"]), f"{role}: drifted from the base's pod"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_planner_runs_once_beside_the_services(layout):
    """One planner, replaced rather than rolled, actuating nothing itself (KEDA does), with its
    profile mounted from the ConfigMap, and probes, scraping and Redis like every service."""
    docs = layout_docs(layout)
    workload = planner(docs)
    spec, pod = workload["spec"], workload["spec"]["template"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate", "two planners publish two decisions"
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    c = container(workload)
    argv = c["command"]
    assert flag(argv, "--actuate") == "external", "KEDA actuates: the planner only publishes"
    assert float(flag(argv, "--interval-s")) > 0
    port = int(flag(argv, "--http-port"))
    assert [p["containerPort"] for p in c["ports"] if p["name"] == "http"] == [port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                                              "prometheus.io/path": "/metrics"}
    assert pod["spec"].get("enableServiceLinks") is False, "Service links inject STREAMOE_*-like variables"
    redis = urlsplit(pod_env(workload, docs)["STREAMOE_REDIS_URL"])
    assert redis.password == SECRET.format(key="redis-password")
    assert f"{redis.hostname}:{redis.port}{redis.path}" == configmap_data(docs, "streamoe")["REDIS_ADDRESS"]
    assert profile_text(workload, docs), "an empty profile"
    if layout == "k8s-cluster":
        cluster_waits(workload)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_planners_command_parses(layout):
    """The planner's command, under its pod's environment, parsed by the planner's own parser:
    every STREAMOE_* variable the pod gets is one of its flags, and the bounds it decides within
    are the ScaledObjects'."""
    from services.planner.__main__ import build_parser

    docs = layout_docs(layout)
    workload = planner(docs)
    argv, env = container(workload)["command"], pod_env(workload, docs)
    parser = build_parser()

    def fail(message: str):
        raise AssertionError(f"{argv}: {message}")

    parser.error = fail
    read = {env_name(next(o for o in a.option_strings if o.startswith("--")))
            for a in parser._actions if any(o.startswith("--") for o in a.option_strings)}
    unread = sorted(k for k in env if k.startswith("STREAMOE_") and k not in read)
    assert not unread, f"the planner reads no flag from {unread}"
    apply_env_defaults(parser, env)
    assert argv[:3] == ["python", "-m", "services.planner"]
    args = parser.parse_args(argv[3:])
    assert args.http_port == int(flag(argv, "--http-port")) and args.host == "0.0.0.0"
    assert args.actuate == "external", "KEDA actuates: the planner only publishes"
    for role in WORKERS:
        spec = scaled_objects(layout)[role]["spec"]
        assert (getattr(args.min, role), getattr(args.max, role)) == \
            (spec["minReplicaCount"], spec["maxReplicaCount"]), f"{role}: the planner's bounds are not KEDA's"
        assert getattr(args.unit, role) == 1, f"{role}: each pod is one rank, so the planner's unit is one"


def test_the_example_profile_meets_the_planners_slo(tmp_path):
    """The example profile loads, and some point of each role meets the SLO the planner is given:
    else the planner refuses to plan."""
    docs = layout_docs("k8s")
    argv = container(planner(docs))["command"]
    path = tmp_path / "profile.json"
    path.write_text(profile_text(planner(docs), docs))
    profile, slo = load_profile(path), parse_slo(flag(argv, "--slo"))
    for mean_input_len in (1000, 4000):
        interval = Interval(0, 3600, requests_per_s=10, mean_input_len=mean_input_len, mean_output_len=500)
        _, point = prefill_capacity(profile, slo, interval)
        decode_capacity(profile, slo, interval, point.ttft_ms)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_reference_resolves(layout):
    """Every ConfigMap and Secret key a pod or a TriggerAuthentication names exists, in the
    manifests or in the hand-made Secret; every authenticationRef names a TriggerAuthentication."""
    docs = layout_docs(layout)
    secrets = {**HAND_MADE, **{d["metadata"]["name"]: set(d.get("data", {})) | set(d.get("stringData", {}))
                               for d in of_kind(docs, "Secret")}}
    configmaps = {d["metadata"]["name"]: set(d["data"]) for d in of_kind(docs, "ConfigMap")}

    def check(what: str, name: str, key: str | None, kind: str):
        known = configmaps if kind == "ConfigMap" else secrets
        assert name in known and (key is None or key in known[name]), f"{what}: {kind} {name} {key or ''}"

    for workload in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet") + of_kind(docs, "Job"):
        pod, what = workload["spec"]["template"]["spec"], workload["metadata"]["name"]
        for c in pod["containers"] + pod.get("initContainers", []):
            for source in c.get("envFrom", []):
                check(what, source["configMapRef"]["name"], None, "ConfigMap")
            for var in (v for v in c.get("env", []) if "valueFrom" in v):
                for ref, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    if ref in var["valueFrom"]:
                        check(what, var["valueFrom"][ref]["name"], var["valueFrom"][ref]["key"], kind)
        for volume in (v for v in pod.get("volumes", []) if "configMap" in v):
            check(what, volume["configMap"]["name"], None, "ConfigMap")
    for auth in of_kind(docs, "TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            check(auth["metadata"]["name"], ref["name"], ref["key"], "Secret")
    auths = {a["metadata"]["name"] for a in of_kind(docs, "TriggerAuthentication")}
    for so in of_kind(docs, "ScaledObject"):
        for trigger in (t for t in so["spec"]["triggers"] if "authenticationRef" in t):
            assert trigger["authenticationRef"]["name"] in auths, so["metadata"]["name"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_redis_reports_the_lag(layout):
    """lagCount reads XINFO GROUPS's lag, which Redis reports from 7.0 on: every Redis here is 7 or later."""
    docs = layout_docs(layout)
    images = {c["image"] for d in of_kind(docs, "StatefulSet") for c in d["spec"]["template"]["spec"]["containers"]
              if c["image"].split(":")[0] == "redis"}
    assert images and all(int(i.partition(":")[2].split(".")[0]) >= 7 for i in images), images


def test_the_planner_is_scraped_under_the_prometheus_operator():
    """The optional component for the Prometheus Operator selects the planner's pods at their
    `http` port's /metrics."""
    assert kind_of(PROMETHEUS_OPERATOR) == "Component"
    docs = build(PROMETHEUS_OPERATOR, layout_docs("k8s"))
    (monitor,) = of_kind(docs, "PodMonitor")
    workload = planner(docs)
    selects = monitor["spec"]["selector"]["matchLabels"].items()
    assert [d for d in of_kind(docs, "Deployment") if selects <= d["spec"]["template"]["metadata"]["labels"].items()] \
        == [workload], "it selects another pod than the planner's"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in [p["name"] for p in container(workload)["ports"]] and endpoint["path"] == "/metrics"


def cluster_waits(workload: dict) -> None:
    """The workload waits for the cluster's join as deploy/k8s-cluster's services do."""
    wait = yaml.safe_load((DEPLOY / "k8s-cluster" / "wait-for-cluster.yaml").read_text())
    (expected,) = wait["spec"]["template"]["spec"]["initContainers"]
    inits = workload["spec"]["template"]["spec"]["initContainers"]
    assert expected in inits, f"{workload['metadata']['name']}: starts before the cluster is formed"


def test_the_cluster_layouts_added_deployments_wait_for_the_cluster():
    """deploy/k8s-cluster's patch ran before the autoscale component added the planner and the
    worker Deployments: its copy gives them the same wait."""
    docs = layout_docs("k8s-cluster")
    for workload in of_kind(docs, "Deployment"):
        cluster_waits(workload)


def test_the_readmes_kustomization_names_the_layouts():
    """deploy/README.md's kustomization of one's own, beside deploy/: its resource and component
    (and those its comments offer instead) are the layouts checked here, from a directory that
    contains neither base."""
    text = (DEPLOY / "README.md").read_text()
    found = re.search(r"cat > (\S+)/kustomization\.yaml <<'YAML'\n(.*?)\nYAML\n", text, re.S)
    assert found, "deploy/README.md shows no kustomization of one's own"
    directory, spec = DEPLOY.parent / found[1], yaml.safe_load(found[2])
    alternatives = dict(re.findall(r"^(\w+): \[\S+\]\s+# or (\S+)$", found[2], re.M))
    shown = [((directory / spec["resources"][0]).resolve(), (directory / spec["components"][0]).resolve()),
             ((directory / alternatives["resources"]).resolve(), (directory / alternatives["components"]).resolve())]
    assert sorted(shown) == sorted(LAYOUTS.values()), "not the layouts this file checks"
    assert all(directory.resolve() not in base.parents for base, _ in shown), "kustomize: cycle detected"
