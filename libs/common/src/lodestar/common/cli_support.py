"""What every ``lodestar`` command that calls a service shares, defined once.

``with_client(endpoint)`` gives a command the connection options (``--target``, ``--token``,
``--state-dir``, ``--tls``, ``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--tls-server-name``)
and hands it a ``Client``, which resolves them the same way for every command:

- the address: ``--target``, else the service's ``LODESTAR_<…>_ENDPOINT`` variable, else its entry
  in ``<state-dir>/endpoints.json`` written by ``lodestar up``, else its default port;
- the token: ``--token`` / ``LODESTAR_TOKEN``, else the local admin token in
  ``<state-dir>/tokens.yaml``;
- the state dir: ``--state-dir``, else ``LODESTAR_STATE_DIR``, else ``.lodestar``.

``Client.run`` runs a command's coroutine and turns a gRPC error into one line naming the service,
its address and, for bad input, the CLI flag instead of the request field; exit status 1.

Only typer and rich are imported here; gRPC, YAML and the stubs load when a command runs. The
channel is built with gRPC alone (the SDK's ``connect`` also loads OpenTelemetry and structlog,
about a second of start-up a one-shot command does not need).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

if TYPE_CHECKING:
    import grpc

STATE_DIR_ENV = "LODESTAR_STATE_DIR"
DEFAULT_STATE_DIR = Path(".lodestar")
#: The help panel that groups the connection options of every command.
CONNECTION_PANEL = "Connection"
#: gRPC status codes that mean "not reached": the service is down or the address is wrong.
UNREACHABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")

R = TypeVar("R")

errors = Console(stderr=True, soft_wrap=True, highlight=False)


@dataclass(frozen=True)
class Endpoint:
    """How the CLI finds a service: its name in ``endpoints.json``, its variable, its default."""

    service: str
    env: str
    default: str


CORE = Endpoint("core", "LODESTAR_CORE_ENDPOINT", "127.0.0.1:50051")

StateDirOption = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        envvar=STATE_DIR_ENV,
        help="the folder where `lodestar up` keeps endpoints, tokens and logs",
        rich_help_panel=CONNECTION_PANEL,
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        envvar="LODESTAR_TOKEN",
        help="bearer token (default: the local admin token of `lodestar up`)",
        rich_help_panel=CONNECTION_PANEL,
        show_default=False,
    ),
]


def target_option(endpoint: Endpoint) -> Any:
    """The ``--target`` option of a command that calls ``endpoint``'s service."""
    return Annotated[
        str | None,
        typer.Option(
            help=f"{endpoint.service}'s address host:port (default: {endpoint.env}, else "
            f"`lodestar up`'s endpoints.json, else {endpoint.default})",
            rich_help_panel=CONNECTION_PANEL,
            show_default=False,
        ),
    ]


TlsOption = Annotated[
    bool,
    typer.Option(
        "--tls",
        envvar="LODESTAR_TLS",
        help="connect with TLS (implied by --tls-ca)",
        rich_help_panel=CONNECTION_PANEL,
    ),
]
TlsCaOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca",
        envvar="LODESTAR_TLS_CA",
        help="CA certificate (PEM) the server's certificate must chain to",
        rich_help_panel=CONNECTION_PANEL,
        show_default=False,
    ),
]
TlsCertOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-cert",
        envvar="LODESTAR_TLS_CERT",
        help="client certificate (PEM) for mutual TLS",
        rich_help_panel=CONNECTION_PANEL,
        show_default=False,
    ),
]
TlsKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-key",
        envvar="LODESTAR_TLS_KEY",
        help="the client certificate's private key (PEM)",
        rich_help_panel=CONNECTION_PANEL,
        show_default=False,
    ),
]
TlsServerNameOption = Annotated[
    str | None,
    typer.Option(
        "--tls-server-name",
        envvar="LODESTAR_TLS_SERVER_NAME",
        help="the name expected in the server's certificate (default: the target's host)",
        rich_help_panel=CONNECTION_PANEL,
        show_default=False,
    ),
]


@dataclass(frozen=True)
class Tls:
    """TLS settings of the CLI's channels; ``enabled`` False is plaintext."""

    enabled: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None


