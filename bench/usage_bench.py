"""Benchmarks of usage-tracker: real core and tracker processes on a real Postgres.

Sizes via environment: USAGE_BENCH_ROWS (ledger rows for the Summary benchmark, default 10M),
USAGE_BENCH_EVENTS (events for end-to-end ingest, default 100k). USAGE_BENCH_ONLY picks one part:
``ingest`` (ingest rate and freshness), ``admission`` (Reserve+Commit) or ``summary``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc

from bench.core_bench import READY_TIMEOUT_SECONDS, CoreUnderTest
from lodestar.common.auth import Role
from lodestar.common.cli import free_port, wait_until_serving
from lodestar.common.db import apply_migrations, create_pool
from lodestar.common.events import new_event
from lodestar.common.sdk import connect
from lodestar.common.testing import postgres_server, start_process
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc
from lodestar.usage.v1 import events_pb2 as ev
from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug
from lodestar_usage import budgets, reports
from lodestar_usage.ingest import ensure_partitions
from lodestar_usage.service import MIGRATIONS

ROWS = int(os.environ.get("USAGE_BENCH_ROWS", "10000000"))
EVENTS = int(os.environ.get("USAGE_BENCH_EVENTS", "100000"))
ONLY = os.environ.get("USAGE_BENCH_ONLY", "")
GENERATE_TIMEOUT_SECONDS = 3600.0


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _scratch(admin_dsn: str) -> tuple[str, str]:
    name = f"lodestar_usage_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    base, _, query = admin_dsn.partition("?")
    return name, base.rpartition("/")[0] + f"/{name}" + (f"?{query}" if query else "")


async def _drop(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


async def bench_summary(dsn: str, out: Callable[[str], None]) -> None:
    """Summary over ROWS ledger rows (30 days, by model and day), answered from the rollups."""
    pool = await create_pool(dsn, "usage_summary_bench", max_size=4)
    try:
        async with pool.acquire() as conn:
            await apply_migrations(conn, "usage_summary_bench", MIGRATIONS)
        end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        start = end - timedelta(days=30)
        await ensure_partitions(pool, start, end)
        began = time.perf_counter()
        await pool.execute(
            "INSERT INTO ledger (occurred_at, event_id, model, provider, project, session_id, "
            "user_id, task_id, attempt, status, duration_ms, input_tokens, output_tokens, "
            "cached_read_tokens, cache_write_tokens, reasoning_tokens, cost_micros, cost_source, "
            "compute_cost_micros, shadow_cost_micros, savings_micros) "
            "SELECT $1::timestamptz + (i * $2::float8) * interval '1 second', gen_random_uuid(), "
            "'model-' || (i % 12), 'prov-' || (i % 4), 'proj-' || (i % 7), 's-' || (i % 5000), "
            "'u-' || (i % 40), '', 1, CASE WHEN i % 50 = 0 THEN 2 ELSE 1 END, 800, 1000, 200, "
            "0, 0, 0, 1500 + i % 100, 2, 0, 0, 0 FROM generate_series(0, $3 - 1) AS i",
            start,
            (30 * 86400) / ROWS,
            ROWS,
            timeout=GENERATE_TIMEOUT_SECONDS,
        )
        for table, unit in (("rollup_hourly", "hour"), ("rollup_daily", "day")):
            await pool.execute(
                f"INSERT INTO {table} SELECT date_trunc('{unit}', occurred_at), model, provider, "
                "project, user_id, count(*), count(*) FILTER (WHERE status = 2), "
                "sum(input_tokens), "
                "sum(output_tokens), sum(cached_read_tokens), sum(cache_write_tokens), "
                "sum(reasoning_tokens), sum(cost_micros), sum(compute_cost_micros), "
                "sum(shadow_cost_micros), sum(savings_micros), sum(duration_ms) FROM ledger "
                "GROUP BY 1, 2, 3, 4, 5",
                timeout=GENERATE_TIMEOUT_SECONDS,
            )
        for table, source, unit in (
            ("rollup_hourly_model", "rollup_hourly", "hour"),
            ("rollup_daily_model", "rollup_daily", "day"),
        ):
            await pool.execute(
                f"INSERT INTO {table} SELECT {unit}, model, provider, sum(requests), sum(errors), "
                "sum(input_tokens), sum(output_tokens), sum(cached_read_tokens), "
                "sum(cache_write_tokens), sum(reasoning_tokens), sum(cost_micros), "
                "sum(compute_cost_micros), sum(shadow_cost_micros), sum(savings_micros), "
                f"sum(duration_ms) FROM {source} GROUP BY 1, 2, 3",
                timeout=GENERATE_TIMEOUT_SECONDS,
            )
        await pool.execute("ANALYZE", timeout=GENERATE_TIMEOUT_SECONDS)
        out(
            f"  {'summary bench: ledger rows generated (N) / seconds':<58} "
            f"{ROWS:,} / {time.perf_counter() - began:.1f}"
        )
        latencies = []
        for _ in range(200):
            t0 = time.perf_counter()
            rows = await reports.summarize(pool, start, end, ["model", "day"], reports.Filters())
            latencies.append((time.perf_counter() - t0) * 1000)
        assert sum(r.sums["requests"] for r in rows) == ROWS
        out(
            f"  {'Summary 30 days by model,day over N rows: p50 / p99 (ms)':<58} "
            f"{statistics.median(latencies):.2f} / {_pct(latencies, 0.99):.2f}"
        )
    finally:
        await pool.close()


class TrackerUnderTest:
    """``python -m lodestar_usage serve`` subscribed to ``core``."""

    def __init__(self, dsn: str, workdir: Path, core: CoreUnderTest) -> None:
        self.port = free_port()
        self._env = {
            "LODESTAR_DATABASE__URL": dsn,
            "LODESTAR_CREDENTIALS_FILE": str(workdir / "credentials.yaml"),
            "LODESTAR_CORE_ENDPOINT": core.target,
            "LODESTAR_TOKEN": core.tokens["usage-tracker"],
            "LODESTAR_SPOOL_DIR": str(workdir / "spool"),
            "LODESTAR_LOG_LEVEL": "WARNING",
        }
        self._log = workdir / "usage.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.process = start_process("lodestar_usage", self._env, self._log, self.port)
        if await wait_until_serving(self.port, self.process, READY_TIMEOUT_SECONDS):
            await asyncio.sleep(1.0)  # let it subscribe
            return
        raise RuntimeError("usage-tracker did not become ready")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)


def _event(project: str = "bench") -> ev.RequestCompleted:
    return ev.RequestCompleted(
        model="bench-model",
        provider="p",
        project=project,
        session_id="s",
        tokens=ev.TokenUsage(input=100, output=10),
        reported_cost=ev.Money(micros=7),
    )


async def _requests(stub: ug.UsageServiceStub, project: str | None = None) -> int:
    filters = u.Filters(projects=[project]) if project else u.Filters()
    reply = await stub.Summary(
        u.SummaryRequest(window=u.Window(rolling=u.RollingWindow(days=1)), filters=filters)
    )
    return int(reply.totals.requests)


async def bench_end_to_end(dsn: str, workdir: Path, out: Callable[[str], None]) -> None:
    """Ingest rate, freshness at 2,000 events/s, and Reserve + Commit latency."""
    async with CoreUnderTest(dsn, workdir) as core:
        tracker = TrackerUnderTest(dsn, workdir, core)
        await tracker.start()
        try:
            async with (
                connect(core.target, core.tokens[Role.PUBLISHER]) as pub,
                connect(tracker.target, core.tokens[Role.ADMIN]) as admin,
            ):
                bus = bus_pb2_grpc.EventBusServiceStub(pub)
                usage = ug.UsageServiceStub(admin)
                if ONLY == "admission":
                    await _admission(tracker, core, admin, out)
                    return
                events = [new_event(_event(), source="bench://usage") for _ in range(EVENTS)]
                began = time.perf_counter()
                sem = asyncio.Semaphore(8)

                async def send(chunk: list[object]) -> None:
                    async with sem:
                        await bus.Publish(bus_pb2.PublishRequest(events=chunk))

                await asyncio.gather(*(send(events[i : i + 1000]) for i in range(0, EVENTS, 1000)))
                while await _requests(usage) < EVENTS:
                    await asyncio.sleep(0.05)
                rate = EVENTS / (time.perf_counter() - began)
                out(
                    f"  {'ingest publish→core→ledger, visible in Summary (events/s)':<58} "
                    f"{rate:,.0f}"
                )
                await _freshness(bus, usage, out)
                if ONLY != "ingest":
                    await _admission(tracker, core, admin, out)
        finally:
            tracker.stop()


async def _freshness(
    bus: bus_pb2_grpc.EventBusServiceStub, usage: ug.UsageServiceStub, out: Callable[[str], None]
) -> None:
    stop = asyncio.Event()

    async def load() -> None:  # 2,000 events/s in batches of 20 every 10 ms
        while not stop.is_set():
            batch = [new_event(_event(), source="bench://load") for _ in range(20)]
            await bus.Publish(bus_pb2.PublishRequest(events=batch))
            await asyncio.sleep(0.01)

    loader = asyncio.create_task(load())
    latencies = []
    for i in range(40):
        project = f"probe-{i}"
        t0 = time.perf_counter()
        await bus.Publish(
            bus_pb2.PublishRequest(events=[new_event(_event(project), source="bench://probe")])
        )
        while await _requests(usage, project) < 1:
            await asyncio.sleep(0.002)
        latencies.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.05)
    stop.set()
    await loader
    out(
        f"  {'freshness at ~2,000 events/s: publish→visible p50 / p99 (ms)':<58} "
        f"{statistics.median(latencies):.1f} / {_pct(latencies, 0.99):.1f}"
    )


async def _admission(
    tracker: TrackerUnderTest,
    core: CoreUnderTest,
    admin: grpc.aio.Channel,
    out: Callable[[str], None],
) -> None:
    gate = ug.BudgetServiceStub(admin)
    await gate.CreateBudget(
        u.CreateBudgetRequest(
            budget=u.Budget(
                name="bench",
                scope=u.BUDGET_SCOPE_PROJECT,
                scope_value="bench",
                period=u.BUDGET_PERIOD_MONTHLY,
                limit_micros=10**12,
            )
        )
    )
    latencies: list[float] = []

    async def caller() -> None:
        for _ in range(10):
            t0 = time.perf_counter()
            r = await gate.Reserve(u.ReserveRequest(project="bench", estimated_cost_micros=100))
            await gate.Commit(
                u.CommitRequest(reservation_id=r.reservation_id, actual_cost_micros=50)
            )
            latencies.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(caller() for _ in range(200)))
    out(
        f"  {'Reserve+Commit, 200 concurrent callers, one budget: p50 / p99 (ms)':<58} "
        f"{statistics.median(latencies):.1f} / {_pct(latencies, 0.99):.1f}"
    )
    _ = budgets


async def run_usage_benchmarks(print_fn: Callable[[str], None]) -> None:
    """Every usage-tracker benchmark, printed through ``print_fn``."""
    print_fn(
        f"usage-tracker benchmarks — N={ROWS:,} ledger rows, {EVENTS:,} ingest events, "
        f"{os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory() as tmp, postgres_server(Path(tmp)) as admin_dsn:
        name, dsn = await _scratch(admin_dsn)
        try:
            if ONLY != "summary":
                await bench_end_to_end(dsn, Path(tmp), print_fn)
            if ONLY in ("", "summary"):
                await bench_summary(dsn, print_fn)
        finally:
            await _drop(admin_dsn, name)


if __name__ == "__main__":
    asyncio.run(run_usage_benchmarks(print))
