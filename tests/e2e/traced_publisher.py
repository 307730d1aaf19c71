"""Publish one event inside a span, with telemetry from the standard OTEL_* variables.

Usage: python traced_publisher.py TARGET TOKEN   (prints the event id)
"""

from __future__ import annotations

import asyncio
import sys

from lodestar.common.sdk import Publisher, connect
from lodestar.common.telemetry import configure_telemetry
from lodestar.usage.v1 import events_pb2 as usage


async def main(target: str, token: str) -> str:
    async with (
        connect(target, token) as channel,
        Publisher(channel, source="test://traced") as publisher,
    ):
        receipt = await publisher.publish(usage.RequestCompleted(model="traced", provider="test"))
    return receipt.event_id


if __name__ == "__main__":
    telemetry = configure_telemetry("test-publisher")
    try:
        print(asyncio.run(main(sys.argv[1], sys.argv[2])))
    finally:
        telemetry.shutdown()
