"""Values: the strict schema, module toggles, config rendering, TLS, the env contract."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_chart import (
    ALL_ON,
    CHART,
    MODULES,
    REPO,
    SERVICES,
    helm,
    name_of,
    pod_specs,
    render,
    template,
)

INVALID = [
    pytest.param({"cor": {"enabled": True}}, "cor", id="typo-top-level"),
    pytest.param({"core": {"replica": 2}}, "replica", id="typo-service-key"),
    pytest.param({"global": {"tls": {"enable": True}}}, "enable", id="typo-nested"),
    pytest.param({"core": {"replicas": "two"}}, "replicas", id="wrong-type-int"),
    pytest.param(
        {"usageTracker": {"config": {"ingest": {"batch_max_event": 5}}}},
        "batch_max_event",
        id="typo-in-service-config",
    ),
    pytest.param(
        {"core": {"config": {"rate_limits": {"roles": {"admin": {"bursts": 5}}}}}},
        "bursts",
        id="typo-deep-in-service-config",
    ),
    pytest.param(
        {"core": {"config": {"ingest": {"batch_max_events": 5}}}},
        "ingest",
        id="another-service-setting-in-core-config",
    ),
    pytest.param(
        {"serviceDefaults": {"config": {"bus": {"max_delivery_attempts": 3}}}},
        "bus",
        id="service-specific-setting-in-defaults",
    ),
    pytest.param({"global": {"tls": {"enabled": "yes"}}}, "enabled", id="wrong-type-bool"),
    pytest.param(
        {"core": {"probes": {"liveness": {"grpc": {"port": 1}}}}}, "grpc", id="probe-action"
    ),
    pytest.param(
        {"usageTracker": {"database": {"schemaName": "Usage-Tracker"}}},
        "schemaName",
        id="bad-schema-name",
    ),
    pytest.param({"global": {"image": {"pullPolicy": "Sometimes"}}}, "pullPolicy", id="bad-enum"),
    pytest.param({"core": {"env": [{"value": "x"}]}}, "name", id="env-without-name"),
    pytest.param({"serviceDefaults": {"replica": 2}}, "replica", id="typo-service-defaults"),
    pytest.param(
        {"serviceDefaults": {"image": {"repository": "x"}}},
        "repository",
        id="defaults-name-no-image",
    ),
    pytest.param(
        {"global": {"postgres": {"existingSecret": "Not_A_Name"}}},
        "existingSecret",
        id="bad-secret-name",
    ),
]
# Checks made by the templates (`fail`): `helm template` and `helm install` stop with the message;
# `helm lint` only logs `fail` calls, so it is not asserted for these.
INVALID_COMBINATIONS = [
    pytest.param(
        {"core": {"terminationGracePeriodSeconds": 10, "shutdownGraceSeconds": 20}},
        "terminationGracePeriodSeconds",
        id="grace-too-short",
    ),
    pytest.param(
        {"core": {"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}}},
        "exactly one",
        id="pdb-both",
    ),
    pytest.param(
        {"core": {"enabled": False}, "learning": {"enabled": True}},
        "coreEndpoint",
        id="module-without-core",
    ),
    pytest.param(
        {"core": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
        "minReplicas",
        id="hpa-min-over-max",
    ),
]


@pytest.mark.parametrize("major", [3, 4])
@pytest.mark.parametrize(("values", "mentions"), INVALID)
def test_invalid_values_are_rejected_with_a_message(
    values: dict[str, Any], mentions: str, major: int
) -> None:
    result = template(values, major=major)
    assert result.returncode != 0, f"helm {major} template accepted {values}"
    assert mentions in result.stderr, result.stderr
    lint = helm(["lint", "--strict", str(CHART)], values, major=major)
    assert lint.returncode != 0, f"helm {major} lint accepted {values}"


@pytest.mark.parametrize("major", [3, 4])
@pytest.mark.parametrize(("values", "mentions"), INVALID_COMBINATIONS)
def test_invalid_combinations_fail_rendering_with_a_message(
    values: dict[str, Any], mentions: str, major: int
) -> None:
    result = template(values, major=major)
    assert result.returncode != 0, f"helm {major} template accepted {values}"
    assert mentions in result.stderr, result.stderr


@pytest.mark.parametrize("major", [3, 4])
def test_a_service_config_the_service_accepts_renders(major: int) -> None:
    """What the service's loader takes, the schema takes: any case, quoted numbers, and a part of
    a setting whose rest comes from serviceDefaults."""
    admin_limit = {"rate_per_second": 10, "burst": 20}
    values = {
        "serviceDefaults": {
            "config": {"log_level": "debug", "rate_limits": {"roles": {"admin": admin_limit}}}
        },
        "core": {
            "config": {
                "port": "50051",
                "migrate_on_start": "false",
                "bus": {"max_delivery_attempts": 3},
                "rate_limits": {"roles": {"admin": {"burst": 50}}},
            }
        },
        "usageTracker": {"config": {"database": {"statement_cache_size": 0}}},
    }
    result = template(values, major=major)
    assert result.returncode == 0, result.stderr


def test_schema_file_is_generated() -> None:
    script = REPO / "deploy" / "helm" / "tools" / "gen_values_schema.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _component_objects(objects: list[dict[str, Any]], module: str) -> list[str]:
    found = []
    for obj in objects:
        component = obj["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")
        if component in (module, f"{module}-migrate") or obj["metadata"]["name"].startswith(
            f"lodestar-{module}"
        ):
            found.append(name_of(obj))
    return found


@pytest.mark.parametrize("key", MODULES)
def test_a_disabled_module_renders_nothing_and_core_is_unchanged(key: str) -> None:
    module = SERVICES[key]
    everything = {
        **ALL_ON,
        "monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    }
    with_module = render(everything)
    without = render({**everything, key: {"enabled": False}})
    assert _component_objects(with_module, module)
    assert _component_objects(without, module) == []
    text = yaml.safe_dump_all(without)
    assert f"lodestar-{module}" not in text, f"something still refers to {module}"
    assert f"component: {module}" not in text

    def core_deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
        return next(o for o in objects if name_of(o) == "Deployment/lodestar-core")

    assert core_deployment(with_module) == core_deployment(without)


def test_core_alone_renders_only_core_objects() -> None:
    objects = render({key: {"enabled": False} for key in MODULES})
    for obj in objects:
        component = obj["metadata"]["labels"].get("app.kubernetes.io/component")
        assert component in (None, "core", "core-migrate", "helm-test"), name_of(obj)


def test_per_service_objects_exist_for_every_enabled_service() -> None:
    values = {**ALL_ON}
    for key in SERVICES:
        values[key] = {"enabled": True, "autoscaling": {"enabled": True}}
    objects = {name_of(o) for o in render(values)}
    for module in SERVICES.values():
        for kind in (
            "Deployment",
            "Service",
            "ConfigMap",
            "ServiceAccount",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
        ):
            assert f"{kind}/lodestar-{module}" in objects
        assert f"Job/lodestar-{module}-migrate" in objects


def _core(objects: list[dict[str, Any]], kind: str, name: str = "lodestar-core") -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def test_module_config_lands_in_its_configmap_and_rolls_the_pods() -> None:
    plain = render()
    tuned = render(
        {
            "core": {"config": {"log_level": "DEBUG", "database": {"pool_max_size": 20}}},
            "global": {"config": {"keepalive_time_seconds": 20}},
        }
    )
    cm = _core(tuned, "ConfigMap")
    assert yaml.safe_load(cm["data"]["core.yaml"]) == {
        "log_level": "DEBUG",
        "database": {"pool_max_size": 20},
    }
    assert yaml.safe_load(cm["data"]["lodestar.yaml"]) == {"keepalive_time_seconds": 20}

    def checksum(objects: list[dict[str, Any]]) -> str:
        dep = _core(objects, "Deployment")
        return dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum(plain) != checksum(tuned)
    volume = _core(tuned, "Deployment")["spec"]["template"]["spec"]["volumes"][0]
    items = volume["projected"]["sources"][0]["configMap"]["items"]
    assert {"key": "core.yaml", "path": "modules/core.yaml"} in items


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_environment_follows_the_service_contract() -> None:
    objects = render({**ALL_ON, "global": {"otel": {"endpoint": "http://collector:4317"}}})
    schemas = {module: module.replace("-", "_") for module in SERVICES.values()}
    for module, schema in schemas.items():
        dep = _core(objects, "Deployment", f"lodestar-{module}")
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["serve"]
        env = _env(container)
        assert env["LODESTAR_HOST"] == "0.0.0.0"
        assert env["LODESTAR_METRICS_HOST"] == "0.0.0.0"
        assert env["LODESTAR_CONFIG_DIR"] == "/etc/lodestar"
        assert env["LODESTAR_DATABASE__SCHEMA_NAME"] == schema
        assert env["LODESTAR_DATABASE__URL"]["secretKeyRef"] == {
            "name": "lodestar-postgres",
            "key": "database-url",
        }
        assert env["LODESTAR_TOKEN"]["secretKeyRef"]["key"] == f"{module}-token"
        assert env["LODESTAR_CREDENTIALS_FILE"] == "/etc/lodestar/credentials/credentials.yaml"
        assert env["LODESTAR_SPOOL_DIR"] == "/tmp/spool"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4317"
        assert env["OTEL_SERVICE_NAME"] == f"lodestar-{module}"
        grace = float(env["LODESTAR_SHUTDOWN_GRACE_SECONDS"])
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace
        if module == "core":
            assert "LODESTAR_CORE_ENDPOINT" not in env
        else:
            assert env["LODESTAR_CORE_ENDPOINT"] == "lodestar-core:50051"
        sa = _core(objects, "ServiceAccount", f"lodestar-{module}")
        assert sa["automountServiceAccountToken"] is False


def test_tls_moves_probes_to_the_health_port() -> None:
    objects = render({"global": {"tls": {"enabled": True, "mutual": True}}})
    dep = _core(objects, "Deployment")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    env = _env(container)
    assert env["LODESTAR_TLS__ENABLED"] == "true"
    assert env["LODESTAR_HEALTH_PORT"] == "50052"
    assert env["LODESTAR_TLS__CERT_FILE"] == "/etc/lodestar/tls/tls.crt"
    assert env["LODESTAR_TLS__CLIENT_CA_FILE"] == "/etc/lodestar/tls/ca.crt"
    assert container["livenessProbe"]["grpc"]["port"] == 50052
    svc_ports = {p["name"]: p for p in _core(objects, "Service")["spec"]["ports"]}
    assert svc_ports["health"]["port"] == 50052
    assert svc_ports["health"]["appProtocol"] == "grpc"
    test_pod = next(o for o in objects if o["kind"] == "Pod")
    targets = [check.split("=")[0] for check in test_pod["spec"]["containers"][0]["args"][1:]]
    assert "lodestar-core:50052" in targets
    assert all(target.endswith(":50052") for target in targets)


def test_migrations_are_pre_install_and_pre_upgrade_hooks() -> None:
    objects = render(ALL_ON)
    jobs = [o for o in objects if o["kind"] == "Job"]
    assert len(jobs) == len(SERVICES)
    for job in jobs:
        annotations = job["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["migrate"]
        sa = job["spec"]["template"]["spec"]["serviceAccountName"]
        hooks = {
            name_of(o): o for o in objects if "helm.sh/hook" in o["metadata"].get("annotations", {})
        }
        assert f"ServiceAccount/{sa}" in hooks, (
            "the hook Job needs its ServiceAccount before install"
        )
        assert int(
            hooks[f"ServiceAccount/{sa}"]["metadata"]["annotations"]["helm.sh/hook-weight"]
        ) < int(annotations["helm.sh/hook-weight"])


def test_dev_postgres_runs_migrations_as_init_containers_and_generates_credentials() -> None:
    objects = render(
        {"postgresql": {"enabled": True}, "global": {"credentials": {"generate": True}}}
    )
    assert not [o for o in objects if o["kind"] == "Job"]
    dep = _core(objects, "Deployment")
    init = dep["spec"]["template"]["spec"]["initContainers"]
    assert [c["args"] for c in init] == [["migrate"]]
    assert _core(objects, "StatefulSet", "lodestar-postgresql")
    dsn = _core(objects, "Secret", "lodestar-postgres")["stringData"]["database-url"]
    assert dsn.startswith("postgresql://lodestar:")
    assert dsn.endswith("@lodestar-postgresql:5432/lodestar")
    creds = _core(objects, "Secret", "lodestar-credentials")["stringData"]
    principals = {p["name"]: p for p in yaml.safe_load(creds["credentials.yaml"])["principals"]}
    assert principals["admin"]["role"] == "admin"
    assert principals["usage-tracker"]["role"] == "module"
    assert principals["publisher"]["role"] == "publisher"
    for name, principal in principals.items():
        token = creds[f"{name}-token"]
        assert principal["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()


def test_helm_test_pod_checks_every_enabled_service() -> None:
    objects = render(ALL_ON)
    pod = next(o for o in objects if o["kind"] == "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    checks = pod["spec"]["containers"][0]["args"][1:]
    assert sorted(checks) == sorted(
        f"lodestar-{m}:50051=" + ("readiness" if m == "core" else "readiness,core")
        for m in SERVICES.values()
    )


def test_monitoring_objects() -> None:
    objects = render(
        {
            **ALL_ON,
            "monitoring": {
                "serviceMonitor": {"enabled": True},
                "prometheusRule": {"enabled": True},
                "grafanaDashboard": {"enabled": True},
            },
        }
    )
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == len(SERVICES)
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {
        "LodestarModuleDown",
        "LodestarSubscriptionLag",
        "LodestarBudgetCrossed",
    }
    dashboard = next(o for o in objects if o["metadata"]["name"] == "lodestar-dashboard")
    text = dashboard["data"]["lodestar.json"]
    for needle in (
        "lodestar_usage_cost_usd_total",
        "lodestar_usage_tokens_total",
        "0.99",
        "lodestar_grpc_server_handled_total",
        "lodestar_bus_subscription_lag",
    ):
        assert needle in text


@pytest.mark.parametrize("kube", ["1.29.0", "1.34.0"])
def test_optional_setups_pass_kubernetes_validate(tmp_path: Path, kube: str) -> None:
    values = {
        **ALL_ON,
        "postgresql": {"enabled": True},
        "global": {"credentials": {"generate": True}, "image": {"pullSecrets": ["regcred"]}},
        "monitoring": {"grafanaDashboard": {"enabled": True}},
    }
    result = template(values)
    assert result.returncode == 0, result.stderr
    manifest = tmp_path / "dev.yaml"
    manifest.write_text(result.stdout)
    proc = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "kubernetes-validate"),
            "--strict",
            "--quiet",
            "-k",
            kube,
            str(manifest),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_helm3_and_helm4_render_the_same(scenario: Path) -> None:
    three = template(files=(scenario,), major=3)
    four = template(files=(scenario,), major=4)
    assert three.returncode == four.returncode == 0, three.stderr + four.stderr

    # Helm 4 keeps a blank line at the end of some documents; nothing else may differ.
    def lines(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.strip()]

    assert lines(three.stdout) == lines(four.stdout)


def test_no_pod_uses_the_default_service_account() -> None:
    for obj, spec, _ in pod_specs(render(ALL_ON)):
        if obj["kind"] != "Pod":
            assert spec.get("serviceAccountName"), name_of(obj)


@pytest.mark.parametrize("major", [3, 4])
def test_service_defaults_apply_to_every_service_and_each_block_overrides(major: int) -> None:
    objects = render(
        {
            **ALL_ON,
            "serviceDefaults": {
                "resources": {"limits": {"memory": "1Gi"}},
                "podAnnotations": {"team": "platform"},
            },
            "core": {
                "replicas": 0,
                "migrations": {"enabled": False},
                "podAnnotations": {"tier": "core"},
                "podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": None},
            },
            "learning": {"enabled": True, "resources": {"limits": {"memory": "2Gi"}}},
            "usageTracker": {
                "autoscaling": {
                    "enabled": True,
                    "targetCPUUtilizationPercentage": None,
                    "targetMemoryUtilizationPercentage": 80,
                },
            },
        },
        major=major,
    )
    limits = {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]["containers"][0]["resources"]
        for o in objects
        if o["kind"] == "Deployment"
    }
    assert limits == {
        f"lodestar-{m}": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "2Gi" if m == "learning" else "1Gi"},
        }
        for m in SERVICES.values()
    }
    core = _core(objects, "Deployment")
    assert core["spec"]["replicas"] == 0  # a falsy override still replaces the default
    annotations = core["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["team"], annotations["tier"]) == ("platform", "core")  # maps merge
    pdb = _core(objects, "PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 1
    assert "maxUnavailable" not in pdb  # null removed the default
    jobs = {o["metadata"]["name"] for o in objects if o["kind"] == "Job"}
    assert "lodestar-core-migrate" not in jobs
    assert "lodestar-learning-migrate" in jobs
    hpa = _core(objects, "HorizontalPodAutoscaler", "lodestar-usage-tracker")
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["memory"]


def test_notes_name_every_image_to_build_and_the_skeletons() -> None:
    args = ["install", "lodestar", str(CHART), "--namespace", "lodestar", "--dry-run=client"]
    result = helm(args, {"learning": {"enabled": True}, "global": {"image": {"tag": "1.2.3"}}})
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    for image in ("lodestar-core:1.2.3", "lodestar-usage-tracker:1.2.3", "lodestar-learning:1.2.3"):
        assert f"  - {image}\n" in notes
    assert "lodestar-health-monitor" not in notes  # not enabled
    assert "lodestar-learning (a skeleton so far" in notes
    assert "make images" in notes
