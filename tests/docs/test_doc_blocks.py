"""Every shell block of the docs runs against a `lodestar up` suite, as a reader would type it.

Blocks are fenced ```bash. One that cannot run here says why in a comment on the line before it:
``<!-- not run: the reason -->``. The others run in document order, file by file, in a folder
whose ``.lodestar`` is the suite's state (as after `make run`), with the suite's ports in place of
the documented defaults and ``<id>`` replaced by the last id a command printed. ``T`` and
``ADMIN`` hold the admin token (API.md says so); grpcurl is the one `make` installs into .venv.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_suite_up import lodestar_up, wait_registered

REPO = Path(__file__).resolve().parents[2]
DOCS = [
    REPO / "README.md",
    *sorted((REPO / "docs").rglob("*.md")),
    REPO / "libs" / "common" / "README.md",
    *sorted((REPO / "services").glob("*/README.md")),
    *sorted((REPO / "services").glob("*/API.md")),
]
SHELL = {"bash", "sh", "shell"}
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
#: A plain block starting like this is a command that should have been marked ```bash.
COMMAND = re.compile(
    r"^(\$ |\.venv/|lodestar|grpcurl|python|make|kubectl|helm|curl|docker|psql|cd |export "
    r"|[A-Z]+=)",
    re.M,
)
DOCUMENTED_PORTS = {
    "core": 50051,
    "usage-tracker": 50061,
    "learning": 50071,
    "health-monitor": 50081,
}
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
JSON_ID = re.compile(rf'"(?:id|reservationId)": "({UUID})"')


#: Variables a command sets (`U=127.0.0.1:50061`) reach the commands after it, as in one shell.
SOURCE_SHELL_STATE = "if [ -f .shell-state ]; then source .shell-state; fi"
SAVE_SHELL_STATE = "declare -p | grep -v '^declare -[a-zA-Z]*r' > .shell-state"


@dataclass(frozen=True)
class Block:
    """A fenced block of a doc."""

    path: Path
    line: int
    language: str
    text: str
    not_run: str | None

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> Iterator[Block]:
    text = path.read_text()
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = NOT_RUN.search(before)
        line = text.count("\n", 0, match.start()) + 1
        yield Block(path, line, match[1], match[2], reason[1] if reason else None)


def commands(text: str) -> list[str]:
    """The block as separate commands (continuations joined); whole when it holds a heredoc."""
    if "<<" in text:
        return [text]
    joined = text.replace("\\\n", " ")
    return [
        line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def test_every_command_block_is_marked_as_shell() -> None:
    unmarked = [
        str(b) for path in DOCS for b in blocks(path) if not b.language and COMMAND.search(b.text)
    ]
    assert not unmarked, f"commands in blocks not fenced ```bash: {unmarked}"


def test_blocks_not_run_say_why() -> None:
    skipped = [b for path in DOCS for b in blocks(path) if b.language in SHELL and b.not_run]
    assert skipped, "the docs have blocks that need a cluster or Docker"
    assert all(len(b.not_run or "") > 10 for b in skipped)


@dataclass
class Reader:
    """A shell in a folder set up like the repository after `make run`."""

    folder: Path
    env: dict[str, str]
    ports: dict[str, int]
    last_id: str = ""

    def run(self, block: Block) -> None:
        for command in commands(block.text):
            command = self._localised(command)
            # `status` catches a failure that -e lets through (`lodestar x && echo ok`).
            script = f"{SOURCE_SHELL_STATE}\n{command}\nstatus=$?\n{SAVE_SHELL_STATE}\nexit $status"
            done = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", script],
                cwd=self.folder,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, (
                f"{block}: `{command}` exited {done.returncode}\n{done.stdout}\n{done.stderr}"
            )
            found = JSON_ID.findall(done.stdout) or re.findall(UUID, done.stdout)
            if found:
                self.last_id = found[-1]

    def _localised(self, command: str) -> str:
        for service, port in DOCUMENTED_PORTS.items():
            command = command.replace(f"127.0.0.1:{port}", f"127.0.0.1:{self.ports[service]}")
        return command.replace("<id>", self.last_id)


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    folder = tmp_path_factory.mktemp("reader")
    with lodestar_up(folder):
        state = folder / "state"
        wait_registered(state, {"usage-tracker", "learning", "health-monitor"})
        (folder / ".lodestar").symlink_to(state)
        (folder / ".venv").symlink_to(REPO / ".venv")
        admin = yaml.safe_load((state / "tokens.yaml").read_text())["admin"]
        endpoints = json.loads((state / "endpoints.json").read_text())
        ports = {name: int(e["grpc"].rsplit(":", 1)[1]) for name, e in endpoints.items()}
        env = {
            **os.environ,
            "PATH": os.pathsep.join([str(REPO / ".venv" / "bin"), os.environ.get("PATH", "")]),
            "T": admin,
            "ADMIN": admin,
        }
        yield Reader(folder, env, ports)


def runnable(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.language in SHELL and not b.not_run]


@pytest.mark.parametrize(
    "path", [p for p in DOCS if runnable(p)], ids=lambda p: str(p.relative_to(REPO))
)
def test_the_shell_blocks_of_a_doc_run(reader: Reader, path: Path) -> None:
    for block in runnable(path):
        reader.run(block)
