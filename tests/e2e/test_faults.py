"""Faults: kill -9 a subscriber, kill -9 core mid-publish, restart Postgres.

Afterwards every acked event is delivered and stored exactly once; a subscriber may see an event
twice (at-least-once), never miss one.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lodestar.common.auth import Role
from lodestar.common.cli import free_port
from lodestar.common.embedded import EmbeddedPostgres
from lodestar.common.sdk import Publisher, connect
from lodestar.common.testing import dev_credentials, kill9, service_env, start_process, wait_serving
from lodestar.usage.v1 import events_pb2 as usage

pytestmark = pytest.mark.faults
CONSUMER = Path(__file__).with_name("consumer.py")


class Suite:
    """An embedded Postgres and a core process, each restartable."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pg = EmbeddedPostgres(root / "pg")
        self.tokens = dev_credentials(root / "credentials.yaml")
        self.port = free_port()
        self.core: subprocess.Popen[bytes] | None = None
        self.consumers: list[subprocess.Popen[bytes]] = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_core(self) -> None:
        env = service_env(self.pg.dsn(), self.root / "credentials.yaml", shutdown_grace_seconds=2)
        self.core = start_process("lodestar_core", env, self.root / "core.log", self.port)

    def start_consumer(self, subscription: str, out: Path) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [
                sys.executable,
                str(CONSUMER),
                self.target,
                self.tokens[Role.MODULE],
                subscription,
                str(out),
            ],
            stdout=(self.root / "consumer.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        self.consumers.append(process)
        return process

    def close(self) -> None:
        for process in [*self.consumers, self.core]:
            if process is not None and process.poll() is None:
                kill9(process)
        self.pg.discard()  # stops it (immediate) and deletes the cluster


@pytest.fixture
def suite(tmp_path: Path) -> Iterator[Suite]:
    suite = Suite(tmp_path)
    suite.pg.start()
    suite.start_core()
    try:
        yield suite
    finally:
        suite.close()


def completed(n: int) -> usage.RequestCompleted:
    return usage.RequestCompleted(model="m", provider="p", tokens=usage.TokenUsage(input=n))


async def publish_all(publisher: Publisher, count: int, offset: int = 0) -> list[str]:
    receipts = await asyncio.gather(
        *(publisher.publish(completed(offset + i)) for i in range(count))
    )
    return [r.event_id for r in receipts]


def handled_ids(out: Path) -> list[str]:
    return out.read_text().split() if out.exists() else []


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def stored_ids(suite: Suite) -> list[str]:
    conn = await asyncpg.connect(suite.pg.dsn())
    try:
        rows = await conn.fetch("SELECT id::text FROM core.events")
    finally:
        await conn.close()
    return [r["id"] for r in rows]


async def readiness(target: str, service: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return reply.status


async def test_kill9_subscriber_mid_stream_loses_nothing(suite: Suite, tmp_path: Path):
    await wait_serving(suite.target, "readiness")
    out = tmp_path / "handled.txt"
    async with (
        connect(suite.target, suite.tokens[Role.PUBLISHER]) as channel,
        Publisher(channel, source="test://faults") as publisher,
    ):
        first = await publish_all(publisher, 3000)
        consumer = suite.start_consumer("faults-sub", out)
        await wait_for(lambda: len(handled_ids(out)) >= 500, 60, "the consumer to get going")
        kill9(consumer)
        second = await publish_all(publisher, 1000, offset=3000)
    suite.start_consumer("faults-sub", out)
    expected = set(first) | set(second)
    await wait_for(lambda: expected <= set(handled_ids(out)), 60, "every event to be handled")
    handled = handled_ids(out)
    assert set(handled) == expected
    print(
        f"handled {len(handled)} deliveries for {len(expected)} events "
        f"({len(handled) - len(expected)} redelivered after the kill)"
    )


async def test_kill9_core_mid_publish_loses_nothing_and_stores_once(suite: Suite, tmp_path: Path):
    await wait_serving(suite.target, "readiness")
    async with connect(suite.target, suite.tokens[Role.PUBLISHER]) as channel:
        publisher = Publisher(
            channel, source="test://faults", spool_dir=tmp_path / "spool", attempts=2
        )
        publishing = asyncio.create_task(publish_all(publisher, 20_000))
        await wait_for(lambda: publisher._sending, 30, "publishing to start")
        await asyncio.sleep(0.3)
        assert suite.core is not None
        kill9(suite.core)
        ids = await asyncio.wait_for(publishing, 120)  # every publish returned: stored or spooled
        spooled = publisher.spooled_batches
        suite.start_core()
        await wait_serving(suite.target, "readiness")
        await publisher.flush(timeout=120)
        await publisher.close()
    stored = await stored_ids(suite)
    assert len(stored) == len(set(stored)) == len(ids)
    assert set(stored) == set(ids)
    print(f"{len(ids)} events, {spooled} batches spooled while core was down")


async def test_postgres_restart_loses_nothing(suite: Suite, tmp_path: Path):
    await wait_serving(suite.target, "readiness")
    out = tmp_path / "handled.txt"
    suite.start_consumer("pg-restart", out)
    async with connect(suite.target, suite.tokens[Role.PUBLISHER]) as channel:
        publisher = Publisher(
            channel, source="test://faults", spool_dir=tmp_path / "spool", attempts=2
        )
        before = await publish_all(publisher, 500)
        suite.pg.stop("immediate")
        await wait_for_status(suite.target, "readiness", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await readiness(suite.target, "liveness") == health_pb2.HealthCheckResponse.SERVING
        during = await publish_all(publisher, 500, offset=500)
        assert publisher.spooled_batches > 0
        suite.pg.start()
        await wait_serving(suite.target, "readiness")
        await publisher.flush(timeout=120)
        await publisher.close()
    expected = set(before) | set(during)
    await wait_for(lambda: expected <= set(handled_ids(out)), 60, "every event to be handled")
    stored = await stored_ids(suite)
    assert len(stored) == len(set(stored)) == len(expected)


async def wait_for_status(target: str, service: str, status: int, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            if await readiness(target, service) == status:
                return
        except grpc.aio.AioRpcError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{service} never became {status}")
        await asyncio.sleep(0.1)
