"""deploy/ agrees with the code: what can be checked without Docker or a cluster.

Docker and Kubernetes do not run here, so these tests check the deployment
files against the code instead (issue 7): every YAML/JSON file parses; every
metric an alert, the autoscaler's adapter rule or the dashboard names exists in
the code's Prometheus registry with the type its query assumes (counters only
through rate()/increase(), histograms through ``_bucket``, gauges never
rated); every environment variable is a setting of :mod:`cluster.settings`
with a value it accepts; commands parse with ``pushctl``'s own parser; ports
and paths are the code's; the Kubernetes manifests validate offline against
the Kubernetes JSON schemas bundled by ``kubernetes-validate``; PromQL parses
with ``promql-parser``; every alert's runbook anchor exists in
docs/OPERATIONS.md. Where the tools are installed, ``kubectl kustomize``
renders base and overlay and ``promtool`` checks the Prometheus config, lints
the exposed metrics (with the recorded exceptions) and runs each alert against
scenarios (skipped otherwise: kubectl is in the machine image, promtool comes
with Debian's ``prometheus`` package, which ``.ci/run`` installs).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import cluster.metrics
from cluster.broker import MemoryBroker
from cluster.settings import SETTINGS, Settings
from pushctl.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"

SETTING_ENV = {env for env, _flag, _default, _help in SETTINGS}
NODE_JOB = "delta-push-node"
ROUTER_JOB = "delta-push-router"
ROUTER_PORT = 8080  # SPEC §10: router on 8080, nodes on 8081...
SPEC_ROUTER_PATHS = {"/ws", "/v1/route", "/v1/cluster", "/healthz", "/readyz", "/metrics"}  # SPEC §7
SPEC_SUBCOMMANDS = {"up", "node", "router", "publish", "tail", "token"}  # SPEC §10
# Oldest Kubernetes we claim to support, and the newest the bundled schemas know.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
# Labels Prometheus attaches to every scraped series (target labels), here and in Kubernetes.
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
RANGE_FUNCTIONS_FOR_COUNTERS = {"rate", "irate", "increase"}
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$namespace": ".*", "$pod": ".*"}
# Series Prometheus itself produces for every target.
SYNTHETIC_SERIES = {"up": ("gauge", ())}


# --- the code's side -------------------------------------------------------------


@cache
def metric_families() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Family name -> (type, label names) for everything the processes expose at /metrics."""
    labels = {
        m.describe()[0].name: tuple(m._labelnames)  # prometheus_client keeps label names here
        for m in vars(cluster.metrics).values()
        if isinstance(m, MetricWrapperBase)
    }
    return {m.name: (m.type, labels.get(m.name, ())) for m in REGISTRY.collect()}


def classify(series: str) -> tuple[str, tuple[str, ...]] | None:
    """What a series name is in the registry: gauge, counter, bucket or histogram_sum_count."""
    if series in SYNTHETIC_SERIES:
        return SYNTHETIC_SERIES[series]
    families = metric_families()
    kind, labels = families.get(series, (None, ()))
    if kind == "gauge":
        return "gauge", labels
    if series.endswith("_total"):
        kind, labels = families.get(series.removesuffix("_total"), (None, ()))
        if kind == "counter":
            return "counter", labels
    for suffix, what in (("_bucket", "bucket"), ("_sum", "histogram_sum_count"), ("_count", "histogram_sum_count")):
        if series.endswith(suffix):
            kind, labels = families.get(series.removesuffix(suffix), (None, ()))
            if kind == "histogram":
                return what, (*labels, "le") if what == "bucket" else labels
    return None


@cache
def node_paths() -> set[str]:
    from node.app import create_app

    app = create_app(Settings(), broker=MemoryBroker())
    return {resource.canonical for resource in app.router.resources()}


@cache
def router_paths() -> set[str]:
    """The router's routes, from its app once router/app.py exists (issue 4), else SPEC §7's list."""
    if importlib.util.find_spec("router.app") is None:
        return SPEC_ROUTER_PATHS
    from router.app import create_app

    app = create_app(Settings(port=ROUTER_PORT))
    paths = {resource.canonical for resource in app.router.resources()}
    assert paths >= SPEC_ROUTER_PATHS, f"the router lacks {SPEC_ROUTER_PATHS - paths}"
    return paths


@cache
def console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@cache
def pushctl_subcommands() -> set[str]:
    parser = build_parser()
    (commands,) = (a for a in parser._actions if a.dest == "command")  # argparse: no public accessor
    return set(commands.choices)


def check_pushctl_argv(argv: list[str], where: str) -> None:
    """argv must be a console script of pyproject whose arguments pushctl's parser accepts."""
    assert argv, f"{where}: no command"
    script = Path(argv[0]).name
    assert script in console_scripts(), f"{where}: {argv[0]!r} is not a console script of pyproject.toml"
    assert console_scripts()[script] == "pushctl.cli:main"
    subcommand = argv[1] if len(argv) > 1 else ""
    if subcommand in SPEC_SUBCOMMANDS and subcommand not in pushctl_subcommands():
        pytest.skip(f"`pushctl {subcommand}` (SPEC §10) is not registered in pushctl/cli.py yet")
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        raise AssertionError(f"{where}: pushctl rejects {shlex.join(argv)}") from exc


def check_settings_env(env: dict[str, str], where: str) -> Settings:
    unknown = sorted(set(env) - SETTING_ENV)
    assert not unknown, f"{where}: {unknown} are not settings (cluster/settings.py SETTINGS)"
    try:
        return Settings.from_env(env)
    except SystemExit as exc:
        raise AssertionError(f"{where}: {exc}") from exc


# --- PromQL ------------------------------------------------------------------------


