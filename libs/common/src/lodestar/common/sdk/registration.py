"""Keeps a module registered with core: register, then heartbeat with its health report."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc
from google.protobuf import duration_pb2

from lodestar.common.logging import get_logger
from lodestar.common.module import HealthReport, HealthState
from lodestar.core.v1 import registry_pb2, registry_pb2_grpc

HEALTH_STATUS = {
    HealthState.HEALTHY: registry_pb2.HEALTH_STATUS_HEALTHY,
    HealthState.DEGRADED: registry_pb2.HEALTH_STATUS_DEGRADED,
    HealthState.DOWN: registry_pb2.HEALTH_STATUS_DOWN,
}
MAX_BACKOFF_SECONDS = 10.0
#: How often a starting module reports until its first healthy report, so that core sees the
#: start-up end at once; for at most STARTING_SECONDS, then at the agent's interval.
STARTING_INTERVAL_SECONDS = 0.5
STARTING_SECONDS = 30.0

log = get_logger(__name__)


class ModuleAgent:
    """Registers ``name`` with core and renews its lease until stopped.

    Core unreachable is retried with backoff; a lease core forgot (NOT_FOUND) is registered again.
    ``registered`` is set while core knows the module. Until its first healthy report (for at
    most ``STARTING_SECONDS``) it reports every ``STARTING_INTERVAL_SECONDS``.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        name: str,
        version: str,
        endpoint: str,
        event_types: Sequence[str],
        health: Callable[[], Awaitable[HealthReport]],
        interval_seconds: float = 5.0,
    ) -> None:
        self._stub = registry_pb2_grpc.RegistryServiceStub(channel)
        lease = duration_pb2.Duration()
        lease.FromSeconds(int(interval_seconds * 3) or 1)
        self._registration = registry_pb2.RegisterRequest(
            name=name,
            version=version,
            endpoint=endpoint,
            event_types=list(event_types),
            lease=lease,
        )
        self._health = health
        self._interval = interval_seconds
        self._stopping = asyncio.Event()
        self._starting_until = time.monotonic() + STARTING_SECONDS
        self.registered = asyncio.Event()

    def stop(self) -> None:
        """End ``run`` after the current call."""
        self._stopping.set()

    async def run(self) -> None:
        """Register and heartbeat until ``stop``."""
        backoff = 0.2
        while not self._stopping.is_set():
            try:
                if not self.registered.is_set():
                    await self._stub.Register(self._registration, timeout=5)
                    self.registered.set()
                    log.info("registered with core", module=self._registration.name)
                await self._heartbeat()
                backoff = 0.2
                delay = self._interval
                if time.monotonic() < self._starting_until:
                    delay = min(delay, STARTING_INTERVAL_SECONDS)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    self.registered.clear()
                log.warning(
                    "core registry call failed", code=exc.code().name, details=exc.details()
                )
                delay, backoff = backoff, min(backoff * 2, MAX_BACKOFF_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _heartbeat(self) -> None:
        report = await self._health()
        health = registry_pb2.ModuleHealth(
            status=HEALTH_STATUS[report.status],
            latency_ms=report.latency_ms,
            last_error=report.last_error,
            uptime_seconds=report.uptime_seconds,
        )
        await self._stub.Heartbeat(
            registry_pb2.HeartbeatRequest(name=self._registration.name, health=health), timeout=5
        )
        if report.status is HealthState.HEALTHY:
            self._starting_until = 0.0  # core has heard it: started
