"""``lodestar``: run the suite locally and talk to it.

``lodestar up`` starts core and every installed module as separate processes on an embedded
Postgres (or the database you name), waits until each reports SERVING, and prints what is where.
``tokens``, ``spool`` and ``audit`` are suite-wide and live in libs/common too
(``OWN_COMMANDS``). Every other command comes from the installed service packages through the
``lodestar.cli`` entry-point group (as ``lodestar up`` finds services through
``lodestar.services``): an entry point's name is the command, its object a ``typer.Typer`` (a
command group) or a function (a command). A package's commands come and go with it; one that
fails to load is named on stderr and the rest still work.

Start-up is kept short: importing this module and building the app loads only typer, rich and the
standard library. A command's module is imported only when it runs or ``--help`` lists it (then
only for its help text: no command's options are built), and imports only typer, rich and
``cli_support``. Each command imports what it needs (gRPC, stubs, YAML, the installed services)
when it runs, so ``lodestar --help`` never pays for them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from lodestar.common.cli_support import (
    DEFAULT_STATE_DIR,
    STATE_DIR_ENV,
    StateDirOption,
    errors,
    fail,
)

if TYPE_CHECKING:
    from typer._click import Command, Context

    from lodestar.common.embedded import EmbeddedPostgres
    from lodestar.common.service_cli import ServiceSpec
    from lodestar.common.supervisor import RestartPolicy
    from lodestar.core.v1 import registry_pb2

#: The entry-point group through which service packages contribute commands.
COMMAND_GROUP = "lodestar.cli"


@dataclass(frozen=True)
class CommandSource:
    """Where a command comes from.

    ``module:attribute`` of a ``typer.Typer`` or a function, and the distribution that brings it
    (None: the CLI's own).
    """

    name: str
    value: str
    distribution: str | None = None

    def load(self) -> Any:
        """The object it names (importing its module)."""
        import importlib

        module, _, attribute = self.value.partition(":")
        target: Any = importlib.import_module(module)
        for part in attribute.split("."):
            target = getattr(target, part)
        return target

    @property
    def panel(self) -> str | None:
        """The help panel it is listed in: its package's, or the default one."""
        return f"Commands of {self.distribution}" if self.distribution else None


#: The CLI's own commands besides ``up``, loaded like the entry points' when they are needed.
OWN_COMMANDS = (
    CommandSource("audit", "lodestar.common.audit_cli:audit"),
    CommandSource("spool", "lodestar.common.spool_cli:spool_app"),
    CommandSource("tokens", "lodestar.common.tokens_cli:tokens_app"),
)


def installed_command_sources() -> list[CommandSource]:
    """The ``lodestar.cli`` entry points of the distributions installed on ``sys.path``.

    Read from each ``*.dist-info``/``*.egg-info`` folder's ``entry_points.txt`` as
    ``importlib.metadata.entry_points`` reads them (of two distributions with one name, the first
    on ``sys.path`` counts), without importing ``importlib.metadata``, which costs more start-up
    than the rest of ``lodestar --help``'s own work.
    """
    seen: set[str] = set()
    sources: list[CommandSource] = []
    for folder in sys.path:
        try:
            names = sorted(os.listdir(folder or "."))
        except OSError:
            continue
        for name in names:
            stem, dot, kind = name.rpartition(".")
            if not dot or kind not in ("dist-info", "egg-info"):
                continue
            distribution = stem.split("-")[0].replace("_", "-").replace(".", "-").lower()
            if distribution in seen:
                continue
            seen.add(distribution)
            path = Path(folder or ".") / name / "entry_points.txt"
            sources += _group_entries(path, COMMAND_GROUP, distribution)
    return sources


def _group_entries(path: Path, group: str, distribution: str) -> list[CommandSource]:
    """The entries of ``group`` in an ``entry_points.txt`` (INI: ``[group]``, ``name = value``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    found: list[CommandSource] = []
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section == group and "=" in line:
            name, _, value = line.partition("=")
            found.append(CommandSource(name.strip(), value.split("[")[0].strip(), distribution))
    return found


class InstalledCommands(MutableMapping[str, "Command"]):
    """The commands of ``lodestar``: its own, then those of the ``lodestar.cli`` entry points.

    A command's module is imported the first time its name is looked up. While help lists the
    commands (``listing``), a command not loaded yet is represented by its name and help only,
    so that ``lodestar --help`` builds no command's options. A name the CLI defines itself is
    never taken by an entry point; of two entry points with one name the first found wins.
    """

    def __init__(self, built: MutableMapping[str, Command]) -> None:
        self._built = built
        self._failed: set[str] = set()
        self.listing = False

    @cached_property
    def _sources(self) -> dict[str, CommandSource]:
        sources = {source.name: source for source in OWN_COMMANDS}
        found = installed_command_sources()
        for source in sorted(found, key=lambda s: (s.distribution or "", s.name)):
            if source.name not in self._built:
                sources.setdefault(source.name, source)
        return sources

    def __getitem__(self, name: str) -> Command:
        if name in self._built:
            return self._built[name]
        source = self._sources.get(name)
        if source is None or name in self._failed:
            raise KeyError(name)
        try:
            if self.listing:
                return command_summary(source)
            command = command_from_source(source)
        except Exception as exc:  # a broken package must not take the whole CLI down
            self._failed.add(name)
            errors.print(
                f"[yellow]lodestar: the {name!r} command of {source.distribution} could not be "
                f"loaded ({type(exc).__name__}: {exc}); skipped[/yellow]"
            )
            raise KeyError(name) from None
        self._built[name] = command
        return command

    def __iter__(self) -> Iterator[str]:
        yield from self._built
        yield from (name for name in self._sources if name not in self._built)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __setitem__(self, name: str, command: Command) -> None:
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        del self._built[name]


def command_from_source(source: CommandSource) -> Command:
    """The click command of a source, named after it and shown in its package's help panel."""
    target = source.load()
    command: Command
    if isinstance(target, typer.Typer):
        command = typer.main.get_group(target)
    elif callable(target):
        single = typer.Typer()
        single.command(name=source.name)(target)
        command = typer.main.get_command(single)
    else:
        raise TypeError(f"{source.value} is neither a typer.Typer nor a function")
    command.name = source.name
    command.rich_help_panel = source.panel  # type: ignore[attr-defined]
    return command


def command_summary(source: CommandSource) -> Command:
    """A stand-in with the command's name and help only, for listing it (no options built)."""
    import inspect

    from typer.core import TyperCommand

    target = source.load()
    if isinstance(target, typer.Typer):
        text = target.info.help
    elif callable(target):
        text = inspect.getdoc(target)
    else:
        raise TypeError(f"{source.value} is neither a typer.Typer nor a function")
    return TyperCommand(
        name=source.name, help=text if isinstance(text, str) else "", rich_help_panel=source.panel
    )


class LodestarGroup(TyperGroup):
    """The ``lodestar`` command group: its own commands plus the installed packages' ones."""

    def __init__(self, *, commands: Any = None, **attrs: Any) -> None:
        super().__init__(**attrs)
        built = commands if isinstance(commands, MutableMapping) else {}
        self.installed = InstalledCommands(built)
        self.commands = self.installed

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        """The command ``cmd_name``, loading its module if it is not loaded yet."""
        return self.commands.get(cmd_name)

    def list_commands(self, ctx: Context) -> list[str]:
        """Every command name, without loading anything."""
        return list(self.commands)

    def format_help(self, ctx: Context, formatter: Any) -> None:
        """The help screen, listing the commands by name and help without building them.

        The root screen is drawn here with the rich parts ``lodestar`` loads anyway: typer's own
        renderer imports rich's Markdown and traceback support, a third of ``--help``'s time.
        """
        self.installed.listing = True
        try:
            if ctx.parent is None:
                self._root_help(ctx)
            else:
                super().format_help(ctx, formatter)
        finally:
            self.installed.listing = False

    def _root_help(self, ctx: Context) -> None:
        from rich.panel import Panel

        out = Console(highlight=False)
        out.print(f"\n [b]Usage:[/b] {ctx.command_path} [OPTIONS] COMMAND [ARGS]...\n")
        out.print(f" {self.help}\n")
        options = [
            record for param in self.get_params(ctx) if (record := param.get_help_record(ctx))
        ]
        out.print(Panel(_grid(options), title="Options", title_align="left", border_style="dim"))
        panels: dict[str, list[tuple[str, str]]] = {}
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                panel = getattr(command, "rich_help_panel", None) or "Commands"
                panels.setdefault(panel, []).append((name, command.get_short_help_str(120)))
        for title, rows in panels.items():
            out.print(Panel(_grid(rows), title=title, title_align="left", border_style="dim"))


def _grid(rows: list[tuple[str, str]]) -> Table:
    """Two columns: a name in bold cyan, then its help."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    for name, text in rows:
        grid.add_row(name, text)
    return grid


app = typer.Typer(
    cls=LodestarGroup,
    help="Lodestar: the control plane for people who run many LLMs.",
    no_args_is_help=True,
)
console = Console(width=None if sys.stdout.isatty() else 160)


@app.callback()
def lodestar() -> None:
    """Lodestar: the control plane for people who run many LLMs."""


STATE_DIR = DEFAULT_STATE_DIR
CORE = "core"
READY_TIMEOUT_SECONDS = 60.0
#: How long ``up``, once every service serves, waits for every module to report itself healthy.
HEALTHY_TIMEOUT_SECONDS = 15.0


@dataclass
class RunningService:
    """A service process started by ``lodestar up``."""

    name: str
    port: int
    metrics_port: int
    process: subprocess.Popen[bytes]
    log: Path


def installed_services() -> dict[str, ServiceSpec[Any]]:
    """Service specs registered under the ``lodestar.services`` entry point group.

    Core first, then by default port (so that ``lodestar up``'s ports are each service's
    defaults).

    Loading a spec imports its service package: only ``lodestar up`` (and tests) call this.
    """
    from importlib.metadata import entry_points

    specs = {ep.name: ep.load() for ep in entry_points(group="lodestar.services")}
    return dict(sorted(specs.items(), key=lambda item: (item[0] != CORE, _default_port(item[1]))))


def _default_port(spec: ServiceSpec[Any]) -> int:
    port: int = spec.settings_cls.model_fields["port"].default
    return port


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` of 127.0.0.1.

    Bound the way gRPC binds (SO_REUSEADDR), so connections of a server stopped a moment ago,
    still in TIME_WAIT, do not count as taking the port.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def local_tokens(state_dir: Path, services: list[str]) -> dict[str, str]:
    """Development tokens: one per role and one per service; created once, kept in state_dir."""
    import yaml

    from lodestar.common.auth import Role, new_token, write_credentials

    path = state_dir / "tokens.yaml"
    tokens: dict[str, str] = yaml.safe_load(path.read_text()) if path.exists() else {}
    wanted = [r.value for r in Role] + services
    if any(name not in tokens for name in wanted):
        tokens = {name: tokens.get(name) or new_token() for name in wanted}
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(tokens))
        path.chmod(0o600)
    principals = {r.value: (r, tokens[r.value]) for r in Role}
    principals |= {name: (Role.MODULE, tokens[name]) for name in services}
    write_credentials(state_dir / "credentials.yaml", principals)
    return tokens


def _assign_ports(names: list[str], port_base: int) -> dict[str, tuple[int, int]]:
    """The gRPC and metrics ports per service: the defaults, or free ones where one is taken."""
    ports = {}
    for index, name in enumerate(names):
        if port_base == 0:
            ports[name] = (free_port(), free_port())
            continue
        wanted = {"gRPC": port_base + 10 * index, "metrics": 9464 + index}
        for kind, port in wanted.items():
            if not port_free(port):
                wanted[kind] = free_port()
                console.print(
                    f"[yellow]port {port} ({name} {kind}) is taken; using {wanted[kind]}[/yellow]"
                )
        ports[name] = (wanted["gRPC"], wanted["metrics"])
    return ports


def _start_service(
    spec: ServiceSpec[Any], ports: tuple[int, int], env: dict[str, str], logs: Path
) -> RunningService:
    package = spec.module_cls.__module__.split(".")[0]
    log = logs / f"{spec.name}.log"
    service_env = env | {"LODESTAR_PORT": str(ports[0]), "LODESTAR_METRICS_PORT": str(ports[1])}
    process = subprocess.Popen(
        [sys.executable, "-m", package, "serve"],
        env=service_env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return RunningService(spec.name, ports[0], ports[1], process, log)


async def wait_until_serving(port: int, process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Poll readiness as a kubelet would; False if the process died or time ran out."""
    import asyncio

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline and process.poll() is None:
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service="readiness"), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    return False