def promql_problems(expr: str) -> tuple[list[str], set[str]]:
    """Parse ``expr``; return (problems, series named). Checks each series' type against its use."""
    try:
        ast = promql_parser.parse(expr)
    except ValueError as exc:
        return [f"does not parse: {exc}"], set()
    problems: list[str] = []
    names: set[str] = set()
    stack: list[Any] = []
    labels_below: list[set[str]] = []

    def pre(node: Any) -> None:
        stack.append(node)
        labels_below.append(set())
        if not isinstance(node, promql_parser.VectorSelector):
            return
        matchers = node.matchers.matchers
        name = node.name or next((m.value for m in matchers if m.name == "__name__"), None)
        if not name:
            problems.append("a selector without a metric name")
            return
        names.add(name)
        found = classify(name)
        if found is None:
            problems.append(f"{name}: not in the code's Prometheus registry")
            return
        kind, labels = found
        allowed = set(labels) | TARGET_LABELS | {"__name__"}
        labels_below[-1] |= allowed
        for matcher in matchers:
            if matcher.name not in allowed:
                problems.append(f"{name}: has no label {matcher.name!r} (labels: {sorted(labels)})")
        parent = stack[-2] if len(stack) > 1 else None
        grandparent = stack[-3] if len(stack) > 2 else None
        range_function = (
            grandparent.func.name
            if isinstance(parent, promql_parser.MatrixSelector) and isinstance(grandparent, promql_parser.Call)
            else None
        )
        calls = {n.func.name for n in stack if isinstance(n, promql_parser.Call)}
        if kind in ("counter", "bucket", "histogram_sum_count") and range_function not in RANGE_FUNCTIONS_FOR_COUNTERS:
            problems.append(f"{name} is a {kind}: use it through rate()/irate()/increase()")
        if kind == "bucket" and "histogram_quantile" not in calls:
            problems.append(f"{name}: buckets belong in histogram_quantile()")
        if kind == "gauge" and range_function in RANGE_FUNCTIONS_FOR_COUNTERS:
            problems.append(f"{name} is a gauge: {range_function}() is for counters")

    def post(node: Any) -> None:
        stack.pop()
        below = labels_below.pop()
        if labels_below:
            labels_below[-1] |= below
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            for label in node.modifier.labels:
                if label not in below:
                    problems.append(f"{node.op} by/without {label!r}: no series below has that label")

    promql_parser.walk(ast, pre_visit=pre, post_visit=post)
    for job in re.findall(r'job\s*(?:=|=~)\s*"([^"]*)"', expr):
        if not any(re.fullmatch(job, real) for real in (NODE_JOB, ROUTER_JOB)):
            problems.append(f"job {job!r} matches no scrape job of deploy/prometheus/prometheus.yml")
    return problems, names


def assert_promql(expr: str, where: str) -> set[str]:
    problems, names = promql_problems(expr)
    assert not problems, f"{where}: {expr}\n" + "\n".join(problems)
    return names


def test_promql_check_catches_misused_metrics() -> None:
    """The checker itself: it must reject what the deploy files must not contain."""
    bad = {
        "rate(ws_connections_total[5m])": "is a gauge",
        "events_dropped_total > 0": "through rate()",
        "histogram_quantile(0.99, rate(event_consume_latency_seconds[5m]))": "not in the code",
        "sum(rate(event_consume_latency_seconds_bucket[5m]))": "histogram_quantile",
        "rate(no_such_metric_total[5m])": "not in the code",
        'sum by (node) (rate(events_dropped_total{reson="x"}[5m]))': "no label 'reson'",
        'up{job="delta-push-nodes"}': "matches no scrape job",
        "rate(events_dropped_total[5m]": "does not parse",
    }
    for expr, expected in bad.items():
        problems, _ = promql_problems(expr)
        assert any(expected in p for p in problems), (expr, problems)
    assert promql_problems('sum by (reason) (rate(events_dropped_total{job="delta-push-node"}[5m]))') == (
        [],
        {"events_dropped_total"},
    )


# --- every file parses ---------------------------------------------------------------


def deploy_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in suffixes)


def yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_every_yaml_and_json_file_under_deploy_parses() -> None:
    files = deploy_files(".yaml", ".yml", ".json")
    assert len(files) >= 15, files
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert yaml_docs(path), f"{path} is empty"


# --- Dockerfile --------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def test_dockerfile_is_multistage_slim_python311_nonroot_without_build_tools() -> None:
    preamble, *stages = dockerfile_stages()
    args = dict(arg.split("=", 1) for ins, arg in preamble if ins == "ARG")
    assert len(stages) >= 2, "multi-stage build"
    final = stages[-1]
    base = final[0][1].split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    users = [arg for ins, arg in final if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final stage runs as a non-root user"
    runs = " ".join(arg for ins, arg in final if ins == "RUN")
    for tool in ("gcc", "build-essential", "apt-get install", "pip install", "make "):
        assert tool not in runs, f"the final stage must not install build tools: {tool}"
    copies = [arg for ins, arg in final if ins == "COPY"]
    assert any(arg.startswith("--from=") for arg in copies), "the final stage copies the built venv"


def test_dockerfile_copies_only_files_that_exist_and_dockerignore_lets_through() -> None:
    allowed = [
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    ]
    sources = []
    for stage in dockerfile_stages()[1:]:
        for ins, arg in stage:
            if ins == "COPY" and not arg.startswith("--from="):
                sources += shlex.split(arg)[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        path = source.rstrip("/")
        let_through = any(path == entry or path.startswith(entry + "/") for entry in allowed)
        assert let_through, f"COPY {source}: excluded by .dockerignore"
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in packages:
        assert package.rstrip("*") in sources, f"package {package} is not copied into the image"


def test_dockerfile_entrypoint_healthcheck_and_ports_match_the_code() -> None:
    final = dockerfile_stages()[-1]
    entrypoint = json.loads(next(arg for ins, arg in final if ins == "ENTRYPOINT"))
    cmd = json.loads(next(arg for ins, arg in final if ins == "CMD"))
    check_pushctl_argv(entrypoint + cmd, "Dockerfile ENTRYPOINT + CMD")
    health = next(arg for ins, arg in final if ins == "HEALTHCHECK")
    probe = json.loads(health.split(" CMD ", 1)[1])
    assert probe[:2] == ["python", "-c"], "probe with the standard library: the slim image has no curl"
    code = probe[2]
    compile(code, "HEALTHCHECK", "exec")
    assert "/healthz" in code and "/healthz" in node_paths()
    assert "PUSH_PORT" in code and "PUSH_PORT" in SETTING_ENV
    assert f"'{Settings().port}'" in code and f"'{ROUTER_PORT}'" in code, "the probe falls back to the default ports"
    exposed = {int(p) for ins, arg in final if ins == "EXPOSE" for p in arg.split()}
    assert {Settings().port, ROUTER_PORT} <= exposed
    env = dict(
        pair.split("=", 1)
        for ins, arg in final
        if ins == "ENV"
        for pair in shlex.split(arg)
        if pair.startswith("PUSH_")
    )
    check_settings_env(env, "Dockerfile ENV")


# --- compose -------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def interpolate(value: Any) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} with nothing set; ${VAR:?error} (required) as a marker."""
    value = re.sub(r"\$\{(\w+):?\?[^}]*\}", r"<required \1>", str(value))
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", value)


def push_services() -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if svc.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
    }


def service_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(v) for k, v in env.items()}


