"""A subscriber process for fault tests: records each handled event id, one per line.

Usage: python consumer.py TARGET TOKEN SUBSCRIPTION OUT_FILE
Writes the id (fsync) before the ack goes out, so a kill can only cause a re-delivery.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from lodestar.common.sdk import ReceivedEvent, Subscriber, connect
from lodestar.common.telemetry import configure_telemetry


async def main(target: str, token: str, subscription: str, out: Path) -> None:
    with out.open("a") as sink:

        async def record(received: ReceivedEvent) -> None:
            sink.write(f"{received.event.id}\n")
            sink.flush()
            os.fsync(sink.fileno())

        async with connect(target, token) as channel:
            await Subscriber(
                channel, subscription=subscription, handler=record, concurrency=4
            ).run()


if __name__ == "__main__":
    telemetry = configure_telemetry("test-consumer")  # off unless OTEL_* variables are set
    try:
        asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])))
    finally:
        telemetry.shutdown()