async def _wait_until_healthy(
    core: str,
    admin_token: str,
    names: Sequence[str],
    started: float,
    *,
    stop: list[bool],
    processes: Sequence[subprocess.Popen[bytes]],
    timeout: float = HEALTHY_TIMEOUT_SECONDS,
) -> dict[str, str]:
    """Wait until core's registry lists each module of ``names`` healthy (or disabled).

    Only a report of a process started since ``started`` (``time.monotonic()``) counts: core
    keeps a module's last health across runs. Returns the modules that were not by
    ``timeout``, each with why; stops early on Ctrl-C (``stop``) or when a process exits.
    """
    import asyncio

    import grpc

    from lodestar.common.sdk import connect
    from lodestar.core.v1 import registry_pb2, registry_pb2_grpc

    waiting = {name: "not registered with core" for name in names}
    async with connect(core, admin_token) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            if stop[0] or any(p.poll() is not None for p in processes):
                break
            try:
                reply = await stub.ListModules(registry_pb2.ListModulesRequest(), timeout=2)
            except grpc.aio.AioRpcError as exc:
                waiting = {name: f"core answered {exc.code().name}" for name in waiting}
                if exc.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                ):
                    break
            else:
                listed = {m.name: m for m in reply.modules}
                since = time.monotonic() - started
                waiting = {
                    name: why
                    for name in waiting
                    if (why := _not_yet_healthy(listed.get(name), since)) is not None
                }
            if waiting:
                await asyncio.sleep(0.1)
    return waiting


