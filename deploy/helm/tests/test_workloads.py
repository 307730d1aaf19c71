"""Every workload is hardened, probed and sized; every pod is covered by a NetworkPolicy."""

from __future__ import annotations

from typing import Any

import pytest
from helm_chart import MODULES, SERVICES, name_of, pod_specs, render, selects

RESTRICTED_CONTAINER = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "privileged": False,
}
DEV_POSTGRES = {
    "postgresql": {"enabled": True, "password": "dev-only"},
    "global": {"credentials": {"generate": True}},
    **{key: {"enabled": True} for key in MODULES},
}


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def _check_security(obj: dict[str, Any], spec: dict[str, Any]) -> None:
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True, name_of(obj)
    assert pod["seccompProfile"]["type"] == "RuntimeDefault", name_of(obj)
    assert spec["automountServiceAccountToken"] is False, name_of(obj)
    for container in _containers(spec):
        where = f"{name_of(obj)} container {container['name']}"
        sc = container["securityContext"]
        for key, value in RESTRICTED_CONTAINER.items():
            assert sc.get(key) is value, f"{where}: securityContext.{key} should be {value}"
        assert sc["capabilities"]["drop"] == ["ALL"], where
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
        resources = container["resources"]
        assert resources["requests"]["cpu"], where
        assert resources["requests"]["memory"], where
        assert resources["limits"]["memory"], where
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        tmp = "/tmp"
        assert tmp in mounts, f"{where}: /tmp must be a mounted emptyDir (read-only root FS)"


def _check_probes(obj: dict[str, Any], spec: dict[str, Any]) -> None:
    if obj["kind"] not in {"Deployment", "StatefulSet"}:
        return
    for container in spec["containers"]:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe in container, f"{name_of(obj)} container {container['name']}: no {probe}"


def test_every_container_is_restricted_sized_and_probed(rendered: list[dict[str, Any]]) -> None:
    workloads = list(pod_specs(rendered))
    assert workloads
    for obj, spec, _ in workloads:
        _check_security(obj, spec)
        _check_probes(obj, spec)


def test_dev_postgres_pods_are_restricted_too() -> None:
    for obj, spec, _ in pod_specs(render(DEV_POSTGRES)):
        _check_security(obj, spec)
        _check_probes(obj, spec)


def test_lodestar_probes_are_native_grpc(rendered: list[dict[str, Any]]) -> None:
    deployments = [o for o in rendered if o["kind"] == "Deployment"]
    assert deployments
    for dep in deployments:
        container = dep["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        probe_port = ports.get("health", ports["grpc"])
        assert container["startupProbe"]["grpc"] == {"port": probe_port, "service": "readiness"}
        assert container["readinessProbe"]["grpc"] == {"port": probe_port, "service": "readiness"}
        assert container["livenessProbe"]["grpc"] == {"port": probe_port, "service": "liveness"}


def _policies(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == "NetworkPolicy"]


@pytest.mark.parametrize("extra", [None, DEV_POSTGRES], ids=["scenario", "dev-postgres"])
def test_every_pod_is_selected_by_an_allow_list_policy(
    rendered: list[dict[str, Any]], extra: dict[str, Any] | None
) -> None:
    objects = rendered if extra is None else render(extra)
    policies = _policies(objects)
    deny = [p for p in policies if p["metadata"]["name"].endswith("-default-deny")]
    assert len(deny) == 1
    assert "ingress" not in deny[0]["spec"]
    assert "egress" not in deny[0]["spec"]
    allow = [p for p in policies if p not in deny]
    for obj, _, labels in pod_specs(objects):
        assert selects(deny[0]["spec"]["podSelector"], labels), f"{name_of(obj)} escapes deny-all"
        matching = [p for p in allow if selects(p["spec"]["podSelector"], labels)]
        assert matching, f"{name_of(obj)} is selected by no allow-list NetworkPolicy"


def _peers_components(rule: dict[str, Any], direction: str) -> set[str]:
    return {
        peer["podSelector"]["matchLabels"].get("app.kubernetes.io/component", "")
        for peer in rule.get(direction, [])
        if "podSelector" in peer and "namespaceSelector" not in peer
    }


def test_allow_list_follows_the_architecture() -> None:
    values = {key: {"enabled": True} for key in MODULES}
    policies = {p["metadata"]["name"]: p["spec"] for p in _policies(render(values))}
    modules = {SERVICES[key] for key in MODULES}
    assert "health-monitor" in modules

    core = policies["lodestar-core"]
    ingress_from = set().union(*(_peers_components(r, "from") for r in core["ingress"]))
    assert modules | {"helm-test"} <= ingress_from
    egress_to = set().union(*(_peers_components(r, "to") for r in core["egress"]))
    assert modules <= egress_to

    for module in modules - {"health-monitor"}:
        spec = policies[f"lodestar-{module}"]
        ingress_from = set().union(*(_peers_components(r, "from") for r in spec["ingress"]))
        assert ingress_from == {"core", "health-monitor", "helm-test"}, module
        egress_to = set().union(*(_peers_components(r, "to") for r in spec["egress"]))
        assert egress_to == {"core"}, f"{module} may only call core, not {egress_to}"

    monitor = policies["lodestar-health-monitor"]
    egress_to = set().union(*(_peers_components(r, "to") for r in monitor["egress"]))
    assert (modules - {"health-monitor"}) | {"core"} <= egress_to
    ports = [p["port"] for r in monitor["egress"] for p in r.get("ports", [])]
    assert 443 in ports, "providers egress missing"
    assert 11434 in ports, "providers egress missing"

    for name, spec in policies.items():
        if name.endswith("-default-deny") or name.endswith("-helm-test"):
            continue
        egress_ports = {p["port"] for r in spec["egress"] for p in r.get("ports", [])}
        assert {53, 5432} <= egress_ports, f"{name}: DNS and PostgreSQL egress"
        if not name.endswith("-migrate"):
            metrics = [r for r in spec["ingress"] if any(p["port"] == 9464 for p in r["ports"])]
            assert metrics, f"{name}: Prometheus may not scrape"


def test_clients_outside_the_release_reach_a_service_on_its_grpc_ports_only() -> None:
    gateway = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "litellm"}}}
    policies = {
        p["metadata"]["name"]: p["spec"]
        for p in _policies(render({"usageTracker": {"networkPolicy": {"clients": [gateway]}}}))
    }
    tracker = [r for r in policies["lodestar-usage-tracker"]["ingress"] if gateway in r["from"]]
    assert [[p["port"] for p in rule["ports"]] for rule in tracker] == [[50051]]
    assert not any(gateway in r.get("from", []) for r in policies["lodestar-core"]["ingress"])


def test_every_service_port_is_named(rendered: list[dict[str, Any]]) -> None:
    services = [o for o in rendered if o["kind"] == "Service"]
    assert services
    for svc in services:
        for port in svc["spec"]["ports"]:
            assert port.get("name"), f"{name_of(svc)} port {port['port']} has no name"
        by_name = {p["name"]: p for p in svc["spec"]["ports"]}
        if "grpc" in by_name:
            assert by_name["grpc"]["appProtocol"] == "grpc"
            assert by_name["metrics"]["port"] == 9464
        for container_obj, spec, _ in pod_specs(rendered):
            for container in spec["containers"]:
                for port in container.get("ports", []):
                    assert port.get("name"), f"{name_of(container_obj)}: unnamed container port"
