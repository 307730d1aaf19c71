"""Every installed Lodestar service, running in-process, for the fuzz suite.

The services are found the way ``lodestar up`` finds them (the ``lodestar.services`` entry
points), and each one's gRPC services are what its module's ``add_to_server`` returns, so a new
service or RPC is fuzzed without touching this suite. They run in an event loop on a thread of
their own; the (synchronous) hypothesis tests submit client coroutines to that loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import Counter
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr

from lodestar.common.auth import Role, new_token, token_metadata, write_credentials
from lodestar.common.cli import free_port, installed_services
from lodestar.common.config import DatabaseSettings, ServiceSettings
from lodestar.common.logging import configure_logging
from lodestar.common.module import Module
from lodestar.common.server import LIVENESS, READINESS, RunningServer, ServiceRunner

T = TypeVar("T")
START_SECONDS = 60.0
#: Most a call may take; longer counts as a hang.
CALL_SECONDS = 10.0
#: A server stream (unary request) still open this long after its last message is alive (a
#: watch), not hung.
STREAM_IDLE_SECONDS = 0.1
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class Rpc:
    """One RPC of one service, as served by one installed module."""

    module: str
    service: str
    method: str

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    @property
    def descriptor(self) -> MethodDescriptor:
        found: MethodDescriptor = (
            descriptor_pool.Default().FindServiceByName(self.service).methods_by_name[self.method]
        )
        return found

    def __str__(self) -> str:
        return f"{self.module}:{self.service.rpartition('.')[2]}.{self.method}"


class _Recorder:
    """Stands in for a grpc.aio server, to learn what a module's ``add_to_server`` registers."""

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored."""

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        """Ignored."""


def declared_services() -> dict[str, list[str]]:
    """The gRPC services of every installed module, by module name (core first)."""
    found = {}
    for name, spec in installed_services().items():
        module = spec.module_cls(spec.settings_cls())
        found[name] = list(module.add_to_server(_Recorder()))  # type: ignore[arg-type]
    return found


#: Services the shared runtime adds to every server (health probes, reflection).
RUNTIME_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")


def declared_rpcs() -> list[Rpc]:
    """Every RPC of every service of every installed module, the runtime's own included."""
    rpcs = []
    for module, services in declared_services().items():
        for service in [*services, *RUNTIME_SERVICES]:
            descriptor = descriptor_pool.Default().FindServiceByName(service)
            rpcs += [Rpc(module, service, m.name) for m in descriptor.methods]
    return rpcs


@dataclass
class Outcome:
    """How a call ended."""

    code: grpc.StatusCode
    details: str
    responses: list[bytes] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)

    def describe(self) -> str:
        errors = "\n".join(self.server_errors) or "(no server error logged)"
        return f"{self.code.name}: {self.details!r} after {len(self.responses)} responses\n{errors}"


@dataclass
class Served:
    """One module serving on 127.0.0.1."""

    name: str
    settings: ServiceSettings
    module: Module
    runner: ServiceRunner
    server: RunningServer
    task: asyncio.Task[None]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def schema(self) -> str:
        return self.settings.database.schema_name


