"""Routine traffic stays out of the INFO and WARNING logs: reconnects at the connection's age."""

from __future__ import annotations

import asyncio

import pytest

from lodestar.common.auth import Role
from lodestar.common.sdk import ReceivedEvent, Subscriber, connect


async def test_a_stream_closed_at_the_connection_age_reconnects_without_a_warning(
    core_settings,
    core_starter,
    tokens,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    core = await core_starter(
        core_settings.model_copy(
            update={"max_connection_age_seconds": 1.0, "shutdown_grace_seconds": 0.5}
        )
    )

    async def handle(event: ReceivedEvent) -> None:
        return None

    async with connect(core.target, tokens[Role.MODULE]) as channel:
        subscriber = Subscriber(channel, subscription="quiet-logs", handler=handle)
        running = asyncio.create_task(subscriber.run())
        await asyncio.sleep(4.0)  # several connection ages
        subscriber.stop()
        await asyncio.wait_for(running, 10)
    out, err = capfd.readouterr()
    # on the output, or in the log records when an earlier test's logging setup holds the streams
    logged = out + err + "\n".join(f"{r.levelname} {r.getMessage()}" for r in caplog.records)
    interrupted = [line for line in logged.splitlines() if "subscription interrupted" in line]
    assert interrupted, "the connection age never closed the stream"
    assert not [line for line in interrupted if "warning" in line.lower()], interrupted