def test_compose_runs_redis_one_router_three_nodes_prometheus_and_grafana() -> None:
    services = compose()["services"]
    assert {"redis", "router", "node-1", "node-2", "node-3", "prometheus", "grafana"} <= set(services)
    roles = {name: svc["command"][0] for name, svc in push_services().items()}
    assert roles == {"router": "router", "node-1": "node", "node-2": "node", "node-3": "node"}
    for name, svc in push_services().items():
        context = (DEPLOY / svc["build"]["context"]).resolve()
        assert context == ROOT, f"{name}: build context is the repository root"
        assert (context / svc["build"]["dockerfile"]).is_file()


@pytest.mark.parametrize("service", ["router", "node-1", "node-2", "node-3"])
def test_compose_service_command_env_and_ports_match_the_code(service: str) -> None:
    svc = push_services()[service]
    final = dockerfile_stages()[-1]
    entrypoint = json.loads(next(arg for ins, arg in final if ins == "ENTRYPOINT"))
    check_pushctl_argv(entrypoint + svc["command"], f"compose {service}")
    env = service_env(svc)
    settings = check_settings_env(env, f"compose {service}")
    expected_port = ROUTER_PORT if service == "router" else settings.port
    assert settings.port == expected_port
    published = {int(p.split(":")[-1]) for p in svc["ports"]}
    assert published == {settings.port}, f"{service}: publishes {published}, listens on {settings.port}"
    redis_host = re.match(r"redis://([^:/]+)", settings.redis_url).group(1)
    assert redis_host in compose()["services"], f"{service}: REDIS_URL points at {redis_host}"
    assert settings.jwt_secret == "<required PUSH_JWT_SECRET>", (
        f"{service}: PUSH_JWT_SECRET must be required from the shell or deploy/.env, with no default"
    )
    assert settings.metrics_port and settings.metrics_port != settings.port
    assert settings.metrics_port not in published, f"{service}: /metrics must not be published on the host"
    grace = float(svc["stop_grace_period"].removesuffix("s"))
    assert grace >= settings.drain_seconds + 5, f"{service}: stop_grace_period must outlast the drain"
    if service.startswith("node-"):
        assert settings.node_id == service
        assert settings.public_url == f"ws://127.0.0.1:{settings.port}/ws", "clients on the host use the published port"
        assert settings.internal_url == f"http://{service}:{settings.port}", "the router reaches nodes by service name"


def test_compose_nodes_have_distinct_ids_ports_and_one_secret() -> None:
    envs = [service_env(svc) for svc in push_services().values()]
    nodes = [e for e in envs if "PUSH_NODE_ID" in e]
    assert len({e["PUSH_NODE_ID"] for e in nodes}) == len(nodes) == 3
    assert len({e["PUSH_PORT"] for e in nodes}) == 3
    assert len({e["PUSH_JWT_SECRET"] for e in envs}) == 1


