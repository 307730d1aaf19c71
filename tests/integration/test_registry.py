"""The module registry against a real core: register, heartbeat, watch, leases, deregister."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest

from lodestar.core.v1 import registry_pb2, registry_pb2_grpc

Change = registry_pb2.ModuleChange
USAGE = "lodestar.usage.v1.RequestCompleted"


def register_request(
    name: str, lease: float | None = None, version: str = "1.0"
) -> registry_pb2.RegisterRequest:
    request = registry_pb2.RegisterRequest(
        name=name, version=version, endpoint="127.0.0.1:7000", event_types=[USAGE]
    )
    if lease is not None:
        request.lease.FromTimedelta(timedelta(seconds=lease))
    return request


class Watch:
    """A WatchModules stream read into a queue."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = registry_pb2_grpc.RegistryServiceStub(channel).WatchModules(
            registry_pb2.WatchModulesRequest()
        )
        self.queue: asyncio.Queue[registry_pb2.WatchModulesResponse] = asyncio.Queue()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for response in self.call:
            self.queue.put_nowait(response)

    async def next(self, timeout: float = 5.0) -> registry_pb2.WatchModulesResponse:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def close(self) -> None:
        self.call.cancel()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def registry(channel: grpc.aio.Channel) -> registry_pb2_grpc.RegistryServiceStub:
    return registry_pb2_grpc.RegistryServiceStub(channel)


async def test_register_heartbeat_list_get(module_as, db):
    stub = registry(await module_as("tracker"))
    registered = (await stub.Register(register_request("tracker"))).module
    assert (registered.name, registered.version, registered.endpoint) == (
        "tracker",
        "1.0",
        "127.0.0.1:7000",
    )
    assert list(registered.event_types) == [USAGE]
    assert registered.enabled
    assert registered.alive
    assert registered.lease_expires_at.ToDatetime() > registered.registered_at.ToDatetime()

    health = registry_pb2.ModuleHealth(
        status=registry_pb2.HEALTH_STATUS_DEGRADED,
        latency_ms=12.5,
        last_error="slow db",
        uptime_seconds=99,
    )
    beat = (
        await stub.Heartbeat(registry_pb2.HeartbeatRequest(name="tracker", health=health))
    ).module
    assert beat.health == health
    row = await db.fetchrow(
        "SELECT health_status, latency_ms, last_error, uptime_seconds FROM modules"
    )
    assert tuple(row) == (registry_pb2.HEALTH_STATUS_DEGRADED, 12.5, "slow db", 99.0)

    await registry(await module_as("another")).Register(register_request("another"))
    listed = (await stub.ListModules(registry_pb2.ListModulesRequest())).modules
    assert [m.name for m in listed] == ["another", "tracker"]
    got = (await stub.GetModule(registry_pb2.GetModuleRequest(name="tracker"))).module
    assert got.health == health
    assert got.registered_at == registered.registered_at


async def test_heartbeat_keeps_the_registered_lease(module_as):
    stub = registry(await module_as("short"))
    module = (await stub.Register(register_request("short", lease=2.0))).module
    registered_for = module.lease_expires_at.ToDatetime() - module.registered_at.ToDatetime()
    assert timedelta(seconds=1.5) < registered_for <= timedelta(seconds=2.5)
    beat = (await stub.Heartbeat(registry_pb2.HeartbeatRequest(name="short"))).module
    remaining = beat.lease_expires_at.ToDatetime() - module.registered_at.ToDatetime()
    assert beat.lease_expires_at.ToDatetime() > module.lease_expires_at.ToDatetime(), "renewed"
    assert timedelta(seconds=1.5) < remaining <= timedelta(seconds=3), "by its own 2 s lease"


async def test_watch_snapshot_then_changes(module_channel, module_as, admin_channel):
    stub = registry(await module_as("second"))
    admin = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    await registry(await module_as("first")).Register(register_request("first"))
    watch = Watch(module_channel)
    snapshot = await watch.next()
    assert (snapshot.change, snapshot.module.name) == (Change.MODULE_CHANGE_SNAPSHOT, "first")

    await stub.Register(register_request("second"))
    change = await watch.next()
    assert (change.change, change.module.name) == (Change.MODULE_CHANGE_REGISTERED, "second")

    await stub.Register(register_request("second", version="2.0"))
    change = await watch.next()
    assert (change.change, change.module.name, change.module.version) == (
        Change.MODULE_CHANGE_UPDATED,
        "second",
        "2.0",
    )

    await admin.SetModuleEnabled(registry_pb2.SetModuleEnabledRequest(name="second", enabled=False))
    change = await watch.next()
    assert (change.change, change.module.enabled) == (Change.MODULE_CHANGE_UPDATED, False)

    await admin.Deregister(registry_pb2.DeregisterRequest(name="second"))
    change = await watch.next()
    assert (change.change, change.module.name) == (Change.MODULE_CHANGE_DEREGISTERED, "second")
    assert watch.queue.empty()
    await watch.close()


async def test_lease_expiry_is_announced(module_channel, module_as, db):
    stub = registry(await module_as("fleeting"))
    await registry(await module_as("sentinel")).Register(register_request("sentinel"))
    watch = Watch(module_channel)
    assert (await watch.next()).module.name == "sentinel"  # the watch is live
    await stub.Register(register_request("fleeting", lease=0.3))
    change = await watch.next()
    assert change.change == Change.MODULE_CHANGE_REGISTERED
    assert change.module.alive
    expired = await watch.next(timeout=5)
    assert (expired.change, expired.module.name) == (Change.MODULE_CHANGE_LEASE_EXPIRED, "fleeting")
    assert not expired.module.alive
    got = (await stub.GetModule(registry_pb2.GetModuleRequest(name="fleeting"))).module
    assert not got.alive
    assert await db.fetchval("SELECT expiry_announced FROM modules WHERE name = 'fleeting'")

    # announced once, not on every sweep
    with pytest.raises(TimeoutError):
        await watch.next(timeout=1.5)

    # a heartbeat brings it back, and watchers hear about it
    beat = (await stub.Heartbeat(registry_pb2.HeartbeatRequest(name="fleeting"))).module
    assert beat.alive
    back = await watch.next()
    assert (back.change, back.module.name, back.module.alive) == (
        Change.MODULE_CHANGE_UPDATED,
        "fleeting",
        True,
    )
    await watch.close()


async def test_deregister_then_register_again(module_channel, module_as, admin_channel, db):
    stub = registry(await module_as("phoenix"))
    admin = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    await stub.Register(register_request("phoenix"))
    await admin.SetModuleEnabled(
        registry_pb2.SetModuleEnabledRequest(name="phoenix", enabled=False)
    )
    await admin.Deregister(registry_pb2.DeregisterRequest(name="phoenix"))
    assert await db.fetchval("SELECT count(*) FROM modules") == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetModule(registry_pb2.GetModuleRequest(name="phoenix"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Heartbeat(registry_pb2.HeartbeatRequest(name="phoenix"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    await registry(await module_as("sentinel")).Register(register_request("sentinel"))
    watch = Watch(module_channel)
    assert (await watch.next()).module.name == "sentinel"  # the watch is live
    again = (await stub.Register(register_request("phoenix"))).module
    assert again.enabled
    assert again.alive
    change = await watch.next()
    assert change.change == Change.MODULE_CHANGE_REGISTERED
    await watch.close()
