"""The module registry: registration, heartbeat leases, enable/disable and change streams."""

from __future__ import annotations

import asyncio
import builtins
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from lodestar.common import audit
from lodestar.common.auth import caller
from lodestar.common.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from lodestar.common.logging import get_logger
from lodestar.core.v1 import registry_pb2, registry_pb2_grpc
from lodestar_core.identity import require_module_identity
from lodestar_core.validation import check_event_types

MODULE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
ENDPOINT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
MODULE_COLUMNS = (
    "name, version, endpoint, event_types, enabled, health_status, latency_ms, last_error, "
    "uptime_seconds, registered_at, lease_expires_at"
)
WATCH_QUEUE_SIZE = 1024
DEREGISTER, SET_ENABLED = "RegistryService/Deregister", "RegistryService/SetModuleEnabled"
MIN_LEASE_SECONDS = 0.1
MAX_LEASE_SECONDS = 86_400
MAX_VERSION_CHARS = 128
MAX_LAST_ERROR_CHARS = 2_000
MAX_LATENCY_MS = 86_400_000.0
MAX_UPTIME_SECONDS = 1e10


def _qualified(alias: str) -> str:
    return ", ".join(f"{alias}.{column.strip()}" for column in MODULE_COLUMNS.split(","))


log = get_logger(__name__)
Change = registry_pb2.ModuleChange


