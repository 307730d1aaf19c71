"""A consumer process for the replica tests: records ``<wall time> <sequence> <event id>`` lines.

Usage: python standby_consumer.py TARGET TOKEN SUBSCRIPTION OUT_FILE
It handles one event at a time and writes (fsync) before the ack goes out. Started while another
consumer holds the subscription, it stands by and takes over when that one's replica is gone.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from lodestar.common.sdk import ReceivedEvent, Subscriber, connect


async def main(target: str, token: str, subscription: str, out: Path) -> None:
    with out.open("a") as sink:

        async def record(received: ReceivedEvent) -> None:
            sink.write(f"{time.time():.6f} {received.sequence} {received.event.id}\n")
            sink.flush()
            os.fsync(sink.fileno())

        async with connect(target, token) as channel:
            await Subscriber(channel, subscription=subscription, handler=record).run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])))
