"""The ``lodestar`` CLI starts without the heavy libraries: commands import them when they run.

Not a timing test: it checks which modules a fresh interpreter has loaded after importing the CLI
and rendering help, which is what start-up time follows from. The service packages' commands come
through the ``lodestar.cli`` entry points: listing them in ``--help`` may import each package's
``cli`` module (typer, rich and ``cli_support`` only), never the service itself.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: Loaded only by the commands that need them (a call, ``up``), never to build the app or show help.
HEAVY = (
    "opentelemetry",
    "grpc",
    "grpc_health",
    "asyncpg",
    "structlog",
    "yaml",
    "google.protobuf",
    "prometheus_client",
    "lodestar.common.auth",
    "lodestar.common.config",
    "lodestar.common.telemetry",
    "lodestar.common.sdk",
    "lodestar.common.embedded",
    "lodestar.core",
    "lodestar.usage",
    "lodestar.audit",
    "lodestar.common.events",
)
#: Of a service package, only these modules may load to build the app or show help.
SERVICE_PACKAGES = ("lodestar_core", "lodestar_usage", "lodestar_learning", "lodestar_health")
LIGHT_SERVICE_MODULES = {f"{p}{suffix}" for p in SERVICE_PACKAGES for suffix in ("", ".cli")}

PROBE = """
import json, sys
from typer.main import get_command
import lodestar.common.cli as cli
args = json.loads(sys.argv[1])
if args:
    try:
        get_command(cli.app).main(args, prog_name="lodestar")
    except SystemExit:
        pass
print(json.dumps(sorted(sys.modules)))
"""


def loaded_modules(*args: str) -> list[str]:
    """The modules a fresh interpreter holds after importing the CLI and running ``args``."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(args))],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    names: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return names


def heavy(names: list[str]) -> list[str]:
    """The names among ``names`` that belong to a heavy package or are a service's internals."""
    return [
        n
        for n in names
        if any(n == h or n.startswith(h + ".") for h in HEAVY)
        or (n.split(".")[0] in SERVICE_PACKAGES and n not in LIGHT_SERVICE_MODULES)
    ]


def test_importing_the_cli_loads_no_heavy_library():
    names = loaded_modules()
    assert "lodestar.common.cli" in names
    assert heavy(names) == []


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["up", "--help"],
        ["tokens", "rotate", "--help"],
        ["budgets", "create", "--help"],
        ["prices", "set", "--help"],
        ["events", "tail", "--help"],
        ["dead-letters", "list", "--help"],
        ["audit", "--help"],
        ["spool", "replay", "--help"],
    ],
    ids=" ".join,
)
def test_help_loads_no_heavy_library(args: list[str]):
    names = loaded_modules(*args)
    # help was rendered: by typer's renderer, or for the root screen by lodestar's lighter one,
    # which leaves typer's (and its Markdown and traceback imports) unloaded
    assert ("typer.rich_utils" in names) == (args != ["--help"])
    assert heavy(names) == []


def test_help_lists_the_installed_packages_commands_and_imports_only_their_cli_modules():
    names = loaded_modules("--help")
    assert {"lodestar_core.cli", "lodestar_usage.cli"} <= set(names)


def test_help_builds_no_commands_options_and_reads_entry_points_without_importlib_metadata():
    """Listing commands needs their help only: typer's option coercion (pydantic) never loads."""
    names = set(loaded_modules("--help"))
    assert "pydantic" not in names
    assert "importlib.metadata" not in names


def test_a_command_imports_only_its_own_package():
    names = loaded_modules("budgets", "list", "--help")
    assert "lodestar_usage.cli" in names
    assert "lodestar_core.cli" not in names


def test_a_command_still_imports_what_it_needs():
    names = loaded_modules("modules", "--target", "127.0.0.1:1", "--token", "x")
    assert "grpc" in names
    assert "lodestar.core.v1.registry_pb2_grpc" in names
    # The CLI's channel needs gRPC alone: not the SDK with OpenTelemetry and structlog.
    assert not [n for n in names if n.startswith(("opentelemetry", "structlog"))]
