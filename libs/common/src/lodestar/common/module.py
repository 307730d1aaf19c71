"""The module contract every Lodestar service implements."""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import ClassVar

import grpc

from lodestar.common.auth import Role
from lodestar.common.errors import ConfigurationError


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
    #: Whether the module reaches core (registered, channel up); None without a link to core
    #: (core itself).
    reaches_core: bool | None = None


@dataclass(frozen=True)
class ModuleInfo:
    """The one declaration of a service's identity: its name, version source and migrations.

    Everything else (config file, schema default, registration with core, the ``migrate``
    command, logs) reads these.
    """

    #: Short name: config file ``config/modules/<name>.yaml``, logs, registration, token key.
    name: str
    #: Folder of the module's SQL migrations, or None when it keeps no state.
    migrations: Path | None = None
    #: The installed distribution whose metadata gives the version; default ``lodestar-<name>``.
    distribution: str = ""

    @property
    def version(self) -> str:
        """The distribution's version, from the installed package metadata."""
        distribution = self.distribution or f"lodestar-{self.name}"
        try:
            return version(distribution)
        except PackageNotFoundError:
            raise ConfigurationError(
                f"module {self.name!r}: distribution {distribution!r} is not installed, so its "
                "version is unknown; install the package (make bootstrap) or set distribution"
            ) from None


class Module(abc.ABC):
    """A service the shared runtime can serve: start, stop, report health, register handlers.

    A service declares ``info`` (a ModuleInfo); ``name`` and ``migrations`` are taken from it.
    """

    #: Name, version and migrations, declared once.
    info: ClassVar[ModuleInfo]
    #: ``info.name`` (or set directly by a module without an ``info``).
    name: ClassVar[str]
    #: ``info.migrations``: folder of the module's SQL migrations, or None.
    migrations: ClassVar[Path | None] = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Take ``name`` and ``migrations`` from the class's ``info`` when it declares one."""
        super().__init_subclass__(**kwargs)
        info = cls.__dict__.get("info")
        if isinstance(info, ModuleInfo):
            cls.name, cls.migrations = info.name, info.migrations

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
