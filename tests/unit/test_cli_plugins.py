"""``lodestar`` commands come from the installed packages' ``lodestar.cli`` entry points.

A package's commands appear in ``--help`` and run; without the package (its entry points gone, as
after ``pip uninstall``) they are gone and the rest of the CLI works; a broken entry point is named
on stderr and skipped. The CLI reads the entry points itself (start-up); a test holds it to what
``importlib.metadata`` reads. Also the connection plumbing every command shares
(``cli_support``): where the address, token and state dir come from, and how refusals read.
"""

from __future__ import annotations

import importlib.metadata
import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lodestar.common import cli, cli_support
from lodestar.common.cli import CommandSource, app
from lodestar.common.cli_support import (
    CORE,
    Client,
    Endpoint,
    describe_rpc_error,
    in_flags,
    resolve_address,
)

CORE_COMMANDS = {"modules", "subscriptions", "dead-letters", "events", "publish"}
USAGE_COMMANDS = {"usage", "budgets", "prices"}
OWN_COMMANDS = {"up", "tokens", "spool", "audit"}


def invoke(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """Run ``lodestar args`` in this process, wide enough that help lines do not wrap."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **(env or {})})


def listed(help_text: str) -> set[str]:
    """The command names a help screen's command panels list."""
    names = set()
    for line in help_text.splitlines():
        cells = line.strip("│ ").split()
        if cells and cells[0].replace("-", "").isalpha() and line.startswith("│ "):
            names.add(cells[0])
    return names


def without_distribution(name: str) -> Callable[[], list[CommandSource]]:
    """The installed command sources as if the distribution ``name`` were uninstalled."""
    real = cli.installed_command_sources

    def sources() -> list[CommandSource]:
        return [source for source in real() if source.distribution != name]

    return sources


def with_extra(*extra: CommandSource) -> Callable[[], list[CommandSource]]:
    """The installed command sources and ``extra``."""
    real = cli.installed_command_sources

    def sources() -> list[CommandSource]:
        return [*real(), *extra]

    return sources


def test_the_entry_points_read_are_those_importlib_metadata_sees():
    expected = {
        (e.name, e.value, e.dist.name if e.dist else None)
        for e in importlib.metadata.entry_points(group="lodestar.cli")
    }
    found = {(s.name, s.value, s.distribution) for s in cli.installed_command_sources()}
    assert found == expected
    assert {name for name, _, _ in found} >= CORE_COMMANDS | USAGE_COMMANDS


def test_help_lists_every_installed_command_by_package():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    assert listed(result.output) >= OWN_COMMANDS | CORE_COMMANDS | USAGE_COMMANDS
    assert "Commands of lodestar-core" in result.output
    assert "Commands of lodestar-usage-tracker" in result.output


def test_without_the_usage_tracker_package_its_commands_are_gone_and_the_rest_work(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(
        cli, "installed_command_sources", without_distribution("lodestar-usage-tracker")
    )
    shown = invoke("--help")
    assert shown.exit_code == 0, shown.output
    assert listed(shown.output) & USAGE_COMMANDS == set()
    assert listed(shown.output) >= OWN_COMMANDS | CORE_COMMANDS

    gone = invoke("budgets", "list")
    assert gone.exit_code == 2
    assert "No such command 'budgets'" in gone.output

    assert invoke("modules", "--help").exit_code == 0
    assert invoke("tokens", "list", "--help").exit_code == 0


def test_without_core_only_the_suite_wide_commands_remain(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cli, "installed_command_sources", without_distribution("lodestar-core"))
    shown = invoke("--help")
    assert shown.exit_code == 0, shown.output
    assert listed(shown.output) & CORE_COMMANDS == set()
    assert invoke("events", "tail").exit_code == 2


def test_a_broken_entry_point_is_named_on_stderr_and_the_others_still_work(
    monkeypatch: pytest.MonkeyPatch,
):
    broken = CommandSource("broken", "lodestar_no_such_package.cli:app", "lodestar-broken")
    monkeypatch.setattr(cli, "installed_command_sources", with_extra(broken))
    shown = invoke("--help")
    assert shown.exit_code == 0, shown.output
    assert "'broken' command" in shown.stderr
    assert "ModuleNotFoundError" in shown.stderr
    assert "broken" not in listed(shown.stdout)
    assert listed(shown.stdout) >= CORE_COMMANDS | USAGE_COMMANDS

    called = invoke("broken")
    assert called.exit_code == 2
    assert "could not be loaded" in called.stderr


def test_an_entry_point_never_replaces_a_command_of_the_cli_itself(monkeypatch: pytest.MonkeyPatch):
    impostor = CommandSource("up", "lodestar_core.cli:modules", "lodestar-impostor")
    monkeypatch.setattr(cli, "installed_command_sources", with_extra(impostor))
    shown = invoke("up", "--help")
    assert shown.exit_code == 0, shown.output
    assert "Start core and every installed module" in shown.output


def test_a_new_distribution_adds_a_command_and_a_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A package installed on the path (a dist-info with entry points, as pip writes it)."""
    package = tmp_path / "lodestar_fake"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text(
        textwrap.dedent(
            '''
            import typer

            fake_app = typer.Typer(help="Fake things.", no_args_is_help=True)

            @fake_app.command("list")
            def list_fakes() -> None:
                """List the fakes."""
                print("fake-1")

            def hello(name: str = "world") -> None:
                """Say hello."""
                print(f"hello {name}")
            '''
        )
    )
    info = tmp_path / "lodestar_fake-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lodestar-fake\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[lodestar.cli]\nfakes = lodestar_fake.cli:fake_app\nhello = lodestar_fake.cli:hello\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    shown = invoke("--help")
    assert {"fakes", "hello"} <= listed(shown.output)
    assert "Commands of lodestar-fake" in shown.output
    assert invoke("fakes", "list").stdout == "fake-1\n"
    assert invoke("hello", "--name", "lodestar").stdout == "hello lodestar\n"


# --- the connection plumbing every command shares ------------------------------------------------


def test_the_address_comes_from_target_then_variable_then_endpoints_file_then_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    usage = Endpoint("usage-tracker", "LODESTAR_USAGE_ENDPOINT", "127.0.0.1:50061")
    monkeypatch.delenv("LODESTAR_USAGE_ENDPOINT", raising=False)
    assert resolve_address(usage, None, tmp_path) == "127.0.0.1:50061"
    (tmp_path / "endpoints.json").write_text(
        json.dumps({"usage-tracker": {"grpc": "127.0.0.1:6001"}, "core": {"grpc": "x:1"}})
    )
    assert resolve_address(usage, None, tmp_path) == "127.0.0.1:6001"
    monkeypatch.setenv("LODESTAR_USAGE_ENDPOINT", "127.0.0.1:6002")
    assert resolve_address(usage, None, tmp_path) == "127.0.0.1:6002"
    assert resolve_address(usage, "127.0.0.1:6003", tmp_path) == "127.0.0.1:6003"


def test_the_token_comes_from_the_flag_else_the_local_admin_token(tmp_path: Path):
    (tmp_path / "tokens.yaml").write_text("admin: local-admin\npublisher: p\n")
    assert Client(CORE, state_dir=tmp_path).secret() == "local-admin"
    assert Client(CORE, token="given", state_dir=tmp_path).secret() == "given"


def test_the_state_dir_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """LODESTAR_STATE_DIR replaces --state-dir: the command finds the tokens it holds there."""
    monkeypatch.delenv("LODESTAR_TOKEN", raising=False)
    monkeypatch.delenv("LODESTAR_CORE_ENDPOINT", raising=False)
    missing = invoke("modules", env={"LODESTAR_STATE_DIR": str(tmp_path)})
    assert missing.exit_code == 2
    assert f"{tmp_path} has no tokens.yaml" in missing.output
    assert "LODESTAR_STATE_DIR" in missing.output


def test_refusals_name_the_flags_the_user_typed():
    flags = {"budget.scope_value": "--value", "budget.scope": "--scope"}
    assert in_flags("budget.scope_value: required", flags) == "--value: required"
    assert in_flags("budget.scope: one of GLOBAL", flags) == "--scope: one of GLOBAL"
    # Only a blamed field (followed by a colon) is replaced, not the same word in the message.
    assert in_flags("subscription: no subscription named 'x'", {"subscription": "--name"}) == (
        "--name: no subscription named 'x'"
    )
    line = describe_rpc_error("INVALID_ARGUMENT", "budget.scope_value: required", "s", "a", flags)
    assert line == "INVALID_ARGUMENT: --value: required"


def test_an_unreachable_or_wrong_service_is_said_in_words():
    down = describe_rpc_error("UNAVAILABLE", "failed to connect\nmore", "core", "127.0.0.1:1")
    assert down.startswith("cannot reach core at 127.0.0.1:1 (UNAVAILABLE: failed to connect)")
    assert "--target" in down
    assert "\n" not in down
    wrong = describe_rpc_error("UNIMPLEMENTED", "Method not found!", "core", "127.0.0.1:50061")
    assert "is --target the address of core?" in wrong


def test_every_calling_command_has_the_same_connection_options():
    for command in (
        ["modules"],
        ["events", "tail"],
        ["budgets", "list"],
        ["prices", "set"],
        ["audit"],
        ["spool", "replay"],
    ):
        shown = invoke(*command, "--help")
        assert shown.exit_code == 0, shown.output
        for option in ("--target", "--token", "--state-dir", "--tls", "--tls-ca", "--tls-cert"):
            assert option in shown.output, (command, option)
        assert cli_support.CONNECTION_PANEL in shown.output
