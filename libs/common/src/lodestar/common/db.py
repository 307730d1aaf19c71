"""Postgres access shared by every service: a pool per service schema and versioned migrations.

Migrations are files named ``NNNN_description.sql`` in a service's migrations folder. They are
applied in order, each in its own transaction under a transaction-scoped advisory lock, so that
replicas starting together apply them once, also through a transaction-pooling PgBouncer. The
checksum of every applied file is recorded; a file changed after it was applied stops start-up
rather than leaving the schema in an unknown state.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg

from lodestar.common.config import DatabaseSettings
from lodestar.common.errors import ConfigurationError, StorageError
from lodestar.common.logging import get_logger

MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

log = get_logger(__name__)


@dataclass(frozen=True)
class Migration:
    """One versioned SQL migration file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(folder: Path) -> list[Migration]:
    """The migrations in ``folder``, ordered by version; a malformed name or a gap is an error."""
    migrations = []
    for path in sorted(folder.glob("*.sql")):
        match = MIGRATION_NAME.match(path.name)
        if not match:
            raise ConfigurationError(
                f"migration file {path.name!r} must be named NNNN_description.sql"
            )
        migrations.append(Migration(int(match.group(1)), path.name, path.read_text()))
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise ConfigurationError(
                f"migration {migration.name} should have version {expected:04d}; "
                "versions must start at 0001 and have no gaps"
            )
    return migrations


def check_schema_name(schema: str) -> str:
    """``schema`` if it is a safe unquoted identifier, else a ConfigurationError."""
    if not SCHEMA_NAME.match(schema):
        raise ConfigurationError(
            f"schema name {schema!r} must match {SCHEMA_NAME.pattern}", field="database.schema_name"
        )
    return schema


async def apply_migrations(conn: asyncpg.Connection, schema: str, folder: Path) -> list[str]:
    """Apply the pending migrations of ``folder`` to ``schema``; returns the names applied."""
    check_schema_name(schema)
    migrations = load_migrations(folder)
    lock_key = f"lodestar:migrate:{schema}"
    # Read committed, whatever the role's default: what was read before the lock was granted
    # must not hide what the transaction that held it committed.
    async with conn.transaction(isolation="read_committed"):
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", lock_key)
        # A service's own role may own its schema without the right to create schemas.
        if not await conn.fetchval("SELECT true FROM pg_namespace WHERE nspname = $1", schema):
            await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                    version integer PRIMARY KEY,
                    name text NOT NULL,
                    checksum text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        _verify_applied(migrations, await _applied(conn, schema))
    done = []
    for migration in migrations:
        async with conn.transaction(isolation="read_committed"):
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", lock_key)
            if migration.version in await _applied(conn, schema):
                continue
            await conn.execute(f"SET LOCAL search_path TO {schema}, public")
            await conn.execute(migration.sql)
            await conn.execute(
                f"INSERT INTO {schema}.schema_migrations (version, name, checksum) "  # noqa: S608
                "VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
        log.info("migration applied", schema=schema, migration=migration.name)
        done.append(migration.name)
    return done


async def _applied(conn: asyncpg.Connection, schema: str) -> dict[int, asyncpg.Record]:
    """The migrations recorded in ``schema``, by version."""
    rows = await conn.fetch(
        f"SELECT version, name, checksum FROM {schema}.schema_migrations"  # noqa: S608 - checked identifier
    )
    return {row["version"]: row for row in rows}


def _verify_applied(migrations: list[Migration], applied: dict[int, asyncpg.Record]) -> None:
    known = {m.version: m for m in migrations}
    for version, row in applied.items():
        migration = known.get(version)
        if migration is None:
            raise ConfigurationError(
                f"the database has migration {row['name']} that this build does not know; "
                "run a build at least as new as the one that applied it"
            )
        if migration.checksum != row["checksum"]:
            raise ConfigurationError(
                f"migration {migration.name} changed after it was applied "
                f"(recorded checksum {row['checksum'][:12]}, file {migration.checksum[:12]}); "
                "restore the original file and put the change in a new migration"
            )


async def create_pool(
    dsn: str,
    schema: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    timeout: float = 5.0,
    statement_cache_size: int = 100,
) -> asyncpg.Pool:
    """A pool whose connections use ``schema`` first on their search path."""
    check_schema_name(schema)
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            command_timeout=60,
            statement_cache_size=statement_cache_size,
            server_settings={"search_path": f"{schema},public", "application_name": schema},
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise StorageError(f"cannot connect to Postgres: {exc}") from exc
    assert pool is not None
    return pool


async def open_service_database(
    database: DatabaseSettings, migrations: Path | None = None
) -> asyncpg.Pool:
    """A pool on the service's own schema, with ``migrations`` applied first when given."""
    if database.url is None:
        raise ConfigurationError(
            "no database configured; set LODESTAR_DATABASE__URL or database.url",
            field="database.url",
        )
    pool = await create_pool(
        database.url.get_secret_value(),
        database.schema_name,
        min_size=database.pool_min_size,
        max_size=database.pool_max_size,
        timeout=database.connect_timeout_seconds,
        statement_cache_size=database.statement_cache_size,
    )
    if migrations is not None:
        try:
            async with pool.acquire() as conn:
                await apply_migrations(conn, database.schema_name, migrations)
        except BaseException:
            await pool.close()
            raise
    return pool


#: Tables of the current schema whose statistics lag far behind their rows.
STALE_STATISTICS = (
    "SELECT relname FROM pg_stat_user_tables WHERE schemaname = current_schema() "
    "AND relname = ANY($1::text[]) AND n_mod_since_analyze > greatest($2, n_live_tup / 10) "
    "AND coalesce(greatest(last_analyze, last_autoanalyze), 'epoch') < now() - $3::interval"
)


async def analyze_if_stale(
    pool: asyncpg.Pool,
    tables: Sequence[str],
    *,
    min_changes: int = 1000,
    min_interval: timedelta = timedelta(seconds=30),
) -> list[str]:
    """ANALYZE those of ``tables`` (this schema's) changed by a tenth since their last analyze.

    Autovacuum does this where it runs; where it is off or lags, a table that grew from empty
    keeps the statistics of an empty table, and the planner then scans what it should look up.
    Returns the tables analyzed.
    """
    stale = [
        r["relname"]
        for r in await pool.fetch(STALE_STATISTICS, list(tables), min_changes, min_interval)
    ]
    for table in stale:
        check_schema_name(table)  # a plain identifier: safe to put in the statement
        await pool.execute(f"ANALYZE {table}")
    return stale
