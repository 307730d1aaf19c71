"""``lodestar``: run the suite locally and talk to it.

``lodestar up`` starts core and every installed module as separate processes on an embedded
Postgres (or the database you name), waits until each reports SERVING, and prints what is where.

Start-up is kept short: importing this module and building the app loads only typer, rich and the
standard library. Each command imports what it needs (gRPC, stubs, the SDK, YAML, the installed
services) when it runs, so ``lodestar --help`` never pays for them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lodestar.common.audit_cli import register as register_audit_commands
from lodestar.common.cli_support import run_rpc
from lodestar.common.spool_cli import register as register_spool_commands
from lodestar.common.tokens_cli import register as register_token_commands
from lodestar.common.usage_cli import register as register_usage_commands

if TYPE_CHECKING:
    from lodestar.common.sdk import ReceivedEvent
    from lodestar.common.service_cli import ServiceSpec

app = typer.Typer(
    help="Lodestar: the control plane for people who run many LLMs.", no_args_is_help=True
)
events_app = typer.Typer(help="Look at and publish events.", no_args_is_help=True)
app.add_typer(events_app, name="events")
console = Console(width=None if sys.stdout.isatty() else 160)

STATE_DIR = Path(".lodestar")
CORE = "core"
READY_TIMEOUT_SECONDS = 60.0

StateDir = Annotated[
    Path, typer.Option("--state-dir", help="where local state, logs and credentials live")
]
Target = Annotated[
    str | None, typer.Option(help="core address host:port (default: from `lodestar up`)")
]
Token = Annotated[
    str | None, typer.Option(envvar="LODESTAR_TOKEN", help="bearer token (default: local admin)")
]


@dataclass
class RunningService:
    """A service process started by ``lodestar up``."""

    name: str
    port: int
    metrics_port: int
    process: subprocess.Popen[bytes]
    log: Path


def installed_services() -> dict[str, ServiceSpec[Any]]:
    """Service specs registered under the ``lodestar.services`` entry point group, core first.

    Loading a spec imports its service package: only ``lodestar up`` (and tests) call this.
    """
    from importlib.metadata import entry_points

    specs = {ep.name: ep.load() for ep in entry_points(group="lodestar.services")}
    return dict(sorted(specs.items(), key=lambda item: (item[0] != CORE, item[0])))


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
    """gRPC and metrics ports per service: the defaults, or free ones where a default is taken."""
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
        typer.Option(envvar="LODESTAR_DATABASE_URL", help="Postgres DSN; default: embedded"),
    ] = None,
    state_dir: StateDir = STATE_DIR,
    port_base: Annotated[
        int, typer.Option(help="core's gRPC port; modules follow in steps of 10; 0 = free ports")
    ] = 50051,
    config_dir: Annotated[Path, typer.Option(help="folder with lodestar.yaml and modules/")] = Path(
        "config"
    ),
) -> None:
    """Start core and every installed module as processes and wait until all are SERVING."""
    import asyncio

    from lodestar.common.embedded import EmbeddedPostgres

    specs = installed_services()
    if CORE not in specs:
        raise typer.BadParameter("lodestar-core is not installed")
    state_dir = state_dir.resolve()
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tokens = local_tokens(state_dir, list(specs))
    ports = _assign_ports(list(specs), port_base)
    database: EmbeddedPostgres | None = None
    if database_url is None:
        database = EmbeddedPostgres(state_dir / "pg", port=free_port())
        console.print(f"starting embedded Postgres in {database.data_dir} …")
        database.start()
        database_url = database.dsn()
    base_env = os.environ | {
        "LODESTAR_DATABASE__URL": database_url,
        "LODESTAR_CREDENTIALS_FILE": str(state_dir / "credentials.yaml"),
        "LODESTAR_CORE_ENDPOINT": f"127.0.0.1:{ports[CORE][0]}",
        "LODESTAR_CONFIG_DIR": str(config_dir.resolve()),
        "LODESTAR_SPOOL_DIR": str(state_dir / "spool"),
    }
    running: list[RunningService] = []
    stop = _stop_requested()
    try:
        for name, spec in specs.items():
            env = base_env | {"LODESTAR_TOKEN": tokens[name]}
            service = _start_service(spec, ports[name], env, logs)
            running.append(service)
            if not asyncio.run(
                wait_until_serving(service.port, service.process, READY_TIMEOUT_SECONDS)
            ):
                console.print(f"[red]{name} did not become ready; see {service.log}[/red]")
                raise typer.Exit(1)
        _write_endpoints(state_dir, running)
        _print_ready(
            running, tokens, state_dir, database_url if database is None else database.dsn()
        )
        _supervise(running, stop)
    finally:
        _stop_all(running)
        if database is not None:
            database.stop()
        console.print("stopped")


def _stop_requested() -> list[bool]:
    flag = [False]

    def handler(signum: int, frame: object) -> None:
        flag[0] = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return flag


def _supervise(running: list[RunningService], stop: list[bool]) -> None:
    """Wait for Ctrl-C / SIGTERM; report services that exit on their own."""
    reported: set[str] = set()
    while not stop[0]:
        for service in running:
            code = service.process.poll()
            if code is not None and service.name not in reported:
                reported.add(service.name)
                console.print(f"[red]{service.name} exited with {code}; see {service.log}[/red]")
        time.sleep(0.2)


def _write_endpoints(state_dir: Path, running: list[RunningService]) -> None:
    """Record where each service listens, for scripts and the other CLI commands."""
    endpoints = {
        s.name: {"grpc": f"127.0.0.1:{s.port}", "metrics": f"127.0.0.1:{s.metrics_port}"}
        for s in running
    }
    (state_dir / "endpoints.json").write_text(json.dumps(endpoints, indent=2))


def _print_ready(
    running: list[RunningService], tokens: dict[str, str], state_dir: Path, dsn: str
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
    core_port = running[0].port
    console.print(
        f"try: grpcurl -plaintext -H 'authorization: Bearer {tokens['admin']}' "
        f"127.0.0.1:{core_port} lodestar.core.v1.RegistryService/ListModules"
    )
    console.print("[bold green]ready[/bold green] — Ctrl-C stops everything", highlight=False)
    sys.stdout.flush()


def _client_defaults(target: str | None, token: str | None, state_dir: Path) -> tuple[str, str]:
    import yaml

    tokens_file = state_dir / "tokens.yaml"
    tokens = yaml.safe_load(tokens_file.read_text()) if tokens_file.exists() else {}
    token = token or tokens.get("admin")
    if not token:
        raise typer.BadParameter(
            "no token: pass --token, set LODESTAR_TOKEN, or run `lodestar up` first"
        )
    return target or os.environ.get("LODESTAR_CORE_ENDPOINT") or _local_core(state_dir), token


def _local_core(state_dir: Path) -> str:
    endpoints = state_dir / "endpoints.json"
    if endpoints.exists():
        address: str = json.loads(endpoints.read_text())[CORE]["grpc"]
        return address
    return "127.0.0.1:50051"


@app.command()
def modules(target: Target = None, token: Token = None, state_dir: StateDir = STATE_DIR) -> None:
    """List registered modules and their health."""
    from lodestar.common.sdk import connect
    from lodestar.core.v1 import registry_pb2, registry_pb2_grpc

    address, secret = _client_defaults(target, token, state_dir)

    async def fetch() -> list[registry_pb2.Module]:
        async with connect(address, secret) as channel:
            reply = await registry_pb2_grpc.RegistryServiceStub(channel).ListModules(
                registry_pb2.ListModulesRequest()
            )
            return list(reply.modules)

    table = Table(title="modules")
    for column in (
        "name",
        "version",
        "endpoint",
        "enabled",
        "alive",
        "status",
        "latency ms",
        "last error",
    ):
        table.add_column(column)
    for module in _run_rpc(fetch()):
        status = (
            registry_pb2.HealthStatus.Name(module.health.status)
            .removeprefix("HEALTH_STATUS_")
            .lower()
        )
        table.add_row(
            module.name,
            module.version,
            module.endpoint,
            str(module.enabled),
            str(module.alive),
            status,
            f"{module.health.latency_ms:.1f}",
            module.health.last_error,
        )
    console.print(table)


@app.command()
def subscriptions(
    target: Target = None, token: Token = None, state_dir: StateDir = STATE_DIR
) -> None:
    """List subscriptions with their position and lag."""
    from lodestar.common.sdk import connect
    from lodestar.core.v1 import bus_pb2, bus_pb2_grpc

    address, secret = _client_defaults(target, token, state_dir)

    async def fetch() -> list[bus_pb2.Subscription]:
        async with connect(address, secret) as channel:
            reply = await bus_pb2_grpc.EventBusServiceStub(channel).ListSubscriptions(
                bus_pb2.ListSubscriptionsRequest()
            )
            return list(reply.subscriptions)

    table = Table(title="subscriptions")
    for column in ("name", "module", "acked", "head", "lag", "connected", "dead letters"):
        table.add_column(column)
    for sub in _run_rpc(fetch()):
        table.add_row(
            sub.name,
            sub.module,
            str(sub.acked_sequence),
            str(sub.head_sequence),
            str(sub.lag),
            str(sub.connected),
            str(sub.dead_letters),
        )
    console.print(table)


@events_app.command("tail")
def tail(
    event_type: Annotated[
        list[str] | None, typer.Option("--type", help="only these event types")
    ] = None,
    subscription: Annotated[str, typer.Option(help="durable subscription name")] = "cli-tail",
    from_start: Annotated[
        bool, typer.Option(help="start at the oldest event of a new subscription")
    ] = False,
    limit: Annotated[int, typer.Option(help="stop after N events (0: run until Ctrl-C)")] = 0,
    target: Target = None,
    token: Token = None,
    state_dir: StateDir = STATE_DIR,
) -> None:
    """Print events as JSON lines as they arrive."""
    from google.protobuf import json_format

    from lodestar.common.events import unpack
    from lodestar.common.sdk import Subscriber, connect
    from lodestar.core.v1 import bus_pb2

    address, secret = _client_defaults(target, token, state_dir)

    async def follow() -> None:
        async with connect(address, secret) as channel:
            seen = 0

            async def show(received: ReceivedEvent) -> None:
                nonlocal seen
                payload = json_format.MessageToDict(unpack(received.event))
                line = {
                    "sequence": received.sequence,
                    "id": received.event.id,
                    "type": received.event.type,
                    "source": received.event.source,
                    "data": payload,
                }
                print(json.dumps(line), flush=True)
                seen += 1
                if limit and seen >= limit:
                    subscriber.stop()

            start = bus_pb2.START_POSITION_EARLIEST if from_start else bus_pb2.START_POSITION_LATEST
            subscriber = Subscriber(
                channel,
                subscription=subscription,
                handler=show,
                event_types=event_type or [],
                start=start,
            )
            await subscriber.run()

    _run_rpc(follow())


@app.command()
def publish(
    event_type: Annotated[str, typer.Argument(help="e.g. lodestar.usage.v1.RequestCompleted")],
    data: Annotated[str, typer.Argument(help="the payload as JSON")],
    source: Annotated[str, typer.Option(help="CloudEvents source")] = "lodestar://cli",
    target: Target = None,
    token: Token = None,
    state_dir: StateDir = STATE_DIR,
) -> None:
    """Publish one event and print its id once core has committed it."""
    from google.protobuf import json_format

    from lodestar.common.events import EVENT_TYPES
    from lodestar.common.sdk import Publisher, connect

    payload_cls = EVENT_TYPES.get(event_type)
    if payload_cls is None:
        raise typer.BadParameter(
            f"unknown type; known: {', '.join(sorted(EVENT_TYPES))}", param_hint="EVENT_TYPE"
        )
    try:
        payload = json_format.Parse(data, payload_cls())
    except json_format.ParseError as exc:
        raise typer.BadParameter(str(exc), param_hint="DATA") from None
    address, secret = _client_defaults(target, token, state_dir)

    async def send() -> str:
        async with (
            connect(address, secret) as channel,
            Publisher(channel, source=source) as publisher,
        ):
            return (await publisher.publish(payload)).event_id

    console.print(_run_rpc(send()))


def _run_rpc(coroutine: Any) -> Any:
    return run_rpc(coroutine, console)


def main() -> None:
    """Console entry point."""
    app()


register_usage_commands(app)  # lodestar usage …, lodestar budgets …
register_spool_commands(app)  # lodestar spool list, lodestar spool replay
register_audit_commands(app)  # lodestar audit
register_token_commands(app)  # lodestar tokens rotate, lodestar tokens list

if __name__ == "__main__":
    main()