@dataclass
class Client:
    """The connection options of one command run, resolved on first use."""

    endpoint: Endpoint
    target: str | None = None
    token: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    tls: Tls = field(default_factory=Tls)
    #: CLI flag per request field, so that a refusal names what the user typed.
    flags: Mapping[str, str] = field(default_factory=dict)

    def address(self, endpoint: Endpoint | None = None) -> str:
        """The address of ``endpoint`` (default: the command's service)."""
        return resolve_address(endpoint or self.endpoint, self.target, self.state_dir)

    def secret(self) -> str:
        """The bearer token: ``--token`` / LODESTAR_TOKEN, else ``lodestar up``'s admin token."""
        return self.token or local_token("admin", self.state_dir)

    def channel(
        self, endpoint: Endpoint | None = None, token: str | None = None
    ) -> grpc.aio.Channel:
        """A channel to ``endpoint`` sending the token (or ``token``) with every call."""
        return open_channel(self.address(endpoint), token or self.secret(), self.tls)

    def run(self, coroutine: Coroutine[Any, Any, R], endpoint: Endpoint | None = None) -> R:
        """Run ``coroutine``; a gRPC error is one line on stderr and exit status 1."""
        target = endpoint or self.endpoint
        address = self.address(target)
        return run_rpc(coroutine, service=target.service, address=address, flags=self.flags)


def local_tokens(state_dir: Path) -> dict[str, str]:
    """The tokens ``lodestar up`` keeps in ``<state-dir>/tokens.yaml`` (empty without one)."""
    import yaml

    path = state_dir / "tokens.yaml"
    if not path.is_file():
        return {}
    tokens = yaml.safe_load(path.read_text())
    return {str(k): str(v) for k, v in tokens.items()} if isinstance(tokens, dict) else {}


def local_token(name: str, state_dir: Path) -> str:
    """The local token of ``name``; a usage error saying where tokens come from if there is none."""
    token = local_tokens(state_dir).get(name)
    if token:
        return token
    raise typer.BadParameter(
        f"no token: pass --token or set LODESTAR_TOKEN, or point --state-dir (or {STATE_DIR_ENV}) "
        f"at the folder `lodestar up` runs with ({state_dir.resolve()} has no tokens.yaml "
        f"with the {name!r} token)",
        param_hint="--token",
    )


def resolve_address(endpoint: Endpoint, target: str | None, state_dir: Path) -> str:
    """``target``, else the endpoint's variable, else ``endpoints.json``, else its default."""
    if target:
        return target
    if from_env := os.environ.get(endpoint.env):
        return from_env
    endpoints = state_dir / "endpoints.json"
    if endpoints.is_file():
        try:
            known = json.loads(endpoints.read_text())
            address = known.get(endpoint.service, {}).get("grpc")
        except (ValueError, AttributeError):
            address = None
        if isinstance(address, str) and address:
            return address
    return endpoint.default


