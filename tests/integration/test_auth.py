"""Every RPC but health and reflection needs a bearer token whose role allows the call."""

from __future__ import annotations

import contextlib
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lodestar.common.auth import Role
from lodestar.common.events import new_event
from lodestar.common.sdk import connect
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc, registry_pb2, registry_pb2_grpc
from lodestar.usage.v1 import events_pb2 as usage


def an_event():  # type: ignore[no-untyped-def]
    return new_event(usage.RequestCompleted(model="m", provider="t"), source="test://auth")


async def expect_status(code: grpc.StatusCode, call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


async def stream_status(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    return caught.value.code(), caught.value.details() or ""


def register_request(name: str = "mod-a") -> registry_pb2.RegisterRequest:
    return registry_pb2.RegisterRequest(name=name, version="1", endpoint="127.0.0.1:1")


async def test_no_token_is_unauthenticated(core, db):
    async with grpc.aio.insecure_channel(core.target) as channel:
        stub = bus_pb2_grpc.EventBusServiceStub(channel)
        details = await expect_status(
            grpc.StatusCode.UNAUTHENTICATED,
            stub.Publish(bus_pb2.PublishRequest(events=[an_event()])),
        )
        assert "authorization: Bearer" in details
        code, details = await stream_status(
            stub.Subscribe(
                iter([bus_pb2.SubscribeRequest(open=bus_pb2.SubscribeOpen(subscription="s"))])
            )
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in details
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        code, _ = await stream_status(registry.WatchModules(registry_pb2.WatchModulesRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        await expect_status(
            grpc.StatusCode.UNAUTHENTICATED,
            channel.unary_unary("/lodestar.core.v1.RegistryService/ListModules")(b""),
        )
    assert await db.fetchval("SELECT count(*) FROM events") == 0
    assert await db.fetchval("SELECT count(*) FROM subscriptions") == 0


@pytest.mark.parametrize("header", ["Bearer", "Basic abc", "Bearer   ", "bearer-abc"])
async def test_malformed_authorization_is_unauthenticated(core, header):
    async with grpc.aio.insecure_channel(core.target) as channel:
        stub = bus_pb2_grpc.EventBusServiceStub(channel)
        await expect_status(
            grpc.StatusCode.UNAUTHENTICATED,
            stub.Publish(
                bus_pb2.PublishRequest(events=[an_event()]), metadata=(("authorization", header),)
            ),
        )


async def test_unknown_token_is_unauthenticated(core, db):
    async with connect(core.target, "not-a-known-token") as channel:
        stub = bus_pb2_grpc.EventBusServiceStub(channel)
        details = await expect_status(
            grpc.StatusCode.UNAUTHENTICATED,
            stub.Publish(bus_pb2.PublishRequest(events=[an_event()])),
        )
        assert "not known" in details
        assert "not-a-known-token" not in details
    assert await db.fetchval("SELECT count(*) FROM events") == 0


async def test_publisher_may_not_subscribe_register_or_administer(publisher_channel, db):
    bus = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    registry = registry_pb2_grpc.RegistryServiceStub(publisher_channel)
    code, details = await stream_status(
        bus.Subscribe(
            iter([bus_pb2.SubscribeRequest(open=bus_pb2.SubscribeOpen(subscription="s"))])
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "publisher" in details
    assert "admin, module" in details
    details = await expect_status(
        grpc.StatusCode.PERMISSION_DENIED, registry.Register(register_request())
    )
    assert "admin, module" in details
    details = await expect_status(
        grpc.StatusCode.PERMISSION_DENIED,
        registry.SetModuleEnabled(registry_pb2.SetModuleEnabledRequest(name="mod-a")),
    )
    assert "needs admin" in details
    await expect_status(
        grpc.StatusCode.PERMISSION_DENIED,
        bus.ListSubscriptions(bus_pb2.ListSubscriptionsRequest()),
    )
    assert await db.fetchval("SELECT count(*) FROM modules") == 0
    assert await db.fetchval("SELECT count(*) FROM subscriptions") == 0
    # but it may publish
    reply = await bus.Publish(bus_pb2.PublishRequest(events=[an_event()]))
    assert reply.accepted == 1


async def test_module_may_not_administer(module_channel, db):
    registry = registry_pb2_grpc.RegistryServiceStub(module_channel)
    bus = bus_pb2_grpc.EventBusServiceStub(module_channel)
    await registry.Register(register_request())
    for call in (
        registry.SetModuleEnabled(
            registry_pb2.SetModuleEnabledRequest(name="mod-a", enabled=False)
        ),
        registry.Deregister(registry_pb2.DeregisterRequest(name="mod-a")),
        bus.ReplayDeadLetters(bus_pb2.ReplayDeadLettersRequest(subscription="s")),
    ):
        details = await expect_status(grpc.StatusCode.PERMISSION_DENIED, call)
        assert "role module" in details
        assert "needs admin" in details
    row = await db.fetchrow("SELECT enabled FROM modules WHERE name = 'mod-a'")
    assert row["enabled"] is True


async def test_admin_may_do_everything(admin_channel, db):
    registry = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    bus = bus_pb2_grpc.EventBusServiceStub(admin_channel)
    await bus.Publish(bus_pb2.PublishRequest(events=[an_event()]))
    await registry.Register(register_request())
    await registry.Heartbeat(registry_pb2.HeartbeatRequest(name="mod-a"))
    await registry.SetModuleEnabled(
        registry_pb2.SetModuleEnabledRequest(name="mod-a", enabled=False)
    )
    assert (
        await registry.GetModule(registry_pb2.GetModuleRequest(name="mod-a"))
    ).module.enabled is False
    await bus.ListSubscriptions(bus_pb2.ListSubscriptionsRequest())
    await bus.ListDeadLetters(bus_pb2.ListDeadLettersRequest())
    call = bus.Subscribe(
        iter([bus_pb2.SubscribeRequest(open=bus_pb2.SubscribeOpen(subscription="adm"))])
    )
    first = await call.read()
    assert first.opened.subscription == "adm"
    call.cancel()
    await bus.ReplayDeadLetters(bus_pb2.ReplayDeadLettersRequest(subscription="adm"))
    await registry.Deregister(registry_pb2.DeregisterRequest(name="mod-a"))
    assert await db.fetchval("SELECT count(*) FROM modules") == 0
    assert await db.fetchval("SELECT count(*) FROM events") == 1


async def test_health_and_reflection_need_no_token(core):
    async with grpc.aio.insecure_channel(core.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = set()
        async for response in call:
            services = {s.name for s in response.list_services_response.service}
        assert {
            "lodestar.core.v1.EventBusService",
            "lodestar.core.v1.RegistryService",
            "grpc.health.v1.Health",
        } <= services


async def test_tokens_never_logged(core, tokens, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    bogus = "bogus-token-" + "z" * 30
    for token in (tokens[Role.PUBLISHER], tokens[Role.MODULE], bogus):
        async with connect(core.target, token) as channel:
            bus = bus_pb2_grpc.EventBusServiceStub(channel)
            registry = registry_pb2_grpc.RegistryServiceStub(channel)
            for call in (
                bus.Publish(bus_pb2.PublishRequest(events=[an_event()])),
                registry.SetModuleEnabled(registry_pb2.SetModuleEnabledRequest(name="x")),
                bus.Publish(bus_pb2.PublishRequest()),
            ):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await call
    out, err = capfd.readouterr()
    logged = out + err + caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert "rpc finished" in logged or caplog.records, "expected the calls to be logged at all"
    for token in (*tokens.values(), bogus):
        assert token not in logged