def test_prometheus_scrapes_every_router_and_node_and_loads_the_alerts() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file(), rule_file
    assert "alerts.yml" in config["rule_files"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    expected: dict[str, set[str]] = {NODE_JOB: set(), ROUTER_JOB: set()}
    for name, svc in push_services().items():
        settings = Settings.from_env(service_env(svc))
        port = settings.metrics_port or settings.port
        expected[ROUTER_JOB if svc["command"][0] == "router" else NODE_JOB].add(f"{name}:{port}")
    for job_name, targets in expected.items():
        job = jobs[job_name]
        assert job.get("metrics_path", "/metrics") == "/metrics" and "/metrics" in node_paths() & router_paths()
        assert {t for sc in job["static_configs"] for t in sc["targets"]} == targets
    prometheus = compose()["services"]["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = Path(config_flag.split("=", 1)[1])
    host_dir = (DEPLOY / mounts[str(config_path.parent)]).resolve()
    assert host_dir / config_path.name == (DEPLOY / "prometheus" / "prometheus.yml").resolve()


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: (DEPLOY / v.split(":")[0]).resolve() for v in grafana["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == (DEPLOY / "grafana" / "provisioning").resolve()
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose()["services"]["prometheus"]["ports"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "delta-push.yaml").read_text())["providers"]
    dashboard_files = [
        host for target, host in mounts.items() if Path(target).parent == Path(provider["options"]["path"])
    ]
    assert dashboard_files == [(DEPLOY / "grafana" / "dashboard.json").resolve()]
    uids = {t["datasource"]["uid"] for p in dashboard()["panels"] for t in p.get("targets", [])}
    assert uids == {"${datasource}"}, "no hard-coded datasource uid: the dashboard imports into any Grafana"
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == datasource["type"], "the provisioned datasource is one of its choices"


def test_dashboard_filters_by_namespace_and_pod_and_all_matches_series_without_them() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    for name in ("namespace", "pod"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"]["uid"] == "${datasource}"
        assert variable["includeAll"] and variable["allValue"] == ".*", f"{name}: compose has no {name} label"
        assert_promql(re.sub(r"label_values\((.*), \w+\)$", r"\1", variable["definition"]).replace("$namespace", ".*"), name)
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            selectors = re.findall(r"\w+\{[^}]*\}", target["expr"])
            assert selectors, target["expr"]
            for selector in selectors:
                assert 'namespace=~"$namespace"' in selector and 'pod=~"$pod"' in selector, (panel["title"], selector)


# --- alerts ----------------------------------------------------------------------------


@cache
def alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for group in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    ]


def github_anchors(markdown: str) -> set[str]:
    """Anchors GitHub generates for headings, plus explicit <a id="...">."""
    anchors = set(re.findall(r'<a (?:id|name)="([^"]+)"', markdown))
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*$", line)
        if match:
            text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def test_alerts_cover_the_spec_metrics() -> None:
    named: dict[str, set[str]] = {}
    for rule in alert_rules():
        named[rule["alert"]] = assert_promql(rule["expr"], f"alert {rule['alert']}")
    everything = set().union(*named.values())
    required = {
        "up",  # a node down
        "ws_connections_total",  # connections dropping sharply
        "event_consume_latency_seconds_bucket",  # p99 too high
        "events_dropped_total",
        "auth_failures_total",
        "redis_reconnects_total",
        "bus_connected",  # a node off the bus (issue 16)
        "router_redis_connected",
        "process_open_fds",  # near the fd limit
        "process_max_fds",
        "router_proxy_errors_total",
        "router_nodes",  # an empty ring
    }
    assert required <= everything, required - everything
    assert any(re.search(r'absent\(up\{job="delta-push-node"\}\)', r["expr"]) for r in alert_rules()), (
        "an alert for a scrape target that is gone altogether"
    )
    latency = [r["expr"] for r in alert_rules() if "event_consume_latency_seconds_bucket" in r["expr"]]
    assert any("histogram_quantile(0.99," in re.sub(r"\s", "", e) for e in latency), "p99 of the consume latency"
    node_down = [r for r in alert_rules() if re.search(r'up\{job="delta-push-node"\}\s*==\s*0', r["expr"])]
    assert node_down, "an alert for a node that is down"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_is_complete_and_its_runbook_exists(rule: dict[str, Any]) -> None:
    assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    if "for" in rule:
        promql_parser.parse_duration(rule["for"])
    annotations = rule["annotations"]
    assert annotations["summary"] and annotations["description"]
    assert "runbook" not in annotations, "the conventional name is runbook_url"
    url, _, anchor = annotations["runbook_url"].partition("#")
    assert re.fullmatch(r"https://[^/\s]+/(?:[^\s#]+/)?docs/OPERATIONS\.md", url) and anchor, (
        f"runbook_url must be an absolute URL of docs/OPERATIONS.md: {annotations['runbook_url']}"
    )
    assert {r["annotations"]["runbook_url"].partition("#")[0] for r in alert_rules()} == {url}, "one docs base"
    assert OPERATIONS.is_file(), "docs/OPERATIONS.md holds the runbooks"
    assert anchor in github_anchors(OPERATIONS.read_text()), f"docs/OPERATIONS.md has no #{anchor}"


# Scenarios for `promtool test rules`: each alert fires on what it is for and not on
# what it is not for (a drain is no connection loss, conflation is no drop, a steady
# rate is no spike). Annotations are stripped before the run: promtool compares them
# verbatim, and `promtool check rules` checks their templates.
ALERT_SCENARIOS = """\
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - name: a node that stops answering scrapes
    interval: 1m
    input_series:
      - {series: 'up{job="delta-push-node", instance="node-1:8081"}', values: '1 1 0 0 0 0'}
      - {series: 'up{job="delta-push-node", instance="node-2:8082"}', values: '1x5'}
      - {series: 'up{job="delta-push-router", instance="router:8080"}', values: '1 0 0 0 0 0'}
    alert_rule_test:
      - {eval_time: 2m, alertname: PushNodeDown, exp_alerts: []}
      - eval_time: 4m
        alertname: PushNodeDown
        exp_alerts: [{exp_labels: {severity: critical, job: delta-push-node, instance: "node-1:8081"}}]
      - eval_time: 4m
        alertname: PushRouterDown
        exp_alerts: [{exp_labels: {severity: critical, job: delta-push-router, instance: "router:8080"}}]
  - name: half the connections gone
    interval: 1m
    input_series:
      - {series: 'ws_connections_total{job="delta-push-node", instance="node-1:8081"}', values: '1000x15 500x15'}
      - {series: 'ws_connections_total{job="delta-push-node", instance="node-2:8082"}', values: '1000x15 500x15'}
    alert_rule_test:
      - {eval_time: 14m, alertname: PushConnectionsDroppingSharply, exp_alerts: []}
      - eval_time: 20m
        alertname: PushConnectionsDroppingSharply
        exp_alerts: [{exp_labels: {severity: critical}}]
  - name: a drain moves connections without losing them
    interval: 1m
    input_series:
      - {series: 'ws_connections_total{job="delta-push-node", instance="node-1:8081"}', values: '1000x15 0x15'}
      - {series: 'ws_connections_total{job="delta-push-node", instance="node-2:8082"}', values: '1000x15 2000x15'}
    alert_rule_test:
      - {eval_time: 25m, alertname: PushConnectionsDroppingSharply, exp_alerts: []}
  - name: slow delivery on one node
    interval: 1m
    input_series:
      - {series: 'event_consume_latency_seconds_bucket{job="delta-push-node", instance="node-1:8081", le="0.5"}', values: '0x30'}
      - {series: 'event_consume_latency_seconds_bucket{job="delta-push-node", instance="node-1:8081", le="1.0"}', values: '0x30'}
      - {series: 'event_consume_latency_seconds_bucket{job="delta-push-node", instance="node-1:8081", le="2.5"}', values: '0+600x30'}
      - {series: 'event_consume_latency_seconds_bucket{job="delta-push-node", instance="node-1:8081", le="+Inf"}', values: '0+600x30'}
      - {series: 'event_consume_latency_seconds_bucket{job="delta-push-node", instance="node-2:8082", le="0.005"}', values: '0+600x30'}
      - {series: 'event_consume_latency_seconds_bucket{job="delta-push-node", instance="node-2:8082", le="0.5"}', values: '0+600x30'}
      - {series: 'event_consume_latency_seconds_bucket{job="delta-push-node", instance="node-2:8082", le="+Inf"}', values: '0+600x30'}
    alert_rule_test:
      - {eval_time: 8m, alertname: PushConsumeLatencyHigh, exp_alerts: []}
      - eval_time: 20m
        alertname: PushConsumeLatencyHigh
        exp_alerts: [{exp_labels: {severity: warning, instance: "node-1:8081"}}]
  - name: drops counted, conflation ignored
    interval: 1m
    input_series:
      - {series: 'events_dropped_total{job="delta-push-node", instance="node-1:8081", reason="queue_full"}', values: '0+1200x20'}
      - {series: 'events_dropped_total{job="delta-push-node", instance="node-1:8081", reason="conflated"}', values: '0+6000x20'}
      - {series: 'events_dropped_total{job="delta-push-node", instance="node-2:8082", reason="expired"}', values: '0+60x20'}
    alert_rule_test:
      - eval_time: 15m
        alertname: PushEventsDropped
        exp_alerts: [{exp_labels: {severity: warning, instance: "node-1:8081", reason: queue_full}}]
  - name: token rejections jump twentyfold
    interval: 1m
    input_series:
      - {series: 'auth_failures_total{job="delta-push-node", instance="node-1:8081", reason="signature"}', values: '0+60x70 4260+1200x20'}
    alert_rule_test:
      - {eval_time: 65m, alertname: PushAuthFailuresSpiking, exp_alerts: []}
      - eval_time: 85m
        alertname: PushAuthFailuresSpiking
        exp_alerts: [{exp_labels: {severity: warning}}]
  - name: a steady high rate of rejections is no spike
    interval: 1m
    input_series:
      - {series: 'auth_failures_total{job="delta-push-router", instance="router:8080", reason="expired"}', values: '0+600x90'}
    alert_rule_test:
      - {eval_time: 85m, alertname: PushAuthFailuresSpiking, exp_alerts: []}
  - name: one reconnect, then flapping
    interval: 1m
    input_series:
      - {series: 'redis_reconnects_total{job="delta-push-node", instance="node-1:8081"}', values: '0 0 0 1 1 1 1 1 1 1'}
      - {series: 'redis_reconnects_total{job="delta-push-node", instance="node-2:8082"}', values: '0 1 2 3 4 4 4 4 4 4'}
      - {series: 'redis_reconnects_total{job="delta-push-node", instance="node-3:8083"}', values: '0x9'}
    alert_rule_test:
      - eval_time: 6m
        alertname: PushRedisReconnects
        exp_alerts:
          - {exp_labels: {severity: warning, instance: "node-1:8081"}}
          - {exp_labels: {severity: warning, instance: "node-2:8082"}}
      - eval_time: 6m
        alertname: PushRedisFlapping
        exp_alerts: [{exp_labels: {severity: critical, instance: "node-2:8082"}}]
  - name: a node off the bus for a minute, another only for a blip
    interval: 15s
    input_series:
      - {series: 'bus_connected{job="delta-push-node", instance="node-1:8081"}', values: '1 1 0 0 0 0 0 0 0 0'}
      - {series: 'bus_connected{job="delta-push-node", instance="node-2:8082"}', values: '1 0 0 1 1 1 1 1 1 1'}
    alert_rule_test:
      - {eval_time: 45s, alertname: PushBusDisconnected, exp_alerts: []}
      - eval_time: 2m
        alertname: PushBusDisconnected
        exp_alerts: [{exp_labels: {severity: critical, job: delta-push-node, instance: "node-1:8081"}}]
  - name: a router routing on its cached ring for a minute
    interval: 15s
    input_series:
      - {series: 'router_redis_connected{job="delta-push-router", instance="router:8080"}', values: '1 0x10'}
    alert_rule_test:
      - {eval_time: 1m, alertname: PushRouterRedisDisconnected, exp_alerts: []}
      - eval_time: 2m
        alertname: PushRouterRedisDisconnected
        exp_alerts: [{exp_labels: {severity: warning, job: delta-push-router, instance: "router:8080"}}]
  - name: the nodes vanish from service discovery
    interval: 1m
    input_series:
      - {series: 'up{job="delta-push-router", instance="router:8080"}', values: '1x20'}
      - {series: 'up{job="delta-push-node", instance="node-1:8081"}', values: '1 1'}
    alert_rule_test:
      - {eval_time: 5m, alertname: PushScrapeTargetAbsent, exp_alerts: []}
      - eval_time: 15m
        alertname: PushScrapeTargetAbsent
        exp_alerts: [{exp_labels: {severity: critical, job: delta-push-node}}]
  - name: descriptors over 80% of the limit on one node
    interval: 1m
    input_series:
      - {series: 'process_open_fds{job="delta-push-node", instance="node-1:8081"}', values: '50000 60000 70000x10'}
      - {series: 'process_max_fds{job="delta-push-node", instance="node-1:8081"}', values: '80000x12'}
      - {series: 'process_open_fds{job="delta-push-node", instance="node-2:8082"}', values: '40000x12'}
      - {series: 'process_max_fds{job="delta-push-node", instance="node-2:8082"}', values: '80000x12'}
    alert_rule_test:
      - {eval_time: 3m, alertname: PushFileDescriptorsHigh, exp_alerts: []}
      - eval_time: 10m
        alertname: PushFileDescriptorsHigh
        exp_alerts: [{exp_labels: {severity: warning, job: delta-push-node, instance: "node-1:8081"}}]
  - name: a router failing to reach nodes
    interval: 1m
    input_series:
      - {series: 'router_proxy_errors_total{job="delta-push-router", instance="router:8080", reason="connect"}', values: '0+300x15'}
      - {series: 'router_proxy_errors_total{job="delta-push-router", instance="router:8080", reason="upstream_lost"}', values: '0+6x15'}
    alert_rule_test:
      - eval_time: 12m
        alertname: PushRouterProxyErrors
        exp_alerts: [{exp_labels: {severity: warning, instance: "router:8080", reason: connect}}]
  - name: a router with no node in its ring
    interval: 15s
    input_series:
      - {series: 'router_nodes{job="delta-push-router", instance="router:8080"}', values: '3 3 0 0 0 0 0 0 0'}
      - {series: 'router_nodes{job="delta-push-router", instance="router-2:8080"}', values: '3x8'}
    alert_rule_test:
      - {eval_time: 45s, alertname: PushRingEmpty, exp_alerts: []}
      - eval_time: 2m
        alertname: PushRingEmpty
        exp_alerts: [{exp_labels: {severity: critical, job: delta-push-router, instance: "router:8080"}}]
"""

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package `prometheus`) is not installed"
)


