"""Helpers for tests of Lodestar services: a Postgres to test against and dev credentials."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import asyncpg

from lodestar.common.auth import Role, new_token, write_credentials

DEFAULT_TEST_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def reachable(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def postgres_server(workdir: Path) -> Iterator[str]:
    """A DSN of a Postgres to test against.

    ``LODESTAR_TEST_DATABASE_URL`` wins; else the server on 127.0.0.1:5432; else an embedded
    Postgres started in ``workdir`` for the duration.
    """
    configured = os.environ.get("LODESTAR_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    if reachable("127.0.0.1", 5432):
        yield DEFAULT_TEST_DSN
        return
    from lodestar.common.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(workdir / "pg")
    try:
        with server:
            yield server.dsn("postgres")
    finally:
        server.discard()


@contextmanager
def scratch_database(admin_dsn: str) -> Iterator[str]:
    """A freshly created database, dropped afterwards; yields its DSN."""
    name = f"lodestar_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(admin_dsn, f"CREATE DATABASE {name}"))
    try:
        yield _with_database(admin_dsn, name)
    finally:
        asyncio.run(_admin(admin_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


async def _admin(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _with_database(dsn: str, database: str) -> str:
    base, _, query = dsn.partition("?")
    head, _, _old = base.rpartition("/")
    return f"{head}/{database}" + (f"?{query}" if query else "")


def dev_credentials(path: Path, modules: Sequence[str] = ()) -> dict[Role | str, str]:
    """Write a credentials file with one token per role and one per module name; returns them.

    The role tokens belong to ``test-admin``, ``test-module`` and ``test-publisher``; each name in
    ``modules`` is a module principal of its own, whose token is under its name.
    """
    tokens: dict[Role | str, str] = {role: new_token() for role in Role}
    principals = {f"test-{role.value}": (role, tokens[role]) for role in Role}
    for name in modules:
        tokens[name] = new_token()
        principals[name] = (Role.MODULE, tokens[name])
    write_credentials(path, principals)
    return tokens
