"""Routine traffic stays out of the INFO and WARNING logs: reconnects at the connection's age."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from lodestar.common.auth import Role
from lodestar.common.sdk import ReceivedEvent, Subscriber, connect


async def test_a_stream_closed_at_the_connection_age_reconnects_without_a_warning(
    core_settings, core_starter, tokens
) -> None:
    core = await core_starter(
        core_settings.model_copy(
            update={"max_connection_age_seconds": 1.0, "shutdown_grace_seconds": 0.5}
        )
    )

    async def handle(event: ReceivedEvent) -> None:
        return None

    with capture_logs() as logged:
        async with connect(core.target, tokens[Role.MODULE]) as channel:
            subscriber = Subscriber(channel, subscription="quiet-logs", handler=handle)
            running = asyncio.create_task(subscriber.run())
            await asyncio.sleep(4.0)  # several connection ages
            subscriber.stop()
            await asyncio.wait_for(running, 10)
    interrupted = [e for e in logged if e["event"] == "subscription interrupted; reconnecting"]
    assert interrupted, "the connection age never closed the stream"
    assert {e["log_level"] for e in interrupted} == {"info"}, interrupted