class ErrorLog(logging.Handler):
    """Collects what the servers log about failures: errors with their tracebacks, and the
    events a service's subscriber refused (nacked)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        self.nacks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = json.loads(self.format(record))
        except Exception:
            fields = {"event": record.getMessage()}
        if not isinstance(fields, dict):
            fields = {"event": str(fields)}
        event = str(fields.get("event", ""))
        if event.startswith("handler failed"):
            self.nacks.append(
                f"{fields.get('service', '')} seq {fields.get('seq')}: {fields.get('error')}"
            )
        elif record.levelno >= logging.ERROR:
            detail = fields.get("exception") or fields.get("error") or ""
            self.lines.append(f"{event} {fields.get('grpc_method', '')}\n{detail}".strip())

    def drain(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


class Suite:
    """The running services, their tokens and a database connection to count their rows."""

    def __init__(self, database_url: str, workdir: Path, prefix: str) -> None:
        self.database_url = database_url
        self.workdir = workdir
        self.prefix = prefix
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-servers")
        self.served: dict[str, Served] = {}
        self.tokens: dict[str, str] = {}
        self.errors = ErrorLog()
        #: Calls made, by RPC and the status code they ended with.
        self.calls: Counter[tuple[str, str]] = Counter()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._sync_channels: dict[str, grpc.Channel] = {}
        self._pool: asyncpg.Pool | None = None

    # --- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self.run(self._start(), START_SECONDS * 3)

    def stop(self) -> None:
        try:
            self.run(self._stop(), START_SECONDS)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = CALL_SECONDS * 3) -> T:
        """Run ``coroutine`` on the servers' loop and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    async def _start(self) -> None:
        credentials = self.workdir / "credentials.yaml"
        principals = {f"fuzz-{role.value}": (role, new_token()) for role in Role}
        services = installed_services()
        principals |= {name: (Role.MODULE, new_token()) for name in services}
        write_credentials(credentials, principals)
        self.tokens = {name: token for name, (_role, token) in principals.items()}
        core_target = ""
        for name, spec in services.items():
            settings = spec.settings_cls.model_validate(
                {
                    "port": free_port(),
                    "metrics_port": -1,
                    "credentials_file": credentials,
                    "shutdown_grace_seconds": 1.0,
                    "core_endpoint": core_target or "127.0.0.1:1",
                    "token": SecretStr(self.tokens[name]),
                    "spool_dir": self.workdir / name / "spool",
                    "database": DatabaseSettings(
                        url=SecretStr(self.database_url),
                        schema_name=f"{self.prefix}_{name.replace('-', '_')}",
                    ),
                }
            )
            served = await _serve(name, spec.module_cls(settings), settings)
            self.served[name] = served
            core_target = core_target or served.target
        self._pool = await asyncpg.create_pool(self.database_url, min_size=1, max_size=2)

    async def _stop(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        for sync_channel in self._sync_channels.values():
            sync_channel.close()
        if self._pool is not None:
            await self._pool.close()
        for served in reversed(self.served.values()):
            served.runner.request_stop()
            await asyncio.gather(served.task, return_exceptions=True)
        current = asyncio.current_task()
        leftovers = [t for t in asyncio.all_tasks() if t is not current]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    # --- calls -----------------------------------------------------------------------------------

    def channel(self, target: str) -> grpc.aio.Channel:
        """One plaintext channel per target, created in the servers' loop."""
        if target not in self._channels:
            self._channels[target] = grpc.aio.insecure_channel(
                target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
            )
        return self._channels[target]

    def call(self, rpc: Rpc, requests: list[bytes], token: str) -> Outcome:
        """Send ``requests`` (encoded) to ``rpc``; how it ended, with the errors servers logged."""
        self.errors.drain()
        outcome = self.run(self._call(rpc, requests, token))
        outcome.server_errors = self.errors.drain()
        self.calls[(str(rpc), outcome.code.name)] += 1
        return outcome

    async def _call(self, rpc: Rpc, requests: list[bytes], token: str) -> Outcome:
        target = self.served[rpc.module].target
        method = rpc.descriptor
        if method.client_streaming:
            # A grpc.aio client that is still writing when the server ends the call reports
            # INTERNAL "Internal error from Core" instead of the server's status
            # (grpc/grpc#36066); the synchronous client reports what the server sent.
            return await asyncio.to_thread(self._stream_call, rpc, requests, token)
        channel = self.channel(target)
        metadata = token_metadata(token)
        try:
            if not method.server_streaming:
                reply = await channel.unary_unary(rpc.path)(
                    requests[0], metadata=metadata, timeout=CALL_SECONDS
                )
                return Outcome(grpc.StatusCode.OK, "", [reply])
            call = channel.unary_stream(rpc.path)(
                requests[0], metadata=metadata, timeout=CALL_SECONDS
            )
            return await _drain(call)
        except grpc.aio.AioRpcError as exc:
            return Outcome(exc.code(), str(exc.details()))

    def _stream_call(self, rpc: Rpc, requests: list[bytes], token: str) -> Outcome:
        """A client-streaming call through a synchronous channel (on a worker thread)."""
        target = self.served[rpc.module].target
        if target not in self._sync_channels:
            self._sync_channels[target] = grpc.insecure_channel(target)
        channel = self._sync_channels[target]
        metadata = token_metadata(token)
        try:
            if not rpc.descriptor.server_streaming:
                reply = channel.stream_unary(rpc.path)(
                    iter(requests), metadata=metadata, timeout=CALL_SECONDS
                )
                return Outcome(grpc.StatusCode.OK, "", [reply])
        except grpc.RpcError as exc:
            return Outcome(exc.code(), str(exc.details()))
        call = channel.stream_stream(rpc.path)(
            iter(requests), metadata=metadata, timeout=CALL_SECONDS
        )
        return _drain_sync(call)

    # --- what the servers hold and say -----------------------------------------------------------

    def fingerprint(self, module: str) -> dict[str, int]:
        """Rows per table in ``module``'s schema."""
        return self.run(self._fingerprint(self.served[module].schema))

    async def _fingerprint(self, schema: str) -> dict[str, int]:
        assert self._pool is not None
        tables = await self._pool.fetch(
            """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
               ORDER BY 1""",
            schema,
        )
        if not tables:
            return {}
        query = " UNION ALL ".join(
            f'SELECT \'{t["relname"]}\', count(*) FROM "{schema}"."{t["relname"]}"' for t in tables
        )
        return {row[0]: row[1] for row in await self._pool.fetch(query)}

    def execute(self, statement: str) -> None:
        """Run one SQL statement (test set-up only)."""
        self.run(self._execute(statement))

    async def _execute(self, statement: str) -> None:
        assert self._pool is not None
        await self._pool.execute(statement)

    def health(self) -> dict[str, dict[str, str]]:
        """Liveness and readiness of every module, as its health service reports them."""
        return self.run(self._health())

    async def _health(self) -> dict[str, dict[str, str]]:
        report = {}
        for name, served in self.served.items():
            stub = health_pb2_grpc.HealthStub(self.channel(served.target))
            report[name] = {}
            for probe in (LIVENESS, READINESS):
                try:
                    reply = await stub.Check(
                        health_pb2.HealthCheckRequest(service=probe), timeout=CALL_SECONDS
                    )
                    report[name][probe] = health_pb2.HealthCheckResponse.ServingStatus.Name(
                        reply.status
                    )
                except grpc.aio.AioRpcError as exc:
                    report[name][probe] = exc.code().name
        return report

    def reflected_services(self, module: str) -> list[str]:
        """The services ``module``'s server lists through reflection."""
        return self.run(self._reflected(self.served[module].target))

    async def _reflected(self, target: str) -> list[str]:
        stub = reflection_pb2_grpc.ServerReflectionStub(self.channel(target))
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request]), timeout=CALL_SECONDS):
            return [s.name for s in reply.list_services_response.service]
        return []


