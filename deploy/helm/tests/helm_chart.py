"""Helpers for the chart tests: render the chart with Helm 3 or Helm 4 and parse the manifests.

The helm binaries come from scripts/chart_check.sh (installed into .tools/helm/); the paths can be
given with LODESTAR_HELM3 / LODESTAR_HELM4. Run: .venv/bin/pytest deploy/helm/tests
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "deploy" / "helm" / "lodestar"
SCENARIOS = sorted(CHART.glob("ci/*-values.yaml"))
RELEASE = "lodestar"
NAMESPACE = "lodestar"
# values key -> module name, from the chart's list of services (the one the templates read).
SERVICES: dict[str, str] = {
    key: meta["name"] for key, meta in yaml.safe_load((CHART / "services.yaml").read_text()).items()
}
MODULES = [key for key in SERVICES if key != "core"]
ALL_ON = {key: {"enabled": True} for key in SERVICES}


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def helm_binary(major: int) -> Path:
    env = os.environ.get(f"LODESTAR_HELM{major}")
    path = Path(env) if env else REPO / ".tools" / "helm" / f"v{major}" / "helm"
    if not path.is_file():
        subprocess.run(
            ["bash", str(REPO / "scripts" / "chart_check.sh"), "--install-only"], check=True
        )
    return path


@cache
def _run_helm(major: int, args: tuple[str, ...], values_json: str) -> Result:
    cmd = [str(helm_binary(major)), *args]
    if values_json != "null":
        cmd += ["--values", "-"]
    proc = subprocess.run(
        cmd,
        input=values_json if values_json != "null" else None,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def helm(args: list[str], values: dict[str, Any] | None = None, *, major: int = 4) -> Result:
    """Run helm with ``values`` (a dict, passed on stdin) after the given arguments."""
    return _run_helm(major, tuple(args), json.dumps(values) if values is not None else "null")


def template(
    values: dict[str, Any] | None = None,
    *,
    files: tuple[Path, ...] = (),
    major: int = 4,
    show_only: str | None = None,
) -> Result:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for f in files:
        args += ["--values", str(f)]
    if show_only:
        args += ["--show-only", show_only]
    return helm(args, values, major=major)


def render(
    values: dict[str, Any] | None = None, *, files: tuple[Path, ...] = (), major: int = 4
) -> list[dict[str, Any]]:
    """The rendered objects; fails the test with helm's message if rendering fails."""
    result = template(values, files=files, major=major)
    if result.returncode != 0:
        pytest.fail(f"helm template failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def pod_specs(
    objects: list[dict[str, Any]],
) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, str]]]:
    """(object, pod spec, pod labels) for every object that makes pods."""
    for obj in objects:
        kind = obj["kind"]
        if kind in {"Deployment", "StatefulSet", "Job", "DaemonSet"}:
            template_ = obj["spec"]["template"]
            yield obj, template_["spec"], template_["metadata"].get("labels", {})
        elif kind == "Pod":
            yield obj, obj["spec"], obj["metadata"].get("labels", {})


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a LabelSelector matches ``labels`` (an empty selector matches everything)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, vals = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and labels.get(key) in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def name_of(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"
