"""health-monitor as a module of the shared runtime: its declaration and wiring; no API yet.

It opens its schema (applying its migrations), registers with core and reports health through the
shared lifecycle (lodestar.common.lifecycle); its behaviour comes in its own issue.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import asyncpg
import grpc

from lodestar.common.auth import Role
from lodestar.common.lifecycle import ServiceModule
from lodestar.common.module import ModuleInfo
from lodestar.common.service_cli import ServiceSpec
from lodestar_health.settings import HealthMonitorSettings

MIGRATIONS = Path(__file__).parent / "migrations"


class HealthMonitorModule(ServiceModule[HealthMonitorSettings]):
    """health-monitor: registered with core and healthy; no RPCs of its own yet."""

    info = ModuleInfo(name="health-monitor", migrations=MIGRATIONS)

    def add_to_server(self, server: grpc.aio.Server) -> list[str]:
        """No gRPC services of its own yet (health and reflection come from the runtime)."""
        return []

    def method_roles(self) -> Mapping[str, frozenset[Role]]:
        """No RPCs, so no roles."""
        return {}

    async def wire(self, pool: asyncpg.Pool) -> None:
        """Register with core (kept alive until stop)."""
        self.link_to_core()


SPEC = ServiceSpec(HealthMonitorModule, HealthMonitorSettings)
