"""grpc.aio server bootstrap shared by every service.

Health follows the Kubernetes probes: ``liveness`` is SERVING while the process runs, ``readiness``
(and the overall "" service) only while the module's dependencies are reachable. On SIGTERM every
health service turns NOT_SERVING, in-flight calls drain for the grace period, the server stops,
the module releases its resources and telemetry is flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.utils import suppress_instrumentation
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from lodestar.common.auth import AuthInterceptor, CredentialsFile, check_method_roles
from lodestar.common.config import ServiceSettings
from lodestar.common.errors import ConfigurationError, NetworkError, StorageError
from lodestar.common.interceptors import default_server_interceptors
from lodestar.common.logging import get_logger
from lodestar.common.metrics import start_metrics_server
from lodestar.common.module import HealthState, Module
from lodestar.common.ratelimit import RateLimiter
from lodestar.common.telemetry import Telemetry, configure_telemetry, server_interceptors

LIVENESS = "liveness"
READINESS = "readiness"
#: SERVING while a module reaches core; a module without core stays ready (DEGRADED).
CORE_LINK = "core"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_INTERVAL_SECONDS = 1.0
#: Calls grpc-core holds before the application takes them (its default cancels beyond 1,000).
MAX_PENDING_CALLS = 100_000

log = get_logger(__name__)


@dataclass
class RunningServer:
    """Addresses of a started service, for callers that started it with port 0."""

    port: int
    metrics_port: int | None
    health_port: int | None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Channel arguments: message size, keepalive and maximum connection age."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.shutdown_grace_seconds * 1000)),
        # grpc-core cancels calls at random (CANCELLED, unseen by any handler) once more than
        # 1,000 wait for the application; they wait instead, and handlers shed load themselves
        # with RESOURCE_EXHAUSTED and a retry delay (ADR 0009).
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
    ]


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS when a client CA is configured) server credentials, or None."""
    tls = settings.tls
    if not tls.enabled:
        return None
    assert tls.cert_file is not None
    assert tls.key_file is not None
    try:
        key, cert = tls.key_file.read_bytes(), tls.cert_file.read_bytes()
        client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    except OSError as exc:
        raise ConfigurationError(f"cannot read TLS file: {exc}", field="tls") from exc
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class ServiceRunner:
    """Serves one module until it is asked to stop."""

    def __init__(self, module: Module, settings: ServiceSettings) -> None:
        self.module = module
        self.settings = settings
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._service_names: list[str] = []
        self._stop = asyncio.Event()
        self._telemetry: Telemetry | None = None
        self._servers: list[grpc.aio.Server] = []
        self._fatal: Exception | None = None

    async def run(
        self,
        on_started: Callable[[RunningServer], Awaitable[None]] | None = None,
        *,
        handle_signals: bool = True,
    ) -> None:
        """Start, serve until SIGTERM/SIGINT or ``request_stop``, then shut down gracefully."""
        self._telemetry = configure_telemetry(self.module.name)
        credentials = self._credentials()
        server = grpc.aio.server(
            interceptors=[
                *server_interceptors(),
                *default_server_interceptors(),
                AuthInterceptor(
                    credentials,
                    self.module.method_roles(),
                    RateLimiter(self.settings.rate_limits),
                ),
            ],
            options=server_options(self.settings),
        )
        self._servers.append(server)
        self._service_names = self.module.add_to_server(server)
        check_method_roles(self.module.method_roles(), self._service_names)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        await self._set_readiness(NOT_SERVING)
        await self.health.set(LIVENESS, SERVING)
        port = self._bind(server, self.settings.port, server_credentials(self.settings))
        health_port = await self._start_health_listener()
        await server.start()
        metrics_port = start_metrics_server(self.settings.metrics_host, self.settings.metrics_port)
        running = RunningServer(port=port, metrics_port=metrics_port, health_port=health_port)
        log.info("listening", port=port, metrics_port=metrics_port, health_port=health_port)
        if handle_signals:
            self._install_signal_handlers()
        if on_started is not None:
            await on_started(running)
        watcher = asyncio.create_task(self._watch_health(), name="health-watcher")
        try:
            await self._stop.wait()
        finally:
            await self._shutdown(watcher)
            running.stopped.set()
        if self._fatal is not None:
            raise self._fatal

    def request_stop(self) -> None:
        """Begin a graceful shutdown."""
        self._stop.set()

    def _credentials(self) -> CredentialsFile:
        path = self.settings.credentials_file
        if path is None:
            raise ConfigurationError(
                "every RPC needs a credential, but no credentials file is configured; set "
                "LODESTAR_CREDENTIALS_FILE (or credentials_file in config), or use `lodestar up`, "
                "which creates local development credentials",
                field="credentials_file",
            )
        return CredentialsFile(path)

    def _bind(
        self, server: grpc.aio.Server, port: int, creds: grpc.ServerCredentials | None
    ) -> int:
        address = f"{self.settings.host}:{port}"
        bound = (
            server.add_secure_port(address, creds)
            if creds is not None
            else server.add_insecure_port(address)
        )
        if bound == 0:
            raise ConfigurationError(f"cannot listen on {address}", field="port")
        return bound

    async def _start_health_listener(self) -> int | None:
        """A plaintext health-only port for kubelet probes when the main port uses TLS."""
        if self.settings.health_port < 0:
            return None
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        port = self._bind(server, self.settings.health_port, None)
        await server.start()
        self._servers.append(server)
        return port

    async def _set_readiness(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in ("", READINESS, *self._service_names):
            await self.health.set(name, status)

    async def _watch_health(self) -> None:
        """Start the module (retrying while dependencies are away), then track its health."""
        try:
            await self._start_module()
        except Exception as exc:
            log.error("module cannot start", error=str(exc))
            self._fatal = exc
            self._stop.set()
            return
        log.info("module started", module=self.module.name)
        ready: bool | None = None
        reaches_core: bool | None = None
        while not self._stop.is_set():
            with suppress_instrumentation():  # health checks are never traced
                report = await self.module.health_check()
            now_ready = report.status is not HealthState.DOWN
            if now_ready != ready:
                await self._set_readiness(SERVING if now_ready else NOT_SERVING)
                log.info("readiness changed", ready=now_ready, last_error=report.last_error)
                ready = now_ready
            if report.reaches_core is not None and report.reaches_core != reaches_core:
                reaches_core = report.reaches_core
                await self.health.set(CORE_LINK, SERVING if reaches_core else NOT_SERVING)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), HEALTH_INTERVAL_SECONDS)

    async def _start_module(self) -> None:
        """Start the module, retrying with backoff while its dependencies are unreachable."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((StorageError, NetworkError, OSError)),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
        ):
            with attempt:
                try:
                    await self.module.start()
                except (StorageError, NetworkError, OSError) as exc:
                    log.warning("dependencies not ready; retrying", error=str(exc))
                    raise

    async def _shutdown(self, watcher: asyncio.Task[None]) -> None:
        log.info("shutting down", grace_seconds=self.settings.shutdown_grace_seconds)
        await self.health.enter_graceful_shutdown()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await asyncio.gather(*(s.stop(self.settings.shutdown_grace_seconds) for s in self._servers))
        try:
            await self.module.stop()
        finally:
            if self._telemetry is not None:
                self._telemetry.shutdown()
            log.info("stopped")

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):  # not the main thread
                return