def _not_yet_healthy(module: registry_pb2.Module | None, since: float) -> str | None:
    """Why ``module`` does not count as healthy yet, or None if it does (or is disabled).

    ``since``: seconds since its process could have started; an older report is a past run's.
    """
    from lodestar.core.v1 import registry_pb2

    if module is None:
        return "not registered with core"
    if not module.enabled:
        return None
    health = module.health
    if not module.alive or health.uptime_seconds > since:
        return "no report from this run yet"
    if health.status == registry_pb2.HEALTH_STATUS_HEALTHY:
        return None
    try:
        status = registry_pb2.HealthStatus.Name(health.status).removeprefix("HEALTH_STATUS_")
    except ValueError:  # a newer core's status
        status = f"status {health.status}"
    return f"{status.lower()}, {health.last_error or 'no error'}"


def _stop_all(services: list[RunningService]) -> None:
    for service in reversed(services):
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
    for service in reversed(services):
        try:
            service.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            service.process.kill()


@app.command()
def up(
    database_url: Annotated[
        str | None,
        typer.Option(
            envvar=[DATABASE_URL_ENV, OLD_DATABASE_URL_ENV],
            help=f"Postgres DSN, as the services read it ({OLD_DATABASE_URL_ENV}, the old name, "
            "still works); default: an embedded Postgres in the state dir",
            show_default=False,
        ),
    ] = None,
    state_dir: StateDirOption = STATE_DIR,
    port_base: Annotated[
        int, typer.Option(help="core's gRPC port; modules follow in steps of 10; 0 = free ports")
    ] = 50051,
    config_dir: Annotated[Path, typer.Option(help="folder with lodestar.yaml and modules/")] = Path(
        "config"
    ),
    max_restarts: Annotated[
        int,
        typer.Option(
            min=1, help="exits within 5 minutes after which a module is given up on and disabled"
        ),
    ] = 5,
    restart_delay: Annotated[
        float, typer.Option(min=0.0, help="seconds before the first restart; doubles each time")
    ] = 1.0,
) -> None:
    """Start core and every installed module as processes and keep them running.

    Waits until all are SERVING; then restarts a service that exits, with backoff, and gives up
    on a module that keeps failing: it is disabled in core's registry, with the reason, and
    core and the other services go on.
    """
    import asyncio

    from lodestar.common.embedded import EmbeddedPostgres

    specs = installed_services()
    if CORE not in specs:
        raise typer.BadParameter("lodestar-core is not installed")
    _warn_old_database_variable(database_url)
    state_dir = state_dir.resolve()
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    lock = _lock_state_dir(state_dir)
    tokens = local_tokens(state_dir, list(specs))
    ports = _assign_ports(list(specs), port_base)
    database: EmbeddedPostgres | None = None
    service_urls: dict[str, str] = {}
    if database_url is None:
        database = EmbeddedPostgres(state_dir / "pg", port=free_port())
        console.print(f"starting embedded Postgres in {database.data_dir} …")
        _start_database(database)
        database_url = database.dsn()
        service_urls = asyncio.run(_service_roles(database_url, specs))
    base_env = os.environ | {
        "LODESTAR_DATABASE__URL": database_url,
        "LODESTAR_CREDENTIALS_FILE": str(state_dir / "credentials.yaml"),
        "LODESTAR_CORE_ENDPOINT": f"127.0.0.1:{ports[CORE][0]}",
        "LODESTAR_CONFIG_DIR": str(config_dir.resolve()),
        "LODESTAR_SPOOL_DIR": str(state_dir / "spool"),
    }
    running: list[RunningService] = []
    envs: dict[str, dict[str, str]] = {}
    stop = _stop_requested()
    started = time.monotonic()
    try:
        for name, spec in specs.items():
            envs[name] = env = base_env | {"LODESTAR_TOKEN": tokens[name]}
            if name in service_urls:  # its own role, owning only its schema
                env["LODESTAR_DATABASE__URL"] = service_urls[name]
            service = _start_service(spec, ports[name], env, logs)
            running.append(service)
            if not asyncio.run(
                wait_until_serving(service.port, service.process, READY_TIMEOUT_SECONDS)
            ):
                console.print(f"[red]{name} did not become ready; see {service.log}[/red]")
                raise typer.Exit(1)
        _write_endpoints(state_dir, running)
        unhealthy = asyncio.run(
            _wait_until_healthy(
                f"127.0.0.1:{ports[CORE][0]}",
                tokens["admin"],
                [name for name in specs if name != CORE],
                started,
                stop=stop,
                processes=[service.process for service in running],
            )
        )
        if not stop[0]:
            dsn = database_url if database is None else database.dsn()
            _print_ready(running, tokens, state_dir, dsn, unhealthy)
        from lodestar.common.supervisor import RestartPolicy

        policy = RestartPolicy(first_delay_seconds=restart_delay, max_failures=max_restarts)
        _supervise(
            running,
            stop,
            policy,
            lambda name: _start_service(specs[name], ports[name], envs[name], logs).process,
            lambda name, reason: _disable(ports[CORE][0], tokens, name, reason),
        )
    finally:
        _stop_all(running)
        if database is not None:
            database.stop()
        lock.close()
        console.print("stopped")


