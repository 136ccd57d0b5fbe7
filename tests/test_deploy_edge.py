"""The deploy files' front door is production-safe (issue 16), checked statically like tests/test_deploy.py.

No working default secret (the manifests and compose reference one they do
not create); TLS ends at an Ingress (or, in the second overlay, at a cloud load
balancer); nothing that faces clients carries the metrics port; a settings
change renames the ConfigMap (hash suffix) so the pods roll.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy import (
    BASE,
    DEPLOY,
    K8S,
    NODE_JOB,
    OPERATIONS,
    OVERLAY,
    ROUTER_JOB,
    base_resources,
    compose,
    find,
    kustomization,
    overlay_resources,
    validate_all,
    yaml_docs,
)

from cluster.settings import Settings

LB_TLS = K8S / "overlays" / "example-lb-tls"
METRICS_PORT_NAME = "metrics"
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) is not installed")


@cache
def rendered(directory: Path) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def config(docs: Any) -> dict[str, str]:
    (config_map,) = find(docs, "ConfigMap")
    return config_map["data"]


def metrics_ports(service: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        p
        for p in service["spec"]["ports"]
        if p.get("targetPort") in (METRICS_PORT_NAME, 9091) or p.get("name") == METRICS_PORT_NAME
    ]


def facing_clients(docs: Any) -> list[dict[str, Any]]:
    """Services a client can reach: load balancers, node ports, and Ingress backends."""
    backends = {
        path["backend"]["service"]["name"]
        for ingress in find(docs, "Ingress")
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    }
    return [
        s
        for s in find(docs, "Service")
        if s["spec"].get("type") in ("LoadBalancer", "NodePort") or s["metadata"]["name"] in backends
    ]


# --- secrets -------------------------------------------------------------------------


def test_the_overlay_ships_no_jwt_secret_and_the_docs_say_how_to_make_one() -> None:
    assert "secretGenerator" not in kustomization(OVERLAY)
    assert not find(overlay_resources(), "Secret")
    text = OPERATIONS.read_text()
    assert "kubectl -n delta-push create secret generic delta-push-secrets" in text
    assert "--from-literal=PUSH_JWT_SECRET=" in text


def test_no_deploy_file_contains_a_usable_default_secret() -> None:
    compose_text = (DEPLOY / "compose.yaml").read_text()
    assert re.search(r"PUSH_JWT_SECRET:\s*\$\{PUSH_JWT_SECRET:\?", compose_text), "compose requires the secret"
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        for match in re.finditer(r"(?<!\{)PUSH_JWT_SECRET\s*[=:]\s*([A-Za-z0-9_.\-]{4,})", path.read_text()):
            raise AssertionError(f"{path.relative_to(DEPLOY)}: sets PUSH_JWT_SECRET to a literal {match.group(1)!r}")


@needs_kubectl
@pytest.mark.parametrize("directory", [OVERLAY, LB_TLS], ids=["example", "example-lb-tls"])
def test_rendered_overlays_reference_a_secret_they_do_not_create(directory: Path) -> None:
    docs = rendered(directory)
    assert not find(docs, "Secret")
    for deployment in find(docs, "Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        (secret,) = [e for e in container["env"] if e["name"] == "PUSH_JWT_SECRET"]
        ref = secret["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "delta-push-secrets" and ref.get("optional") is False


# --- TLS at the edge -------------------------------------------------------------------------


def test_the_ingress_terminates_tls_for_its_host_with_websocket_timeouts() -> None:
    docs = overlay_resources()
    (ingress,) = find(docs, "Ingress")
    validate_all([ingress], "overlays/example ingress")
    hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
    tls_hosts = {host for entry in ingress["spec"]["tls"] for host in entry["hosts"]}
    assert hosts and hosts <= tls_hosts, "every host is served over TLS"
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/force-ssl-redirect"] == "true", "never plain HTTP"
    settings = Settings.from_env(config(docs))
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[f"nginx.ingress.kubernetes.io/{timeout}"]) >= 10 * settings.ws_heartbeat
    origins = settings.allowed_origins
    assert origins and all(o.startswith("https://") for o in origins), "an https page can only use wss://"
    assert settings.router_trust_forwarded_for, "behind the Ingress the client IP is in X-Forwarded-For"
    (router_service,) = find(docs, "Service", "delta-push-router")
    assert router_service["spec"].get("type", "ClusterIP") == "ClusterIP", "only the Ingress is public"
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            port = path["backend"]["service"]["port"]["name"]
            assert port in {p["name"] for p in router_service["spec"]["ports"]}


@needs_kubectl
def test_the_lb_tls_overlay_terminates_tls_at_the_load_balancer_and_trusts_no_forwarded_header() -> None:
    docs = rendered(LB_TLS)
    validate_all(docs, "overlays/example-lb-tls")
    assert not find(docs, "Ingress")
    (service,) = find(docs, "Service", "delta-push-router")
    assert service["spec"]["type"] == "LoadBalancer"
    assert [p["port"] for p in service["spec"]["ports"]] == [443]
    annotations = service["metadata"]["annotations"]
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-ssl-ports"] == "https"
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-ssl-cert"].startswith("arn:aws:acm:")
    assert not Settings.from_env(config(docs)).router_trust_forwarded_for, "an L4 balancer sets no X-Forwarded-For"


def test_operations_says_where_tls_ends_and_that_tokens_never_cross_plain_http() -> None:
    text = OPERATIONS.read_text()
    assert "### TLS at the edge" in text
    section = text.split("### TLS at the edge", 1)[1].split("\n## ", 1)[0]
    assert "plain HTTP" in section and "token" in section


# --- metrics stay internal ----------------------------------------------------------------------


@pytest.mark.parametrize("docs_name", ["base", "example"])
def test_no_service_that_faces_clients_carries_the_metrics_port(docs_name: str) -> None:
    docs = base_resources() if docs_name == "base" else overlay_resources()
    exposed = facing_clients(docs) if docs_name == "example" else find(docs, "Service", "delta-push-router")
    assert exposed
    for service in exposed:
        assert not metrics_ports(service), f"{service['metadata']['name']} would publish /metrics"
    scraped = [s for s in find(docs, "Service") if metrics_ports(s)]
    assert {s["metadata"]["labels"]["delta-push.io/job"] for s in scraped} == {NODE_JOB, ROUTER_JOB}
    for service in scraped:
        assert service["spec"].get("clusterIP") == "None", "metrics Services are headless, cluster-internal"


@needs_kubectl
def test_the_lb_tls_load_balancer_has_no_metrics_port() -> None:
    for service in facing_clients(rendered(LB_TLS)):
        assert not metrics_ports(service), service["metadata"]["name"]


def test_the_service_monitor_scrapes_the_metrics_port_of_the_labelled_services() -> None:
    (monitor,) = yaml_docs(K8S / "monitoring" / "servicemonitor.yaml")
    assert monitor["kind"] == "ServiceMonitor"
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in find(base_resources(), "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["labels"][monitor["spec"]["jobLabel"]] for s in selected} == {NODE_JOB, ROUTER_JOB}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    for service in selected:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert "delta-push-router" not in {s["metadata"]["name"] for s in selected}, "not the public Service"


def test_compose_publishes_only_client_ports() -> None:
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    scraped_ports = {int(t.rsplit(":", 1)[1]) for t in targets}
    for name, svc in compose()["services"].items():
        if name in {"router", "node-1", "node-2", "node-3"}:
            published = {int(p.split(":")[0]) for p in svc["ports"]}
            assert not published & scraped_ports, f"compose {name} publishes its metrics port"


# --- a settings change rolls the pods -------------------------------------------------------------


def test_settings_come_from_a_config_map_generator() -> None:
    generators = kustomization(BASE)["configMapGenerator"]
    assert [g["name"] for g in generators] == ["delta-push-config"]
    assert "disableNameSuffixHash" not in str(generators)
    assert not (BASE / "configmap.yaml").exists()


@needs_kubectl
def test_kustomize_gives_the_config_map_a_content_hash_and_points_the_pods_at_it() -> None:
    def names(docs: Any) -> tuple[str, set[str]]:
        (config_map,) = find(docs, "ConfigMap")
        refs = {
            source["configMapRef"]["name"]
            for deployment in find(docs, "Deployment")
            for source in deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        }
        return config_map["metadata"]["name"], refs

    base_name, base_refs = names(rendered(BASE))
    overlay_name, overlay_refs = names(rendered(OVERLAY))
    assert re.fullmatch(r"delta-push-config-[a-z0-9]{10}", base_name) and base_refs == {base_name}
    assert overlay_refs == {overlay_name} and overlay_name != base_name, "other settings, another name: a rollout"
