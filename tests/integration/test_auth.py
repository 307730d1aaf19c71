"""Every RPC but health and reflection needs a bearer token whose role allows the call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

import asyncpg
import grpc
import pytest
import yaml
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from lodestar.common.auth import Credentials, Role, hash_token, new_token
from lodestar.common.cli import app as cli_app
from lodestar.common.errors import ConfigurationError
from lodestar.common.events import new_event
from lodestar.common.ratelimit import RateLimitSettings, TokenBucketLimit
from lodestar.common.sdk import connect
from lodestar.common.server import ServiceRunner
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc, registry_pb2, registry_pb2_grpc
from lodestar.usage.v1 import events_pb2 as usage
from lodestar_core.service import MODULE, CoreModule


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
    await registry.Register(register_request("test-module"))  # its own name
    for call in (
        registry.SetModuleEnabled(
            registry_pb2.SetModuleEnabledRequest(name="test-module", enabled=False)
        ),
        registry.Deregister(registry_pb2.DeregisterRequest(name="test-module")),
        bus.ReplayDeadLetters(bus_pb2.ReplayDeadLettersRequest(subscription="s")),
    ):
        details = await expect_status(grpc.StatusCode.PERMISSION_DENIED, call)
        assert "role module" in details
        assert "needs admin" in details
    row = await db.fetchrow("SELECT enabled FROM modules WHERE name = 'test-module'")
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
    assert "rpc finished" in logged, "expected the calls to be logged at all"
    for token in (*tokens.values(), bogus):
        assert token not in logged


# --- rotation, reload, rate limits, the role table ---------------------------------------------


def rotate(path: Path, principal: str, *options: str) -> str:
    """``lodestar tokens rotate`` on ``path``; returns the new token."""
    env = {k: v for k, v in os.environ.items() if k != "LODESTAR_CREDENTIALS_FILE"}
    result = CliRunner().invoke(
        cli_app,
        ["tokens", "rotate", principal, "--credentials-file", str(path), *options],
        env=env,
    )
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


async def publish_once(target: str, token: str) -> None:
    async with connect(target, token) as channel:
        await bus_pb2_grpc.EventBusServiceStub(channel).Publish(
            bus_pb2.PublishRequest(events=[an_event()])
        )


async def until_accepted(target: str, token: str, timeout: float = 5.0) -> float:
    """Seconds until ``token`` is accepted (the server re-reads the file within a second)."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    while True:
        try:
            await publish_once(target, token)
            return loop.time() - began
        except grpc.aio.AioRpcError as exc:
            refused = exc
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED, refused.details()
        assert loop.time() - began < timeout, "the changed file was never reloaded"
        await asyncio.sleep(0.1)


async def test_rotation_needs_no_restart_and_old_tokens_expire_after_the_grace(
    core, core_settings, tokens, db
):
    path = core_settings.credentials_file
    old = tokens[Role.PUBLISHER]
    new = rotate(path, "test-publisher", "--expire-old-in", "5s")
    assert await until_accepted(core.target, new) < 2.5
    await publish_once(core.target, old)  # both valid during the grace
    expiry = next(
        e.expires_at for e in Credentials.load(path).entries if e.token_sha256 == hash_token(old)
    )
    assert expiry is not None
    await asyncio.sleep(max(0.0, expiry.timestamp() - time.time()) + 0.1)
    async with connect(core.target, old) as channel:
        details = await expect_status(
            grpc.StatusCode.UNAUTHENTICATED,
            bus_pb2_grpc.EventBusServiceStub(channel).Publish(
                bus_pb2.PublishRequest(events=[an_event()])
            ),
        )
    assert "expired" in details
    assert expiry.strftime("%Y-%m-%dT%H:%M:%SZ") in details
    assert old not in details
    await publish_once(core.target, new)
    # the new token's first accepted publish, the old one's in the grace, the new one's now;
    # every refused attempt stored nothing
    assert await db.fetchval("SELECT count(*) FROM events") == 3


async def test_a_broken_credentials_file_keeps_the_previous_credentials(
    core, core_settings, tokens, capfd, caplog
):
    path = core_settings.credentials_file
    good = path.read_text()
    path.write_text("principals: [{name: x, role: root, token_sha256: nope}]\n")
    await asyncio.sleep(1.2)
    await publish_once(core.target, tokens[Role.PUBLISHER])
    await publish_once(core.target, tokens[Role.PUBLISHER])
    out, err = capfd.readouterr()
    # on the output, or in the log records when an earlier test's logging setup holds the streams
    assert "keeping the previous credentials" in out + err + caplog.text
    # a later valid file is picked up again
    token = new_token()
    entries = yaml.safe_load(good)["principals"]
    entries.append({"name": "late", "role": "publisher", "token_sha256": hash_token(token)})
    path.write_text(yaml.safe_dump({"principals": entries}))
    await until_accepted(core.target, token)