async def _service_roles(admin_url: str, specs: Mapping[str, ServiceSpec[Any]]) -> dict[str, str]:
    """A role per service on the embedded Postgres, owning only its schema; their DSNs."""
    from lodestar.common.db_roles import provision_service_role

    return {
        name: await provision_service_role(admin_url, name, spec.settings_cls.default_schema)
        for name, spec in specs.items()
    }


DATABASE_URL_ENV = "LODESTAR_DATABASE__URL"
OLD_DATABASE_URL_ENV = "LODESTAR_DATABASE_URL"


def _warn_old_database_variable(database_url: str | None) -> None:
    old = os.environ.get(OLD_DATABASE_URL_ENV)
    if old and database_url == old and DATABASE_URL_ENV not in os.environ:
        errors.print(
            f"[yellow]{OLD_DATABASE_URL_ENV} is deprecated: set {DATABASE_URL_ENV}, as the "
            "services read it[/yellow]"
        )


def _lock_state_dir(state_dir: Path) -> Any:
    """Hold ``<state-dir>/up.lock`` while ``lodestar up`` runs.

    One line and exit 1 if another ``lodestar up`` holds it. The lock goes with the process,
    however it ends.
    """
    import fcntl

    lock = (state_dir / "up.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        fail(
            f"another `lodestar up` (pid {holder}) runs with the state dir {state_dir}; stop it, "
            "or give this one another --state-dir"
        )
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _start_database(database: EmbeddedPostgres) -> None:
    """Start the embedded Postgres; a failure is one line naming its log, exit status 1."""
    from lodestar.common.errors import ConfigurationError

    try:
        database.start()
    except (ConfigurationError, subprocess.CalledProcessError, OSError) as exc:
        log = database.data_dir / "cluster" / "server.log"
        fail(f"the embedded Postgres in {database.data_dir} did not start ({exc}); see {log}")


