"""The chart's alerts and dashboard query only metrics and labels that the services export.

The queries are read from the chart's PrometheusRule template and Grafana dashboard; the exports
are scraped from the metrics endpoints of a `lodestar up` suite that has done one of everything
(a usage event stored, a budget defined, a subscription open).
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from prometheus_client.parser import text_string_to_metric_families

from lodestar.audit.v1 import audit_pb2
from lodestar.core.v1 import bus_pb2, registry_pb2
from lodestar.usage.v1 import usage_pb2
from tests.e2e.test_suite_up import lodestar, lodestar_up, wait_registered

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "lodestar"
RULES = CHART / "templates" / "prometheusrule.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
#: Labels Prometheus adds to every scraped series (ServiceMonitor target labels).
TARGET_LABELS = {"namespace", "job", "instance", "pod", "service", "container", "endpoint"}
METRIC = re.compile(r"\b(lodestar_[a-z0-9_]+)\b")
MATCHER = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def queries() -> list[str]:
    """Every PromQL expression of the alerts and the dashboard panels."""
    rules = [
        line.split("expr:", 1)[1] for line in RULES.read_text().splitlines() if "expr:" in line
    ]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return rules + [target["expr"] for panel in panels for target in panel.get("targets", [])]


def used(expr: str) -> dict[str, set[str]]:
    """The lodestar metrics ``expr`` reads, each with the labels the expression relies on."""
    labels = {name for group in GROUPING.findall(expr) for name in re.findall(r"[a-z_]+", group)}
    for selector in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(MATCHER.findall(selector))
    return {metric: labels - TARGET_LABELS for metric in METRIC.findall(expr)}


def test_queries_are_read() -> None:
    found = {metric for expr in queries() for metric in used(expr)}
    assert "lodestar_usage_budget_used_ratio" in found
    assert "lodestar_grpc_server_handling_seconds_bucket" in found
    assert used('sum by (model, kind) (rate(lodestar_usage_tokens_total{namespace="x"}[5m]))') == {
        "lodestar_usage_tokens_total": {"model", "kind"}
    }


def scrape(endpoints: dict[str, dict[str, str]]) -> dict[str, set[str]]:
    """Sample name -> the label names it carries, over every service's metrics endpoint."""
    exported: dict[str, set[str]] = {}
    for service in endpoints.values():
        with urllib.request.urlopen(f"http://{service['metrics']}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                exported.setdefault(sample.name, set()).update(sample.labels)
    return exported


def test_every_metric_and_label_the_chart_queries_is_exported(tmp_path: Path) -> None:
    with lodestar_up(tmp_path) as (_, _):
        state = tmp_path / "state"
        wait_registered(state, {"usage-tracker"})
        for args in (
            [
                "publish",
                "lodestar.usage.v1.RequestCompleted",
                '{"model": "m", "provider": "p", "tokens": {"input": 5, "output": 2}}',
            ],
            ["budgets", "create", "--name", "team a", "--scope", "global", "--limit-usd", "1"],
        ):
            done = lodestar(state, *args)
            assert done.returncode == 0, done.stdout + done.stderr
        endpoints = json.loads((state / "endpoints.json").read_text())
        wanted: dict[str, set[str]] = {}
        for expr in queries():
            for metric, labels in used(expr).items():
                wanted.setdefault(metric, set()).update(labels)
        deadline = time.monotonic() + 30  # ingest, the budget check and the lag gauge run on timers
        while not wanted.keys() <= (exported := scrape(endpoints)).keys():
            assert time.monotonic() < deadline, f"never exported: {wanted.keys() - exported.keys()}"
            time.sleep(0.5)
    missing = {
        metric: labels - exported[metric]
        for metric, labels in wanted.items()
        if labels - exported[metric]
    }
    assert not missing, f"labels the queries use but the services do not export: {missing}"


def streaming_methods() -> set[str]:
    """Every streaming method of Lodestar's services, and of the stock ones they serve."""
    modules = (audit_pb2, bus_pb2, registry_pb2, usage_pb2, health_pb2, reflection_pb2)
    return {
        method.name
        for module in modules
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
        if method.client_streaming or method.server_streaming
    }


def test_latency_panels_leave_out_every_streaming_method() -> None:
    """A stream's duration is its lifetime (minutes), which would swamp any latency quantile."""
    latency = [expr for expr in queries() if "handling_seconds" in expr]
    assert latency
    for expr in latency:
        excluded = re.search(r'grpc_method!~\\?"([^"\\]+)', expr)
        assert excluded, f"no grpc_method exclusion in {expr}"
        pattern = re.compile(excluded.group(1))
        assert {m for m in streaming_methods() if not pattern.fullmatch(m)} == set()
