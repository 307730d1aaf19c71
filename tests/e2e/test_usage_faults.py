"""usage-tracker faults: kill -9 the tracker mid-stream; after a restart the totals are exact.

Core and the tracker run as real processes on an embedded Postgres. 20,000 RequestCompleted events
are published; the tracker is SIGKILLed while its ledger holds some but not all of them, restarted,
and once it has caught up the Summary RPC and the ledger itself must show exactly the totals the
test computed from the events it sent, with exactly one ledger row per event id.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from lodestar.common.auth import Role
from lodestar.common.cli import free_port
from lodestar.common.embedded import EmbeddedPostgres
from lodestar.common.sdk import Publisher, connect
from lodestar.common.testing import dev_credentials, kill9, service_env, start_process, wait_serving
from lodestar.usage.v1 import events_pb2 as ev
from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug

pytestmark = [pytest.mark.faults, pytest.mark.e2e]
EVENTS = 20_000
MODELS = ("claude-sonnet-4", "gpt-4o", "gemini-2.5-pro")
SCHEMA = "usage_tracker"


class Suite:
    """An embedded Postgres, a core process and a restartable usage-tracker process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pg = EmbeddedPostgres(root / "pg")
        self.tokens = dev_credentials(root / "credentials.yaml", ["usage-tracker"])
        self.core_port = free_port()
        self.tracker_port = free_port()
        self.core: subprocess.Popen[bytes] | None = None
        self.tracker: subprocess.Popen[bytes] | None = None

    @property
    def core_target(self) -> str:
        return f"127.0.0.1:{self.core_port}"

    @property
    def tracker_target(self) -> str:
        return f"127.0.0.1:{self.tracker_port}"

    def _env(self, **extra: object) -> dict[str, str]:
        return service_env(
            self.pg.dsn(),
            self.root / "credentials.yaml",
            shutdown_grace_seconds=2,
            spool_dir=self.root / "spool",
            log_level="WARNING",
            **extra,
        )

    def start_core(self) -> None:
        self.core = start_process(
            "lodestar_core", self._env(), self.root / "core.log", self.core_port
        )

    def start_tracker(self) -> None:
        env = self._env(
            core=self.core_target,
            token=self.tokens["usage-tracker"],
            # Small batches, so that a kill lands between many committed transactions.
            ingest__batch_max_events=200,
        )
        self.tracker = start_process(
            "lodestar_usage", env, self.root / "tracker.log", self.tracker_port
        )

    def close(self) -> None:
        for process in (self.tracker, self.core):
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


def event(i: int) -> ev.RequestCompleted:
    """Event ``i``: varied model, tokens of every kind and a reported cost (which always wins)."""
    return ev.RequestCompleted(
        model=MODELS[i % len(MODELS)],
        provider="anthropic",
        project=f"p{i % 5}",
        session_id=f"s{i % 97}",
        user=f"u{i % 11}",
        status=ev.REQUEST_STATUS_ERROR if i % 50 == 0 else ev.REQUEST_STATUS_OK,
        tokens=ev.TokenUsage(
            input=100 + i % 1000,
            output=i % 313,
            cached_read=i % 7,
            cache_write=i % 5,
            reasoning=i % 3,
        ),
        reported_cost=ev.Money(currency="USD", micros=1_000 + (i * 7919) % 100_003),
    )


async def ledger_count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.ledger")
        if not exists:
            return 0
        return int(await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.ledger"))
    finally:
        await conn.close()


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_kill9_tracker_mid_stream_gives_exact_totals(suite: Suite):
    await wait_serving(suite.core_target, "readiness")
    payloads = [event(i) for i in range(EVENTS)]
    expected = {
        "requests": EVENTS,
        "errors": sum(p.status == ev.REQUEST_STATUS_ERROR for p in payloads),
        "cost_micros": sum(p.reported_cost.micros for p in payloads),
        **{
            kind: sum(getattr(p.tokens, kind) for p in payloads)
            for kind in ("input", "output", "cached_read", "cache_write", "reasoning")
        },
    }
    async with (
        connect(suite.core_target, suite.tokens[Role.PUBLISHER]) as channel,
        Publisher(channel, source="test://usage-faults") as publisher,
    ):
        receipts = await asyncio.gather(*(publisher.publish(p) for p in payloads))
    ids = {r.event_id for r in receipts}
    assert len(ids) == EVENTS

    # The backlog is waiting in core; the tracker starts on it and is killed part-way.
    suite.start_tracker()
    dsn = suite.pg.dsn()

    async def some_ingested() -> bool:
        return await ledger_count(dsn) >= 1_000

    await wait_until(some_ingested, 60, "the tracker to ingest")
    assert suite.tracker is not None
    kill9(suite.tracker)
    at_kill = await ledger_count(dsn)
    assert 0 < at_kill < EVENTS, f"the kill must land mid-stream, the ledger had {at_kill} rows"

    suite.start_tracker()
    await wait_serving(suite.tracker_target, "readiness", timeout=60)

    async def caught_up() -> bool:
        return await ledger_count(dsn) >= EVENTS

    await wait_until(caught_up, 90, "the restarted tracker to catch up")
    await asyncio.sleep(0.5)  # anything counted twice would show up now

    async with connect(suite.tracker_target, suite.tokens[Role.MODULE]) as channel:
        reply = await ug.UsageServiceStub(channel).Summary(
            u.SummaryRequest(window=u.Window(rolling=u.RollingWindow(days=1)), group_by=["model"])
        )
    totals = reply.totals
    assert totals.requests == expected["requests"]
    assert totals.errors == expected["errors"]
    assert totals.cost_micros == expected["cost_micros"]
    for kind in ("input", "output", "cached_read", "cache_write", "reasoning"):
        assert getattr(totals.tokens, kind) == expected[kind], kind
    by_model = {row.group["model"]: row.totals.requests for row in reply.rows}
    assert by_model == {m: sum(1 for i in range(EVENTS) if MODELS[i % 3] == m) for m in MODELS}

    conn = await asyncpg.connect(dsn)
    try:
        ledger = await conn.fetchrow(
            f"SELECT count(*) AS rows, count(DISTINCT event_id) AS ids, sum(cost_micros) AS cost, "
            f"sum(input_tokens) AS input, sum(output_tokens) AS output, "
            f"sum(cached_read_tokens) AS cached_read, sum(cache_write_tokens) AS cache_write, "
            f"sum(reasoning_tokens) AS reasoning FROM {SCHEMA}.ledger"
        )
        stored = {
            str(r["event_id"]) for r in await conn.fetch(f"SELECT event_id FROM {SCHEMA}.ledger")
        }
        rollup = await conn.fetchrow(
            "SELECT sum(requests) AS requests, sum(cost_micros) AS cost "
            f"FROM {SCHEMA}.rollup_hourly"
        )
    finally:
        await conn.close()
    assert ledger["rows"] == ledger["ids"] == EVENTS
    assert stored == ids
    assert ledger["cost"] == expected["cost_micros"]
    for kind in ("input", "output", "cached_read", "cache_write", "reasoning"):
        assert ledger[kind] == expected[kind], kind
    assert rollup["requests"] == EVENTS
    assert rollup["cost"] == expected["cost_micros"]
    print(f"killed with {at_kill} of {EVENTS} rows in the ledger; totals exact after restart")
