"""Versioned migrations: idempotent, checksummed, and applied once by replicas starting together."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from lodestar.common.db import analyze_if_stale, apply_migrations, create_pool
from lodestar.common.errors import ConfigurationError
from lodestar_core.service import MIGRATIONS


@pytest.fixture
async def conn(database_url: str):  # type: ignore[no-untyped-def]
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


def fresh_schema() -> str:
    return f"m_{uuid.uuid4().hex[:12]}"


async def applied(conn: asyncpg.Connection, schema: str) -> list[str]:
    rows = await conn.fetch(f"SELECT name FROM {schema}.schema_migrations ORDER BY version")
    return [r["name"] for r in rows]


async def test_apply_twice_is_idempotent(conn):
    schema = fresh_schema()
    names = sorted(p.name for p in MIGRATIONS.glob("*.sql"))
    assert await apply_migrations(conn, schema, MIGRATIONS) == names
    assert await apply_migrations(conn, schema, MIGRATIONS) == []
    assert await applied(conn, schema) == names
    tables = {
        r["tablename"]
        for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
    }
    assert {"modules", "events", "subscriptions", "dead_letters", "schema_migrations"} <= tables
    # nothing leaked into public
    assert await conn.fetchval("SELECT to_regclass('public.modules')") is None


async def test_changed_migration_is_refused(conn, tmp_path: Path):
    schema = fresh_schema()
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, folder)
    await apply_migrations(conn, schema, folder)
    first = folder / "0001_init.sql"
    first.write_text(first.read_text() + "\n-- an afterthought\n")
    with pytest.raises(ConfigurationError) as caught:
        await apply_migrations(conn, schema, folder)
    assert "0001_init.sql" in str(caught.value)
    assert "new migration" in str(caught.value)
    # the lock was released: another apply (of the original files) still works
    assert await apply_migrations(conn, schema, MIGRATIONS) == []


async def test_new_migration_is_applied_and_a_broken_one_rolls_back(conn, tmp_path: Path):
    schema = fresh_schema()
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, folder)
    await apply_migrations(conn, schema, folder)
    count = len(list(folder.glob("*.sql")))
    broken = folder / f"{count + 1:04d}_broken.sql"
    broken.write_text("CREATE TABLE extra (id int);\nSELECT no_such_function();\n")
    with pytest.raises(asyncpg.PostgresError):
        await apply_migrations(conn, schema, folder)
    assert await conn.fetchval(f"SELECT to_regclass('{schema}.extra')") is None
    broken.write_text("CREATE TABLE extra (id int);\n")
    assert await apply_migrations(conn, schema, folder) == [broken.name]
    assert await conn.fetchval(f"SELECT to_regclass('{schema}.extra')") is not None


async def test_unknown_applied_migration_is_refused(conn, tmp_path: Path):
    schema = fresh_schema()
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, folder)
    count = len(list(folder.glob("*.sql")))
    (folder / f"{count + 1:04d}_later.sql").write_text("CREATE TABLE later (id int);\n")
    await apply_migrations(conn, schema, folder)
    with pytest.raises(ConfigurationError) as caught:
        await apply_migrations(conn, schema, MIGRATIONS)
    assert f"{count + 1:04d}_later.sql" in str(caught.value)


async def test_bad_schema_name_is_refused(conn):
    with pytest.raises(ConfigurationError) as caught:
        await apply_migrations(conn, "bad; DROP TABLE x", MIGRATIONS)
    assert caught.value.field == "database.schema_name"


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read", "serializable"])
async def test_concurrent_applies_apply_once(database_url: str, isolation: str):
    """Also where the role's default isolation is stricter (snapshots taken before the lock)."""
    schema = fresh_schema()
    settings = {"default_transaction_isolation": isolation}
    conns = [await asyncpg.connect(database_url, server_settings=settings) for _ in range(3)]
    try:
        results = await asyncio.gather(*(apply_migrations(c, schema, MIGRATIONS) for c in conns))
        names = sorted(p.name for p in MIGRATIONS.glob("*.sql"))
        assert sorted(name for result in results for name in result) == names  # each once
        assert await applied(conns[0], schema) == names
        in_time_order = await conns[0].fetch(
            f"SELECT name FROM {schema}.schema_migrations ORDER BY applied_at, version"
        )
        assert [r["name"] for r in in_time_order] == names
        # every transaction released the advisory lock
        held = await conns[0].fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = ANY($1::int[])",
            [c.get_server_pid() for c in conns],
        )
        assert held == 0
    finally:
        for c in conns:
            await c.close()


async def test_a_table_grown_from_empty_gets_statistics_once(database_url: str) -> None:
    """Without autovacuum a table that grew from empty keeps an empty table's statistics."""
    schema = fresh_schema()
    pool = await create_pool(database_url, schema)
    try:
        await pool.execute(f"CREATE SCHEMA {schema}")
        await pool.execute("CREATE TABLE grown (id int PRIMARY KEY)")
        await pool.execute("INSERT INTO grown SELECT generate_series(1, 5000)")
        analyzed: list[str] = []
        for _ in range(50):  # the cumulative statistics reach other sessions within a second
            analyzed = await analyze_if_stale(pool, ["grown", "absent"], min_interval=timedelta())
            if analyzed:
                break
            await asyncio.sleep(0.1)
        assert analyzed == ["grown"]
        assert (
            await pool.fetchval("SELECT reltuples FROM pg_class WHERE oid = 'grown'::regclass")
            == 5000
        )
        assert await analyze_if_stale(pool, ["grown"], min_interval=timedelta()) == []
    finally:
        await pool.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await pool.close()
