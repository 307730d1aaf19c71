"""The chart's list of services (services.yaml) and values.yaml match the services in the code:
every installed service (``lodestar.services`` entry point) is in the chart and the other way
round, with the console script, image and schema its package declares."""

from __future__ import annotations

import tomllib
from importlib.metadata import entry_points
from typing import Any

import pytest
import yaml
from helm_chart import CHART, REPO

CHART_SERVICES: dict[str, dict[str, str]] = yaml.safe_load((CHART / "services.yaml").read_text())
VALUES: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())


def service_projects() -> dict[str, dict[str, Any]]:
    """Each service's pyproject ``[project]`` table, by the module name of its entry point."""
    found = {}
    for path in sorted(REPO.glob("services/*/pyproject.toml")):
        project = tomllib.loads(path.read_text())["project"]
        for name in project.get("entry-points", {}).get("lodestar.services", {}):
            found[name] = project
    return found


PROJECTS = service_projects()


def test_every_service_in_the_code_is_in_the_chart_and_back() -> None:
    assert sorted(meta["name"] for meta in CHART_SERVICES.values()) == sorted(PROJECTS)
    installed = {ep.name for ep in entry_points(group="lodestar.services")}
    assert installed == set(PROJECTS), "run `make bootstrap` after adding a service"


@pytest.mark.parametrize("key", sorted(CHART_SERVICES))
def test_script_image_and_schema_are_the_ones_the_package_declares(key: str) -> None:
    meta = CHART_SERVICES[key]
    project = PROJECTS[meta["name"]]
    assert meta["script"] in project["scripts"], f"{project['name']} has no {meta['script']}"
    values = VALUES[key]
    assert values["image"]["repository"] == f"lodestar-{meta['name']}"
    spec = next(
        ep for ep in entry_points(group="lodestar.services") if ep.name == meta["name"]
    ).load()
    assert values["database"]["schemaName"] == spec.settings_cls.default_schema
    assert spec.info.distribution in ("", project["name"])
    assert project["name"] == f"lodestar-{meta['name']}"
