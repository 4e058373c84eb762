"""deploy/grafana/: the dashboard, Grafana's provisioning and the Prometheus scrape configs, checked
against the code and the other deployment files without running Prometheus or Grafana: every
metric a query names is one the services define (a renamed metric fails here), the compose
profile mounts what exists and scrapes every streamoe container at its --http-port, and the
Kubernetes scrape config, run over the manifests' pods, finds each at its annotated port."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import yaml
from test_deploy import DEPLOY, POD_IP, compose, flag, kustomized, manifests, monitoring, port_of

from shared.cost import economics
from shared.planner.slo import METRICS as SLO_METRICS
from shared.protocol import metric_names

ROOT = DEPLOY.parent
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "streamoe.json"
METRIC_TYPES = ("Counter", "Gauge", "Histogram")


# --- the metrics the code defines --------------------------------------------------------------

def exposed(kind: str, name: str) -> set[str]:
    """The sample names a scrape shows for one prometheus_client metric (_created aside)."""
    if kind == "Counter":
        return {name.removesuffix("_total") + "_total"}
    if kind == "Histogram":
        return {name + suffix for suffix in ("_bucket", "_sum", "_count")}
    return {name}


def defined_metrics() -> tuple[set[str], list[str]]:
    """(sample names, call sites whose name the scan could not read), from every Counter, Gauge
    and Histogram of prometheus_client in services/ and shared/."""
    samples: set[str] = set()
    unresolved: list[str] = []
    for path in sorted([*(ROOT / "services").rglob("*.py"), *(ROOT / "shared").rglob("*.py")]):
        found, unread = module_metrics(path)
        samples |= found
        unresolved += unread
    return samples, unresolved


def module_metrics(path: Path) -> tuple[set[str], list[str]]:
    """One module's metrics. A name is a string literal, a constant of shared/protocol/metric_names.py,
    or the first argument of a local factory (a function passing its first parameter on as the name)."""
    tree = ast.parse(path.read_text(), str(path))
    classes: dict[str, str] = {}  # local name -> prometheus_client class
    modules: set[str] = set()  # local names of prometheus_client
    names_modules: set[str] = set()  # local names of shared.protocol.metric_names
    constants: dict[str, str] = {}  # names imported from metric_names
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                local = alias.asname or alias.name
                if node.module == "prometheus_client" and alias.name in METRIC_TYPES:
                    classes[local] = alias.name
                elif node.module == "shared.protocol" and alias.name == "metric_names":
                    names_modules.add(local)
                elif node.module == "shared.protocol.metric_names":
                    constants[local] = getattr(metric_names, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "prometheus_client":
                    modules.add(alias.asname or alias.name)
                elif alias.name == "shared.protocol.metric_names" and alias.asname:
                    names_modules.add(alias.asname)

    def metric_class(call: ast.Call) -> str | None:
        f = call.func
        if isinstance(f, ast.Name):
            return classes.get(f.id)
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in modules:
            return f.attr if f.attr in METRIC_TYPES else None
        return None

    def first(call: ast.Call) -> ast.expr | None:
        return call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "name"), None)

    def name_of(node: ast.expr | None) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names_modules:
            return getattr(metric_names, node.attr)
        if isinstance(node, ast.Name):
            return constants.get(node.id)
        return None

    factories: dict[str, str] = {}  # function name -> the class it makes
    passed_on: set[int] = set()  # the calls inside factories, naming the metric by the parameter
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and fn.args.args:
            for call in ast.walk(fn):
                if isinstance(call, ast.Call) and metric_class(call) and isinstance(first(call), ast.Name) \
                        and first(call).id == fn.args.args[0].arg:
                    factories[fn.name] = metric_class(call)
                    passed_on.add(id(call))
    samples: set[str] = set()
    unresolved: list[str] = []
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call) or id(call) in passed_on:
            continue
        f = call.func
        called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        kind = metric_class(call) or factories.get(called)
        if kind is None:
            continue
        name = name_of(first(call))
        if name is None:
            unresolved.append(f"{path.relative_to(ROOT)}:{call.lineno}")
        else:
            samples |= exposed(kind, name)
    return samples, unresolved


STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
IDENTIFIER = re.compile(r"(?<![$\w:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\{)?")


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: `streamoe_*`, Prometheus' `up`, and any
    identifier right before a label matcher `{`. Label values (strings) are not names."""
    out = set()
    for m in IDENTIFIER.finditer(STRING.sub('""', expr)):
        word, selector = m[1], m[2]
        if word.startswith("streamoe_") or word == "up" or selector:
            out.add(word)
    return out


