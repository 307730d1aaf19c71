"""Core as a module of the shared runtime: wiring, background upkeep and health."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc

from lodestar.common import audit
from lodestar.common.auth import Role
from lodestar.common.deferred import DeferredServicer
from lodestar.common.errors import DATABASE_UNREACHABLE
from lodestar.common.lifecycle import ServiceModule
from lodestar.common.logging import get_logger
from lodestar.common.module import ModuleInfo
from lodestar.common.service_cli import ServiceSpec
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc, registry_pb2, registry_pb2_grpc
from lodestar_core.bus import EventBus
from lodestar_core.registry import Registry, RegistryService
from lodestar_core.replicas import ReplicaPresence
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
    BUS + "DeleteSubscription": MODULE,
    REGISTRY + "Register": MODULE,
    REGISTRY + "Heartbeat": MODULE,
    REGISTRY + "ListModules": MODULE,
    REGISTRY + "GetModule": MODULE,
    REGISTRY + "WatchModules": MODULE,
    # Deregister, SetModuleEnabled and ReplayDeadLetters are admin only.
    **audit.METHOD_ROLES,  # reading the audit log: admin only
}

log = get_logger(__name__)


class CoreModule(ServiceModule[CoreSettings]):
    """The registry and the event bus, served by the shared runtime."""

    info = ModuleInfo(name="core", migrations=MIGRATIONS)

    def __init__(self, settings: CoreSettings) -> None:
        super().__init__(settings)
        self.store: EventStore | None = None
        self.presence: ReplicaPresence | None = None
        self.bus: EventBus | None = None
        self._bus_servicer = DeferredServicer(
            bus_pb2.DESCRIPTOR.services_by_name["EventBusService"], self.name
        )
        self._registry_servicer = DeferredServicer(
            registry_pb2.DESCRIPTOR.services_by_name["RegistryService"], self.name
        )
        self._audit_servicer = audit.deferred_servicer(self.name)

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

    async def wire(self, pool: asyncpg.Pool) -> None:
        """Load the log's partitions and the registry, then start the writer and the upkeep."""
        bus_settings = self.settings.bus
        store = EventStore(pool, group_commit_max_events=bus_settings.group_commit_max_events)
        await store.ensure_partitions(
            datetime.now(UTC).date(),
            bus_settings.partitions_ahead_days,
            bus_settings.retention_days,
        )
        await store.start()
        self.store = store
        registry = Registry(pool, timedelta(seconds=self.settings.registry.lease_seconds))
        await registry.load()
        presence = ReplicaPresence(
            pool, bus_settings.replica_heartbeat_seconds, bus_settings.takeover_after_seconds
        )
        await presence.heartbeat()
        self.presence = presence
        bus = EventBus(store, SubscriptionStore(pool), registry, bus_settings, presence)
        self.bus = bus
        registry.on_enabled_changed = bus.wake_module
        self._bus_servicer.target = bus
        self._registry_servicer.target = RegistryService(registry)
        self._audit_servicer.target = audit.AuditService(pool)
        self.tasks.every(1.0, registry.expire_leases)
        self.tasks.every(3600.0, self._maintain_partitions)
        self.tasks.every(5.0, bus.describe_subscriptions)
        self.tasks.every(bus_settings.replica_heartbeat_seconds, presence.heartbeat)
        self.tasks.every(bus_settings.head_poll_seconds, bus.follow_other_replicas)
        self.tasks.every(1.0, registry.refresh)

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

    async def release(self) -> None:
        """Stop the log writer (flushing what it holds) and leave the replicas."""
        if self.bus is not None:
            await self.bus.drain()
        if self.store is not None:
            await self.store.stop()
        if self.presence is not None:
            try:
                await self.presence.leave()
            except DATABASE_UNREACHABLE as exc:  # its holds then lapse after the takeover time
                log.warning("cannot leave the replicas", error=str(exc))


SPEC = ServiceSpec(CoreModule, CoreSettings)
