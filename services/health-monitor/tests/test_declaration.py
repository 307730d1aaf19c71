"""health-monitor's declaration: found by `lodestar up`, versioned by its package, migrated."""

from __future__ import annotations

from importlib.metadata import entry_points, version

from lodestar.common.db import load_migrations
from lodestar_health.service import MIGRATIONS, SPEC, HealthMonitorModule
from lodestar_health.settings import HealthMonitorSettings


def test_the_entry_point_names_this_spec():
    found = {ep.name: ep for ep in entry_points(group="lodestar.services")}
    assert found["health-monitor"].load() is SPEC
    assert SPEC.name == HealthMonitorModule.name == "health-monitor"


def test_the_version_comes_from_the_package_metadata():
    assert SPEC.info.version == version("lodestar-health-monitor")


def test_its_migrations_are_read_from_the_declaration():
    assert SPEC.migrations == HealthMonitorModule.migrations == MIGRATIONS
    assert [m.name for m in load_migrations(MIGRATIONS)] == ["0001_init.sql", "0002_leases.sql"]


def test_its_defaults_give_it_a_schema_and_ports_of_its_own():
    settings = HealthMonitorSettings()
    assert settings.database.schema_name == "health_monitor"
    assert (settings.port, settings.migrate_on_start) == (50081, True)


def test_it_serves_no_rpcs_of_its_own_yet():
    module = SPEC.module_cls(HealthMonitorSettings())
    assert module.add_to_server(None) == []  # type: ignore[arg-type]
    assert module.method_roles() == {}