def promtool(*args: str) -> None:
    result = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


PROMTOOL_LINT_EXCEPTIONS = {
    "ws_connections_total": 'non-counter metrics should not have "_total" suffix',
}
"""`promtool check metrics` findings we keep on purpose: ws_connections_total is a gauge with a
counter's suffix, but it is the name of the design document and SPEC §9, and the dashboard,
the alerts and the autoscaler's adapter rule select it; renaming it would break them all."""


@needs_promtool
def test_promtool_lints_the_exposed_metrics_clean_but_for_the_recorded_exceptions() -> None:
    from prometheus_client import generate_latest

    result = subprocess.run(
        ["promtool", "check", "metrics"], input=generate_latest(REGISTRY), capture_output=True, timeout=60, check=False
    )
    findings = {line.strip() for line in (result.stdout + result.stderr).decode().splitlines() if line.strip()}
    expected = {f"{name} {problem}" for name, problem in PROMTOOL_LINT_EXCEPTIONS.items()}
    assert findings == expected, f"promtool check metrics: {sorted(findings - expected)} (recorded: {expected})"


@needs_promtool
def test_promtool_accepts_the_prometheus_config_and_the_alert_rules() -> None:
    promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    promtool("check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))


@needs_promtool
def test_alerts_fire_on_the_scenarios_they_are_for(tmp_path: Path) -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "scenarios.yml").write_text(ALERT_SCENARIOS)
    scenarios = yaml.safe_load(ALERT_SCENARIOS)
    firing = {t["alertname"] for test in scenarios["tests"] for t in test["alert_rule_test"] if t["exp_alerts"]}
    assert firing == {rule["alert"] for rule in alert_rules()}, "every alert has a scenario where it fires"
    promtool("test", "rules", str(tmp_path / "scenarios.yml"))


