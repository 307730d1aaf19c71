"""Helpers for tests of Lodestar services.

They give a Postgres to test against, dev credentials, and one harness that starts any service in
the test's event loop or as a process of its own.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, overload
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lodestar.common.auth import Role, new_token, write_credentials
from lodestar.common.cli import free_port
from lodestar.common.config import ServiceSettings
from lodestar.common.module import Module
from lodestar.common.server import READINESS, RunningServer, ServiceRunner
from lodestar.common.service_cli import ServiceSpec

DEFAULT_TEST_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def reachable(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def postgres_server(workdir: Path) -> Iterator[str]:
    """A DSN of a Postgres to test against.

    ``LODESTAR_TEST_DATABASE_URL`` wins; else the server on 127.0.0.1:5432; else an embedded
    Postgres started in ``workdir`` for the duration.
    """
    configured = os.environ.get("LODESTAR_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    if reachable("127.0.0.1", 5432):
        yield DEFAULT_TEST_DSN
        return
    from lodestar.common.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(workdir / "pg")
    try:
        with server:
            yield server.dsn("postgres")
    finally:
        server.discard()


@contextmanager
def scratch_database(admin_dsn: str) -> Iterator[str]:
    """A freshly created database, dropped afterwards; yields its DSN."""
    name = f"lodestar_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(admin_dsn, f"CREATE DATABASE {name}"))
    try:
        yield _with_database(admin_dsn, name)
    finally:
        asyncio.run(_admin(admin_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


async def _admin(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _with_database(dsn: str, database: str) -> str:
    base, _, query = dsn.partition("?")
    head, _, _old = base.rpartition("/")
    return f"{head}/{database}" + (f"?{query}" if query else "")


def dev_credentials(path: Path, modules: Sequence[str] = ()) -> dict[Role | str, str]:
    """Write a credentials file with one token per role and one per module name; returns them.

    The role tokens belong to ``test-admin``, ``test-module`` and ``test-publisher``; each name in
    ``modules`` is a module principal of its own, whose token is under its name.
    """
    tokens: dict[Role | str, str] = {role: new_token() for role in Role}
    principals = {f"test-{role.value}": (role, tokens[role]) for role in Role}
    for name in modules:
        tokens[name] = new_token()
        principals[name] = (Role.MODULE, tokens[name])
    write_credentials(path, principals)
    return tokens


M = TypeVar("M", bound=Module)
S = TypeVar("S", bound=ServiceSettings)

#: How long a service may take to start and report SERVING unless told otherwise.
START_TIMEOUT_SECONDS = 30.0


@dataclass
class RunningService(Generic[M]):
    """A service serving in the current event loop."""

    runner: ServiceRunner
    module: M
    server: RunningServer
    task: asyncio.Task[None]

    @property
    def target(self) -> str:
        """Where clients reach its gRPC port."""
        return f"127.0.0.1:{self.server.port}"

    async def stop(self) -> None:
        """Stop it the way SIGTERM would and wait until it has stopped."""
        self.runner.request_stop()
        await self.task


@overload
async def start_in_process(
    service: ServiceSpec[S],
    settings: S,
    *,
    ready: Callable[[Module], bool] | None = None,
    timeout: float = START_TIMEOUT_SECONDS,
) -> RunningService[Module]: ...


@overload
async def start_in_process(
    service: M,
    settings: ServiceSettings,
    *,
    ready: Callable[[M], bool] | None = None,
    timeout: float = START_TIMEOUT_SECONDS,
) -> RunningService[M]: ...


async def start_in_process(
    service: ServiceSpec[Any] | Module,
    settings: ServiceSettings,
    *,
    ready: Callable[[Any], bool] | None = None,
    timeout: float = START_TIMEOUT_SECONDS,
) -> RunningService[Any]:
    """Start a service in this event loop; returns once it is ready.

    The service is a module, or the one a spec builds from ``settings``. It is ready when its
    readiness probe says SERVING and ``ready(module)`` holds.
    """
    module = service.module_cls(settings) if isinstance(service, ServiceSpec) else service
    runner = ServiceRunner(module, settings)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    started: asyncio.Future[RunningServer] = loop.create_future()

    async def on_started(server: RunningServer) -> None:
        started.set_result(server)

    task = asyncio.create_task(runner.run(on_started, handle_signals=False))
    running = RunningService(runner, module, await _started(started, task, timeout), task)
    try:
        await _until_ready(running, ready, deadline)
    except BaseException:
        await running.stop()
        raise
    return running


async def _started(
    started: asyncio.Future[RunningServer], task: asyncio.Task[None], timeout: float
) -> RunningServer:
    """The server ``task`` reports through ``started``; its error if it ends first."""
    waiting: set[asyncio.Future[Any]] = {started, task}
    done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    if not started.done():
        task.cancel()
        raise TimeoutError(f"the service did not start within {timeout}s")
    return started.result()


async def _until_ready(
    running: RunningService[Any], ready: Callable[[Any], bool] | None, deadline: float
) -> None:
    """Wait for the readiness probe to say SERVING, then for ``ready(module)``."""
    loop = asyncio.get_running_loop()
    server = running.server
    # With TLS on the main port, probe the plaintext health port the way a kubelet would.
    probe_port = server.health_port if server.health_port is not None else server.port
    await wait_serving(f"127.0.0.1:{probe_port}", READINESS, max(deadline - loop.time(), 0.1))
    while ready is not None and not ready(running.module):
        if loop.time() > deadline:
            raise TimeoutError(f"{type(running.module).__name__} started but not ready in time")
        await asyncio.sleep(0.05)


async def wait_serving(target: str, service: str, timeout: float = START_TIMEOUT_SECONDS) -> None:
    """Poll the health service the way a kubelet probe does until it says SERVING."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{target} {service!r} not SERVING after {timeout}s")
            await asyncio.sleep(0.05)


