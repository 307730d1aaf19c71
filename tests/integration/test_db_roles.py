"""A Postgres role per service: each owns its schema, and cannot read another service's."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from lodestar.common.db import apply_migrations
from lodestar.common.db_roles import provision_service_role, role_name
from lodestar_core.service import MIGRATIONS as CORE_MIGRATIONS
from lodestar_usage.service import MIGRATIONS as USAGE_MIGRATIONS


@pytest.fixture
async def services(database_url: str) -> AsyncIterator[dict[str, tuple[str, str]]]:
    """Two services with their own roles: name -> (schema, DSN)."""
    suffix = uuid.uuid4().hex[:8]
    names = {f"core-{suffix}": f"core_{suffix}", f"tracker-{suffix}": f"tracker_{suffix}"}
    provisioned = {
        name: (schema, await provision_service_role(database_url, name, schema))
        for name, schema in names.items()
    }
    try:
        yield provisioned
    finally:
        admin = await asyncpg.connect(database_url)
        try:
            for name, schema in names.items():
                await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
                await admin.execute(f"DROP OWNED BY {role_name(name)}")
                await admin.execute(f"DROP ROLE {role_name(name)}")
        finally:
            await admin.close()


async def test_each_role_migrates_its_own_schema_and_is_refused_the_other(services):
    (core, (core_schema, core_dsn)), (_, (tracker_schema, tracker_dsn)) = services.items()
    core_conn = await asyncpg.connect(core_dsn)
    tracker_conn = await asyncpg.connect(tracker_dsn)
    try:
        await apply_migrations(core_conn, core_schema, CORE_MIGRATIONS)
        await apply_migrations(tracker_conn, tracker_schema, USAGE_MIGRATIONS)
        assert await core_conn.fetchval("SELECT current_user") == role_name(core)
        assert await core_conn.fetchval(f"SELECT count(*) FROM {core_schema}.events") == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await core_conn.fetch(f"SELECT * FROM {tracker_schema}.ledger")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await tracker_conn.fetch(f"SELECT * FROM {core_schema}.events")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await tracker_conn.execute(f"CREATE TABLE {core_schema}.intruder (x int)")
        # a pooler that drops the client's search_path (PgBouncer) leaves the role's own
        assert await core_conn.fetchval("SHOW search_path") == f"{core_schema}, public"
    finally:
        await core_conn.close()
        await tracker_conn.close()


async def test_a_schema_created_by_the_admin_is_handed_over_to_the_service_role(database_url):
    name, schema = f"legacy-{uuid.uuid4().hex[:8]}", f"legacy_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    try:
        await apply_migrations(
            admin, schema, CORE_MIGRATIONS
        )  # as before: everything owned by the admin
        dsn = await provision_service_role(database_url, name, schema)
        conn = await asyncpg.connect(dsn)
        try:
            await apply_migrations(
                conn, schema, CORE_MIGRATIONS
            )  # nothing left to apply, and allowed
            await conn.execute(f"ALTER TABLE {schema}.events ADD COLUMN probe int")  # owner only
            assert await conn.fetchval(f"SELECT count(*) FROM {schema}.audit_log") == 0
        finally:
            await conn.close()
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.execute(f"DROP OWNED BY {role_name(name)}")
        await admin.execute(f"DROP ROLE {role_name(name)}")
        await admin.close()