# --- the dashboard -----------------------------------------------------------------------------

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def generator():
    spec = importlib.util.spec_from_file_location("grafana_dashboard", GRAFANA / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expressions(doc: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    out = [(f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
           for p in doc["panels"] for t in p.get("targets", [])]
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']}", re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query)))
    return out


def test_the_dashboard_is_what_its_generator_writes():
    """dashboards/streamoe.json is deploy/grafana/dashboard.py's output: edit the script, rerun it."""
    assert DASHBOARD.read_text() == generator().render(), "run `python deploy/grafana/dashboard.py`"


def test_the_dashboard_has_the_grafana_schema_basics():
    doc = dashboard()
    assert doc["title"] and re.fullmatch(r"[\w-]{1,40}", doc["uid"]) and doc["schemaVersion"] >= 36
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids), "panel ids must be unique"
    boxes = []
    for p in doc["panels"]:
        pos = p["gridPos"]
        assert {"h", "w", "x", "y"} <= pos.keys() and pos["x"] + pos["w"] <= 24, f"{p['title']}: {pos}"
        for other, box in boxes:
            overlap = pos["x"] < box["x"] + box["w"] and box["x"] < pos["x"] + pos["w"] and \
                pos["y"] < box["y"] + box["h"] and box["y"] < pos["y"] + pos["h"]
            assert not overlap, f"{p['title']!r} overlaps {other!r}"
        boxes.append((p["title"], pos))
        if p["type"] == "row":
            continue
        assert p["targets"], f"{p['title']}: no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"{p['title']}: refIds {refs}"
        for t in [p, *p["targets"]]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert {"datasource", "instance", "role"} <= variables.keys()
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in doc["panels"]:
        used = set(re.findall(r"\$(\w+)", json.dumps(p))) - {"1", "__rate_interval", "__range", "__interval"}
        assert used <= variables.keys(), f"{p['title']}: undefined variables {used - variables.keys()}"
    # the prices `streamoe cost` uses
    prices = {name: float(variables[name]["query"]) for name in
              ("gpu_hour_usd", "price_input_cache_hit", "price_input_cache_miss", "price_output")}
    assert prices["gpu_hour_usd"] == economics.GPU_HOUR_USD
    assert (prices["price_input_cache_hit"], prices["price_input_cache_miss"], prices["price_output"]) == \
        economics.PRICES_PER_MILLION
    titles = {p["title"] for p in doc["panels"]}
    assert {"Prefill", "Decode"} <= titles, "a row for each role"


def test_every_query_names_metrics_the_services_define():
    """Each metric name in the dashboard's PromQL is a sample the code exports: a renamed or
    removed metric fails here rather than leaving a panel empty."""
    samples, unresolved = defined_metrics()
    allowed = samples | {"up"}
    named: set[str] = set()
    for where, expr in expressions(dashboard()):
        names = metric_names_in(expr)
        assert names, f"{where}: names no metric: {expr}"
        unknown = names - allowed
        assert not unknown, f"{where}: {sorted(unknown)} not defined in services/ or shared/" + \
            (f" (names the scan could not read, at {unresolved})" if unresolved else "")
        named |= names
        for slo in re.findall(r'streamoe_slo_target_seconds\{metric="(\w+)"\}', expr):
            assert slo in SLO_METRICS, f"{where}: no SLO metric {slo!r}"
    assert set(generator().SLO_HISTOGRAMS) == set(SLO_METRICS)
    assert {"streamoe_expert_tokens_total", "streamoe_planner_desired_ranks", "streamoe_gpu_seconds_total",
            "streamoe_stream_length", "up"} <= named
    # the scan reads each way a name is given: a literal, a metric_names constant, a factory's argument
    read = {"streamoe_requests_total", metric_names.sample(metric_names.TOKENS),
            metric_names.sample(metric_names.SPEC_ACCEPTED_TOKENS)}
    assert read <= samples, f"the scan missed {read - samples}"


def test_names_are_the_samples_a_scrape_shows():
    """A counter is queried with _total, a histogram by _bucket, _sum and _count, never by the name
    the code gives; label values and label names are not metric names."""
    samples, _ = defined_metrics()
    assert {"streamoe_tokens", "streamoe_ttft_seconds", "streamoe_planner_decisions"}.isdisjoint(samples)
    assert {"streamoe_ttft_seconds_count", "streamoe_planner_decisions_total"} <= samples
    assert metric_names_in('sum(rate(streamoe_tokens_total{kind="output"}[1m])) / up') == \
        {"streamoe_tokens_total", "up"}
    assert metric_names_in('x_bucket{le="+Inf"} and on (le) label_replace(y, "a", "$1", "streamoe_b", "up")') == \
        {"x_bucket"}


# --- Grafana's provisioning and the compose profile -------------------------------------------

def bind_mounts(spec: dict) -> dict[str, Path]:
    """Container path -> host path, of a compose service's bind mounts (relative to deploy/)."""
    out = {}
    for volume in spec.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (DEPLOY / source).resolve()
    return out


def host_path(container_path: str, mounts: dict[str, Path]) -> Path:
    for target, source in sorted(mounts.items(), key=lambda m: -len(m[0])):
        if container_path == target or container_path.startswith(target + "/"):
            return source / container_path[len(target):].lstrip("/")
    raise AssertionError(f"{container_path} is on no bind mount ({mounts})")


def test_the_monitoring_profile_mounts_what_exists():
    """Prometheus and Grafana only under the profile, pinned, on 127.0.0.1; their bind mounts exist,
    and the files Grafana's provisioning points at are the ones mounted there."""
    services = compose()["services"]
    stack = {k: v for k, v in services.items() if monitoring(v)}
    assert set(stack) == {"prometheus", "grafana"}
    assert not [k for k, v in services.items() if v.get("profiles") and not monitoring(v)]
    for key, spec in stack.items():
        image, _, tag = spec["image"].rpartition(":")
        assert image and tag and tag != "latest", f"{key}: pin the image ({spec['image']})"
        assert spec["ports"] and all(p.startswith("127.0.0.1:") for p in spec["ports"]), f"{key}: {spec['ports']}"
        for target, source in bind_mounts(spec).items():
            assert source.exists() and GRAFANA in [source, *source.parents], f"{key}: {source} for {target}"
    prometheus = stack["prometheus"]
    (config,) = [a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file=")]
    assert host_path(config, bind_mounts(prometheus)) == GRAFANA / "prometheus.yml"

    grafana = stack["grafana"]
    mounts = bind_mounts(grafana)
    provisioning = host_path("/etc/grafana/provisioning", mounts)
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    url = re.fullmatch(r"http://([\w-]+):(\d+)", source["url"])
    # on the compose network: the service's name, the container port (Prometheus listens on 9090)
    assert url and url[1] == "prometheus" and prometheus["ports"][0].rsplit(":", 1)[1] == url[2], source["url"]
    assert source["type"] == "prometheus" and source["uid"] == generator().DATASOURCE_UID
    assert {v["name"]: v for v in dashboard()["templating"]["list"]}["datasource"]["current"]["value"] == source["uid"]
    scrape = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape, "$__rate_interval needs the scrape interval"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "streamoe.yaml").read_text())["providers"]
    assert provider["type"] == "file"
    assert host_path(provider["options"]["path"], mounts) == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(home, mounts) == DASHBOARD
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


# --- the scrape configs ------------------------------------------------------------------------

def relabel(labels: dict[str, str], configs: list[dict]) -> dict[str, str] | None:
    """Prometheus' relabeling (actions replace, keep, drop): the labels after, or None if dropped."""
    labels = dict(labels)
    for c in configs:
        value = c.get("separator", ";").join(labels.get(s, "") for s in c.get("source_labels", []))
        match = re.fullmatch(c.get("regex", "(.*)"), value)
        action = c.get("action", "replace")
        if action == "keep" and not match or action == "drop" and match:
            return None
        if action == "replace" and match:
            # Go's $1 and ${1} -> Python's \g<1>
            result = match.expand(re.sub(r"\$\{?(\w+)\}?", r"\\g<\1>", c.get("replacement", "$1")))
            if result:
                labels[c["target_label"]] = result
            else:
                labels.pop(c["target_label"], None)
        assert action in ("replace", "keep", "drop"), f"relabel action {action} is not modelled here"
    return labels


def target(labels: dict[str, str]) -> tuple[str, str, tuple]:
    """(address, path, public labels) of a relabeled target; `instance` defaults to the address."""
    public = {k: v for k, v in labels.items() if not k.startswith("__")}
    public.setdefault("instance", labels["__address__"])
    return labels["__address__"], labels["__metrics_path__"], tuple(sorted(public.items()))


def test_the_compose_scrape_config_finds_every_streamoe_container():
    """One job per streamoe service, each container at the --http-port of its command; a service
    with replicas through DNS (a target per replica), one without as a static target."""
    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    want: dict[str, set] = {}
    for key, spec in compose()["services"].items():
        command = spec.get("command", [])
        if monitoring(spec) or command[:2] != ["python", "-m"]:
            continue
        service, port = command[2].removeprefix("services."), int(flag(command, "--http-port"))
        found = ("dns", key, port) if spec.get("deploy", {}).get("replicas", 1) > 1 else ("static", f"{key}:{port}")
        want.setdefault(service, set()).add(found)
    got: dict[str, set] = {}
    for job in config["scrape_configs"]:
        assert set(job) <= {"job_name", "static_configs", "dns_sd_configs", "relabel_configs"}, job["job_name"]
        found = got.setdefault(job["job_name"], set())
        for static in job.get("static_configs", []):
            found |= {("static", t) for t in static["targets"]}
        for dns in job.get("dns_sd_configs", []):
            assert dns["type"] == "A", "a replica per A record"
            found |= {("dns", name, dns["port"]) for name in dns["names"]}
        labels = relabel({"job": job["job_name"], "__address__": "x:1", "__metrics_path__": "/metrics"},
                         job.get("relabel_configs", []))
        assert labels["service"] == job["job_name"], "the dashboard groups by `service`"
    assert got == want


def pod_targets(workload: dict, ordinal: int, job: dict) -> set[tuple]:
    """The targets Prometheus' pod discovery gives one pod, after the job's relabeling: a target
    per container port and one per container without ports (init containers too); equal ones
    are one target."""
    pod = workload["spec"]["template"]
    name = f"{workload['metadata']['name']}-{ordinal}"

    def sanitized(key: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_]", "_", key)

    meta = {"job": job["job_name"], "__scheme__": "http", "__metrics_path__": "/metrics",
            "__meta_kubernetes_namespace": "default", "__meta_kubernetes_pod_name": name,
            "__meta_kubernetes_pod_ip": POD_IP,
            **{f"__meta_kubernetes_pod_label_{sanitized(k)}": v for k, v in pod["metadata"]["labels"].items()},
            **{f"__meta_kubernetes_pod_annotation_{sanitized(k)}": v
               for k, v in pod["metadata"].get("annotations", {}).items()}}
    out = set()
    for init, container in [*((True, c) for c in pod["spec"].get("initContainers", [])),
                            *((False, c) for c in pod["spec"]["containers"])]:
        ports = container.get("ports") or [None]
        for port in ports:
            labels = {**meta, "__meta_kubernetes_pod_container_name": container["name"],
                      "__meta_kubernetes_pod_container_init": str(init).lower(),
                      "__address__": POD_IP if port is None else f"{POD_IP}:{port['containerPort']}"}
            if port is not None:
                labels |= {"__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                           "__meta_kubernetes_pod_container_port_name": port.get("name", "")}
            kept = relabel(labels, job["relabel_configs"])
            if kept is not None:
                out.add(target(kept))
    return out


def test_the_kubernetes_scrape_config_finds_every_annotated_pod():
    """prometheus-kubernetes.yml over every pod of deploy/k8s, deploy/k8s-cluster and the autoscale
    component: one target per streamoe pod, at the port and path of its prometheus.io/*
    annotations (its `http` port, /metrics), labelled with its service; Redis is not scraped."""
    (job,) = yaml.safe_load((GRAFANA / "prometheus-kubernetes.yml").read_text())["scrape_configs"]
    assert [sd["role"] for sd in job["kubernetes_sd_configs"]] == ["pod"]
    docs = [*manifests(), *kustomized(DEPLOY / "k8s-cluster"), *manifests(DEPLOY / "k8s" / "autoscale")]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    services = set()
    for workload in workloads:
        pod = workload["spec"]["template"]
        notes = pod["metadata"].get("annotations", {})
        (container,) = pod["spec"]["containers"]
        for ordinal in range(workload["spec"].get("replicas", 1)):
            found = pod_targets(workload, ordinal, job)
            what = f"{workload['kind']} {workload['metadata']['name']}-{ordinal}"
            if notes.get("prometheus.io/scrape") != "true":
                assert not found, f"{what} is not annotated for scraping, yet scraped"
                continue
            assert len(found) == 1, f"{what}: {len(found)} targets, not one: {found}"
            ((address, path, labels),) = found
            assert address == f"{POD_IP}:{notes['prometheus.io/port']}" == f"{POD_IP}:{port_of(container, 'http')}"
            assert path == notes["prometheus.io/path"] == "/metrics", what
            labels = dict(labels)
            assert labels["service"] == pod["metadata"]["labels"]["app.kubernetes.io/component"], what
            assert labels["instance"] == f"{workload['metadata']['name']}-{ordinal}", what
            services.add(labels["service"])
    assert services == {"gateway", "tokenizer", "cache", "balancer", "prefill", "decode", "planner"}