def service_env(
    database_url: str,
    credentials: Path,
    *,
    schema: str | None = None,
    core: str | None = None,
    token: str | None = None,
    **settings: object,
) -> dict[str, str]:
    """The environment of a service process.

    It names the database (and schema), the credentials file, the core the service talks to with
    its token, and any other setting as ``name=value`` (``__`` nests:
    ``ingest__batch_max_events=200`` is ``LODESTAR_INGEST__BATCH_MAX_EVENTS``).
    """
    env = {
        "LODESTAR_DATABASE__URL": database_url,
        "LODESTAR_CREDENTIALS_FILE": str(credentials),
    }
    if schema is not None:
        env["LODESTAR_DATABASE__SCHEMA_NAME"] = schema
    if core is not None:
        env["LODESTAR_CORE_ENDPOINT"] = core
    if token is not None:
        env["LODESTAR_TOKEN"] = token
    env.update({f"LODESTAR_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def service_package(service: str | ServiceSpec[Any]) -> str:
    """The importable package whose ``python -m <package> serve`` runs ``service``."""
    if isinstance(service, str):
        return service
    return service.module_cls.__module__.partition(".")[0]


def start_process(
    service: str | ServiceSpec[Any], env: dict[str, str], log: Path, port: int
) -> subprocess.Popen[bytes]:
    """Start ``python -m <package> serve`` on ``port``, its output going to ``log``.

    ``env`` is added to this process's environment; metrics are off unless it sets
    ``LODESTAR_METRICS_PORT``.
    """
    metrics_off = {"LODESTAR_METRICS_PORT": "-1"}
    full_env = os.environ | metrics_off | env | {"LODESTAR_PORT": str(port)}
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", service_package(service), "serve"],
            env=full_env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


@contextmanager
def service_process(
    service: str | ServiceSpec[Any], env: dict[str, str], log: Path, port: int | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A service process on ``port`` (a free one if None); SIGKILLed afterwards if still running."""
    port = port or free_port()
    process = start_process(service, env, log, port)
    try:
        yield process, port
    finally:
        if process.poll() is None:
            kill9(process)


def kill9(process: subprocess.Popen[bytes]) -> None:
    """Kill a process without any chance to clean up, and reap it."""
    process.send_signal(signal.SIGKILL)
    process.wait()


@contextmanager
def pgbouncer(upstream_dsn: str, logins: dict[str, str], *, pool_size: int = 3) -> Iterator[int]:
    """A transaction-pooling PgBouncer in front of ``upstream_dsn``'s server; yields its port.

    ``logins`` maps each role that may connect through it to its password. ``pool_size`` server
    connections per database and role are shared by all clients, one transaction at a time.
    Raises FileNotFoundError when PgBouncer is not installed.
    """
    binary = pgbouncer_binary()
    if binary is None:
        raise FileNotFoundError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    upstream = urlsplit(upstream_dsn)
    port = free_port()
    # PgBouncer refuses to run as root and reads its files as the user it switches to.
    run_as = ["-u", _unprivileged_user()] if os.geteuid() == 0 else []
    workdir = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    workdir.chmod(0o755)
    auth_file = workdir / "users.txt"
    auth_file.write_text("".join(f'"{role}" "{password}"\n' for role, password in logins.items()))
    config = workdir / "pgbouncer.ini"
    config.write_text(
        "[databases]\n"
        f"* = host={upstream.hostname or '127.0.0.1'} port={upstream.port or 5432}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {auth_file}\n"
        f"pool_mode = transaction\ndefault_pool_size = {pool_size}\nmax_client_conn = 1000\n"
        # asyncpg sends search_path; the role's own default search path applies instead.
        "ignore_startup_parameters = extra_float_digits,search_path\n"
    )
    for path in (auth_file, config):
        path.chmod(0o644)
    command = [binary, *run_as, str(config)]
    with (workdir / "pgbouncer.log").open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_listening(process, port, workdir / "pgbouncer.log")
        yield port
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def pgbouncer_binary() -> str | None:
    """Where PgBouncer is installed, if it is (Debian puts it outside a user's PATH)."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")


def through(dsn: str, port: int) -> str:
    """``dsn`` pointed at 127.0.0.1:``port`` (a PgBouncer), with the same credentials.

    A ``host``/``port`` in the query (a Unix socket) would bypass PgBouncer, so they are dropped.
    """
    parts = urlsplit(dsn)
    credentials, at, _ = parts.netloc.rpartition("@")
    pairs = parts.query.split("&")
    kept = [pair for pair in pairs if pair.split("=")[0] not in ("", "host", "port")]
    query = "&".join(kept)
    netloc = f"{credentials}{at}127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _unprivileged_user() -> str:
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("no unprivileged user (postgres or nobody) to run pgbouncer as")


def _wait_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 10
    while not reachable("127.0.0.1", port):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"pgbouncer did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