#: Channel options of the CLI: large messages (exports), keepalive for long streams (tail).
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def open_channel(address: str, token: str, tls: Tls) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to ``address`` that sends ``authorization: Bearer <token>``."""
    import grpc

    options: list[tuple[str, Any]] = list(CHANNEL_OPTIONS)
    if not tls.enabled and tls.ca is None:
        return grpc.aio.insecure_channel(
            address, options=options, interceptors=bearer_interceptors(token)
        )
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(
            root_certificates=_read(tls.ca, "--tls-ca"),
            private_key=_read(tls.key, "--tls-key"),
            certificate_chain=_read(tls.cert, "--tls-cert"),
        ),
        grpc.access_token_call_credentials(token),
    )
    return grpc.aio.secure_channel(address, credentials, options=options)


def _read(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint=flag) from None


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors adding the bearer token to every kind of call on a plaintext channel.

    (gRPC sends call credentials only over TLS; ``lodestar up`` serves plaintext on 127.0.0.1.)
    """
    import grpc

    metadata = (("authorization", f"Bearer {token}"),)

    def with_token(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*(details.metadata or ()), *metadata),
            details.credentials,
            details.wait_for_ready,
        )

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
        async def intercept_unary_unary(self, call: Any, details: Any, request: Any) -> Any:
            return await call(with_token(details), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
        async def intercept_unary_stream(self, call: Any, details: Any, request: Any) -> Any:
            return await call(with_token(details), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
        async def intercept_stream_unary(self, call: Any, details: Any, requests: Any) -> Any:
            return await call(with_token(details), requests)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
        async def intercept_stream_stream(self, call: Any, details: Any, requests: Any) -> Any:
            return await call(with_token(details), requests)

    kinds: list[Any] = [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]
    return kinds


def run_rpc(
    coroutine: Coroutine[Any, Any, R],
    *,
    service: str = "the service",
    address: str = "",
    flags: Mapping[str, str] | None = None,
) -> R:
    """Run ``coroutine``; a gRPC error becomes one line on stderr and exit status 1, Ctrl-C 130."""
    import asyncio

    import grpc

    try:
        return asyncio.run(coroutine)
    except grpc.aio.AioRpcError as exc:
        fail(describe_rpc_error(exc.code().name, exc.details() or "", service, address, flags))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def describe_rpc_error(
    code: str, details: str, service: str, address: str, flags: Mapping[str, str] | None = None
) -> str:
    """One line for a refused or failed call: what went wrong, in the user's terms."""
    where = f"{service} at {address}" if address else service
    if code in UNREACHABLE:
        reason = details.splitlines()[0] if details else code
        return (
            f"cannot reach {where} ({code}: {reason}); is it running? Point --target at it, or "
            f"--state-dir (or {STATE_DIR_ENV}) at the folder `lodestar up` runs with"
        )
    if code == "UNIMPLEMENTED":
        return (
            f"{where} does not serve this call ({details or code}): is --target the address "
            f"of {service}?"
        )
    return f"{code}: {in_flags(details, flags or {})}"


def in_flags(text: str, flags: Mapping[str, str]) -> str:
    """``text`` with each request field it blames (``budget.scope_value: …``) named by its flag.

    Only a field followed by a colon is replaced: that is how a refusal names its field, and the
    same word elsewhere in the message (``no subscription named …``) stays.
    """
    import re

    if not flags:
        return text
    fields = "|".join(re.escape(name) for name in sorted(flags, key=len, reverse=True))
    return re.sub(rf"(?<![\w.\[\]-])(?:{fields})(?=:)", lambda m: flags[m.group()], text)


def fail(message: str, status: int = 1) -> NoReturn:
    """Print ``message`` as one red line on stderr and exit with ``status``."""
    errors.print(f"[red]{_escape(message)}[/red]")
    raise typer.Exit(status)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(" ".join(text.split()))


def with_client(
    endpoint: Endpoint, flags: Mapping[str, str] | None = None
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Give a command the connection options; it receives them as its first parameter, a Client.

    ``flags`` maps request fields to the command's flags (``budget.scope_value`` → ``--value``)
    for the messages of refused calls.
    """

    def decorate(command: Callable[..., R]) -> Callable[..., R]:
        signature = inspect.signature(command, eval_str=True)
        own = list(signature.parameters.values())[1:]
        shared = [
            inspect.Parameter(name, KEYWORD, default=default, annotation=kind)
            for name, kind, default in [("target", target_option(endpoint), None), *_SHARED]
        ]

        @functools.wraps(command)
        def run(**options: Any) -> R:
            client = Client(
                endpoint,
                target=options.pop("target"),
                token=options.pop("token"),
                state_dir=options.pop("state_dir"),
                tls=Tls(
                    enabled=options.pop("tls"),
                    ca=options.pop("tls_ca"),
                    cert=options.pop("tls_cert"),
                    key=options.pop("tls_key"),
                    server_name=options.pop("tls_server_name"),
                ),
                flags=flags or {},
            )
            return command(client, **options)

        parameters = [p.replace(kind=KEYWORD) for p in own] + shared
        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        del run.__wrapped__  # typer must see the new signature, not the command's
        return run

    return decorate


KEYWORD = inspect.Parameter.KEYWORD_ONLY
#: The connection options besides ``--target``: (parameter, annotation, default).
_SHARED: list[tuple[str, Any, Any]] = [
    ("token", TokenOption, None),
    ("state_dir", StateDirOption, DEFAULT_STATE_DIR),
    ("tls", TlsOption, False),
    ("tls_ca", TlsCaOption, None),
    ("tls_cert", TlsCertOption, None),
    ("tls_key", TlsKeyOption, None),
    ("tls_server_name", TlsServerNameOption, None),
]


def print_line(text: str) -> None:
    """Print ``text`` to stdout now; when the reader has gone (``| head``), exit quietly with 0."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Nothing more can be written; stdout points at /dev/null so the exit flush is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


def stdout_console() -> Console:
    """The console commands print tables to (wide when not a terminal, so lines do not wrap)."""
    return Console(width=None if sys.stdout.isatty() else 160)
