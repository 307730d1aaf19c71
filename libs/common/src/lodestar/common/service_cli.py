"""The command line every service shares: ``serve`` and ``migrate``.

Flags are the top configuration layer: ``--port``, ``--host``, ``--config-dir`` and, for any other
field, ``--set dotted.key=value``.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, Protocol, TypeVar

import typer

from lodestar.common.config import ServiceSettings, load_settings
from lodestar.common.db import apply_migrations, open_service_database
from lodestar.common.errors import ConfigurationError, LodestarError
from lodestar.common.logging import configure_logging, get_logger
from lodestar.common.module import Module, ModuleInfo
from lodestar.common.server import ServiceRunner

S = TypeVar("S", bound=ServiceSettings)
S_contra = TypeVar("S_contra", bound=ServiceSettings, contravariant=True)


class ModuleClass(Protocol[S_contra]):
    """A module class: it declares its ``info`` and is built from its settings."""

    @property
    def info(self) -> ModuleInfo:
        """The module's declaration (a class attribute of the module class)."""
        ...

    def __call__(self, settings: S_contra, /) -> Module:
        """A module serving with ``settings``."""
        ...


@dataclass(frozen=True)
class ServiceSpec(Generic[S]):
    """What the shared runtime needs to know to run a service: its module and settings classes.

    The module class's ``info`` names the service and holds its migrations.
    """

    module_cls: ModuleClass[S]
    settings_cls: type[S]

    @property
    def info(self) -> ModuleInfo:
        """The module's one declaration of name, version and migrations."""
        return self.module_cls.info

    @property
    def name(self) -> str:
        """The module's name."""
        return self.info.name

    @property
    def migrations(self) -> Path | None:
        """The module's migrations folder, read by ``migrate`` and at start-up."""
        return self.info.migrations


ConfigDir = Annotated[
    Path | None, typer.Option("--config-dir", help="folder with lodestar.yaml and modules/")
]
Port = Annotated[int | None, typer.Option(help="gRPC port (0 picks a free one)")]
Host = Annotated[str | None, typer.Option(help="address to listen on")]
Overrides = Annotated[
    list[str] | None, typer.Option("--set", help="any setting as dotted.key=value; repeatable")
]


def cli_overrides(port: int | None, host: str | None, pairs: list[str] | None) -> dict[str, Any]:
    """The CLI layer: explicit flags and ``--set key=value`` pairs."""
    overrides: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigurationError(f"--set {pair!r} must look like dotted.key=value")
        overrides[key.strip()] = value
    if port is not None:
        overrides["port"] = port
    if host is not None:
        overrides["host"] = host
    return overrides


def service_app(spec: ServiceSpec[Any]) -> typer.Typer:
    """A typer app with ``serve`` and ``migrate`` for ``spec``."""
    app = typer.Typer(help=f"Lodestar {spec.name} service", no_args_is_help=True)

    def settings_for(config_dir: Path | None, overrides: dict[str, Any]) -> Any:
        settings = load_settings(spec.settings_cls, spec.name, config_dir=config_dir, cli=overrides)
        configure_logging(spec.name, settings.log_level, settings.log_format)
        return settings

    @app.command()
    def serve(
        config_dir: ConfigDir = None, port: Port = None, host: Host = None, set_: Overrides = None
    ) -> None:
        """Serve gRPC until SIGTERM."""
        _exit_on_error(
            lambda: asyncio.run(
                _serve(spec, settings_for(config_dir, cli_overrides(port, host, set_)))
            )
        )

    @app.command()
    def migrate(config_dir: ConfigDir = None, set_: Overrides = None) -> None:
        """Apply pending schema migrations and exit."""
        _exit_on_error(
            lambda: asyncio.run(
                _migrate(spec, settings_for(config_dir, cli_overrides(None, None, set_)))
            )
        )

    return app


async def _serve(spec: ServiceSpec[Any], settings: ServiceSettings) -> None:
    tune_garbage_collector()
    await ServiceRunner(spec.module_cls(settings), settings).run()


#: Allocations between young-generation collections (CPython's default is 700).
YOUNG_COLLECTION_THRESHOLD = 50_000


def tune_garbage_collector() -> None:
    """Collect less often, and freeze the objects alive at startup out of every scan.

    A service allocates many short-lived objects per event (messages, rows) and almost none of
    them form cycles, so the default young-generation threshold spends CPU rescanning live
    objects.
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)


async def _migrate(spec: ServiceSpec[Any], settings: ServiceSettings) -> None:
    if spec.migrations is None:
        return
    pool = await open_service_database(settings.database)
    try:
        async with pool.acquire() as conn:
            applied = await apply_migrations(conn, settings.database.schema_name, spec.migrations)
    finally:
        await pool.close()
    get_logger(__name__).info(
        "migrations done", applied=applied, schema=settings.database.schema_name
    )


def _exit_on_error(run: Callable[[], None]) -> None:
    try:
        run()
    except LodestarError as exc:
        print(f"lodestar: {exc.details()}", file=sys.stderr)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
