"""Services behind a transaction-pooling PgBouncer, each logging in as its own role."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import pytest

from lodestar.common.db_roles import provision_service_role, role_name
from lodestar.common.testing import pgbouncer, pgbouncer_binary, through

#: PgBouncer 1.18 keeps no prepared statement from one transaction to the next.
POOLED_SETTINGS = {"database__statement_cache_size": 0}


@contextlib.asynccontextmanager
async def pooled_roles(database_url: str, schemas: dict[str, str]) -> AsyncIterator[dict[str, str]]:
    """service -> a DSN through PgBouncer as the service's own role owning its schema.

    Skips the test where PgBouncer is not installed, unless LODESTAR_REQUIRE_PGBOUNCER is set
    (CI sets it). Roles and schemas are dropped afterwards.
    """
    if pgbouncer_binary() is None:
        missing = "pgbouncer is not installed (Debian: apt-get install pgbouncer)"
        if os.environ.get("LODESTAR_REQUIRE_PGBOUNCER"):
            pytest.fail(missing)
        pytest.skip(missing)
    try:
        dsns = {
            service: await provision_service_role(database_url, service, schema)
            for service, schema in schemas.items()
        }
        parts = [urlsplit(dsn) for dsn in dsns.values()]
        logins = {part.username or "": part.password or "" for part in parts}
        with pgbouncer(database_url, logins) as port:
            yield {service: through(dsn, port) for service, dsn in dsns.items()}
    finally:
        await _drop(database_url, schemas)


async def _drop(database_url: str, schemas: dict[str, str]) -> None:
    admin = await asyncpg.connect(database_url)
    try:
        for service, schema in schemas.items():
            role = role_name(service)
            if await admin.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", role):
                await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
                await admin.execute(f"DROP OWNED BY {role}")
                await admin.execute(f"DROP ROLE {role}")
    finally:
        await admin.close()
