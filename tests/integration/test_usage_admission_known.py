"""Rounds decided on what a tracker last knew (ADR 0017), straight against Postgres.

Such a round is written only if the counters, reservations, budgets and time window it was
decided on still hold; otherwise it is decided again on what the database holds.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from lodestar.common.db import apply_migrations, create_pool
from lodestar.usage.v1 import usage_pb2 as u
from lodestar_usage import budgets, counters, metrics
from lodestar_usage.admission import ADMISSION_APPLY, Admitter
from lodestar_usage.ingest import LedgerRow, LedgerWriter, ensure_partitions
from lodestar_usage.reservations import Admission
from lodestar_usage.service import MIGRATIONS

from .test_usage_admission import project_budget

LEASE = timedelta(seconds=60)


@pytest.fixture
async def pool(database_url: str, schema: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, schema, max_size=8)
    async with pool.acquire() as conn:
        await apply_migrations(conn, schema, MIGRATIONS)
    yield pool
    await pool.close()


def rounds(path: str) -> float:
    return metrics.ADMISSION_ROUNDS.labels(path)._value.get()


async def reserve(
    admitter: Admitter, micros: int, project: str = "p", lease: timedelta = LEASE
) -> Admission:
    request = u.ReserveRequest(project=project, estimated_cost_micros=micros)
    return await admitter.reserve(request, lease, "gateway", None)


async def held(pool: asyncpg.Pool, project: str = "p") -> int:
    return int(
        await pool.fetchval(
            "SELECT coalesce(sum(c.held_micros), 0) FROM budget_counters c "
            "JOIN budgets b ON b.id = c.budget_id WHERE b.scope_value = $1",
            project,
        )
    )


async def test_a_warm_tracker_decides_and_writes_a_round_in_one_call(pool: asyncpg.Pool) -> None:
    await budgets.create_budget(
        pool, budgets.budget_from_proto(project_budget(1_000), require_id=False)
    )
    admitter = Admitter(pool)
    assert (await reserve(admitter, 100)).granted  # the first round reads: nothing known yet
    known = rounds("known")
    second = await reserve(admitter, 200)
    assert second.granted
    assert rounds("known") == known + 1
    assert second.lease_expires_at is not None
    assert abs(second.lease_expires_at - (datetime.now(UTC) + LEASE)) < timedelta(seconds=5)
    finished = await admitter.finish(
        uuid.UUID(second.reservation_id), "gateway", None, commit=True, micros=50
    )
    assert finished.state == "active"
    assert rounds("known") == known + 2
    assert await held(pool) == 150
    again = await admitter.finish(
        uuid.UUID(second.reservation_id), "gateway", None, commit=True, micros=70
    )
    assert again.state == "committed"
    assert again.micros == 50
    assert await held(pool) == 150


async def test_counters_changed_behind_a_trackers_back_are_decided_on_as_they_are(
    pool: asyncpg.Pool,
) -> None:
    await budgets.create_budget(
        pool, budgets.budget_from_proto(project_budget(1_000), require_id=False)
    )
    admitter = Admitter(pool)
    assert (await reserve(admitter, 100)).granted
    await pool.execute("UPDATE budget_counters SET held_micros = held_micros + 800")  # 900 held
    stale = rounds("stale")
    refused = await reserve(admitter, 200)
    assert not refused.granted
    assert rounds("stale") == stale + 1
    assert refused.denial is not None
    assert refused.denial.remaining_micros == 100
    await pool.execute("UPDATE budget_counters SET held_micros = 0")
    assert (await reserve(admitter, 1_000)).granted
    assert await held(pool) == 1_000


async def test_a_wrong_word_from_ingest_costs_a_round_never_a_grant(pool: asyncpg.Pool) -> None:
    """Counter changes ingest reports are a guess like the rest: written only if they hold."""
    created = await budgets.create_budget(
        pool, budgets.budget_from_proto(project_budget(1_000), require_id=False)
    )
    admitter = Admitter(pool)
    assert (await reserve(admitter, 100)).granted
    (key,) = [
        (created.id, "p", start)
        for (start,) in await pool.fetch("SELECT window_start FROM budget_counters")
    ]
    unknown = (uuid.uuid4(), "p", key[2])
    admitter.counters_changed({key: [0, 0, -100, 0], unknown: [5, 5, 5, 5]})  # says: none held
    assert unknown not in admitter._known.counters  # only what the process remembers changes
    stale = rounds("stale")
    refused = await reserve(admitter, 901)
    assert not refused.granted
    assert refused.denial is not None
    assert refused.denial.remaining_micros == 900
    assert rounds("stale") == stale + 1
    assert await held(pool) == 100


async def test_a_settled_hold_whose_lease_had_lapsed_is_not_taken_off_twice(
    pool: asyncpg.Pool,
) -> None:
    """A lapsed hold no longer counts as a round reads the counters; ingest settling it changes
    only the spend there, and the tracker, told so, decides the next Reserve in one call."""
    await budgets.create_budget(
        pool, budgets.budget_from_proto(project_budget(1_000), require_id=False)
    )
    now = datetime.now(UTC)
    await ensure_partitions(pool, now - timedelta(days=1), now + timedelta(days=1))
    admitter = Admitter(pool)
    writer = LedgerWriter(
        pool, max_batch=10, linger_seconds=0, on_counters=admitter.counters_changed
    )
    writer.start()
    try:
        lapsing = await reserve(admitter, 100, lease=timedelta(seconds=0.2))
        await asyncio.sleep(0.3)
        assert (await reserve(admitter, 50)).granted  # the lapsed 100 no longer counts
        await writer.submit([ledger_row(cost_micros=80, reservation_id=lapsing.reservation_id)])
        assert (
            await pool.fetchval(
                "SELECT state FROM reservations WHERE id = $1::uuid", lapsing.reservation_id
            )
            == "settled"
        )
        stale = rounds("stale")
        assert (await reserve(admitter, 870)).granted  # 1,000 - 80 spent - 50 held
        refused = await reserve(admitter, 1)
    finally:
        await writer.stop()
    assert not refused.granted
    assert refused.denial is not None
    assert refused.denial.remaining_micros == 0
    assert rounds("stale") == stale


def ledger_row(cost_micros: int, reservation_id: str, project: str = "p") -> LedgerRow:
    """A ledger row of now for ``project``, naming ``reservation_id``."""
    return LedgerRow(
        datetime.now(UTC),
        str(uuid.uuid4()),
        "m",
        "prov",
        project,
        "",
        "",
        "",
        1,
        1,
        10,
        100,
        10,
        0,
        0,
        0,
        cost_micros,
        int(u.COST_SOURCE_REPORTED),
        0,
        0,
        0,
        reservation_id,
    )


async def test_a_reservation_finished_behind_a_trackers_back_is_decided_on_as_it_is(
    pool: asyncpg.Pool,
) -> None:
    """Another replica committed the hold this tracker still knows as active: no second commit.

    At its estimate, so the counters are as the tracker knows them: only the reservation differs.
    """
    await budgets.create_budget(
        pool, budgets.budget_from_proto(project_budget(1_000), require_id=False)
    )
    mine, other = Admitter(pool), Admitter(pool)
    granted = await reserve(mine, 300)
    key = uuid.UUID(granted.reservation_id)
    assert (await mine.finish(key, "gateway", None, commit=False)).state == "active"  # known
    assert (await reserve(mine, 100)).granted
    second = await reserve(mine, 200)
    second_key = uuid.UUID(second.reservation_id)
    assert (await other.finish(second_key, "gateway", None, commit=True, micros=200)).state == (
        "active"
    )
    stale = rounds("stale")
    again = await mine.finish(second_key, "gateway", None, commit=True, micros=190)
    assert rounds("stale") == stale + 1
    assert again.state == "committed"
    assert again.micros == 200
    assert await held(pool) == 100 + 200  # a commit holds its actual cost until it is ingested


async def scans(pool: asyncpg.Pool) -> dict[str, tuple[int, int]]:
    """(sequential, index) scans of the admission tables, as far as the statistics have them."""
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = await conn.fetch(
            "SELECT relname, seq_scan, coalesce(idx_scan, 0) AS idx_scan FROM pg_stat_user_tables "
            "WHERE schemaname = current_schema() "
            "AND relname IN ('reservations', 'reservation_budgets', 'budget_counters')"
        )
    return {r["relname"]: (r["seq_scan"], r["idx_scan"]) for r in rows}


async def test_rounds_planned_on_small_tables_find_rows_by_key_once_they_grow(
    pool: asyncpg.Pool, database_url: str, schema: str
) -> None:
    """The admission functions' plans are made once per connection, here on tables nearly empty.

    Statistics reach pg_stat_user_tables when a backend that has been idle a second ends a
    transaction: one more round after a pause sends each phase's.
    """
    await budgets.create_budget(
        pool, budgets.budget_from_proto(project_budget(10**9), require_id=False)
    )
    one_connection = await create_pool(database_url, schema, min_size=1, max_size=1)
    admitter = Admitter(one_connection)

    async def pairs(count: int) -> None:
        for _ in range(count):
            granted = await reserve(admitter, 100)
            await admitter.finish(uuid.UUID(granted.reservation_id), "gateway", None, commit=True)

    try:
        await pairs(3)  # the plans are made now
        await pool.execute(
            "INSERT INTO reservations (id, owner, project, user_id, session_id, model, state, "
            "amount_micros, amount_tokens, created_at, lease_expires_at, finished_at) "
            "SELECT gen_random_uuid(), 'gateway', 'p', '', '', 'm', 'released', 1, 0, now(), "
            "now(), now() FROM generate_series(1, 5000)"
        )
        await asyncio.sleep(1.2)
        await pairs(1)
        before = await scans(pool)
        known = rounds("known")
        await pairs(20)
        assert rounds("known") == known + 40
        await asyncio.sleep(1.2)
        await pairs(1)
    finally:
        await one_connection.close()
    after = await scans(pool)
    assert after["reservations"][1] > before["reservations"][1]
    assert {table: after[table][0] - before[table][0] for table in after} == {
        "reservations": 0,
        "reservation_budgets": 0,
        "budget_counters": 0,
    }


async def test_holds_whose_lease_ran_out_stop_counting_before_the_expiry_job_runs(
    pool: asyncpg.Pool,
) -> None:
    created = await budgets.create_budget(
        pool, budgets.budget_from_proto(project_budget(1_000), require_id=False)
    )
    other = await budgets.create_budget(
        pool, budgets.budget_from_proto(project_budget(1_000, "q"), require_id=False)
    )
    admitter = Admitter(pool)
    short = timedelta(seconds=0.3)
    for project, micros, lease in [("p", 300, short), ("p", 300, short), ("p", 200, LEASE)]:
        assert (await reserve(admitter, micros, project, lease)).granted
    assert (await reserve(admitter, 400, "q", short)).granted
    assert not (await reserve(admitter, 300)).granted
    await asyncio.sleep(0.4)
    locked = rounds("locked")
    granted = await reserve(admitter, 500)  # the 600 lapsed no longer count: 800 left
    assert granted.granted
    assert rounds("locked") == locked  # decided on the rows read, lapsed holds and all
    assert not (await reserve(admitter, 301)).granted
    now = datetime.now(UTC)
    assert (await counters.usage_of(pool, created, "p", now)).reserved_micros == 700
    assert (await counters.usage_of(pool, other, "q", now)).reserved_micros == 0
    assert await held(pool) == 1_300  # in the counter until the expiry job marks them


async def test_a_changed_limit_is_decided_on_at_once(pool: asyncpg.Pool) -> None:
    created = await budgets.create_budget(
        pool, budgets.budget_from_proto(project_budget(1_000), require_id=False)
    )
    admitter = Admitter(pool)
    assert (await reserve(admitter, 100)).granted
    created.limit_micros = 150
    await budgets.update_budget(pool, created)
    assert not (await reserve(admitter, 100)).granted
    assert (await reserve(admitter, 50)).granted


async def test_a_round_outside_its_time_window_writes_nothing(pool: asyncpg.Pool) -> None:
    """admission_apply refuses a round whose windows do not contain the database's time."""
    reservation = uuid.uuid4()
    past = datetime(2020, 1, 1, tzinfo=UTC)
    empty: list[object] = []
    write = [
        [reservation],
        ["gateway"],
        ["p"],
        [""],
        [""],
        ["m"],
        [1],
        [0],
        [LEASE],
        *[empty] * 15,
    ]
    generation = await pool.fetchval("SELECT generation FROM budget_generation")
    args = ["off", generation, past, past + timedelta(days=31), *[empty] * 13, *write]
    rows = await pool.fetch(ADMISSION_APPLY, *args)
    assert [r["applied"] for r in rows] == [False]
    assert await pool.fetchval("SELECT count(*) FROM reservations") == 0
    args[2:4] = [past, datetime(9999, 1, 1, tzinfo=UTC)]
    assert [r["applied"] for r in await pool.fetch(ADMISSION_APPLY, *args)] == [True]
    assert await pool.fetchval("SELECT count(*) FROM reservations") == 1


@pytest.mark.parametrize("decide_on_known", [True, False], ids=["known", "locked"])
async def test_a_counter_created_meanwhile_is_never_decided_on_unlocked(
    database_url: str, schema: str, pool: asyncpg.Pool, decide_on_known: bool
) -> None:
    """Three trackers, two rounds each in flight, race to create and fill 150 new counters.

    Before migration 0012 a round could read a counter another round had just created without
    locking it, and both granted against it (about one budget in a hundred here).
    """
    projects = [f"p{i}" for i in range(150)]
    for project in projects:
        budget = budgets.budget_from_proto(project_budget(100, project), require_id=False)
        await budgets.create_budget(pool, budget)
    pools = [await create_pool(database_url, schema, max_size=4) for _ in range(3)]
    try:
        admitters = [
            Admitter(p, max_batch=4, rounds_in_flight=2, decide_on_known=decide_on_known)
            for p in pools
        ]
        calls = [reserve(admitters[i % 3], 30, project) for project in projects for i in range(12)]
        granted = [a.granted for a in await asyncio.gather(*calls)]
        assert sum(granted) == 3 * len(projects)  # each budget holds three of 30 in 100
        for project in projects:
            assert await held(pool, project) == 90
    finally:
        for p in pools:
            await p.close()
