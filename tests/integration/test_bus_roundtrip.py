"""Publish to a real core on Postgres and receive through a durable subscription."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from lodestar.common.events import new_event
from lodestar.common.sdk import Publisher, ReceivedEvent, Subscriber
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc
from lodestar.usage.v1 import events_pb2 as usage


def completed(model: str, n: int = 1) -> usage.RequestCompleted:
    return usage.RequestCompleted(
        model=model, provider="test", project="p", tokens=usage.TokenUsage(input=n)
    )


async def test_publish_then_subscribe_receives_in_order(publisher_channel, module_channel):
    async with Publisher(publisher_channel, source="test://roundtrip") as publisher:
        receipts = [await publisher.publish(completed("m", i)) for i in range(20)]
    assert all(not r.spooled for r in receipts)

    received: list[ReceivedEvent] = []
    done = asyncio.Event()

    async def handle(event: ReceivedEvent) -> None:
        received.append(event)
        if len(received) == 20:
            done.set()

    subscriber = Subscriber(module_channel, subscription="roundtrip", handler=handle)
    task = asyncio.create_task(subscriber.run())
    await asyncio.wait_for(done.wait(), 10)
    subscriber.stop()
    await task
    assert [r.event.id for r in received] == [r.event_id for r in receipts]
    assert [r.payload.tokens.input for r in received] == list(range(20))
    assert [r.sequence for r in received] == sorted(r.sequence for r in received)


async def test_retried_publish_is_stored_once(publisher_channel):
    stub = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    event = new_event(completed("m"), source="test://dup")
    first = await stub.Publish(bus_pb2.PublishRequest(events=[event]))
    again = await stub.Publish(bus_pb2.PublishRequest(events=[event, event]))
    assert (first.accepted, first.duplicates) == (1, 0)
    assert (again.accepted, again.duplicates) == (0, 2)


async def test_unknown_type_is_rejected_and_nothing_stored(publisher_channel, admin_channel):
    stub = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    good = new_event(completed("m"), source="test://bad")
    bad = new_event(completed("m"), source="test://bad")
    bad.type = "acme.v1.Nope"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Publish(bus_pb2.PublishRequest(events=[good, bad]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[1].type" in refused.value.details()
    assert "nothing was stored" in refused.value.details()
    again = await stub.Publish(bus_pb2.PublishRequest(events=[good]))
    assert again.accepted == 1


async def test_an_id_dated_back_to_the_retention_lands_in_a_partition_retention_drops(
    publisher_channel, db
):
    """Partitions reach back as far as publish accepts ids, so nothing lands in the default one."""
    now = datetime.now(UTC)
    old = now - timedelta(days=6)  # inside the default retention of 7 days
    millis = int(old.timestamp() * 1000)
    old_id = uuid.UUID(int=(millis << 80) | (0x7 << 76) | (0b10 << 62) | 12345)
    event = new_event(completed("m"), source="test://old", event_id=str(old_id), time=old)
    stub = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    assert (await stub.Publish(bus_pb2.PublishRequest(events=[event]))).accepted == 1
    partition = await db.fetchval("SELECT tableoid::regclass::text FROM events")
    assert partition == f"events_p{old:%Y%m%d}"
    assert await db.fetchval("SELECT count(*) FROM events_default") == 0


async def test_a_large_retried_batch_spanning_partitions_is_stored_once(publisher_channel, db):
    """Batches of COPY size find their stored ids in every partition the batch's ids reach."""
    old = datetime.now(UTC) - timedelta(days=6)
    millis = int(old.timestamp() * 1000)
    old_ids = [uuid.UUID(int=(millis << 80) | (0x7 << 76) | (0b10 << 62) | n) for n in range(40)]
    events = [
        new_event(completed("m"), source="test://big", event_id=str(i), time=old) for i in old_ids
    ] + [new_event(completed("m"), source="test://big") for _ in range(40)]
    stub = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    first = await stub.Publish(bus_pb2.PublishRequest(events=events))
    fresh = [new_event(completed("m"), source="test://big") for _ in range(10)]
    again = await stub.Publish(bus_pb2.PublishRequest(events=fresh + events[::-1]))
    assert (first.accepted, first.duplicates) == (80, 0)
    assert (again.accepted, again.duplicates) == (10, 80)
    partitions = await db.fetchval("SELECT count(DISTINCT tableoid) FROM events")
    assert (await db.fetchval("SELECT count(*) FROM events"), partitions) == (90, 2)
