"""The lifecycle every service shares, written once.

It covers background tasks that survive their failures, the database and core links, and
readiness derived from them.

A service subclasses ``ServiceModule``, declares its ``info`` (name, migrations; the version comes
from package metadata) and implements ``wire`` (build its parts on the open database, schedule its
jobs). The base opens the service's schema (applying ``info.migrations`` when the settings say
so), optionally registers with core, reports health and releases everything on ``stop``.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import asyncpg
import grpc
from opentelemetry.instrumentation.utils import suppress_instrumentation

from lodestar.common.config import ServiceSettings
from lodestar.common.db import open_service_database
from lodestar.common.errors import LodestarError
from lodestar.common.logging import get_logger
from lodestar.common.module import HealthReport, HealthState, Module, ModuleInfo
from lodestar.common.sdk import ModuleAgent, connect

#: Failures a background job is expected to meet now and then: a dependency away for a while.
EXPECTED_FAILURES: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    LodestarError,
)
#: How long a long-running task gets to finish its current call on stop before it is cancelled.
STOP_WAIT_SECONDS = 2.0
#: How long the readiness check waits for the database to answer.
DATABASE_CHECK_SECONDS = 2.0

S = TypeVar("S", bound=ServiceSettings)

log = get_logger(__name__)


@dataclass
class _LongRunning:
    task: asyncio.Task[None]
    stop: Callable[[], None] | None


class BackgroundTasks:
    """A service's background work: periodic jobs and long-running tasks, stopped together.

    A periodic job that raises is logged with its name and called again at its next turn; the
    failure is kept as ``last_error`` for the health report. Jobs run outside any trace.
    """

    def __init__(self) -> None:
        self.last_error = ""
        self._periodic: list[asyncio.Task[None]] = []
        self._long_running: list[_LongRunning] = []

    def every(
        self, seconds: float, job: Callable[[], Awaitable[object]], *, name: str = ""
    ) -> None:
        """Call ``job`` now and then every ``seconds`` after it returns, until ``stop``."""
        name = name or getattr(job, "__name__", "job")
        task = asyncio.create_task(self._repeat(seconds, job, name), name=name)
        self._periodic.append(task)

    def keep_running(
        self, name: str, run: Awaitable[None], stop: Callable[[], None] | None = None
    ) -> None:
        """Run ``run`` (traced as usual) until it ends.

        On ``stop`` it is asked to end through ``stop`` and cancelled if still running after the
        wait; without ``stop``, cancelled.
        """
        task = asyncio.create_task(self._supervise(name, run), name=name)
        self._long_running.append(_LongRunning(task, stop))

    async def stop(self, wait_seconds: float = STOP_WAIT_SECONDS) -> None:
        """Cancel the periodic jobs and end the long-running tasks; returns once all have ended.

        Long-running tasks are asked to end; those still running after ``wait_seconds`` are
        cancelled.
        """
        for job in self._periodic:
            job.cancel()
        for entry in self._long_running:
            if entry.stop is not None:
                entry.stop()
            else:
                entry.task.cancel()
        running = [entry.task for entry in self._long_running]
        if running:
            _, waiting = await asyncio.wait(running, timeout=wait_seconds)
            for task in waiting:
                task.cancel()
        await asyncio.gather(*self._periodic, *running, return_exceptions=True)
        self._periodic, self._long_running = [], []

    async def _repeat(
        self, seconds: float, job: Callable[[], Awaitable[object]], name: str
    ) -> None:
        while True:
            try:
                with suppress_instrumentation():  # upkeep, not a request: keep traces clean
                    await job()
            except Exception as exc:
                self._failed(name, exc)
            await asyncio.sleep(seconds)

    async def _supervise(self, name: str, run: Awaitable[None]) -> None:
        try:
            await run
        except Exception as exc:
            self._failed(name, exc)

    def _failed(self, name: str, exc: Exception) -> None:
        self.last_error = f"{name}: {exc}"
        if isinstance(exc, EXPECTED_FAILURES):
            log.warning("background job failed", job=name, error=str(exc))
        else:
            log.error("background job crashed", job=name, error=str(exc), exc_info=exc)


async def database_error(pool: asyncpg.Pool | None) -> str | None:
    """Why the database cannot serve this service right now, or None when it answers."""
    if pool is None:
        return "not started"
    try:
        await pool.fetchval("SELECT 1", timeout=DATABASE_CHECK_SECONDS)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"database: {exc}"
    return None


class CoreLink:
    """A module's channel to core and its registration there (name and version from its info).

    The registration is renewed by a ModuleAgent for as long as the module runs.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        info: ModuleInfo,
        health: Callable[[], Awaitable[HealthReport]],
        event_types: Sequence[str] = (),
    ) -> None:
        token = settings.token.get_secret_value() if settings.token else None
        self.channel: grpc.aio.Channel = connect(settings.core_endpoint, token)
        self.agent = ModuleAgent(
            self.channel,
            name=info.name,
            version=info.version,
            endpoint=f"{settings.host}:{settings.port}",
            event_types=list(event_types),
            health=health,
        )

    def problem(self) -> str | None:
        """Why core is not reached right now, or None.

        The reason is that the module is not registered, or that the channel is not connected.
        """
        if not self.agent.registered.is_set():
            return "not registered with core"
        state = self.channel.get_state()
        if state is not grpc.ChannelConnectivity.READY:
            return f"core unreachable (channel {state.name})"
        return None

    async def close(self) -> None:
        """Close the channel (stop the agent through the module's tasks first)."""
        await self.channel.close(None)


