"""Core as a module of the shared runtime: wiring, background upkeep and health."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
from opentelemetry.instrumentation.utils import suppress_instrumentation

from lodestar.common import audit
from lodestar.common.auth import Role
from lodestar.common.db import open_service_database
from lodestar.common.deferred import DeferredServicer
from lodestar.common.logging import get_logger
from lodestar.common.module import HealthReport, HealthState, Module
from lodestar.common.service_cli import ServiceSpec
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc, registry_pb2, registry_pb2_grpc
from lodestar_core.bus import EventBus
from lodestar_core.registry import Registry, RegistryService
from lodestar_core.settings import CoreSettings
from lodestar_core.store import EventStore
from lodestar_core.subscriptions import SubscriptionStore

MIGRATIONS = Path(__file__).parent / "migrations"
BUS = "/lodestar.core.v1.EventBusService/"
REGISTRY = "/lodestar.core.v1.RegistryService/"
MODULE, PUBLISHER = frozenset({Role.MODULE}), frozenset({Role.PUBLISHER, Role.MODULE})

METHOD_ROLES: Mapping[str, frozenset[Role]] = {
    BUS + "Publish": PUBLISHER,
    BUS + "PublishStream": PUBLISHER,
    BUS + "Subscribe": MODULE,
    BUS + "ListSubscriptions": MODULE,
    BUS + "ListDeadLetters": MODULE,
    REGISTRY + "Register": MODULE,
    REGISTRY + "Heartbeat": MODULE,
    REGISTRY + "ListModules": MODULE,
    REGISTRY + "GetModule": MODULE,
    REGISTRY + "WatchModules": MODULE,
    # Deregister, SetModuleEnabled and ReplayDeadLetters are admin only.
    **audit.METHOD_ROLES,  # reading the audit log: admin only
}

log = get_logger(__name__)


class CoreModule(Module):
    """The registry and the event bus, served by the shared runtime."""

    name = "core"
    migrations = MIGRATIONS

    def __init__(self, settings: CoreSettings) -> None:
        super().__init__()
        self.settings = settings
        self._pool: asyncpg.Pool | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_error = ""
        self.store: EventStore | None = None
        self._bus: EventBus | None = None
        self._registry: Registry | None = None
        self._bus_servicer = DeferredServicer(
            bus_pb2.DESCRIPTOR.services_by_name["EventBusService"], "core"
        )
        self._registry_servicer = DeferredServicer(
            registry_pb2.DESCRIPTOR.services_by_name["RegistryService"], "core"
        )
        self._audit_servicer = audit.deferred_servicer("core")

    def add_to_server(self, server: grpc.aio.Server) -> list[str]:
        """Register the bus and registry services (they answer UNAVAILABLE until started)."""
        bus_pb2_grpc.add_EventBusServiceServicer_to_server(self._bus_servicer, server)  # type: ignore[arg-type]
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(self._registry_servicer, server)  # type: ignore[arg-type]
        return [
            "lodestar.core.v1.EventBusService",
            "lodestar.core.v1.RegistryService",
            audit.add_to_server(self._audit_servicer, server),
        ]

    def method_roles(self) -> Mapping[str, frozenset[Role]]:
        """Who may call what."""
        return METHOD_ROLES

    async def start(self) -> None:
        """Connect, migrate, load state and start background upkeep."""
        migrations = MIGRATIONS if self.settings.migrate_on_start else None
        pool = await open_service_database(self.settings.database, migrations)
        try:
            await self._wire(pool)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def _wire(self, pool: asyncpg.Pool) -> None:
        bus_settings = self.settings.bus
        store = EventStore(pool, group_commit_max_events=bus_settings.group_commit_max_events)
        await store.ensure_partitions(
            datetime.now(UTC).date(),
            bus_settings.partitions_ahead_days,
            bus_settings.retention_days,
        )
        await store.start()
        registry = Registry(pool, timedelta(seconds=self.settings.registry.lease_seconds))
        await registry.load()
        bus = EventBus(store, SubscriptionStore(pool), registry, bus_settings)
        registry.on_enabled_changed = bus.wake_module
        self.store, self._bus, self._registry = store, bus, registry
        self._bus_servicer.target = bus
        self._registry_servicer.target = RegistryService(registry)
        self._audit_servicer.target = audit.AuditService(pool)
        self._tasks = [
            self._every(1.0, registry.expire_leases),
            self._every(3600.0, self._maintain_partitions),
            self._every(5.0, bus.describe_subscriptions),
        ]

    def _every(self, seconds: float, job: Callable[[], Awaitable[object]]) -> asyncio.Task[None]:
        async def loop() -> None:
            while True:
                try:
                    with suppress_instrumentation():  # upkeep, not a request: keep traces clean
                        await job()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    self._last_error = str(exc)
                    log.warning("background job failed", job=job.__name__, error=str(exc))
                await asyncio.sleep(seconds)

        return asyncio.create_task(loop(), name=job.__name__)

    async def _maintain_partitions(self) -> None:
        assert self.store is not None
        today = datetime.now(UTC).date()
        bus = self.settings.bus
        created = await self.store.ensure_partitions(
            today, bus.partitions_ahead_days, bus.retention_days
        )
        dropped = await self.store.drop_expired_partitions(today, bus.retention_days)
        if created or dropped:
            log.info("partitions maintained", created=created, dropped=dropped)

    async def stop(self) -> None:
        """Stop background work, the writer and the pool."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.store is not None:
            await self.store.stop()
        if self._pool is not None:
            await self._pool.close()

    async def health_check(self) -> HealthReport:
        """DOWN when the database does not answer."""
        started = time.perf_counter()
        status = HealthState.HEALTHY
        if self._pool is None:
            status, self._last_error = HealthState.DOWN, "not started"
        else:
            try:
                await self._pool.fetchval("SELECT 1", timeout=2.0)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                status, self._last_error = HealthState.DOWN, f"database: {exc}"
        return HealthReport(
            status=status,
            latency_ms=(time.perf_counter() - started) * 1000,
            last_error=self._last_error,
            uptime_seconds=self.uptime_seconds,
        )


SPEC = ServiceSpec(
    name="core", settings_cls=CoreSettings, module_cls=CoreModule, migrations=MIGRATIONS
)