# --- dashboard -------------------------------------------------------------------------


@cache
def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())


def test_dashboard_queries_parse_and_name_real_metrics_of_the_right_type() -> None:
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    named: set[str] = set()
    for panel in panels:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"undefined dashboard variable in {expr}"
            named |= assert_promql(expr, f"panel {panel['title']!r}")
    required = {
        "ws_connections_total",  # connections per node
        "events_published_total",  # events in
        "events_delivered_total",  # events out
        "event_consume_latency_seconds_bucket",  # latency percentiles
        "events_dropped_total",  # drops by reason
        "subscriptions_active",
        "auth_failures_total",
        "router_routes_total",  # routes per node
    }
    assert required <= named, required - named


# --- Kubernetes ------------------------------------------------------------------------


def kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


@cache
def base_resources() -> tuple[dict[str, Any], ...]:
    """The base, loaded the way kustomize does: every file listed under `resources`."""
    docs: list[dict[str, Any]] = []
    for entry in kustomization(BASE)["resources"]:
        path = BASE / entry
        assert path.is_file(), f"base/kustomization.yaml lists {entry}, which does not exist"
        docs += yaml_docs(path)
    listed = {BASE / entry for entry in kustomization(BASE)["resources"]}
    unlisted = set(BASE.glob("*.yaml")) - listed - {BASE / "kustomization.yaml"}
    assert not unlisted, f"files in base/ that kustomization.yaml does not list: {unlisted}"
    apply_config_map_generators(BASE, docs)
    return tuple(docs)


def env_file(path: Path) -> dict[str, str]:
    """A kustomize ``envs`` file: KEY=value lines, # comments."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def apply_config_map_generators(directory: Path, docs: list[dict[str, Any]]) -> None:
    """configMapGenerator as kustomize applies it: create, or merge into the parent's (behavior: merge)."""
    for generator in kustomization(directory).get("configMapGenerator", []):
        data: dict[str, str] = {}
        for name in generator.get("envs", []):
            data |= env_file(directory / name)
        data |= dict(literal.split("=", 1) for literal in generator.get("literals", []))
        if generator.get("behavior") == "merge":
            (existing,) = find(docs, "ConfigMap", generator["name"])
            existing["data"] |= data
            continue
        assert not find(docs, "ConfigMap", generator["name"]), f"{generator['name']} generated twice"
        labels = generator.get("options", {}).get("labels", {})
        docs.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"], "labels": labels}, "data": data}
        )


