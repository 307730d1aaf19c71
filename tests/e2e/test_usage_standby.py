"""Two usage-tracker replicas: one consumes, the other stands by and takes over on kill -9.

Core and both trackers are real processes on one database and one tracker schema. The standby's
subscriber is refused with SUBSCRIPTION_HELD and waits; once the active tracker is SIGKILLed and
its core-side hold released by the broken stream, the standby ingests the rest: every event lands
in the ledger exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from lodestar.common.auth import Role
from lodestar.common.cli import free_port
from lodestar.common.sdk import Publisher, connect
from lodestar.common.testing import dev_credentials, kill9, service_env, start_process, wait_serving
from lodestar.usage.v1 import events_pb2 as ev

from .pooling import POOLED_SETTINGS, pooled_roles

pytestmark = [pytest.mark.faults, pytest.mark.e2e]
PER_PHASE = 1_000


class Cluster:
    """A core process and usage-tracker processes sharing one database."""

    def __init__(
        self,
        root: Path,
        database_url: str,
        schema: str,
        dsns: dict[str, str] | None = None,
        **settings: object,
    ) -> None:
        """``dsns`` gives core's and the tracker's own DSNs; else both use ``database_url``."""
        self.root = root
        self.database_url = database_url
        self.tracker_schema = tracker_schema(schema)
        self.dsns = dsns or {"core": database_url, "usage-tracker": database_url}
        self.settings = settings
        self.tokens = dev_credentials(root / "credentials.yaml", ["usage-tracker"])
        self.core_port = free_port()
        self.env = service_env(
            self.dsns["core"],
            root / "credentials.yaml",
            schema=schema,
            shutdown_grace_seconds=1,
            **settings,
        )
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def core_target(self) -> str:
        return f"127.0.0.1:{self.core_port}"

    async def start_core(self) -> None:
        core = start_process("lodestar_core", self.env, self.root / "core.log", self.core_port)
        self.processes.append(core)
        await wait_serving(self.core_target, "readiness")

    async def start_tracker(self, name: str) -> subprocess.Popen[bytes]:
        port = free_port()
        env = service_env(
            self.dsns["usage-tracker"],
            self.root / "credentials.yaml",
            schema=self.tracker_schema,
            core=self.core_target,
            token=self.tokens["usage-tracker"],
            spool_dir=self.root / f"spool-{name}",
            shutdown_grace_seconds=1,
            ingest__batch_max_events=100,
            **self.settings,
        )
        tracker = start_process("lodestar_usage", env, self.root / f"{name}.log", port)
        self.processes.append(tracker)
        await wait_serving(f"127.0.0.1:{port}", "readiness", timeout=60)
        return tracker

    async def ledger_rows(self) -> tuple[int, int]:
        """Rows in the ledger and distinct event ids among them."""
        conn = await asyncpg.connect(self.database_url)
        try:
            table = f"{self.tracker_schema}.ledger"
            if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                return 0, 0
            row = await conn.fetchrow(
                f"SELECT count(*) AS n, count(DISTINCT event_id) AS ids FROM {table}"
            )
            return int(row["n"]), int(row["ids"])
        finally:
            await conn.close()

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                kill9(process)


def tracker_schema(schema: str) -> str:
    return f"{schema}_usage"


@pytest.fixture(params=["direct", "pgbouncer"])
async def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str, schema: str
) -> AsyncIterator[Cluster]:
    """Core and trackers on Postgres directly, or through a transaction-pooling PgBouncer."""
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "direct":
            running = Cluster(tmp_path, database_url, schema)
        else:
            schemas = {f"core-{schema}": schema, f"usage-{schema}": tracker_schema(schema)}
            pooled = await stack.enter_async_context(pooled_roles(database_url, schemas))
            dsns = dict(zip(["core", "usage-tracker"], pooled.values(), strict=True))
            running = Cluster(tmp_path, database_url, schema, dsns, **POOLED_SETTINGS)
        stack.callback(running.close)
        await running.start_core()
        yield running


async def publish(cluster: Cluster, count: int, phase: str) -> None:
    async with (
        connect(cluster.core_target, cluster.tokens[Role.PUBLISHER]) as channel,
        Publisher(channel, source="test://standby") as publisher,
    ):
        await asyncio.gather(
            *(
                publisher.publish(ev.RequestCompleted(model="m", project=phase, task_id=str(i)))
                for i in range(count)
            )
        )


async def until(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_a_standby_tracker_takes_over_when_the_active_one_is_killed(cluster: Cluster):
    active = await cluster.start_tracker("active")
    await publish(cluster, PER_PHASE, "before")

    async def first_phase_ingested() -> bool:
        return (await cluster.ledger_rows())[0] >= PER_PHASE

    await until(first_phase_ingested, 60, "the active tracker to ingest")
    await cluster.start_tracker("standby")
    await asyncio.sleep(1.0)
    assert "standing by" in (cluster.root / "standby.log").read_text()

    kill9(active)
    await publish(cluster, PER_PHASE, "after")

    async def all_ingested() -> bool:
        return (await cluster.ledger_rows())[1] >= 2 * PER_PHASE

    await until(all_ingested, 60, "the standby to take over")
    await asyncio.sleep(0.5)  # anything stored twice would show now
    assert await cluster.ledger_rows() == (2 * PER_PHASE, 2 * PER_PHASE)
