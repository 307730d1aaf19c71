"""usage-tracker Summary at two rollup grains: the per-model rollups answer as the fine ones.

Rows go in through the real ingest statement (``write_rows``); summaries are compared with the
fine path (grouped also by project, then re-summed) and with totals computed here from the rows,
over a window with partial hours at both edges, whole hours and whole days, in UTC and in a
timezone with a DST change inside the window.
"""

from __future__ import annotations

import random
import shutil
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from lodestar.common.db import apply_migrations, create_pool
from lodestar_usage import reports
from lodestar_usage.ingest import (
    ERROR,
    INSERT_LEDGER,
    LedgerRow,
    ensure_partitions,
    stage,
    write_rows,
)
from lodestar_usage.service import MIGRATIONS

# 2025-03-30: Europe/Berlin moves from UTC+1 to UTC+2, so local days are 23 h and 24 h long.
BASE = datetime(2025, 3, 28, 0, 0, tzinfo=UTC)
START = BASE + timedelta(hours=5, minutes=37, seconds=12, microseconds=345)
END = BASE + timedelta(days=4, hours=19, minutes=8, seconds=1)
BERLIN = "Europe/Berlin"
MODELS = [("claude-sonnet-4", "anthropic"), ("gpt-4o", "openai"), ("llama3", "ollama")]
PROJECTS = ["alpha", "beta", "gamma"]
USERS = ["ann", "bob", ""]


def make_rows(count: int, seed: int = 7) -> list[LedgerRow]:
    rng = random.Random(seed)
    rows = []
    span = int((END - START).total_seconds()) + 4 * 3600
    for i in range(count):
        # Some rows fall just outside the window, many inside its partial edge hours.
        if i % 10 == 0:
            occurred = START + timedelta(microseconds=rng.randint(-1_800_000_000, 1_800_000_000))
        elif i % 10 == 1:
            occurred = END + timedelta(microseconds=rng.randint(-1_800_000_000, 1_800_000_000))
        else:
            occurred = START - timedelta(hours=2) + timedelta(seconds=rng.randint(0, span))
        if i == 2:
            occurred = START  # exactly on the (inclusive) start
        if i == 3:
            occurred = END  # exactly on the (exclusive) end
        model, provider = MODELS[i % len(MODELS)]
        rows.append(
            LedgerRow(
                occurred_at=occurred,
                event_id=str(uuid.UUID(int=rng.getrandbits(128))),
                model=model,
                provider=provider,
                project=PROJECTS[rng.randrange(len(PROJECTS))],
                session_id=f"s{rng.randrange(5)}" if i % 4 else "",
                user_id=USERS[rng.randrange(len(USERS))],
                task_id="t",
                attempt=1,
                status=int(ERROR) if i % 9 == 0 else 1,
                duration_ms=rng.randint(1, 5000),
                input=rng.randint(0, 5000),
                output=rng.randint(0, 900),
                cached_read=rng.randint(0, 300),
                cache_write=rng.randint(0, 50),
                reasoning=rng.randint(0, 70),
                cost_micros=rng.randint(0, 90_000),
                cost_source=2,
                compute_cost_micros=rng.randint(0, 100),
                shadow_cost_micros=rng.randint(0, 100),
                savings_micros=rng.randint(-50, 100),
                reservation_id="",
            )
        )
    return rows


def expected(
    rows: Sequence[LedgerRow],
    keys: Sequence[str],
    tz: str = "UTC",
    filters: reports.Filters | None = None,
    start: datetime = START,
    end: datetime = END,
) -> dict[tuple[str, ...], dict[str, int]]:
    """Totals of the rows in [start, end) grouped by ``keys``, computed here."""
    out: dict[tuple[str, ...], dict[str, int]] = defaultdict(lambda: dict.fromkeys(reports.SUMS, 0))
    zone = ZoneInfo(tz)
    filters = filters or reports.Filters()
    for row in rows:
        if not start <= row.occurred_at < end or ("session" in keys and not row.session_id):
            continue
        if (filters.models and row.model not in filters.models) or (
            filters.providers and row.provider not in filters.providers
        ):
            continue
        local = row.occurred_at.astimezone(zone)
        group = {
            "model": row.model,
            "provider": row.provider,
            "day": local.strftime("%Y-%m-%d"),
            "month": local.strftime("%Y-%m"),
            "project": row.project,
            "user": row.user_id,
            "session": row.session_id,
        }
        acc = out[tuple(group[k] for k in keys)]
        values = {
            "requests": 1,
            "errors": int(row.status == ERROR),
            "input_tokens": row.input,
            "output_tokens": row.output,
            "cached_read_tokens": row.cached_read,
            "cache_write_tokens": row.cache_write,
            "reasoning_tokens": row.reasoning,
            "cost_micros": row.cost_micros,
            "compute_cost_micros": row.compute_cost_micros,
            "shadow_cost_micros": row.shadow_cost_micros,
            "savings_micros": row.savings_micros,
            "duration_ms": row.duration_ms,
        }
        for name, value in values.items():
            acc[name] += value
    return dict(out)