def _stop_requested() -> list[bool]:
    flag = [False]

    def handler(signum: int, frame: object) -> None:
        flag[0] = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return flag


def _supervise(
    running: list[RunningService],
    stop: list[bool],
    policy: RestartPolicy,
    start: Callable[[str], subprocess.Popen[bytes]],
    give_up: Callable[[str, str], None],
) -> None:
    """Until Ctrl-C / SIGTERM: restart services that exit, give up on those that keep failing."""
    from lodestar.common.supervisor import Supervisor

    supervisor = Supervisor(policy, start, give_up, console.print, essential=frozenset({CORE}))
    for service in running:
        supervisor.watch(service.name, service.process, service.log)
    while not stop[0]:
        supervisor.tick(time.monotonic())
        for service in running:  # so that the final stop reaches the restarted processes
            service.process = supervisor.services[service.name].process
        time.sleep(0.2)


def _disable(core_port: int, tokens: dict[str, str], name: str, reason: str) -> None:
    """Record ``reason`` as the module's last error and disable it in core's registry."""
    import asyncio

    try:
        asyncio.run(_disable_in_registry(f"127.0.0.1:{core_port}", tokens, name, reason))
    except Exception as exc:  # core itself may be down; the console line says enough
        console.print(f"[red]could not disable {name} in core: {exc}[/red]")


