"""The SDK subscriber's ack flusher: one message per interval under load, no wake-ups when idle."""

from __future__ import annotations

import asyncio
from unittest import mock

import grpc

from lodestar.common.sdk import subscriber as module
from lodestar.common.sdk.subscriber import Subscriber, _PendingAcks
from lodestar.core.v1 import bus_pb2


async def test_an_idle_flusher_sleeps_until_there_is_an_ack() -> None:
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    sub = Subscriber(channel, subscription="s", handler=mock.AsyncMock(), ack_interval_seconds=0.01)
    acks = _PendingAcks()
    outbox: asyncio.Queue[bus_pb2.SubscribeRequest | None] = asyncio.Queue()
    real_sleep = asyncio.sleep
    with mock.patch.object(module.asyncio, "sleep", wraps=real_sleep) as sleeps:
        flusher = asyncio.create_task(sub._flush_acks(acks, outbox))
        await real_sleep(0.1)
        assert sleeps.call_count == 0, "woke up with nothing to ack"
        for sequence in (3, 4, 5):
            acks.add(sequence)
        message = await asyncio.wait_for(outbox.get(), 1)
        assert message is not None
        assert list(message.ack.sequences) == [3, 4, 5]  # one message for the interval
        await real_sleep(0.1)
        assert sleeps.call_count == 1
        assert outbox.empty()
    flusher.cancel()
    await asyncio.gather(flusher, return_exceptions=True)
    await channel.close()