def find(docs: Any, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch as far as our overlays use it: maps merge, named lists merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in base + patch)
    ):
        out_list = [copy.deepcopy(i) for i in base]
        for item in patch:
            index = next((n for n, old in enumerate(out_list) if old["name"] == item["name"]), None)
            if index is None:
                out_list.append(item)
            else:
                out_list[index] = merge(out_list[index], item)
        return out_list
    return patch


@cache
def overlay_resources() -> tuple[dict[str, Any], ...]:
    """The example overlay rendered with the kustomize features it uses, in Python."""
    spec = kustomization(OVERLAY)
    docs: list[dict[str, Any]] = []
    for entry in spec["resources"]:
        path = (OVERLAY / entry).resolve()
        if path == BASE.resolve():
            docs += copy.deepcopy(list(base_resources()))
        else:
            assert path.is_file(), entry
            docs += yaml_docs(path)
    apply_config_map_generators(OVERLAY, docs)
    for generator in spec.get("secretGenerator", []):
        data = dict(literal.split("=", 1) for literal in generator["literals"])
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": generator.get("type", "Opaque"),
                "metadata": {"name": generator["name"]},
                "stringData": data,
            }
        )
    for entry in spec.get("patches", []):
        (patch,) = yaml_docs(OVERLAY / entry["path"])
        targets = find(docs, patch["kind"], patch["metadata"]["name"])
        assert len(targets) == 1, (
            f"{entry['path']} patches {patch['kind']}/{patch['metadata']['name']}, not in the base"
        )
        docs[docs.index(targets[0])] = merge(targets[0], patch)
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in spec.get("images", [])}
    for doc in docs:
        if doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = spec["namespace"]
        for container in pod_spec(doc).get("containers", []):
            container["image"] = images.get(container["image"].split(":")[0], container["image"])
    return tuple(docs)


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else {}


def validate_all(docs: Any, where: str) -> None:
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                raise AssertionError(
                    f"{where}: {doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {version}: {path}: {exc.message}"
                ) from None


def test_base_manifests_validate_against_the_kubernetes_schemas() -> None:
    kinds = {d["kind"] for d in base_resources()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"} <= kinds
    validate_all(base_resources(), "base")


def test_example_overlay_validates_against_the_kubernetes_schemas() -> None:
    docs = overlay_resources()
    validate_all(docs, "overlays/example")
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        kustomization(OVERLAY)["namespace"]
    }


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_kustomize_renders_what_the_python_loader_sees(directory: Path) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    validate_all(rendered, f"kubectl kustomize {directory.relative_to(ROOT)}")
    ours = overlay_resources() if directory == OVERLAY else base_resources()

    def key(doc: dict[str, Any]) -> tuple[str, str]:
        name = doc["metadata"]["name"]
        if doc["kind"] in ("Secret", "ConfigMap"):
            name = re.sub(r"-[a-z0-9]{10}$", "", name)  # the generator's content hash
        return doc["kind"], name

    assert sorted(map(key, rendered)) == sorted(map(key, ours))


def containers(docs: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(doc, c) for doc in docs if doc["kind"] == "Deployment" for c in pod_spec(doc)["containers"]]


