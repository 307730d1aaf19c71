"""A Postgres role per service that owns only its schema (least privilege).

``lodestar up`` provisions one on its embedded Postgres for every service; on a real cluster
the operator creates them (docs/deploy.md) and gives each service its own DSN. A service's
role owns its schema and everything in it, so it can migrate it; other services' roles get no
privilege on it, so one service cannot read another's tables even by mistake.
"""

from __future__ import annotations

import re
import secrets

import asyncpg

from lodestar.common.db import check_schema_name

#: The relation kinds a schema's owner must own to migrate them: tables (plain and
#: partitioned), sequences, views and materialized views; indexes follow their table.
OWNED_KINDS = {"r": "TABLE", "p": "TABLE", "S": "SEQUENCE", "v": "VIEW", "m": "MATERIALIZED VIEW"}


def role_name(service: str) -> str:
    """The role of ``service``: ``lodestar_<service>`` with dashes as underscores."""
    name = "lodestar_" + service.replace("-", "_")
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", name):
        raise ValueError(f"{service!r} does not make a valid role name")
    return name


async def provision_service_role(admin_dsn: str, service: str, schema: str) -> str:
    """A DSN that logs in as ``service``'s own role, created (or updated) to own ``schema``.

    The role becomes the owner of the schema and of everything already in it, with the schema
    first on its default search path; everyone else is shut out of it.
    """
    check_schema_name(schema)
    role, password = role_name(service), secrets.token_urlsafe(24)
    conn = await asyncpg.connect(admin_dsn)
    try:
        async with conn.transaction():
            exists = await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", role)
            verb = "ALTER" if exists else "CREATE"
            # the password is a literal: utility statements take no parameters
            await conn.execute(
                f"{verb} ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                f"PASSWORD '{password}'"
            )
            database = await conn.fetchval("SELECT current_database()")
            await conn.execute(f'GRANT CONNECT, TEMPORARY ON DATABASE "{database}" TO {role}')
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {role}")
            await conn.execute(f"ALTER SCHEMA {schema} OWNER TO {role}")
            await conn.execute(f"REVOKE ALL ON SCHEMA {schema} FROM PUBLIC")
            # What a pooler that drops the client's search_path leaves in force (PgBouncer).
            await conn.execute(f"ALTER ROLE {role} SET search_path = {schema}, public")
            await _hand_over_contents(conn, schema, role)
    finally:
        await conn.close()
    return _dsn_for(admin_dsn, role, password)


async def _hand_over_contents(conn: asyncpg.Connection, schema: str, role: str) -> None:
    """Make ``role`` the owner of what an earlier, shared-role setup created in ``schema``.

    Tables first: a sequence a table owns (serial, identity) follows it and cannot be moved alone.
    """
    for kinds in (["r", "p", "v", "m"], ["S"]):
        for relation in await _foreign_relations(conn, schema, role, kinds):
            kind = OWNED_KINDS[relation["relkind"]]
            await conn.execute(f'ALTER {kind} {schema}."{relation["relname"]}" OWNER TO {role}')
    functions = await conn.fetch(
        """SELECT p.oid::regprocedure::text AS signature FROM pg_proc p
           JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = $1 AND pg_get_userbyid(p.proowner) <> $2""",
        schema,
        role,
    )
    for function in functions:
        await conn.execute(f"ALTER FUNCTION {function['signature']} OWNER TO {role}")


async def _foreign_relations(
    conn: asyncpg.Connection, schema: str, role: str, kinds: list[str]
) -> list[asyncpg.Record]:
    """Relations of ``kinds`` in ``schema`` that ``role`` does not own."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT c.relname, c.relkind::text AS relkind FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = $1 AND c.relkind::text = ANY($2::text[])
             AND pg_get_userbyid(c.relowner) <> $3""",
        schema,
        kinds,
        role,
    )
    return rows


def _dsn_for(admin_dsn: str, role: str, password: str) -> str:
    """``admin_dsn`` with ``role`` and ``password`` as the credentials."""
    scheme, _, rest = admin_dsn.partition("://")
    _, _, host_part = rest.rpartition("@")
    return f"{scheme}://{role}:{password}@{host_part}"
