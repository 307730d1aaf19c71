"""Fixtures shared by the cross-service tests: real Postgres, real servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from pydantic import SecretStr

from lodestar.common.auth import Role
from lodestar.common.config import DatabaseSettings
from lodestar.common.sdk import connect
from lodestar.common.testing import (
    RunningService,
    dev_credentials,
    postgres_server,
    scratch_database,
    start_in_process,
)
from lodestar_core.service import CoreModule
from lodestar_core.settings import CoreSettings


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A scratch database for the whole session (each test uses its own schema)."""
    with (
        postgres_server(tmp_path_factory.mktemp("pg")) as admin_dsn,
        scratch_database(admin_dsn) as dsn,
    ):
        yield dsn


@pytest.fixture
def schema() -> str:
    """A schema name of this test's own."""
    return f"t_{uuid.uuid4().hex[:12]}"


#: Module names the tests register or subscribe as: each is a module principal of its own.
TEST_MODULES = (
    *("usage-tracker", "tracker", "another", "first", "second", "sentinel", "phoenix"),
    *("fleeting", "short", "pausable", "gone"),
)


@pytest.fixture
def tokens(tmp_path: Path) -> dict[Role | str, str]:
    """One token per role and per test module, accepted by servers using ``credentials_file``."""
    return dev_credentials(tmp_path / "credentials.yaml", TEST_MODULES)


@pytest.fixture
async def module_as(
    core: RunningCore, tokens: dict[Role | str, str]
) -> AsyncIterator[Callable[[str], Awaitable[grpc.aio.Channel]]]:
    """Opens channels to core with the credential of the module principal of a given name."""
    async with contextlib.AsyncExitStack() as stack:

        async def open_channel(name: str) -> grpc.aio.Channel:
            return await stack.enter_async_context(connect(core.target, tokens[name]))

        yield open_channel


@pytest.fixture
def core_settings(
    tmp_path: Path, database_url: str, schema: str, tokens: dict[Role, str]
) -> CoreSettings:
    """Settings of a core on a free port with a schema of its own."""
    return CoreSettings(
        port=0,
        metrics_port=-1,
        credentials_file=tmp_path / "credentials.yaml",
        shutdown_grace_seconds=2.0,
        database=DatabaseSettings(url=SecretStr(database_url), schema_name=schema),
    )


#: A core serving in this test's event loop.
RunningCore = RunningService[CoreModule]


async def start_core(settings: CoreSettings) -> RunningCore:
    """Start core and wait until its readiness probe says SERVING."""
    return await start_in_process(CoreModule(settings), settings)


@pytest.fixture
async def core(core_settings: CoreSettings) -> AsyncIterator[RunningCore]:
    """A running core."""
    running = await start_core(core_settings)
    yield running
    await running.stop()


@pytest.fixture
async def publisher_channel(
    core: RunningCore, tokens: dict[Role, str]
) -> AsyncIterator[grpc.aio.Channel]:
    async with connect(core.target, tokens[Role.PUBLISHER]) as channel:
        yield channel


@pytest.fixture
async def module_channel(
    core: RunningCore, tokens: dict[Role, str]
) -> AsyncIterator[grpc.aio.Channel]:
    async with connect(core.target, tokens[Role.MODULE]) as channel:
        yield channel


@pytest.fixture
async def admin_channel(
    core: RunningCore, tokens: dict[Role, str]
) -> AsyncIterator[grpc.aio.Channel]:
    async with connect(core.target, tokens[Role.ADMIN]) as channel:
        yield channel


@pytest.fixture
async def db(
    core: RunningCore, database_url: str, schema: str
) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the running core's schema, to check what was stored."""
    conn = await asyncpg.connect(database_url, server_settings={"search_path": f"{schema},public"})
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def core_starter() -> AsyncIterator[Callable[[CoreSettings], Awaitable[RunningCore]]]:
    """Starts cores with settings of the test's choosing; stops them at the end."""
    running: list[RunningCore] = []

    async def start(settings: CoreSettings) -> RunningCore:
        core = await start_core(settings)
        running.append(core)
        return core

    yield start
    for core in reversed(running):
        if not core.task.done():
            await core.stop()