def container_env(docs: Any, container: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """(environment a container sees, with ConfigMaps and literal values; entries taken from elsewhere)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        (config,) = find(docs, "ConfigMap", source["configMapRef"]["name"])
        env |= config["data"]
    sourced: dict[str, Any] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            sourced[item["name"]] = item["valueFrom"]
    return env, sourced


@pytest.mark.parametrize("docs_name", ["base", "overlay"])
def test_every_manifest_env_var_is_a_setting_with_a_valid_value(docs_name: str) -> None:
    docs = base_resources() if docs_name == "base" else overlay_resources()
    for config in find(docs, "ConfigMap"):
        check_settings_env(config["data"], f"ConfigMap {config['metadata']['name']}")
    for doc, container in containers(docs):
        where = f"{doc['metadata']['name']}/{container['name']}"
        env, sourced = container_env(docs, container)
        helpers = {name for name, source in sourced.items() if name not in SETTING_ENV}
        for name in helpers:
            # A downward-API value that is not a setting may only feed $(NAME) in a setting.
            assert "fieldRef" in sourced[name], f"{where}: {name} is not a setting"
            assert any(f"$({name})" in v for v in env.values()), f"{where}: {name} is unused"
        for name, source in sourced.items():
            if "secretKeyRef" in source:
                assert source["secretKeyRef"]["key"] == name, f"{where}: secret key and env var differ"
                assert not source["secretKeyRef"].get("optional", False), f"{where}: a missing Secret must stop the pod"
                assert not find(docs, "Secret", source["secretKeyRef"]["name"]), (
                    f"{where}: the manifests must not ship the Secret (a working default secret)"
                )
        resolved = {k: re.sub(r"\$\((\w+)\)", "10.0.0.1", v) for k, v in env.items()}
        resolved |= {name: "from-the-cluster" for name in sourced if name not in helpers}
        settings = check_settings_env(resolved, where)
        if "PUSH_JWT_SECRET" in SETTING_ENV:
            assert sourced.get("PUSH_JWT_SECRET", {}).get("secretKeyRef"), (
                f"{where}: the JWT secret comes from a Secret"
            )
            assert all("PUSH_JWT_SECRET" not in c["data"] for c in find(docs, "ConfigMap"))
        assert settings.drain_seconds > 0


def role(doc: dict[str, Any]) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def test_deployment_commands_ports_probes_and_drain_match_the_code() -> None:
    docs = base_resources()
    roles = set()
    for doc, container in containers(docs):
        where = f"{doc['metadata']['name']}/{container['name']}"
        roles.add(role(doc))
        argv = container.get("command", []) + container.get("args", [])
        check_pushctl_argv(argv, where)
        env, _ = container_env(docs, container)
        settings = Settings.from_env({k: v for k, v in env.items() if "$(" not in v})
        expected_port = Settings().port if role(doc) == "node" else ROUTER_PORT
        assert settings.port == expected_port, f"{where}: listens on {settings.port}"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert settings.metrics_port and settings.metrics_port != settings.port, f"{where}: /metrics on its own port"
        assert ports == {"http": settings.port, "metrics": settings.metrics_port}
        paths = node_paths() if role(doc) == "node" else router_paths()
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path and path in paths, f"{where}: {probe}"
            assert ports.get(get["port"], get["port"]) == settings.port
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == settings.metrics_port
        assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in paths
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        grace = pod_spec(doc)["terminationGracePeriodSeconds"]
        assert grace >= float(pre_stop[1]) + settings.drain_seconds + 10, (
            f"{where}: terminationGracePeriodSeconds {grace} must outlast preStop + a {settings.drain_seconds} s drain"
        )
        resources = container["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"], f"{where}: sized requests"
        security = container["securityContext"]
        assert pod_spec(doc)["securityContext"]["runAsNonRoot"] and not security["allowPrivilegeEscalation"]
    assert roles == {"node", "router"}


def test_services_and_budgets_select_the_deployments_pods() -> None:
    docs = base_resources()
    pods = {role(d): (d["spec"]["template"]["metadata"]["labels"], pod_spec(d)) for d in find(docs, "Deployment")}
    for kind in ("Service", "PodDisruptionBudget"):
        selected = set()
        for doc in find(docs, kind):
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            matches = [r for r, (labels, _) in pods.items() if selector.items() <= labels.items()]
            assert len(matches) == 1, f"{kind}/{doc['metadata']['name']} selects {matches}"
            selected.add(matches[0])
            if kind == "Service":
                (container,) = pods[matches[0]][1]["containers"]
                names = {p["name"]: p["containerPort"] for p in container["ports"]}
                for port in doc["spec"]["ports"]:
                    assert port["targetPort"] in names or port["targetPort"] in names.values()
        assert selected == {"node", "router"}, kind
    for deployment in find(docs, "Deployment"):
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pods[role(deployment)][0].items()
        assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns replicas"


@cache
def adapter_rules() -> list[dict[str, Any]]:
    (config,) = yaml_docs(K8S / "prometheus-adapter-rules.yaml")
    validate_all([config], "prometheus-adapter-rules.yaml")
    return yaml.safe_load(config["data"]["config.yaml"])["rules"]


def test_prometheus_adapter_rule_serves_open_connections_from_the_gauge() -> None:
    for rule in adapter_rules():
        (series,) = assert_promql(rule["seriesQuery"], "adapter seriesQuery")
        assert re.fullmatch(rule["name"]["matches"], series)
        assert set(rule["resources"]["overrides"]) <= TARGET_LABELS
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="delta-push",pod=~"delta-push-node-.*"')
            .replace("<<.GroupBy>>", "pod")
        )
        assert "<<" not in query, query
        assert_promql(query, "adapter metricsQuery")
    assert any(
        r["name"]["as"] == "ws_connections" and "ws_connections_total" in r["seriesQuery"] for r in adapter_rules()
    )


def test_node_autoscaler_uses_cpu_and_connections_per_pod_through_the_adapter() -> None:
    docs = base_resources()
    served = {rule["name"]["as"] for rule in adapter_rules()}
    (hpa,) = find(docs, "HorizontalPodAutoscaler", "delta-push-node")
    target = hpa["spec"]["scaleTargetRef"]
    (deployment,) = find(docs, target["kind"], target["name"])
    assert role(deployment) == "node"
    metrics = hpa["spec"]["metrics"]
    assert {m["resource"]["name"] for m in metrics if m["type"] == "Resource"} == {"cpu"}
    pods = [m["pods"] for m in metrics if m["type"] == "Pods"]
    assert pods and {p["metric"]["name"] for p in pods} <= served
    assert hpa["spec"]["minReplicas"] >= 2
    for doc in find(docs, "HorizontalPodAutoscaler"):
        (scaled,) = find(docs, doc["spec"]["scaleTargetRef"]["kind"], doc["spec"]["scaleTargetRef"]["name"])
        (container,) = pod_spec(scaled)["containers"]
        assert container["resources"]["requests"]["cpu"], "CPU utilization needs a CPU request"


# --- the runbook matches the commands that exist ------------------------------------------


def test_operations_commands_and_settings_exist() -> None:
    assert OPERATIONS.is_file()
    text = OPERATIONS.read_text()
    for env in set(re.findall(r"\b(PUSH_[A-Z0-9_]+|REDIS_URL)\b", text)):
        assert env in SETTING_ENV, f"docs/OPERATIONS.md names {env}, which is not a setting"
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, flags=re.S)
    lines = "\n".join(blocks).splitlines()
    lines += re.findall(r"`(pushctl [^`]*)`", re.sub(r"```.*?```", "", text, flags=re.S))  # inline code
    commands = []
    for line in lines:
        match = re.search(r"(?:^|\s|/|\$\()(pushctl\s[^|&;#>)]*)", line.strip())
        if match:
            commands.append(shlex.split(match.group(1)))
    assert len(commands) >= 6, commands
    used = {argv[1] for argv in commands}
    assert {"up", "node", "router", "publish", "tail", "token"} <= used, used
    missing = sorted(used - pushctl_subcommands())
    assert set(missing) <= SPEC_SUBCOMMANDS, f"docs/OPERATIONS.md uses pushctl {missing}, which SPEC §10 does not have"
    for argv in commands:
        if argv[1] in pushctl_subcommands():
            try:
                build_parser().parse_args(argv[1:])
            except SystemExit as exc:
                raise AssertionError(f"docs/OPERATIONS.md: pushctl rejects {shlex.join(argv)}") from exc
    if missing:
        pytest.skip(f"pushctl {missing} (SPEC §10) not registered in pushctl/cli.py yet; the rest checked")
