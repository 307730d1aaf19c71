"""learning's declaration: found by `lodestar up`, versioned by its package, migrated."""

from __future__ import annotations

from importlib.metadata import entry_points, version

from lodestar.common.db import load_migrations
from lodestar_learning.service import MIGRATIONS, SPEC, LearningModule
from lodestar_learning.settings import LearningSettings


def test_the_entry_point_names_this_spec():
    found = {ep.name: ep for ep in entry_points(group="lodestar.services")}
    assert found["learning"].load() is SPEC
    assert SPEC.name == LearningModule.name == "learning"


def test_the_version_comes_from_the_package_metadata():
    assert SPEC.info.version == version("lodestar-learning")


def test_its_migrations_are_read_from_the_declaration():
    assert SPEC.migrations == LearningModule.migrations == MIGRATIONS
    assert [m.name for m in load_migrations(MIGRATIONS)] == ["0001_init.sql"]


def test_its_defaults_give_it_a_schema_and_ports_of_its_own():
    settings = LearningSettings()
    assert settings.database.schema_name == "learning"
    assert (settings.port, settings.migrate_on_start) == (50071, True)


def test_it_serves_no_rpcs_of_its_own_yet():
    module = SPEC.module_cls(LearningSettings())
    assert module.add_to_server(None) == []  # type: ignore[arg-type]
    assert module.method_roles() == {}
