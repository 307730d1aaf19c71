"""`lodestar up` as a user runs it: real processes on an embedded Postgres."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest
import yaml

from lodestar.common.cli import installed_services
from lodestar.common.sdk import connect
from lodestar.core.v1 import registry_pb2, registry_pb2_grpc

LODESTAR = [sys.executable, "-m", "lodestar.common.cli"]


def wait_for_line(process: subprocess.Popen[str], needle: str, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen; output so far:\n{''.join(lines)}")


def lodestar(state: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LODESTAR, *args, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_registered(state: Path, names: set[str], timeout: float = 30) -> set[str]:
    """The names `lodestar modules` lists once it lists all of ``names`` (or when time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        listed = lodestar(state, "modules").stdout
        found = {name for name in names if f" {name} " in listed}
        if found == names or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@contextmanager
def lodestar_up(folder: Path, *options: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """``lodestar up`` run in ``folder`` (state in folder/state) until it is ready; the process
    and the lines it printed up to ``ready``. Stopped with SIGTERM afterwards."""
    state = folder / "state"
    process = subprocess.Popen(
        [*LODESTAR, "up", "--port-base", "0", "--state-dir", str(state), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=folder,  # its config dir is folder/config
    )
    try:
        yield process, wait_for_line(process, "Ctrl-C stops everything", timeout=120)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def suite(tmp_path: Path):
    with lodestar_up(tmp_path) as (process, printed):
        database_line = next(line for line in printed if line.startswith("database:"))
        admin_dsn = database_line.split("database:", 1)[1].strip()
        yield process, tmp_path / "state", admin_dsn, printed


def test_up_publish_tail_and_clean_stop(suite):
    process, state, _, _ = suite
    endpoints = json.loads((state / "endpoints.json").read_text())
    installed = set(installed_services())
    assert {"core", "usage-tracker", "learning", "health-monitor"} <= installed
    assert set(endpoints) == installed, "every installed service is up"
    registered = wait_registered(state, installed - {"core"})
    assert registered >= installed - {"core"}

    published = lodestar(
        state,
        "publish",
        "lodestar.usage.v1.RequestCompleted",
        '{"model": "llama3:8b", "provider": "ollama", "tokens": {"input": 12}}',
    )
    assert published.returncode == 0, published.stdout + published.stderr
    event_id = published.stdout.strip()

    tail = lodestar(
        state, "events", "tail", "--from-start", "--limit", "1", "--subscription", "e2e-tail"
    )
    assert tail.returncode == 0, tail.stdout + tail.stderr
    line = json.loads(tail.stdout.strip().splitlines()[-1])
    assert line["id"] == event_id
    assert line["data"]["model"] == "llama3:8b"
    assert line["data"]["tokens"]["input"] == "12"  # int64 is a JSON string in proto3 JSON

    subs = lodestar(state, "subscriptions")
    assert "e2e-tail" in subs.stdout

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def test_ready_is_printed_once_every_module_reports_itself_healthy(suite):
    """A module that serves may still be starting (the tracker subscribing to core): `ready`
    waits for its report, so the first `lodestar modules` after it shows every module healthy."""
    _, state, _, printed = suite
    assert not [line for line in printed if "not healthy yet" in line]
    endpoints = json.loads((state / "endpoints.json").read_text())
    admin = yaml.safe_load((state / "tokens.yaml").read_text())["admin"]

    async def listed() -> dict[str, tuple[bool, int]]:
        async with connect(endpoints["core"]["grpc"], admin) as channel:
            reply = await registry_pb2_grpc.RegistryServiceStub(channel).ListModules(
                registry_pb2.ListModulesRequest()
            )
        return {m.name: (m.enabled, m.health.status) for m in reply.modules}

    healthy = (True, registry_pb2.HEALTH_STATUS_HEALTHY)
    assert asyncio.run(listed()) == dict.fromkeys(set(installed_services()) - {"core"}, healthy)


def test_each_service_connects_as_a_role_that_owns_only_its_schema(suite):
    _, state, admin_dsn, _ = suite
    wait_registered(state, set(installed_services()) - {"core"})

    async def look() -> tuple[dict[str, str], set[str]]:
        conn = await asyncpg.connect(admin_dsn)
        try:
            owners = await conn.fetch(
                "SELECT nspname, pg_get_userbyid(nspowner) AS owner FROM pg_namespace "
                "WHERE nspname = ANY($1::text[])",
                ["core", "usage_tracker", "learning", "health_monitor"],
            )
            users = await conn.fetch(
                "SELECT DISTINCT usename FROM pg_stat_activity WHERE usename LIKE 'lodestar_%'"
            )
        finally:
            await conn.close()
        return {r["nspname"]: r["owner"] for r in owners}, {r["usename"] for r in users}

    owners, connected = asyncio.run(look())
    assert owners == {
        "core": "lodestar_core",
        "usage_tracker": "lodestar_usage_tracker",
        "learning": "lodestar_learning",
        "health_monitor": "lodestar_health_monitor",
    }
    assert connected >= set(owners.values()), "each service is connected as its own role"
