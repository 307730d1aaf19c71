"""`lodestar up` on a database the user names, read from the variable the services read."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_suite_up import LODESTAR, lodestar, wait_for_line

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("variable", "deprecated"),
    [("LODESTAR_DATABASE__URL", False), ("LODESTAR_DATABASE_URL", True)],
    ids=["services-name", "old-name"],
)
def test_up_uses_the_database_named_in_the_environment(
    database_url: str, tmp_path: Path, variable: str, deprecated: bool
):
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LODESTAR_DATABASE")}
    process = subprocess.Popen(
        [*LODESTAR, "up", "--port-base", "0", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env={**env, variable: database_url},
    )
    try:
        lines = wait_for_line(process, "Ctrl-C stops everything", timeout=120)
        output = "".join(lines)
        assert "embedded Postgres" not in output
        assert not (state / "pg").exists()
        assert ("LODESTAR_DATABASE_URL is deprecated" in output) is deprecated
        modules = lodestar(state, "modules")
        assert modules.returncode == 0, modules.stderr
        assert "usage-tracker" in modules.stdout
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