async def _drain(call: Any) -> Outcome:
    """Read a response stream until it ends; one still open but quiet is alive, not hung."""
    responses: list[bytes] = []
    iterator = call.__aiter__()
    while True:
        wait = CALL_SECONDS if not responses else STREAM_IDLE_SECONDS
        try:
            responses.append(await asyncio.wait_for(iterator.__anext__(), wait))
        except StopAsyncIteration:
            return Outcome(grpc.StatusCode.OK, "", responses)
        except TimeoutError:
            call.cancel()
            if not responses:
                return Outcome(grpc.StatusCode.DEADLINE_EXCEEDED, "no response: hung")
            return Outcome(grpc.StatusCode.OK, "still streaming", responses)
        except grpc.aio.AioRpcError as exc:
            return Outcome(exc.code(), str(exc.details()), responses)


def _drain_sync(call: Any) -> Outcome:
    """Read a response stream to its end. The client has sent all it had, so the server must end
    the call too: one that does not ends at the call's deadline, a hang."""
    responses: list[bytes] = []
    try:
        responses.extend(call)
    except grpc.RpcError as exc:
        return Outcome(exc.code(), str(exc.details()), responses)
    return Outcome(grpc.StatusCode.OK, "", responses)


async def _serve(name: str, module: Module, settings: ServiceSettings) -> Served:
    runner = ServiceRunner(module, settings)
    started: asyncio.Future[RunningServer] = asyncio.get_running_loop().create_future()

    async def on_started(server: RunningServer) -> None:
        started.set_result(server)

    task = asyncio.create_task(runner.run(on_started, handle_signals=False))
    done, _ = await asyncio.wait(
        {started, task}, timeout=START_SECONDS, return_when="FIRST_COMPLETED"
    )
    if task in done:
        task.result()
    server = started.result()
    served = Served(name, settings, module, runner, server, task)
    await _wait_ready(served.target)
    return served


async def _wait_ready(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = asyncio.get_running_loop().time() + START_SECONDS
        while asyncio.get_running_loop().time() < deadline:
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=READINESS), timeout=1
                )
                if reply.status == SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{target} not ready after {START_SECONDS}s")


#: Loggers of the services and the libraries under them.
SERVICE_LOGGERS = ("lodestar", "lodestar_core", "lodestar_usage", "grpc", "asyncpg")


@contextmanager
def server_errors_logged(errors: ErrorLog) -> Iterator[None]:
    """Route the services' logs through the standard library, their errors into ``errors`` only.

    Refused calls are expected here, so the services' own error lines are collected for the
    failure messages instead of being printed (or captured by pytest) thousands at a time.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure_logging("fuzz", level="WARNING")
    if root.handlers:
        errors.setFormatter(root.handlers[-1].formatter)
    root.handlers[:] = handlers
    root.setLevel(level)
    saved = []
    for name in SERVICE_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate, logger.level))
        logger.propagate = False
        logger.setLevel(logging.WARNING)
        logger.addHandler(errors)
    try:
        yield
    finally:
        for logger, propagate, previous in saved:
            logger.removeHandler(errors)
            logger.propagate = propagate
            logger.setLevel(previous)