async def _disable_in_registry(core: str, tokens: dict[str, str], name: str, reason: str) -> None:
    import grpc

    from lodestar.core.v1 import registry_pb2, registry_pb2_grpc

    def bearer(token: str) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {token}"),)

    async with grpc.aio.insecure_channel(core) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        down = registry_pb2.ModuleHealth(
            status=registry_pb2.HEALTH_STATUS_DOWN, last_error=reason[:2000]
        )
        try:  # as the module itself: only it may report its health
            await stub.Heartbeat(
                registry_pb2.HeartbeatRequest(name=name, health=down),
                metadata=bearer(tokens[name]),
                timeout=5,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # never registered: nothing to record
                raise
        await stub.SetModuleEnabled(
            registry_pb2.SetModuleEnabledRequest(name=name, enabled=False),
            metadata=bearer(tokens["admin"]),
            timeout=5,
        )


def _write_endpoints(state_dir: Path, running: list[RunningService]) -> None:
    """Record where each service listens, for scripts and the other CLI commands."""
    endpoints = {
        s.name: {"grpc": f"127.0.0.1:{s.port}", "metrics": f"127.0.0.1:{s.metrics_port}"}
        for s in running
    }
    (state_dir / "endpoints.json").write_text(json.dumps(endpoints, indent=2))


def _print_ready(
    running: list[RunningService],
    tokens: dict[str, str],
    state_dir: Path,
    dsn: str,
    unhealthy: Mapping[str, str],
) -> None:
    from lodestar.common.auth import Role

    table = Table(title="Lodestar services")
    for column in ("service", "gRPC", "metrics", "health", "log"):
        table.add_column(column)
    for service in running:
        table.add_row(
            service.name,
            f"127.0.0.1:{service.port}",
            f"http://127.0.0.1:{service.metrics_port}/metrics",
            "readiness / liveness",
            str(service.log),
        )
    console.print(table)
    creds = Table(title=f"Local development credentials ({state_dir / 'tokens.yaml'})")
    creds.add_column("role")
    creds.add_column("token")
    for role in Role:
        creds.add_row(role.value, tokens[role.value])
    console.print(creds)
    console.print(f"database: {dsn}")
    if state_dir != (Path.cwd() / DEFAULT_STATE_DIR).resolve():
        console.print(f"other shells: export {STATE_DIR_ENV}={state_dir}", highlight=False)
    core_port = running[0].port
    console.print(
        f"try: grpcurl -plaintext -H 'authorization: Bearer {tokens['admin']}' "
        f"127.0.0.1:{core_port} lodestar.core.v1.RegistryService/ListModules"
    )
    for name, why in unhealthy.items():
        console.print(f"[yellow]{name} is not healthy yet: {why}[/yellow]", highlight=False)
    console.print("[bold green]ready[/bold green] — Ctrl-C stops everything", highlight=False)
    sys.stdout.flush()


def main() -> None:
    """Console entry point.

    Output piped into a reader that stops early (``| head``) ends the command quietly with
    status 0.
    """
    try:
        app()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
