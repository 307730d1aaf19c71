"""The module contract every Lodestar service implements."""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import ClassVar

import grpc

from lodestar.common.auth import Role


class HealthState(StrEnum):
    """Coarse health: healthy serves normally, degraded serves with reduced guarantees."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"


@dataclass(frozen=True)
class HealthReport:
    """What ``health_check`` returns."""

    status: HealthState
    latency_ms: float
    last_error: str
    uptime_seconds: float


class Module(abc.ABC):
    """A service the shared runtime can serve: start, stop, report health, register handlers."""

    #: Short name, used for config files (``config/modules/<name>.yaml``) and logs.
    name: ClassVar[str]
    #: Folder of the module's SQL migrations, or None when it keeps no state.
    migrations: ClassVar[Path | None] = None

    def __init__(self) -> None:
        self._started_at = time.monotonic()

    @property
    def uptime_seconds(self) -> float:
        """Seconds since the module object was created."""
        return time.monotonic() - self._started_at

    @abc.abstractmethod
    def add_to_server(self, server: grpc.aio.Server) -> list[str]:
        """Register the gRPC servicers; returns their full service names."""

    @abc.abstractmethod
    def method_roles(self) -> Mapping[str, frozenset[Role]]:
        """The roles allowed on each full method name (admin is always allowed)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect to dependencies; raises StorageError or NetworkError while they are away."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release every resource; called once, after the server stopped taking calls."""

    @abc.abstractmethod
    async def health_check(self) -> HealthReport:
        """Current health; DOWN makes the readiness probe fail."""
