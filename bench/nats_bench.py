"""The same publish and consume workload through NATS JetStream, for a same-run ratio."""

from __future__ import annotations

import time
import uuid

import nats
from nats.js.api import StorageType, StreamConfig

from lodestar.common.testing import reachable

NATS_URL = "nats://127.0.0.1:4222"
PAYLOAD = b"x" * 200
IN_FLIGHT = 4000


async def jetstream_available() -> bool:
    """Whether a NATS server answers on 127.0.0.1:4222."""
    return reachable("127.0.0.1", 4222)


async def bench_jetstream(count: int) -> tuple[float, float]:
    """(acked publish msgs/s, pull consume msgs/s with an ack per message)."""
    client = await nats.connect(NATS_URL)
    js = client.jetstream(publish_async_max_pending=IN_FLIGHT)
    stream = f"BENCH{uuid.uuid4().hex[:8].upper()}"
    subject = f"bench.{stream.lower()}"
    await js.add_stream(StreamConfig(name=stream, subjects=[subject], storage=StorageType.FILE))
    try:
        started = time.perf_counter()
        for _ in range(count):
            await js.publish_async(subject, PAYLOAD, headers={"Nats-Msg-Id": uuid.uuid4().hex})
        await js.publish_async_completed()
        publish_rate = count / (time.perf_counter() - started)

        subscription = await js.pull_subscribe(subject, durable=f"{stream}-consumer")
        received = 0
        started = time.perf_counter()
        while received < count:
            messages = await subscription.fetch(256, timeout=5)
            for message in messages:
                await message.ack()
            received += len(messages)
        consume_rate = received / (time.perf_counter() - started)
    finally:
        await js.delete_stream(stream)
        await client.close()
    return publish_rate, consume_rate
