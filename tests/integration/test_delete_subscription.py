"""DeleteSubscription: the owner (or an admin) forgets a subscription no stream has open."""

from __future__ import annotations

import grpc
import pytest

from lodestar.core.v1 import bus_pb2, bus_pb2_grpc
from tests.integration.test_subscriptions import (
    eventually,
    publish,
    raw,
    subscriptions,
    usage_event,
    wait_disconnected,
)


async def delete(channel: grpc.aio.Channel, name: str) -> bus_pb2.DeleteSubscriptionResponse:
    stub = bus_pb2_grpc.EventBusServiceStub(channel)
    return await stub.DeleteSubscription(bus_pb2.DeleteSubscriptionRequest(subscription=name))


async def with_a_dead_letter(publisher_channel, module_channel, name: str) -> None:  # type: ignore[no-untyped-def]
    await publish(publisher_channel, [usage_event(i) for i in range(3)])
    sub = raw(module_channel, name)
    await sub.opened()
    first, *rest = await sub.take(3)
    sub.permanent_nack(first.sequence, "cannot be handled")
    sub.ack(*(d.sequence for d in rest))

    async def settled() -> bool:
        state = (await subscriptions(module_channel))[name]
        return state.dead_letters == 1 and state.lag == 0

    await eventually(settled)
    await sub.close()
    await wait_disconnected(module_channel, name)


async def test_the_owner_deletes_a_closed_subscription_and_its_dead_letters(
    publisher_channel, module_channel, admin_channel, db
):
    await with_a_dead_letter(publisher_channel, module_channel, "short-lived")
    assert (await subscriptions(module_channel))["short-lived"].dead_letters == 1
    response = await delete(module_channel, "short-lived")
    assert response.dead_letters == 1
    assert "short-lived" not in await subscriptions(module_channel)
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0
    assert await db.fetchval("SELECT count(*) FROM events") == 3  # the log keeps the events
    entry = await db.fetchrow(
        "SELECT * FROM audit_log WHERE action = 'EventBusService/DeleteSubscription'"
    )
    assert entry["target"] == "subscription/short-lived"
    assert entry["principal"] == "test-module"
    # the name can be used again, and starts from the beginning of the log
    again = raw(module_channel, "short-lived")
    assert (await again.opened()).acked_sequence == 0
    assert len(await again.take(3)) == 3
    await again.close()


async def test_a_subscription_with_an_open_stream_is_not_deleted(module_channel):
    sub = raw(module_channel, "busy")
    await sub.opened()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await delete(module_channel, "busy")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "stop its consumer" in (refused.value.details() or "")
    await sub.close()
    assert "busy" in await subscriptions(module_channel)


async def test_another_principals_subscription_is_refused_and_an_admin_may_delete_it(
    module_channel, module_as, admin_channel
):
    sub = raw(module_channel, "owned")
    await sub.opened()
    await sub.close()
    await wait_disconnected(module_channel, "owned")
    intruder = await module_as("usage-tracker")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await delete(intruder, "owned")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "owned" in await subscriptions(module_channel)
    await delete(admin_channel, "owned")
    assert "owned" not in await subscriptions(admin_channel)


@pytest.mark.parametrize(
    ("name", "code"),
    [("", grpc.StatusCode.INVALID_ARGUMENT), ("never-created", grpc.StatusCode.NOT_FOUND)],
)
async def test_a_missing_name_or_unknown_subscription_is_refused(module_channel, name, code):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await delete(module_channel, name)
    assert refused.value.code() == code