def limited(settings, **principals):  # type: ignore[no-untyped-def]
    return settings.model_copy(
        update={
            "rate_limits": RateLimitSettings(
                principals={
                    name: TokenBucketLimit(rate_per_second=rate, burst=burst)
                    for name, (rate, burst) in principals.items()
                }
            )
        }
    )


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(error)
    assert status is not None, "the refusal carries google.rpc details"
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    raise AssertionError("no RetryInfo in the status details")


def refused_total(principal: str) -> float:
    sample = REGISTRY.get_sample_value(
        "lodestar_rate_limited_total", {"principal": principal, "role": "publisher"}
    )
    return sample or 0.0


async def test_rate_limit_refuses_a_burst_with_a_retry_delay_and_refills(
    core_starter, core_settings, tokens, database_url, schema
):
    core = await core_starter(limited(core_settings, **{"test-publisher": (4.0, 3)}))
    before = refused_total("test-publisher")
    async with (
        connect(core.target, tokens[Role.PUBLISHER]) as publisher,
        connect(core.target, tokens[Role.ADMIN]) as admin,
    ):
        bus = bus_pb2_grpc.EventBusServiceStub(publisher)
        for _ in range(3):
            await bus.Publish(bus_pb2.PublishRequest(events=[an_event()]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await bus.Publish(bus_pb2.PublishRequest(events=[an_event()]))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = caught.value.details() or ""
        assert "test-publisher" in details
        assert "4 calls per second with bursts of 3" in details
        delay = retry_delay(caught.value)
        assert 0 < delay <= 0.25
        # a stream is refused the same way
        code, _ = await stream_status(bus.PublishStream(iter([])))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused_total("test-publisher") == before + 2
        # other principals are not affected; health is never limited
        admin_bus = bus_pb2_grpc.EventBusServiceStub(admin)
        for _ in range(10):
            await admin_bus.Publish(bus_pb2.PublishRequest(events=[an_event()]))
        health = health_pb2_grpc.HealthStub(publisher)
        for _ in range(10):
            await health.Check(health_pb2.HealthCheckRequest(service=""))
        await asyncio.sleep(delay + 0.05)
        await bus.Publish(bus_pb2.PublishRequest(events=[an_event()]))  # refilled
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        assert await conn.fetchval("SELECT count(*) FROM events") == 3 + 10 + 1
    finally:
        await conn.close()


class MisspeltCore(CoreModule):
    """Core whose role table names a method its services do not have."""

    def method_roles(self):  # type: ignore[no-untyped-def]
        return {**super().method_roles(), "/lodestar.core.v1.RegistryService/Regster": MODULE}


async def test_start_up_fails_when_the_role_table_names_an_unknown_method(core_settings):
    runner = ServiceRunner(MisspeltCore(core_settings), core_settings)
    with pytest.raises(ConfigurationError) as caught:
        await asyncio.wait_for(runner.run(handle_signals=False), 10)
    assert "'/lodestar.core.v1.RegistryService/Regster'" in caught.value.message
    assert "Register, Heartbeat" in caught.value.message


async def test_every_message_of_a_client_stream_counts_against_the_rate_limit(
    core_starter, core_settings, tokens, database_url, schema
):
    """One PublishStream once carried 20,000 events under a limit of 5 calls a second."""
    core = await core_starter(limited(core_settings, **{"test-publisher": (1.0, 3)}))
    async with connect(core.target, tokens[Role.PUBLISHER]) as publisher:
        bus = bus_pb2_grpc.EventBusServiceStub(publisher)
        batches = [bus_pb2.PublishStreamRequest(batch_id=n, events=[an_event()]) for n in range(10)]
        acked: list[int] = []

        async def publish_all() -> None:
            async for reply in bus.PublishStream(iter(batches)):
                acked.append(reply.batch_id)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await publish_all()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 0 < retry_delay(caught.value) <= 1.0
    assert acked == [0, 1, 2], "the call and two more messages fit the burst of 3"
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        assert await conn.fetchval("SELECT count(*) FROM events") == 3
    finally:
        await conn.close()