class Registry:
    """Registered modules, persisted in core's schema and cached for the delivery path."""

    def __init__(self, pool: asyncpg.Pool, lease: timedelta) -> None:
        self._pool = pool
        self._lease = lease
        self._enabled: dict[str, bool] = {}
        self._seen: dict[str, registry_pb2.Module] = {}
        self._watchers: set[asyncio.Queue[registry_pb2.WatchModulesResponse | None]] = set()
        self.on_enabled_changed: Callable[[str], None] = lambda _name: None

    async def load(self) -> None:
        """Fill the cache from the database."""
        self._seen = await self._current()
        self._enabled = {name: m.enabled for name, m in self._seen.items()}

    async def refresh(self) -> None:
        """Catch up with what other core replicas changed.

        That covers the enabled flags deliveries obey, and the changes WatchModules streams (each
        announced once per replica).
        """
        current = await self._current()
        for name, module in current.items():
            before = self._seen.get(name)
            if before is None:
                self._announce(Change.MODULE_CHANGE_REGISTERED, module, if_new=True)
            elif before.alive and not module.alive:
                self._announce(Change.MODULE_CHANGE_LEASE_EXPIRED, module, if_new=True)
            else:
                self._announce(Change.MODULE_CHANGE_UPDATED, module, if_new=True)
        for name in set(self._seen) - set(current):
            self._announce(Change.MODULE_CHANGE_DEREGISTERED, self._seen[name], if_new=True)
        changed = {
            name
            for name in set(self._enabled) | set(current)
            if self._enabled.get(name) != (current[name].enabled if name in current else None)
        }
        self._enabled = {name: m.enabled for name, m in current.items()}
        for name in changed:
            self.on_enabled_changed(name)

    async def _current(self) -> dict[str, registry_pb2.Module]:
        rows = await self._pool.fetch(f"SELECT {MODULE_COLUMNS} FROM modules")  # noqa: S608
        return {r["name"]: _module(r) for r in rows}

    async def exists(self, name: str) -> bool:
        """Whether ``name`` is registered."""
        return name in self._enabled

    async def is_enabled(self, name: str) -> bool:
        """Whether deliveries to ``name`` may flow (unknown modules count as disabled)."""
        return self._enabled.get(name, False)

    async def register(self, request: registry_pb2.RegisterRequest) -> registry_pb2.Module:
        """Create or update a module; its lease starts now."""
        _validate_registration(request)
        lease = request.lease.ToTimedelta() if request.HasField("lease") else self._lease
        existed = request.name in self._enabled
        row = await self._pool.fetchrow(
            f"""INSERT INTO modules (name, version, endpoint, event_types, lease, lease_expires_at)
                VALUES ($1, $2, $3, $4, $5::interval, now() + $5::interval)
                ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version,
                    endpoint = EXCLUDED.endpoint, event_types = EXCLUDED.event_types,
                    lease = EXCLUDED.lease, lease_expires_at = EXCLUDED.lease_expires_at,
                    expiry_announced = false
                RETURNING {MODULE_COLUMNS}""",  # noqa: S608
            request.name,
            request.version,
            request.endpoint,
            list(request.event_types),
            lease,
        )
        module = _module(row)
        self._enabled[module.name] = module.enabled
        self._announce(
            Change.MODULE_CHANGE_UPDATED if existed else Change.MODULE_CHANGE_REGISTERED, module
        )
        return module

    async def heartbeat(self, request: registry_pb2.HeartbeatRequest) -> registry_pb2.Module:
        """Renew a lease and record the module's health."""
        check_module_name(request.name)
        _validate_heartbeat(request)
        health = request.health
        row = await self._pool.fetchrow(
            f"""UPDATE modules AS m SET lease_expires_at = now() + m.lease,
                    health_status = $2, latency_ms = $3, last_error = $4, uptime_seconds = $5,
                    expiry_announced = false
                FROM (SELECT name, expiry_announced FROM modules WHERE name = $1 FOR UPDATE) AS old
                WHERE m.name = old.name
                RETURNING {_qualified("m")}, old.expiry_announced AS was_expired""",  # noqa: S608
            request.name,
            health.status,
            health.latency_ms,
            health.last_error[:2000],
            health.uptime_seconds,
        )
        if row is None:
            raise NotFoundError(
                f"module {request.name!r} is not registered; call Register first", field="name"
            )
        module = _module(row)
        if row["was_expired"]:
            log.info("module lease renewed after expiry", module=module.name)
            self._announce(Change.MODULE_CHANGE_UPDATED, module)
        return module

    async def deregister(self, name: str) -> None:
        """Remove a module (audited); its subscriptions keep their position."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"DELETE FROM modules WHERE name = $1 RETURNING {MODULE_COLUMNS}",  # noqa: S608
                name,
            )
            if row is None:
                raise NotFoundError(f"module {name!r} is not registered", field="name")
            module = _module(row)
            await audit.record(
                conn, action=DEREGISTER, target=f"module/{name}", before=module, after=None
            )
        self._enabled.pop(name, None)
        self.on_enabled_changed(name)
        self._announce(Change.MODULE_CHANGE_DEREGISTERED, module)

    async def list(self) -> list[registry_pb2.Module]:
        """Every module, by name."""
        rows = await self._pool.fetch(
            f"SELECT {MODULE_COLUMNS} FROM modules ORDER BY name"  # noqa: S608
        )
        return [_module(r) for r in rows]

    async def get(self, name: str) -> registry_pb2.Module:
        """One module."""
        row = await self._pool.fetchrow(
            f"SELECT {MODULE_COLUMNS} FROM modules WHERE name = $1",  # noqa: S608
            name,
        )
        if row is None:
            raise NotFoundError(f"module {name!r} is not registered", field="name")
        return _module(row)

    async def set_enabled(self, name: str, enabled: bool) -> registry_pb2.Module:
        """Enable or disable a module (audited); disabling pauses its deliveries."""
        async with self._pool.acquire() as conn, conn.transaction():
            old = await conn.fetchrow(
                f"SELECT {MODULE_COLUMNS} FROM modules WHERE name = $1 FOR UPDATE",  # noqa: S608
                name,
            )
            if old is None:
                raise NotFoundError(f"module {name!r} is not registered", field="name")
            row = await conn.fetchrow(
                f"UPDATE modules SET enabled = $2 WHERE name = $1 RETURNING {MODULE_COLUMNS}",  # noqa: S608
                name,
                enabled,
            )
            module = _module(row)
            await audit.record(
                conn, action=SET_ENABLED, target=f"module/{name}", before=_module(old), after=module
            )
        self._enabled[name] = enabled
        self.on_enabled_changed(name)
        self._announce(Change.MODULE_CHANGE_UPDATED, module)
        return module

    async def expire_leases(self) -> builtins.list[str]:
        """Announce modules whose lease ran out since the last call; returns their names."""
        rows = await self._pool.fetch(
            f"""UPDATE modules SET expiry_announced = true
                WHERE lease_expires_at < now() AND NOT expiry_announced
                RETURNING {MODULE_COLUMNS}"""  # noqa: S608
        )
        for row in rows:
            module = _module(row)
            log.warning("module lease expired", module=module.name)
            self._announce(Change.MODULE_CHANGE_LEASE_EXPIRED, module, if_new=True)
        return [r["name"] for r in rows]

    async def watch(self) -> AsyncIterator[registry_pb2.WatchModulesResponse]:
        """A snapshot of every module, then each change as it happens."""
        queue: asyncio.Queue[registry_pb2.WatchModulesResponse | None] = asyncio.Queue(
            WATCH_QUEUE_SIZE + 1
        )
        self._watchers.add(queue)
        try:
            for module in await self.list():
                yield registry_pb2.WatchModulesResponse(
                    change=Change.MODULE_CHANGE_SNAPSHOT, module=module
                )
            while (change := await queue.get()) is not None:
                yield change
            raise ResourceExhaustedError(
                f"this watch fell more than {WATCH_QUEUE_SIZE} changes behind and was dropped; "
                "watch again to get a fresh snapshot"
            )
        finally:
            self._watchers.discard(queue)

    def _announce(self, change: int, module: registry_pb2.Module, *, if_new: bool = False) -> None:
        """Tell the watchers; with ``if_new``, only if they have not seen the module in this state.

        A replica announces what it changed at once, what others changed on refresh.
        """
        before = self._seen.get(module.name)
        if change == Change.MODULE_CHANGE_DEREGISTERED:
            self._seen.pop(module.name, None)
            if if_new and before is None:
                return
        else:
            self._seen[module.name] = module
            if if_new and _unchanged(before, module):
                return
        message = registry_pb2.WatchModulesResponse(change=change, module=module)  # type: ignore[arg-type]
        for queue in list(self._watchers):
            if (
                queue.qsize() >= WATCH_QUEUE_SIZE
            ):  # a watcher this far behind is dropped, not waited for
                self._watchers.discard(queue)
                queue.put_nowait(None)  # the one slot kept free: ends its stream with an error
                continue
            queue.put_nowait(message)


def _unchanged(before: registry_pb2.Module | None, after: registry_pb2.Module) -> bool:
    """Whether a watcher would see nothing new: health and lease renewals are not changes."""
    return before is not None and (
        before.version,
        before.endpoint,
        list(before.event_types),
        before.enabled,
        before.alive,
    ) == (after.version, after.endpoint, list(after.event_types), after.enabled, after.alive)


def check_module_name(name: str) -> None:
    """Refuse a module name that no module can have (before any lookup)."""
    if not MODULE_NAME.fullmatch(name):
        raise InvalidArgumentError(f"{name[:64]!r} must match {MODULE_NAME.pattern}", field="name")


def _validate_registration(request: registry_pb2.RegisterRequest) -> None:
    check_module_name(request.name)
    if not request.version:
        raise InvalidArgumentError("required, the module's version", field="version")
    if not _valid_endpoint(request.endpoint):
        raise InvalidArgumentError(
            f"{request.endpoint[:64]!r} must be host:port with a port from 1 to 65535",
            field="endpoint",
        )
    check_event_types(request.event_types, "event_types")
    _check_text(request.version, "version", MAX_VERSION_CHARS)
    if request.HasField("lease"):
        _check_lease(request.lease)


def _check_lease(lease: duration_pb2.Duration) -> None:
    seconds = lease.seconds + lease.nanos / 1e9
    if not (0 <= lease.nanos < 1_000_000_000 and MIN_LEASE_SECONDS <= seconds <= MAX_LEASE_SECONDS):
        raise InvalidArgumentError(
            f"must be from {MIN_LEASE_SECONDS} to {MAX_LEASE_SECONDS} seconds "
            f"(got {lease.seconds} s {lease.nanos} ns)",
            field="lease",
        )


def _validate_heartbeat(request: registry_pb2.HeartbeatRequest) -> None:
    health = request.health
    if health.status not in registry_pb2.HealthStatus.values():
        raise InvalidArgumentError(
            f"unknown health status {health.status}; use a HealthStatus value",
            field="health.status",
        )
    for field, value, limit in (
        ("health.latency_ms", health.latency_ms, MAX_LATENCY_MS),
        ("health.uptime_seconds", health.uptime_seconds, MAX_UPTIME_SECONDS),
    ):
        if not 0 <= value <= limit:  # also refuses NaN
            raise InvalidArgumentError(f"must be from 0 to {limit:g}, got {value!r}", field=field)
    _check_text(health.last_error, "health.last_error", MAX_LAST_ERROR_CHARS)


def _check_text(value: str, field: str, limit: int) -> None:
    if "\x00" in value:
        raise InvalidArgumentError("must not contain NUL characters", field=field)
    if len(value) > limit:
        raise InvalidArgumentError(f"at most {limit} characters, got {len(value)}", field=field)


def _valid_endpoint(endpoint: str) -> bool:
    if len(endpoint) > 255 or not ENDPOINT.fullmatch(endpoint):
        return False
    port = int(endpoint.rpartition(":")[2])
    return 1 <= port <= 65535


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value.astimezone(UTC))
    return stamp


def _module(row: asyncpg.Record) -> registry_pb2.Module:
    expires: datetime = row["lease_expires_at"]
    return registry_pb2.Module(
        name=row["name"],
        version=row["version"],
        endpoint=row["endpoint"],
        event_types=list(row["event_types"]),
        enabled=row["enabled"],
        alive=expires > datetime.now(UTC),
        health=registry_pb2.ModuleHealth(
            status=row["health_status"],
            latency_ms=row["latency_ms"],
            last_error=row["last_error"],
            uptime_seconds=row["uptime_seconds"],
        ),
        registered_at=_timestamp(row["registered_at"]),
        lease_expires_at=_timestamp(expires),
    )


class RegistryService(registry_pb2_grpc.RegistryServiceServicer):
    """gRPC handlers of the registry."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def Register(
        self, request: registry_pb2.RegisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.RegisterResponse:
        """Create or update a module."""
        require_module_identity(caller(), request.name, "name")
        return registry_pb2.RegisterResponse(module=await self._registry.register(request))

    async def Heartbeat(
        self, request: registry_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.HeartbeatResponse:
        """Renew a lease."""
        require_module_identity(caller(), request.name, "name")
        return registry_pb2.HeartbeatResponse(module=await self._registry.heartbeat(request))

    async def Deregister(
        self, request: registry_pb2.DeregisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.DeregisterResponse:
        """Remove a module."""
        check_module_name(request.name)
        await self._registry.deregister(request.name)
        return registry_pb2.DeregisterResponse()

    async def ListModules(
        self, request: registry_pb2.ListModulesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.ListModulesResponse:
        """Every module."""
        return registry_pb2.ListModulesResponse(modules=await self._registry.list())

    async def GetModule(
        self, request: registry_pb2.GetModuleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.GetModuleResponse:
        """One module."""
        check_module_name(request.name)
        return registry_pb2.GetModuleResponse(module=await self._registry.get(request.name))

    async def SetModuleEnabled(
        self,
        request: registry_pb2.SetModuleEnabledRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> registry_pb2.SetModuleEnabledResponse:
        """Enable or disable a module."""
        check_module_name(request.name)
        module = await self._registry.set_enabled(request.name, request.enabled)
        return registry_pb2.SetModuleEnabledResponse(module=module)

    async def WatchModules(
        self, request: registry_pb2.WatchModulesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[registry_pb2.WatchModulesResponse]:
        """Snapshot, then changes."""
        async for change in self._registry.watch():
            yield change
