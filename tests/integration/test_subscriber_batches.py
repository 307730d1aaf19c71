"""Subscriber batch handlers against a real core: batching, refusals, retries, dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import grpc
import pytest

from lodestar.common.sdk import ReceivedEvent, Subscriber
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc
from lodestar.usage.v1 import events_pb2 as usage
from lodestar_core.bus import DELIVERIES_PER_MESSAGE

from .test_subscriptions import (  # noqa: F401 (core_settings: the same bus limits)
    MAX_ATTEMPTS,
    core_settings,
    eventually,
    publish,
    subscriptions,
    usage_event,
)

DEADLINE = 30.0


async def within_deadline(check) -> None:  # type: ignore[no-untyped-def]
    """``eventually`` with room for retries and dead-lettering on a loaded machine."""
    await eventually(check, DEADLINE)


async def caught_up(channel, name: str) -> None:  # type: ignore[no-untyped-def]
    """Wait until every event of the subscription is acked or dead-lettered."""

    async def no_lag() -> bool:
        listed = (await subscriptions(channel)).get(name)
        return listed is not None and listed.lag == 0

    await within_deadline(no_lag)


async def test_batches_arrive_in_order_each_once_and_are_all_acked(
    publisher_channel, module_channel, db
):
    total = 2 * DELIVERIES_PER_MESSAGE + 100  # more than two stream messages
    published = await publish(publisher_channel, [usage_event(i) for i in range(total)])
    batches: list[list[ReceivedEvent]] = []

    async def handle(batch: Sequence[ReceivedEvent]) -> Mapping[int, str]:
        batches.append(list(batch))
        return {}

    subscriber = Subscriber(module_channel, subscription="batched", batch_handler=handle)
    task = asyncio.create_task(subscriber.run())

    async def all_handled() -> bool:
        return sum(len(b) for b in batches) >= total

    await within_deadline(all_handled)
    await caught_up(module_channel, "batched")
    subscriber.stop()
    await task

    received = [r for b in batches for r in b]
    assert [r.event.id for r in received] == [e.id for e in published]
    sequences = [r.sequence for r in received]
    assert sequences == sorted(set(sequences))
    assert all(r.attempt == 1 for r in received)
    payloads = [r.payload for r in received if isinstance(r.payload, usage.RequestCompleted)]
    assert [p.tokens.input for p in payloads] == list(range(total))
    assert len(batches) >= -(-total // DELIVERIES_PER_MESSAGE)
    assert max(len(b) for b in batches) > 1
    assert all(0 < len(b) <= DELIVERIES_PER_MESSAGE for b in batches)
    assert subscriber.handled == total
    listed = (await subscriptions(module_channel))["batched"]
    assert listed.lag == 0
    assert listed.acked_sequence == sequences[-1]
    assert listed.dead_letters == 0
    assert await db.fetchval("SELECT count(*) FROM delivery_failures") == 0


async def test_refused_event_is_retried_then_dead_lettered_and_the_rest_acked(
    publisher_channel, module_channel, db
):
    total = 300
    events = await publish(publisher_channel, [usage_event(i) for i in range(total)])
    poison = events[100].id
    attempts: dict[str, list[int]] = {}
    batch_sizes: list[int] = []

    async def handle(batch: Sequence[ReceivedEvent]) -> Mapping[int, str]:
        batch_sizes.append(len(batch))
        for r in batch:
            attempts.setdefault(r.event.id, []).append(r.attempt)
        return {r.sequence: "cannot digest this one" for r in batch if r.event.id == poison}

    subscriber = Subscriber(module_channel, subscription="batch-poison", batch_handler=handle)
    task = asyncio.create_task(subscriber.run())

    async def dead_lettered() -> bool:
        listed = (await subscriptions(module_channel)).get("batch-poison")
        return listed is not None and listed.dead_letters == 1

    await within_deadline(dead_lettered)
    await caught_up(module_channel, "batch-poison")
    subscriber.stop()
    await task

    assert batch_sizes[0] > 1  # the poison was refused out of a batch, not handled alone
    assert attempts[poison] == list(range(1, MAX_ATTEMPTS + 1))
    assert set(attempts) == {e.id for e in events}
    others = {e.id: attempts[e.id] for e in events if e.id != poison}
    assert all(a == [1] for a in others.values()), {k: a for k, a in others.items() if a != [1]}
    assert subscriber.handled == total - 1

    bus = bus_pb2_grpc.EventBusServiceStub(module_channel)
    (letter,) = (
        await bus.ListDeadLetters(bus_pb2.ListDeadLettersRequest(subscription="batch-poison"))
    ).dead_letters
    assert letter.event.id == poison
    assert letter.attempts == MAX_ATTEMPTS
    assert "cannot digest this one" in letter.last_error
    assert await db.fetchval("SELECT count(*) FROM delivery_failures") == 0


async def test_raising_batch_handler_gets_the_whole_batch_again(
    publisher_channel, module_channel, db
):
    total = 300
    events = await publish(publisher_channel, [usage_event(i) for i in range(total)])
    attempts: dict[str, list[int]] = {}
    acked: list[str] = []
    first_batch: list[str] = []
    first_sequences: set[int] = set()

    async def handle(batch: Sequence[ReceivedEvent]) -> Mapping[int, str]:
        for r in batch:
            attempts.setdefault(r.event.id, []).append(r.attempt)
        if not first_batch:
            first_batch.extend(r.event.id for r in batch)
            first_sequences.update(r.sequence for r in batch)
            raise RuntimeError("database unavailable")
        acked.extend(r.event.id for r in batch)
        return {}

    subscriber = Subscriber(module_channel, subscription="batch-raises", batch_handler=handle)
    task = asyncio.create_task(subscriber.run())

    async def all_acked() -> bool:
        return len(acked) >= total

    await within_deadline(all_acked)
    await caught_up(module_channel, "batch-raises")
    subscriber.stop()
    await task

    assert len(first_batch) > 1
    assert first_batch == [e.id for e in events[: len(first_batch)]]
    refused = set(first_batch)
    assert all(attempts[i] == [1, 2] for i in first_batch)
    assert all(attempts[e.id] == [1] for e in events if e.id not in refused)
    assert sorted(acked) == sorted(e.id for e in events)  # each acked exactly once, none lost
    assert subscriber.handled == total
    listed = (await subscriptions(module_channel))["batch-raises"]
    assert (listed.lag, listed.dead_letters) == (0, 0)
    # The refused batch succeeded on its second attempt: core forgot its failures.
    assert await db.fetchval("SELECT count(*) FROM delivery_failures") == 0


async def test_refusals_not_keyed_by_sequence_refuse_the_batch_instead_of_acking_it(
    publisher_channel, module_channel
):
    events = await publish(publisher_channel, [usage_event(i) for i in range(5)])
    calls: list[list[str]] = []

    async def keyed_by_id(batch: Sequence[ReceivedEvent]) -> Mapping[int, str]:
        calls.append([r.event.id for r in batch])
        if len(calls) == 1:
            return {r.event.id: "refused" for r in batch}  # type: ignore[misc]
        return {}

    subscriber = Subscriber(module_channel, subscription="batch-keys", batch_handler=keyed_by_id)
    task = asyncio.create_task(subscriber.run())
    await within_deadline(lambda: _true(sum(len(c) for c in calls) >= 10))
    await caught_up(module_channel, "batch-keys")
    subscriber.stop()
    await task
    # The first call's "refusals" were a handler bug: the batch came back rather than being acked.
    assert calls[0] == [e.id for e in events]
    assert sorted(i for c in calls[1:] for i in c) == sorted(e.id for e in events)
    assert subscriber.handled == 5


async def test_a_refusal_that_is_not_text_is_still_a_refusal(publisher_channel, module_channel):
    await publish(publisher_channel, [usage_event(1)])
    attempts: list[int] = []

    async def handle(batch: Sequence[ReceivedEvent]) -> Mapping[int, str]:
        attempts.extend(r.attempt for r in batch)
        if len(attempts) == 1:
            return {batch[0].sequence: RuntimeError("not yet")}  # type: ignore[dict-item]
        return {}

    subscriber = Subscriber(module_channel, subscription="batch-text", batch_handler=handle)
    task = asyncio.create_task(subscriber.run())
    await within_deadline(lambda: _true(len(attempts) >= 2))
    await caught_up(module_channel, "batch-text")
    subscriber.stop()
    await task
    assert attempts == [1, 2]
    assert subscriber.handled == 1


async def _true(value: bool) -> bool:
    return value


async def _noop(event: ReceivedEvent) -> None:
    return None


async def _noop_batch(batch: Sequence[ReceivedEvent]) -> Mapping[int, str]:
    return {}


@pytest.mark.parametrize(
    "handlers",
    [
        pytest.param({"handler": _noop, "batch_handler": _noop_batch}, id="both"),
        pytest.param({}, id="neither"),
    ],
)
async def test_exactly_one_kind_of_handler(handlers):
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        with pytest.raises(ValueError, match="exactly one of handler and batch_handler"):
            Subscriber(channel, subscription="either", **handlers)