class ServiceModule(Module, Generic[S]):
    """A module with its own database schema, background tasks and, optionally, a link to core.

    Readiness: DOWN while the database does not answer (the probe fails), DEGRADED while core is
    not reached (``core_problem``), HEALTHY otherwise.
    """

    def __init__(self, settings: S) -> None:
        super().__init__()
        self.settings = settings
        self.pool: asyncpg.Pool | None = None
        self.tasks = BackgroundTasks()
        self.core: CoreLink | None = None

    @abc.abstractmethod
    async def wire(self, pool: asyncpg.Pool) -> None:
        """Build the module's parts on the open database and schedule its background work.

        Raising closes the pool again; the runner retries StorageError and NetworkError.
        """

    async def release(self) -> None:
        """Release the module's own parts.

        Called on stop after the background tasks ended and before the core link and the pool
        close, and when ``wire`` failed (so it must cope with parts never built).
        """

    async def start(self) -> None:
        """Open the service's schema (migrating it first when configured), then ``wire``."""
        migrations = self.migrations if self.settings.migrate_on_start else None
        pool = await open_service_database(self.settings.database, migrations)
        try:
            await self.wire(pool)
        except BaseException:
            await self._release_all(pool)
            raise
        self.pool = pool

    def link_to_core(self, event_types: Sequence[str] = ()) -> CoreLink:
        """Register with core and keep the registration alive until stop."""
        self.core = CoreLink(self.settings, self.info, self.health_check, event_types)
        agent = self.core.agent
        self.tasks.keep_running("module-agent", agent.run(), agent.stop)
        return self.core

    async def stop(self) -> None:
        """Stop background work, then the module's parts, the core link and the pool."""
        await self._release_all(self.pool)

    async def _release_all(self, pool: asyncpg.Pool | None) -> None:
        await self.tasks.stop()
        try:
            await self.release()
        finally:
            if self.core is not None:
                await self.core.close()
                self.core = None
            if pool is not None:
                await pool.close()
                self.pool = None

    def core_problem(self) -> str | None:
        """Why core is not reached, or None; a module may narrow this (e.g. its subscription)."""
        return self.core.problem() if self.core is not None else None

    async def health_check(self) -> HealthReport:
        """DOWN without the database, DEGRADED without core, else HEALTHY."""
        started = time.perf_counter()
        status, error = HealthState.HEALTHY, self.tasks.last_error
        problem = await database_error(self.pool)
        if problem is not None:
            status, error = HealthState.DOWN, problem
        elif (problem := self.core_problem()) is not None:
            status, error = HealthState.DEGRADED, problem
        return HealthReport(
            status=status,
            latency_ms=(time.perf_counter() - started) * 1000,
            last_error=error,
            uptime_seconds=self.uptime_seconds,
            reaches_core=None if self.core is None else self.core.problem() is None,
        )