def by_keys(
    rows: Sequence[reports.Row], keys: Sequence[str]
) -> dict[tuple[str, ...], dict[str, int]]:
    """Summary rows re-summed over ``keys`` (drops the finer groups)."""
    out: dict[tuple[str, ...], dict[str, int]] = defaultdict(lambda: dict.fromkeys(reports.SUMS, 0))
    for row in rows:
        acc = out[tuple(row.group[k] for k in keys)]
        for name, value in row.sums.items():
            acc[name] += value
    return {k: v for k, v in out.items() if v["requests"]}


@pytest.fixture
async def pool(database_url: str, schema: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, schema, max_size=4)
    try:
        async with pool.acquire() as conn:
            await apply_migrations(conn, schema, MIGRATIONS)
        await ensure_partitions(pool, BASE - timedelta(days=1), BASE + timedelta(days=6))
        yield pool
    finally:
        await pool.close()


async def ingest(pool: asyncpg.Pool, rows: Sequence[LedgerRow], batch: int = 97) -> int:
    new = 0
    for i in range(0, len(rows), batch):
        async with pool.acquire() as conn, conn.transaction():
            new += len((await write_rows(conn, rows[i : i + batch])).new)
    return new


async def assert_grains_agree(pool: asyncpg.Pool) -> None:
    """Each per-model rollup equals its fine rollup summed over project and user."""
    sums = ", ".join(f"sum({s})::bigint AS {s}" for s in reports.SUMS)
    columns = ", ".join(reports.SUMS)
    for coarse, fine, unit in (
        ("rollup_hourly_model", "rollup_hourly", "hour"),
        ("rollup_daily_model", "rollup_daily", "day"),
    ):
        want = await pool.fetch(
            f"SELECT {unit}, model, provider, {sums} FROM {fine} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        )
        got = await pool.fetch(
            f"SELECT {unit}, model, provider, {columns} FROM {coarse} ORDER BY 1, 2, 3"
        )
        assert [tuple(r) for r in got] == [tuple(r) for r in want]
        assert got, f"{coarse} is empty"


async def test_coarse_grain_summary_equals_the_fine_path_and_the_ledger(pool):
    rows = make_rows(3000)
    assert await ingest(pool, rows) == len(rows)
    # A redelivery adds nothing to either grain.
    assert await ingest(pool, rows[:500], batch=500) == 0
    await assert_grains_agree(pool)

    no_filter = reports.Filters()
    assert reports.coarse_grain(["model", "day"], no_filter)
    assert reports.coarse_grain(["provider", "month"], reports.Filters(models=["gpt-4o"]))
    assert not reports.coarse_grain(["model", "project"], no_filter)
    assert not reports.coarse_grain(["model"], reports.Filters(users=["ann"]))
    assert not reports.coarse_grain(["day"], reports.Filters(projects=["alpha"]))
    assert not reports.coarse_grain(["model"], reports.Filters(sessions=["s1"]))

    cases: list[tuple[list[str], str, reports.Filters]] = [
        (["model", "day"], "UTC", no_filter),
        (["model", "provider", "month"], "UTC", no_filter),
        ([], "UTC", no_filter),
        (["day"], "UTC", reports.Filters(models=["gpt-4o", "llama3"])),
        (["model", "day"], BERLIN, no_filter),
        (["provider", "day"], BERLIN, reports.Filters(providers=["openai", "ollama"])),
    ]
    fine: dict[int, dict[tuple[str, ...], dict[str, int]]] = {}
    for index, (keys, tz, filters) in enumerate(cases):
        want = expected(rows, keys, tz, filters)
        assert want, (keys, tz)
        coarse_rows = await reports.summarize(pool, START, END, keys, filters, tz)
        assert by_keys(coarse_rows, keys) == want, (keys, tz)
        # The fine path: the same request grouped also by project (and user), re-summed.
        fine_rows = await reports.summarize(
            pool, START, END, [*keys, "project", "user"], filters, tz
        )
        fine[index] = by_keys(fine_rows, keys)
        assert fine[index] == want, (keys, tz)

    # The coarse path does not read the fine rollups at all...
    await pool.execute("TRUNCATE rollup_hourly, rollup_daily")
    for index, (keys, tz, filters) in enumerate(cases):
        got = by_keys(await reports.summarize(pool, START, END, keys, filters, tz), keys)
        assert got == fine[index], (keys, tz)
    fine_now = await reports.summarize(pool, START, END, ["model", "day", "project"], no_filter)
    assert by_keys(fine_now, ["model", "day"]) != fine[0]  # (the fine path did read them)

    # ...and grouping by local days reads the hourly per-model rollup, not the daily one.
    await pool.execute("TRUNCATE rollup_daily_model")
    for index, (keys, tz, filters) in enumerate(cases):
        if tz == BERLIN:
            got = by_keys(await reports.summarize(pool, START, END, keys, filters, tz), keys)
            assert got == fine[index], (keys, tz)
    utc_now = await reports.summarize(pool, START, END, ["model", "day"], no_filter)
    assert by_keys(utc_now, ["model", "day"]) != fine[0]  # UTC days did use the daily one


async def test_migration_backfills_the_model_rollups_from_the_fine_ones(
    database_url: str, schema: str, tmp_path: Path
):
    older = tmp_path / "migrations"
    older.mkdir()
    for path in sorted(MIGRATIONS.glob("*.sql"))[:2]:
        shutil.copy(path, older / path.name)
    pool = await create_pool(database_url, schema, max_size=2)
    try:
        async with pool.acquire() as conn:
            assert await apply_migrations(conn, schema, older) == [
                "0001_init.sql",
                "0002_budget_counters.sql",
            ]
        await ensure_partitions(pool, BASE - timedelta(days=1), BASE + timedelta(days=6))
        rows = make_rows(1200, seed=11)
        async with pool.acquire() as conn, conn.transaction():
            await stage(conn, rows)
            await conn.execute(INSERT_LEDGER)
        sums = ", ".join(
            ["count(*)", f"count(*) FILTER (WHERE status = {int(ERROR)})"]
            + [f"sum({s})" for s in reports.SUMS[2:]]
        )
        for table, unit in (("rollup_hourly", "hour"), ("rollup_daily", "day")):
            await pool.execute(
                f"INSERT INTO {table} SELECT date_trunc('{unit}', occurred_at, 'UTC'), model, "
                f"provider, project, user_id, {sums} FROM ledger GROUP BY 1, 2, 3, 4, 5"
            )
        async with pool.acquire() as conn:
            applied = await apply_migrations(conn, schema, MIGRATIONS)
            assert applied[0] == "0003_model_rollups.sql"
        await assert_grains_agree(pool)
        got = await reports.summarize(pool, START, END, ["model", "day"], reports.Filters())
        assert by_keys(got, ["model", "day"]) == expected(rows, ["model", "day"])
    finally:
        await pool.close()


async def test_any_window_at_any_moment_equals_the_ledger(pool):
    """Edges read from the ledger, or as a rollup minus the rest of the hour: always exact."""
    rows = make_rows(3000, seed=5)
    await ingest(pool, rows, batch=500)
    rng = random.Random(3)
    instants = [row.occurred_at for row in rows[::50]] + [START, END, BASE]
    for case in range(60):
        start, end = sorted(rng.sample(instants, 2))
        start += timedelta(microseconds=rng.choice([0, 1, -1]))
        now = rng.choice([end, end + timedelta(minutes=rng.randint(0, 90)), start, BASE])
        keys = rng.choice([[], ["model", "day"], ["session"], ["project", "user"], ["day"]])
        tz = rng.choice(["UTC", BERLIN])
        got = await reports.summarize(pool, start, end, keys, reports.Filters(), tz, now=now)
        assert by_keys(got, keys) == expected(rows, keys, tz, start=start, end=end), (
            case,
            start,
            end,
            now,
            keys,
        )


async def test_a_batch_mixing_new_and_recorded_events_adds_only_the_new_ones(pool):
    rows = make_rows(600, seed=9)
    assert await ingest(pool, rows[:300], batch=300) == 300
    async with pool.acquire() as conn, conn.transaction():
        new = (await write_rows(conn, [*rows[200:600], *rows[250:260]])).new
    assert sorted(r.event_id for r in new) == sorted(r.event_id for r in rows[300:600])
    assert await pool.fetchval("SELECT count(*) FROM ledger") == 600
    await assert_grains_agree(pool)
    got = await reports.summarize(pool, START, END, ["model", "day"], reports.Filters())
    assert by_keys(got, ["model", "day"]) == expected(rows, ["model", "day"])
