"""Credentials bound to identities: nobody acts as another principal, except an admin.

Each test plays the attack from the trust-boundary issue against a real core and checks that it is
refused with PERMISSION_DENIED, that nothing changed in the database, and that an admin (or the
rightful principal) may do the same thing.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_status import rpc_status

from lodestar.common.auth import Role
from lodestar.common.errors import bad_request_violations
from lodestar.common.events import new_event
from lodestar.common.sdk import PermanentFailure, ReceivedEvent, Subscriber, connect
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc, registry_pb2, registry_pb2_grpc
from lodestar.events.v1 import event_pb2
from lodestar.usage.v1 import events_pb2 as usage

from .test_subscriptions import (  # noqa: F401 (core_settings: three attempts before dead letter)
    MAX_ATTEMPTS,
    core_settings,
    eventually,
    publish,
    raw,
    subscriptions,
    usage_event,
    wait_disconnected,
)

DENIED = grpc.StatusCode.PERMISSION_DENIED


def alert_event(source: str = "lodestar://usage-tracker") -> event_pb2.Event:
    return new_event(usage.BudgetThresholdCrossed(budget_name="b", threshold_pct=80), source=source)


async def refused(call: object, code: grpc.StatusCode = DENIED) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return caught.value


def register(name: str, version: str = "1") -> registry_pb2.RegisterRequest:
    return registry_pb2.RegisterRequest(name=name, version=version, endpoint="127.0.0.1:7000")


async def test_a_module_registers_and_heartbeats_only_as_itself(module_as, admin_channel, db):
    tracker = registry_pb2_grpc.RegistryServiceStub(await module_as("usage-tracker"))
    intruder = registry_pb2_grpc.RegistryServiceStub(await module_as("tracker"))
    await tracker.Register(register("usage-tracker", version="1.2.3"))
    before = await db.fetchrow("SELECT * FROM modules WHERE name = 'usage-tracker'")

    error = await refused(intruder.Register(register("usage-tracker", version="6.6.6")))
    assert "may act only as module 'tracker'" in (error.details() or "")
    down = registry_pb2.ModuleHealth(status=registry_pb2.HEALTH_STATUS_DOWN, last_error="fake")
    await refused(
        intruder.Heartbeat(registry_pb2.HeartbeatRequest(name="usage-tracker", health=down))
    )
    assert await db.fetchrow("SELECT * FROM modules WHERE name = 'usage-tracker'") == before

    admin = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    beat = await admin.Heartbeat(registry_pb2.HeartbeatRequest(name="usage-tracker", health=down))
    assert beat.module.health.last_error == "fake"


async def test_a_refusal_names_the_field_in_bad_request_details(module_as):
    intruder = registry_pb2_grpc.RegistryServiceStub(await module_as("tracker"))
    error = await refused(intruder.Register(register("usage-tracker")))
    status = rpc_status.from_call(error)
    assert status is not None
    assert [v.field for v in bad_request_violations(status)] == ["name"]


async def test_a_subscription_belongs_to_the_module_that_created_it(
    module_as, admin_channel, publisher_channel, db
):
    owner = await module_as("usage-tracker")
    first = raw(owner, "ledger")
    await first.opened()
    await first.close()
    await wait_disconnected(admin_channel, "ledger")

    hijack = raw(await module_as("tracker"), "ledger")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hijack.opened()
    assert caught.value.code() == DENIED
    assert "belongs to 'usage-tracker'" in (caught.value.details() or "")
    await hijack.close()
    assert await db.fetchval("SELECT owner FROM subscriptions WHERE name = 'ledger'") == (
        "usage-tracker"
    )

    # the owner and an admin may open it; the admin's open keeps the owner
    await publish(publisher_channel, [usage_event(1)])
    for channel in (owner, admin_channel):
        again = raw(channel, "ledger")
        await again.opened()
        assert (await again.next()).event.type == "lodestar.usage.v1.RequestCompleted"
        await again.close()
        await wait_disconnected(admin_channel, "ledger")
    assert await db.fetchval("SELECT owner FROM subscriptions WHERE name = 'ledger'") == (
        "usage-tracker"
    )


async def test_a_module_cannot_subscribe_claiming_another_module(module_as, admin_channel, db):
    registry = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    await registry.Register(register("usage-tracker"))
    claim = raw(await module_as("tracker"), "mine", module="usage-tracker")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await claim.opened()
    assert caught.value.code() == DENIED
    await claim.close()
    assert await db.fetchval("SELECT count(*) FROM subscriptions") == 0


async def test_only_the_owning_module_publishes_its_events(
    publisher_channel, module_as, admin_channel, db
):
    publisher = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    good = usage_event(1)
    error = await refused(publisher.Publish(bus_pb2.PublishRequest(events=[good, alert_event()])))
    assert "events[1].type" in (error.details() or "")
    assert "emitted by module 'usage-tracker' only" in (error.details() or "")
    status = rpc_status.from_call(error)
    assert status is not None
    assert [v.field for v in bad_request_violations(status)] == ["events[1].type"]

    # a producer event may not borrow a module's source either
    spoofed = new_event(usage.RequestCompleted(model="m"), source="lodestar://usage-tracker/x")
    error = await refused(publisher.Publish(bus_pb2.PublishRequest(events=[spoofed])))
    assert "events[0].source" in (error.details() or "")

    # a module publishes its own events, not producer events, nor another module's
    tracker = bus_pb2_grpc.EventBusServiceStub(await module_as("usage-tracker"))
    other = bus_pb2_grpc.EventBusServiceStub(await module_as("tracker"))
    await refused(other.Publish(bus_pb2.PublishRequest(events=[alert_event()])))
    await refused(tracker.Publish(bus_pb2.PublishRequest(events=[usage_event(2)])))
    assert await db.fetchval("SELECT count(*) FROM events") == 0

    reply = await tracker.Publish(bus_pb2.PublishRequest(events=[alert_event()]))
    assert reply.accepted == 1
    admin = bus_pb2_grpc.EventBusServiceStub(admin_channel)
    assert (await admin.Publish(bus_pb2.PublishRequest(events=[alert_event()]))).accepted == 1


async def test_publish_stream_refuses_a_batch_it_may_not_publish_alone(publisher_channel, db):
    stub = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    requests = [
        bus_pb2.PublishStreamRequest(batch_id=1, events=[usage_event(1)]),
        bus_pb2.PublishStreamRequest(batch_id=2, events=[usage_event(2), alert_event()]),
        bus_pb2.PublishStreamRequest(batch_id=3, events=[usage_event(3)]),
    ]
    replies = [reply async for reply in stub.PublishStream(iter(requests))]
    assert [(r.batch_id, r.accepted) for r in replies] == [(1, 1), (2, 0), (3, 1)]
    assert [r.index for r in replies[1].rejections] == [1]
    assert await db.fetchval("SELECT count(*) FROM events") == 2


async def test_core_stamps_the_publishing_principal_on_every_event(
    publisher_channel, module_as, core, db
):
    forged = usage_event(1)
    forged.authid, forged.authtype = "usage-tracker", "service_account"
    await publish(publisher_channel, [forged])
    tracker = await module_as("usage-tracker")
    await publish(tracker, [alert_event()])
    stored = [
        event_pb2.Event.FromString(row["envelope"])
        for row in await db.fetch("SELECT envelope FROM events ORDER BY seq")
    ]
    assert [(e.authid, e.authtype) for e in stored] == [
        ("test-publisher", "api_key"),
        ("usage-tracker", "service_account"),
    ]

    seen: list[tuple[str, str]] = []

    async def handler(received: ReceivedEvent) -> None:
        seen.append((received.event.type, received.principal))

    subscriber = Subscriber(tracker, subscription="stamped", handler=handler)
    task = asyncio.create_task(subscriber.run())

    async def both_seen() -> bool:
        return len(seen) == 2

    await eventually(both_seen)
    subscriber.stop()
    await task
    assert seen == [
        ("lodestar.usage.v1.RequestCompleted", "test-publisher"),
        ("lodestar.usage.v1.BudgetThresholdCrossed", "usage-tracker"),
    ]


async def test_a_permanent_failure_is_dead_lettered_at_once(publisher_channel, module_channel):
    await publish(publisher_channel, [usage_event(1), usage_event(2)])
    attempts: list[int] = []

    async def handler(received: ReceivedEvent) -> None:
        attempts.append(received.attempt)
        if received.payload.tokens.input == 1:  # type: ignore[attr-defined]
            raise PermanentFailure("this consumer can never handle it")

    subscriber = Subscriber(module_channel, subscription="picky", handler=handler)
    task = asyncio.create_task(subscriber.run())

    async def settled() -> bool:
        listed = (await subscriptions(module_channel)).get("picky")
        return listed is not None and listed.lag == 0 and listed.dead_letters == 1

    await eventually(settled)
    subscriber.stop()
    await task
    assert attempts == [1, 1], f"retried a permanent failure (max attempts {MAX_ATTEMPTS})"
    dead = await bus_pb2_grpc.EventBusServiceStub(module_channel).ListDeadLetters(
        bus_pb2.ListDeadLettersRequest(subscription="picky")
    )
    assert [(d.attempts, d.last_error) for d in dead.dead_letters] == [
        (1, "PermanentFailure: this consumer can never handle it")
    ]


@pytest.mark.parametrize(
    "source",
    ["LODESTAR://usage-tracker", "lodestar:usage-tracker", "Lodestar://usage-tracker/x"],
)
async def test_look_alike_module_sources_are_refused(publisher_channel, db, source):
    stub = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    event = new_event(usage.RequestCompleted(model="m"), source=source)
    error = await refused(stub.Publish(bus_pb2.PublishRequest(events=[event])))
    assert "events[0].source" in (error.details() or "")
    assert await db.fetchval("SELECT count(*) FROM events") == 0


async def test_a_source_with_spaces_is_not_a_uri(publisher_channel, db):
    stub = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    event = new_event(usage.RequestCompleted(model="m"), source=" lodestar://usage-tracker")
    error = await refused(
        stub.Publish(bus_pb2.PublishRequest(events=[event])), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "events[0].source" in (error.details() or "")
    assert await db.fetchval("SELECT count(*) FROM events") == 0


async def test_repeated_event_types_cannot_bloat_a_module_or_subscription(module_as, db):
    """A registration naming one type 100,000 times once broke ListModules for everyone."""
    channel = await module_as("usage-tracker")
    registry = registry_pb2_grpc.RegistryServiceStub(channel)
    bloated = register("usage-tracker")
    bloated.event_types.extend(["lodestar.learning.v1.ResponseCollected"] * 100_000)
    error = await refused(registry.Register(bloated), grpc.StatusCode.INVALID_ARGUMENT)
    assert (error.details() or "").startswith("event_types: each event type may be named once")
    assert await db.fetchval("SELECT count(*) FROM modules") == 0

    sub = raw(channel, "bloat", event_types=["lodestar.usage.v1.RequestCompleted"] * 2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sub.opened()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await sub.close()
    assert await db.fetchval("SELECT count(*) FROM subscriptions") == 0


@pytest.mark.parametrize("name", ["tracker\n", "a\x00", "x" * 70_000])
async def test_a_name_no_module_can_have_is_refused_before_any_lookup(admin_channel, name):
    registry = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    for call in (
        registry.GetModule(registry_pb2.GetModuleRequest(name=name)),
        registry.SetModuleEnabled(registry_pb2.SetModuleEnabledRequest(name=name)),
        registry.Deregister(registry_pb2.DeregisterRequest(name=name)),
        registry.Register(register(name)),
    ):
        error = await refused(call, grpc.StatusCode.INVALID_ARGUMENT)
        status = rpc_status.from_call(error)
        assert status is not None
        assert [v.field for v in bad_request_violations(status)] == ["name"]


async def test_dead_letters_are_read_by_their_subscription_owner_only(
    module_as, admin_channel, publisher_channel
):
    owner = await module_as("usage-tracker")
    await publish(publisher_channel, [usage_event(1)])
    sub = raw(owner, "ledger")
    await sub.opened()
    delivery = await sub.next()
    sub.permanent_nack(delivery.sequence, "never")
    listed = bus_pb2_grpc.EventBusServiceStub(owner)

    async def dead_lettered() -> bool:
        reply = await listed.ListDeadLetters(bus_pb2.ListDeadLettersRequest(subscription="ledger"))
        return len(reply.dead_letters) == 1

    await eventually(dead_lettered)

    # while the owner is connected, another module learns nothing about it, not even its address
    other = bus_pb2_grpc.EventBusServiceStub(await module_as("tracker"))
    intruder = raw(await module_as("tracker"), "ledger")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await intruder.opened()
    assert caught.value.code() == DENIED
    assert "127.0.0.1" not in (caught.value.details() or "")
    await intruder.close()
    await sub.close()

    await refused(other.ListDeadLetters(bus_pb2.ListDeadLettersRequest(subscription="ledger")))
    everything = await other.ListDeadLetters(bus_pb2.ListDeadLettersRequest())
    assert list(everything.dead_letters) == []
    await refused(
        other.ListDeadLetters(bus_pb2.ListDeadLettersRequest(subscription="nope")),
        grpc.StatusCode.NOT_FOUND,
    )
    admin = bus_pb2_grpc.EventBusServiceStub(admin_channel)
    assert len((await admin.ListDeadLetters(bus_pb2.ListDeadLettersRequest())).dead_letters) == 1


async def test_a_principal_owns_a_bounded_number_of_subscriptions(
    core_starter,
    core_settings,  # noqa: F811 - the fixture imported above
    tokens,
    db,
):
    bus = core_settings.bus.model_copy(update={"max_subscriptions_per_owner": 3})
    core = await core_starter(core_settings.model_copy(update={"bus": bus}))
    async with connect(core.target, tokens[Role.MODULE]) as module:
        for n in range(3):
            sub = raw(module, f"mine-{n}")
            await sub.opened()
            await sub.close()
        again = raw(module, "mine-0")  # reopening one of its own is fine
        await again.opened()
        await again.close()
        extra = raw(module, "one-too-many")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await extra.opened()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "bus.max_subscriptions_per_owner" in (caught.value.details() or "")
        await extra.close()
    assert await db.fetchval("SELECT count(*) FROM subscriptions") == 3
