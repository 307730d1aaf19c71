"""Bad input at the edge: every refusal names the field, stores nothing, and the server goes on."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import grpc
import pytest

from lodestar.common.events import new_event
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc, registry_pb2, registry_pb2_grpc
from lodestar.events.v1 import event_pb2
from lodestar.usage.v1 import events_pb2 as usage

MAX_EVENT_BYTES = 2048
MAX_BATCH = 5
MAX_IN_FLIGHT = 50
USAGE = "lodestar.usage.v1.RequestCompleted"


@pytest.fixture
def core_settings(core_settings):  # type: ignore[no-untyped-def]
    return core_settings.model_copy(
        update={
            "bus": core_settings.bus.model_copy(
                update={
                    "max_event_bytes": MAX_EVENT_BYTES,
                    "max_batch_events": MAX_BATCH,
                    "max_in_flight": MAX_IN_FLIGHT,
                    "default_in_flight": 10,
                }
            ),
            "max_message_bytes": 64 * 1024,
        }
    )


def good(model: str = "m") -> event_pb2.Event:
    payload = usage.RequestCompleted(model=model, provider="t", tokens=usage.TokenUsage(input=1))
    return new_event(payload, source="test://bad-input")


def _no_id(e: event_pb2.Event) -> None:
    e.id = ""


def _not_uuid(e: event_pb2.Event) -> None:
    e.id = "not-a-uuid"


def _uuid4(e: event_pb2.Event) -> None:
    e.id = str(uuid.uuid4())


def _braced(e: event_pb2.Event) -> None:
    e.id = "{" + e.id + "}"


def _no_source(e: event_pb2.Event) -> None:
    e.source = ""


def _unknown_type(e: event_pb2.Event) -> None:
    e.type = "acme.v1.Nope"


def _no_type(e: event_pb2.Event) -> None:
    e.type = ""


def _type_url_mismatch(e: event_pb2.Event) -> None:
    e.data.type_url = "type.googleapis.com/lodestar.learning.v1.OutcomeRecorded"


def _no_data(e: event_pb2.Event) -> None:
    e.ClearField("data")


def _garbage_data(e: event_pb2.Event) -> None:
    e.data.value = b"\x0a\xff\xff\xff\x0f"  # a length-delimited field far longer than the bytes


def _oversized(e: event_pb2.Event) -> None:
    e.subject = "x" * 500
    payload = usage.RequestCompleted(model="m" * (MAX_EVENT_BYTES * 2), provider="t")
    e.data.Pack(payload)


def _bad_traceparent(e: event_pb2.Event) -> None:
    e.traceparent = "00-nothex-01"


def _zero_trace_id(e: event_pb2.Event) -> None:
    e.traceparent = "00-" + "0" * 32 + "-" + "1" * 16 + "-01"


def _long_subject(e: event_pb2.Event) -> None:
    e.subject = "s" * 513


BAD_EVENTS: list[tuple[Callable[[event_pb2.Event], None], str]] = [
    (_no_id, "id"),
    (_not_uuid, "id"),
    (_uuid4, "id"),
    (_braced, "id"),
    (_no_source, "source"),
    (_unknown_type, "type"),
    (_no_type, "type"),
    (_type_url_mismatch, "data"),
    (_no_data, "data"),
    (_garbage_data, "data"),
    (_oversized, ""),
    (_bad_traceparent, "traceparent"),
    (_zero_trace_id, "traceparent"),
    (_long_subject, "subject"),
]


async def stored_count(db) -> int:  # type: ignore[no-untyped-def]
    return int(await db.fetchval("SELECT count(*) FROM events"))


async def expect_status(code: grpc.StatusCode, call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


@pytest.mark.parametrize(("spoil", "field"), BAD_EVENTS, ids=[f.__name__ for f, _ in BAD_EVENTS])
async def test_publish_bad_event_is_refused_and_nothing_stored(publisher_channel, db, spoil, field):
    stub = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    first, bad = good(), good()
    spoil(bad)
    details = await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT, stub.Publish(bus_pb2.PublishRequest(events=[first, bad]))
    )
    assert f"events[1].{field}".rstrip(".") in details
    assert "nothing was stored" in details
    assert await stored_count(db) == 0
    # the server still serves, and the good event alone is stored
    reply = await stub.Publish(bus_pb2.PublishRequest(events=[first]))
    assert (reply.accepted, reply.duplicates) == (1, 0)
    assert await stored_count(db) == 1


async def test_oversized_event_names_the_limit(publisher_channel, db):
    stub = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    bad = good()
    _oversized(bad)
    details = await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT, stub.Publish(bus_pb2.PublishRequest(events=[bad]))
    )
    assert "events[0]" in details
    assert str(MAX_EVENT_BYTES) in details
    assert await stored_count(db) == 0


async def test_empty_and_too_large_batches_are_refused(publisher_channel, db):
    stub = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    details = await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT, stub.Publish(bus_pb2.PublishRequest())
    )
    assert "events" in details
    assert "nothing was stored" in details
    details = await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.Publish(bus_pb2.PublishRequest(events=[good() for _ in range(MAX_BATCH + 1)])),
    )
    assert f"limit is {MAX_BATCH}" in details
    assert "nothing was stored" in details
    assert await stored_count(db) == 0
    reply = await stub.Publish(bus_pb2.PublishRequest(events=[good() for _ in range(MAX_BATCH)]))
    assert reply.accepted == MAX_BATCH
    assert await stored_count(db) == MAX_BATCH


async def test_nothing_reaches_a_subscription_after_refusals(publisher_channel, module_channel):
    stub = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    for spoil, _ in BAD_EVENTS:
        bad = good()
        spoil(bad)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Publish(bus_pb2.PublishRequest(events=[good(), bad]))
    marker = good("marker")
    await stub.Publish(bus_pb2.PublishRequest(events=[marker]))
    bus = bus_pb2_grpc.EventBusServiceStub(module_channel)
    requests: asyncio.Queue[bus_pb2.SubscribeRequest] = asyncio.Queue()
    requests.put_nowait(
        bus_pb2.SubscribeRequest(
            open=bus_pb2.SubscribeOpen(
                subscription="everything", start=bus_pb2.START_POSITION_EARLIEST
            )
        )
    )

    async def outgoing():  # type: ignore[no-untyped-def]
        while True:
            yield await requests.get()

    call = bus.Subscribe(outgoing())
    opened = await call.read()
    assert opened.WhichOneof("message") == "opened"
    response = await asyncio.wait_for(call.read(), 5)
    delivery = response.batch.deliveries[0]
    assert delivery.event.id == marker.id
    assert delivery.sequence == 1  # the refused batches took no sequence numbers
    call.cancel()
    listed = await bus.ListSubscriptions(bus_pb2.ListSubscriptionsRequest())
    (sub,) = listed.subscriptions
    assert sub.lag == 1


async def test_publish_stream_refuses_a_bad_batch_and_goes_on(publisher_channel, db):
    stub = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    bad = good()
    _uuid4(bad)
    first, second = good(), good()
    call = stub.PublishStream()
    await call.write(bus_pb2.PublishStreamRequest(batch_id=1, events=[first, bad]))
    refused = await call.read()
    assert refused.batch_id == 1
    assert refused.accepted == 0
    assert [r.index for r in refused.rejections] == [1]
    assert refused.rejections[0].event_id == bad.id
    assert "events[1].id" in refused.rejections[0].reason
    assert "nothing was stored" in refused.error
    assert await stored_count(db) == 0

    await call.write(bus_pb2.PublishStreamRequest(batch_id=2, events=[]))
    empty = await call.read()
    assert empty.batch_id == 2
    assert empty.error
    assert empty.accepted == 0

    await call.write(bus_pb2.PublishStreamRequest(batch_id=3, events=[first, second]))
    accepted = await call.read()
    assert (accepted.batch_id, accepted.accepted, accepted.error) == (3, 2, "")
    assert not accepted.rejections
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    ids = {str(r["id"]) for r in await db.fetch("SELECT id FROM events")}
    assert ids == {first.id, second.id}


def _subscribe_call(channel, *requests: bus_pb2.SubscribeRequest):  # type: ignore[no-untyped-def]
    stub = bus_pb2_grpc.EventBusServiceStub(channel)

    async def outgoing():  # type: ignore[no-untyped-def]
        for request in requests:
            yield request
        await asyncio.sleep(30)

    return stub.Subscribe(outgoing())


async def _subscribe_error(
    channel, *requests: bus_pb2.SubscribeRequest
) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    call = _subscribe_call(channel, *requests)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    return caught.value.code(), caught.value.details() or ""


@pytest.mark.parametrize(
    ("open_", "field"),
    [
        (bus_pb2.SubscribeOpen(subscription=""), "open.subscription"),
        (bus_pb2.SubscribeOpen(subscription="Bad Name"), "open.subscription"),
        (bus_pb2.SubscribeOpen(subscription="x" * 200), "open.subscription"),
        (
            bus_pb2.SubscribeOpen(subscription="ok", event_types=["acme.v1.Nope"]),
            "open.event_types",
        ),
        (
            bus_pb2.SubscribeOpen(subscription="ok", max_in_flight=MAX_IN_FLIGHT + 1),
            "open.max_in_flight",
        ),
        (bus_pb2.SubscribeOpen(subscription="ok", max_in_flight=-1), "open.max_in_flight"),
        (bus_pb2.SubscribeOpen(subscription="ok", start=42), "open.start"),  # type: ignore[arg-type]
    ],
)
async def test_subscribe_bad_open_is_refused(module_channel, db, open_, field):
    code, details = await _subscribe_error(module_channel, bus_pb2.SubscribeRequest(open=open_))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(field)
    assert await db.fetchval("SELECT count(*) FROM subscriptions") == 0


async def test_subscribe_first_message_must_be_open(module_channel, db):
    ack = bus_pb2.SubscribeRequest(ack=bus_pb2.SubscribeAck(sequences=[1]))
    code, details = await _subscribe_error(module_channel, ack)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "open" in details
    assert await db.fetchval("SELECT count(*) FROM subscriptions") == 0


async def test_subscribe_second_open_is_refused(module_channel):
    open_ = bus_pb2.SubscribeRequest(open=bus_pb2.SubscribeOpen(subscription="twice"))
    code, details = await _subscribe_error(module_channel, open_, open_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "once" in details


async def test_subscribe_unregistered_module_is_refused(admin_channel):
    open_ = bus_pb2.SubscribeOpen(subscription="s", module="ghost")
    code, details = await _subscribe_error(admin_channel, bus_pb2.SubscribeRequest(open=open_))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "open.module" in details
    assert "register" in details


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (registry_pb2.RegisterRequest(name="Bad_Name", version="1", endpoint="h:1"), "name"),
        (registry_pb2.RegisterRequest(name="", version="1", endpoint="h:1"), "name"),
        (registry_pb2.RegisterRequest(name="ok", version="", endpoint="h:1"), "version"),
        (registry_pb2.RegisterRequest(name="ok", version="1", endpoint="no-port"), "endpoint"),
        (registry_pb2.RegisterRequest(name="ok", version="1", endpoint="h:99999"), "endpoint"),
        (registry_pb2.RegisterRequest(name="ok", version="1", endpoint=""), "endpoint"),
        (
            registry_pb2.RegisterRequest(
                name="ok", version="1", endpoint="h:1", event_types=["x.Y"]
            ),
            "event_types",
        ),
    ],
)
async def test_register_bad_input_is_refused(admin_channel, db, request_, field):
    """Refused for what it says even from an admin, who may register under any name."""
    stub = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    details = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.Register(request_))
    assert details.startswith(f"{field}:")
    assert await db.fetchval("SELECT count(*) FROM modules") == 0


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(0, -5_000_000), (0, 0), (0, 99_999_999), (10**11, 0), (2**63 - 1, 0), (5, 10**9)],
)
async def test_register_bad_lease_is_refused(admin_channel, db, seconds, nanos):
    stub = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    request = registry_pb2.RegisterRequest(name="ok", version="1", endpoint="h:1")
    request.lease.seconds, request.lease.nanos = seconds, nanos
    details = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.Register(request))
    assert details.startswith("lease:")
    assert "86400" in details
    assert await db.fetchval("SELECT count(*) FROM modules") == 0


@pytest.mark.parametrize(
    ("health", "field"),
    [
        (registry_pb2.ModuleHealth(status=99), "health.status"),
        (registry_pb2.ModuleHealth(latency_ms=float("nan")), "health.latency_ms"),
        (registry_pb2.ModuleHealth(latency_ms=-1), "health.latency_ms"),
        (registry_pb2.ModuleHealth(uptime_seconds=float("inf")), "health.uptime_seconds"),
        (registry_pb2.ModuleHealth(last_error="bad\x00byte"), "health.last_error"),
        (registry_pb2.ModuleHealth(last_error="x" * 2001), "health.last_error"),
    ],
)
async def test_heartbeat_bad_health_is_refused(admin_channel, db, health, field):
    stub = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    await stub.Register(registry_pb2.RegisterRequest(name="ok", version="1", endpoint="h:1"))
    before = await db.fetchrow("SELECT health_status, latency_ms, last_error FROM modules")
    details = await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.Heartbeat(registry_pb2.HeartbeatRequest(name="ok", health=health)),
    )
    assert details.startswith(f"{field}:")
    assert await db.fetchrow("SELECT health_status, latency_ms, last_error FROM modules") == before


async def test_unknown_module_is_not_found(module_channel, admin_channel):
    stub = registry_pb2_grpc.RegistryServiceStub(module_channel)
    details = await expect_status(
        grpc.StatusCode.NOT_FOUND, stub.GetModule(registry_pb2.GetModuleRequest(name="ghost"))
    )
    assert "ghost" in details
    admin = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    await expect_status(
        grpc.StatusCode.NOT_FOUND,
        admin.Heartbeat(registry_pb2.HeartbeatRequest(name="ghost")),
    )
    await expect_status(
        grpc.StatusCode.NOT_FOUND,
        admin.SetModuleEnabled(registry_pb2.SetModuleEnabledRequest(name="ghost")),
    )
    await expect_status(
        grpc.StatusCode.NOT_FOUND, admin.Deregister(registry_pb2.DeregisterRequest(name="ghost"))
    )


async def test_dead_letter_calls_validate(module_channel, admin_channel):
    stub = bus_pb2_grpc.EventBusServiceStub(module_channel)
    details = await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.ListDeadLetters(bus_pb2.ListDeadLettersRequest(limit=-1)),
    )
    assert details.startswith("limit:")
    admin = bus_pb2_grpc.EventBusServiceStub(admin_channel)
    details = await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        admin.ReplayDeadLetters(bus_pb2.ReplayDeadLettersRequest()),
    )
    assert details.startswith("subscription:")
    await expect_status(
        grpc.StatusCode.NOT_FOUND,
        admin.ReplayDeadLetters(bus_pb2.ReplayDeadLettersRequest(subscription="ghost")),
    )


async def test_message_over_grpc_limit_is_resource_exhausted(publisher_channel, db):
    stub = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    huge = good()
    huge.subject = "x" * (100 * 1024)
    await expect_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, stub.Publish(bus_pb2.PublishRequest(events=[huge]))
    )
    assert await stored_count(db) == 0
    reply = await stub.Publish(bus_pb2.PublishRequest(events=[good()]))
    assert reply.accepted == 1
