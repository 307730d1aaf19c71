"""Fixtures of the usage-tracker integration tests: a real tracker beside the real core."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from lodestar.common.auth import Role
from lodestar.common.sdk import connect
from lodestar.common.testing import start_in_process
from lodestar_usage.service import UsageModule
from lodestar_usage.testing import RunningTracker, start_tracker, tracker_settings


@pytest.fixture
def tracker_schema(schema: str) -> str:
    """The tracker's own schema beside core's."""
    return f"{schema}_usage"


@pytest.fixture
async def tracker(
    tmp_path: Path,
    database_url: str,
    tracker_schema: str,
    core: Any,
    tokens: dict[Role | str, str],
) -> AsyncIterator[RunningTracker]:
    """A usage-tracker serving in this test's event loop, subscribed to core as itself."""
    running = await start_tracker(
        tracker_settings(
            database_url=database_url,
            schema=tracker_schema,
            core_target=core.target,
            token=tokens["usage-tracker"],
            credentials=tmp_path / "credentials.yaml",
            spool=tmp_path / "spool",
        )
    )
    yield running
    await running.stop()


@pytest.fixture
async def admin(
    tracker: RunningTracker, tokens: dict[Role | str, str]
) -> AsyncIterator[grpc.aio.Channel]:
    """An admin's channel to the tracker."""
    async with connect(tracker.target, tokens[Role.ADMIN]) as channel:
        yield channel


@pytest.fixture
async def tracker_db(
    tracker: RunningTracker, database_url: str, tracker_schema: str
) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the tracker's schema, to plant rows and check what was stored."""
    conn = await asyncpg.connect(database_url, server_settings={"search_path": tracker_schema})
    try:
        yield conn
    finally:
        await conn.close()


StartTracker = Callable[..., Awaitable[RunningTracker]]


@pytest.fixture
async def start_trackers(
    tmp_path: Path,
    database_url: str,
    tracker_schema: str,
    core: Any,
    tokens: dict[Role | str, str],
) -> AsyncIterator[StartTracker]:
    """Starts trackers on one schema (replicas), with settings overrides; stops them after."""
    running: list[RunningTracker] = []

    async def start(**overrides: object) -> RunningTracker:
        settings = tracker_settings(
            database_url=database_url,
            schema=tracker_schema,
            core_target=core.target,
            token=tokens["usage-tracker"],
            credentials=tmp_path / "credentials.yaml",
            spool=tmp_path / f"spool-{len(running)}",
            **overrides,
        )
        # Core lets one consumer at a time hold the tracker's subscription: only the first
        # replica running ingests; the others serve admission (DEGRADED, yet ready).
        if any(not r.task.done() for r in running):
            tracker = await start_in_process(UsageModule(settings), settings)
        else:
            tracker = await start_tracker(settings)
        running.append(tracker)
        return tracker

    yield start
    for tracker in running:
        if not tracker.task.done():
            await tracker.stop()
