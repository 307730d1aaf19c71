"""One bad stored row never breaks a read for everyone, and the read says which row is bad.

Rows are planted straight into the tracker's tables with asyncpg (as an older build, a restore
or a hand edit could leave them): sums beyond int64, times of -infinity, infinity and the year
20000, negative counts, absurd text, budgets no window can be computed for, holds beyond int64.
Every read must still answer for everyone, with the good rows, and name the bad ones.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest

from lodestar.common.errors import InvalidArgumentError
from lodestar.common.events import new_event
from lodestar.common.sdk import ReceivedEvent
from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug
from lodestar_usage import retention
from lodestar_usage.reports import EXPORT_FIELDS
from lodestar_usage.testing import RunningTracker

from .test_usage_ledger import completed

I64 = 2**63 - 1
SUMS = (
    "requests, errors, input_tokens, output_tokens, cached_read_tokens, cache_write_tokens, "
    "reasoning_tokens, cost_micros, compute_cost_micros, shadow_cost_micros, savings_micros, "
    "duration_ms"
)
EVIL = (1, 0, 1, 1, 0, 0, 0, I64, 0, 0, 0, 1)  # one request costing int64's maximum


def _hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


async def plant_ledger(conn: asyncpg.Connection, occurred_at: object, **values: object) -> str:
    """A ledger row (no rollups), with ``values`` overriding a sane row; returns its event id."""
    row: dict[str, object] = {
        "occurred_at": occurred_at,
        "event_id": uuid.uuid4(),
        "model": "planted",
        "provider": "anthropic",
        "project": "p1",
        "session_id": "",
        "user_id": "ann",
        "task_id": "t",
        "attempt": 1,
        "status": 1,
        "duration_ms": 10,
        "input_tokens": 1,
        "output_tokens": 1,
        "cached_read_tokens": 0,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "cost_micros": 1,
        "cost_source": 1,
        "compute_cost_micros": 0,
        "shadow_cost_micros": 0,
        "savings_micros": 0,
        "reservation_id": "",
    }
    row.update(values)
    time_sql = "$1::text::timestamptz" if isinstance(occurred_at, str) else "$1"
    columns = ", ".join(row)
    params = ", ".join([time_sql, *(f"${i}" for i in range(2, len(row) + 1))])
    await conn.execute(f"INSERT INTO ledger ({columns}) VALUES ({params})", *row.values())
    return str(row["event_id"])


async def plant_rollups(conn: asyncpg.Connection, hour: datetime) -> None:
    """Two rollup rows of model ``evil`` per grain in ``hour``, each costing int64's maximum."""
    day = hour.replace(hour=0)
    sums = ", ".join(f"${i}" for i in range(6, 6 + len(EVIL)))
    for table, when in (("rollup_hourly", hour), ("rollup_daily", day)):
        column = "hour" if table == "rollup_hourly" else "day"
        for project in ("x1", "x2"):
            await conn.execute(
                f"INSERT INTO {table} ({column}, model, provider, project, user_id, {SUMS}) "
                f"VALUES ($1, $2, $3, $4, $5, {sums})",
                when,
                "evil",
                "p",
                project,
                "",
                *EVIL,
            )
    for table, when in (("rollup_hourly_model", hour), ("rollup_daily_model", day)):
        column = "hour" if table == "rollup_hourly_model" else "day"
        for provider in ("pa", "pb"):
            await conn.execute(
                f"INSERT INTO {table} ({column}, model, provider, {SUMS}) "
                f"VALUES ($1, $2, $3, {', '.join(f'${i}' for i in range(4, 4 + len(EVIL)))})",
                when,
                "evil",
                provider,
                *EVIL,
            )
    for session in ("evil-1", "evil-2"):
        await conn.execute(
            f"INSERT INTO rollup_session_hourly (hour, session_id, model, provider, project, "
            f"user_id, {SUMS}) VALUES ($1, $2, $3, $4, $5, $6, "
            f"{', '.join(f'${i}' for i in range(7, 7 + len(EVIL)))})",
            hour,
            session,
            "evil",
            "p",
            "x",
            "",
            *EVIL,
        )


async def plant_session(conn: asyncpg.Connection, session_id: str, **values: str | int) -> None:
    """A sessions row; times are Postgres text (e.g. '-infinity')."""
    row: dict[str, str | int] = {
        "started_at": "now",
        "last_activity_at": "now",
        "cost_micros": 1,
    }
    row.update(values)
    await conn.execute(
        "INSERT INTO sessions (session_id, project, user_id, started_at, last_activity_at, "
        "last_model, requests, cost_micros) "
        "VALUES ($1, 'p1', 'ann', $2::text::timestamptz, $3::text::timestamptz, 'm', 1, $4)",
        session_id,
        row["started_at"],
        row["last_activity_at"],
        row["cost_micros"],
    )


async def plant_budget(conn: asyncpg.Connection, name: str, **values: object) -> uuid.UUID:
    """A budgets row (global, monthly, limit 1000 unless ``values`` say otherwise)."""
    row: dict[str, object] = {
        "id": uuid.uuid4(),
        "name": name,
        "scope": u.BUDGET_SCOPE_GLOBAL,
        "scope_value": "",
        "period": u.BUDGET_PERIOD_MONTHLY,
        "timezone": "UTC",
        "rolling_seconds": 0,
        "limit_micros": 1000,
        "thresholds_pct": [50],
    }
    row.update(values)
    created = row.pop("created_at", "now")
    columns = ", ".join(row)
    params = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    await conn.execute(
        f"INSERT INTO budgets ({columns}, created_at) "
        f"VALUES ({params}, ${len(row) + 1}::text::timestamptz)",
        *row.values(),
        created,
    )
    return row["id"]  # type: ignore[return-value]


async def plant_hold(conn: asyncpg.Connection, budget_id: uuid.UUID, value: str) -> uuid.UUID:
    """An active reservation of int64's maximum against ``budget_id``, leased for ever."""
    rid = uuid.uuid4()
    await conn.execute(
        "INSERT INTO reservations (id, project, user_id, session_id, model, state, "
        "amount_micros, amount_tokens, lease_expires_at) "
        "VALUES ($1, $2, '', '', 'm', 'active', $3, 0, 'infinity')",
        rid,
        value,
        I64,
    )
    await conn.execute(
        "INSERT INTO reservation_budgets (reservation_id, budget_id, scope_value) "
        "VALUES ($1, $2, $3)",
        rid,
        budget_id,
        value,
    )
    return rid


async def ingest_good(tracker: RunningTracker) -> None:
    good = completed(model="good-model", session="good", cost=5)
    refused = await tracker.module.handle_batch(
        [ReceivedEvent(1, 1, new_event(good, source="test://bad-rows"), good)]
    )
    assert not refused


async def test_reads_answer_despite_bad_ledger_and_rollup_rows(
    admin: grpc.aio.Channel, tracker: RunningTracker, tracker_db: asyncpg.Connection
) -> None:
    await ingest_good(tracker)
    now = datetime.now(UTC)
    await plant_rollups(tracker_db, _hour(now))
    costly = await plant_ledger(tracker_db, now - timedelta(minutes=1), cost_micros=I64)
    wordy = await plant_ledger(tracker_db, now - timedelta(minutes=2), model="m" * 10_000)
    negative = await plant_ledger(tracker_db, now - timedelta(minutes=3), input_tokens=-7)
    await plant_ledger(tracker_db, "-infinity")
    await plant_ledger(tracker_db, "infinity")
    # bigint's minimum in a partial edge hour: read negated ("unledger") by a range window.
    past = _hour(now) - timedelta(hours=3)
    minimum = await plant_ledger(tracker_db, past + timedelta(minutes=5), cost_micros=-(2**63))
    month_start = _hour(now).replace(day=1, hour=0)
    bad = {costly, wordy, negative} | ({minimum} if past >= month_start else set())
    stub = ug.UsageServiceStub(admin)

    by_model = await stub.Summary(u.SummaryRequest(group_by=["model"]))
    groups = {row.group["model"]: row for row in by_model.rows}
    assert groups["good-model"].totals.cost_micros == 5
    assert not groups["good-model"].error
    assert "does not fit int64" in groups["evil"].error
    assert not groups["evil"].HasField("totals")
    assert any("evil" in w for w in by_model.warnings)
    assert by_model.totals.cost_micros == 5  # the evil group is left out of the totals

    overall = await stub.Summary(u.SummaryRequest())
    assert "does not fit int64" in overall.rows[0].error
    assert not overall.HasField("totals")
    by_session = await stub.Summary(u.SummaryRequest(group_by=["session"]))
    assert any("totals not reported" in w for w in by_session.warnings)
    ranged = u.Window(
        range=u.TimeRange(
            start=_stamp(past + timedelta(minutes=10)), end=_stamp(now + timedelta(seconds=1))
        )
    )
    for group_by in ([], ["model"], ["project", "day"]):
        await stub.Summary(u.SummaryRequest(window=ranged, group_by=group_by))

    records = await stub.ListRecords(u.ListRecordsRequest())
    assert [r.model for r in records.records] == ["good-model"]
    assert {s.id for s in records.skipped_records} == bad
    assert all(s.kind == "ledger" and s.reason for s in records.skipped_records)
    by_id = {s.id: s.reason for s in records.skipped_records}
    assert "cost_micros" in by_id[costly]
    assert "model" in by_id[wordy]
    assert "input_tokens" in by_id[negative]

    chunks = [c async for c in stub.ExportRecords(u.ExportRecordsRequest())]
    lines = b"".join(c.chunk for c in chunks).decode().splitlines()
    assert len(lines) == 2  # header and the good row
    assert "good-model" in lines[1]
    assert {s.id for c in chunks for s in c.skipped_records} == bad


def _stamp(moment: datetime) -> object:
    from google.protobuf import timestamp_pb2

    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def test_list_sessions_answers_despite_bad_session_rows(
    admin: grpc.aio.Channel, tracker: RunningTracker, tracker_db: asyncpg.Connection
) -> None:
    await ingest_good(tracker)
    long_id = "L" * 10_000
    await plant_session(tracker_db, "year-1", started_at="-infinity")
    await plant_session(tracker_db, "forever", last_activity_at="infinity")
    await plant_session(tracker_db, "year-20000", started_at="20000-01-01")
    await plant_session(tracker_db, "owes", cost_micros=-5)
    await plant_session(tracker_db, long_id)
    await plant_session(
        tracker_db, "backwards", started_at="now", last_activity_at="2020-01-01 00:00:00+00"
    )
    bad = {"year-1", "forever", "year-20000", "owes", "backwards"}
    stub = ug.UsageServiceStub(admin)

    reply = await stub.ListSessions(u.ListSessionsRequest())
    assert [s.session_id for s in reply.sessions] == ["good"]
    skipped = {s.id: s.reason for s in reply.skipped_records}
    assert set(skipped) - {k for k in skipped if k.startswith("LLL")} == bad
    assert any(k.startswith("LLL") and len(k) <= 513 for k in skipped)
    assert "-infinity" in skipped["year-1"]
    assert "infinity" in skipped["forever"]
    assert "cost_micros" in skipped["owes"]

    windowed = await stub.ListSessions(
        u.ListSessionsRequest(window=u.Window(rolling=u.RollingWindow(days=1)))
    )
    assert "good" in [s.session_id for s in windowed.sessions]

    # Paging one at a time walks past every bad row, each page answering.
    seen_good, seen_bad, token, pages = [], set(), "", 0
    while True:
        page = await stub.ListSessions(u.ListSessionsRequest(page_size=1, page_token=token))
        seen_good += [s.session_id for s in page.sessions]
        seen_bad |= {s.id for s in page.skipped_records}
        token, pages = page.next_page_token, pages + 1
        if not token:
            break
        assert pages < 20
    assert seen_good == ["good"]
    assert seen_bad == set(skipped)


async def test_list_budgets_answers_despite_bad_budget_and_reservation_rows(
    admin: grpc.aio.Channel, tracker: RunningTracker, tracker_db: asyncpg.Connection
) -> None:
    await ingest_good(tracker)
    stub = ug.BudgetServiceStub(admin)
    good = await stub.CreateBudget(
        u.CreateBudgetRequest(
            budget=u.Budget(
                name="good",
                scope=u.BUDGET_SCOPE_GLOBAL,
                period=u.BUDGET_PERIOD_MONTHLY,
                limit_micros=1000,
            )
        )
    )
    bad = {
        await plant_budget(
            tracker_db, "millennia", period=u.BUDGET_PERIOD_ROLLING, rolling_seconds=10**11
        ): "rolling_seconds",
        await plant_budget(tracker_db, "nowhere", timezone="Nowhere/Land"): "timezone",
        await plant_budget(tracker_db, "no-period", period=99): "period",
        await plant_budget(tracker_db, "no-scope", scope=42): "scope",
        await plant_budget(tracker_db, "overdrawn", limit_micros=-1): "limit_micros",
    }
    held = await plant_budget(
        tracker_db, "held", scope=u.BUDGET_SCOPE_PROJECT, scope_value="px", limit_micros=10**12
    )
    await plant_hold(tracker_db, held, "px")
    await plant_hold(tracker_db, held, "px")
    odd_date = await plant_budget(tracker_db, "odd-date", created_at="20000-01-01")
    await tracker_db.execute(
        "INSERT INTO budget_counters VALUES ($1, '', now(), $2, $2, $2, $2)", held, I64
    )

    reply = await stub.ListBudgets(u.ListBudgetsRequest())
    listed = {b.budget.name: b for b in reply.budgets}
    assert set(listed) == {"good", "odd-date"}
    assert listed["good"].spent_micros == 5
    assert listed["good"].budget.id == good.budget.id
    assert not listed["odd-date"].budget.HasField("created_at")
    assert str(odd_date) == listed["odd-date"].budget.id
    skipped = {s.id: s.reason for s in reply.skipped_records}
    assert set(skipped) == {str(b) for b in bad} | {str(held)}
    for budget_id, column in bad.items():
        assert column in skipped[str(budget_id)]
    assert "holds" in skipped[str(held)]
    assert all(s.kind == "budget" for s in reply.skipped_records)


async def test_a_bad_stored_budget_breaks_neither_admission_nor_ingest_nor_alerts(
    admin: grpc.aio.Channel, tracker: RunningTracker, tracker_db: asyncpg.Connection
) -> None:
    """A rolling budget of 10^11 s (accepted on main), a budget with an unknown timezone or
    period, and one dated the year 20000 apply to every request: each is left out (and logged)
    while the good budget still decides."""
    stub = ug.BudgetServiceStub(admin)
    await stub.CreateBudget(
        u.CreateBudgetRequest(
            budget=u.Budget(
                name="good",
                scope=u.BUDGET_SCOPE_GLOBAL,
                period=u.BUDGET_PERIOD_MONTHLY,
                limit_micros=1000,
            )
        )
    )
    await plant_budget(
        tracker_db, "millennia", period=u.BUDGET_PERIOD_ROLLING, rolling_seconds=10**11
    )
    await plant_budget(tracker_db, "nowhere", timezone="Nowhere/Land")
    await plant_budget(tracker_db, "no-period", period=99)
    # Usable (only its creation time is bad), with room to spare: "good" decides.
    await plant_budget(tracker_db, "year-20000", created_at="20000-01-01", limit_micros=10**6)

    granted = await stub.Reserve(u.ReserveRequest(project="p1", estimated_cost_micros=600))
    assert granted.granted
    denied = await stub.Reserve(u.ReserveRequest(project="p1", estimated_cost_micros=600))
    assert not denied.granted
    assert denied.denial.budget_name == "good"
    await stub.Release(u.ReleaseRequest(reservation_id=granted.reservation_id))

    await ingest_good(tracker)  # ingest adds to the counters of every counted budget
    assert await tracker_db.fetchval("SELECT count(*) FROM ledger") == 1
    # 5 of good's 1000 micros: below its 50% threshold; the burn-rate check waits for 10% of the
    # month, by when 5 micros project to at most 50. The bad budgets are left out.
    assert await tracker.module.check_alerts() == 0
    assert await tracker_db.fetchval("SELECT count(*) FROM budget_crossings") == 0


def _archived(**changes: object) -> dict[str, object]:
    row: dict[str, object] = dict.fromkeys(EXPORT_FIELDS, 0)
    row.update(
        {
            "occurred_at": "2025-01-01T10:00:00+00:00",
            "event_id": str(uuid.uuid4()),
            "model": "m",
            "provider": "p",
            "project": "p1",
            "session_id": "",
            "user_id": "ann",
            "task_id": "",
            "status": 1,
            "cost_source": 1,
            "cost_micros": 7,
            "reservation_id": "",
        }
    )
    row.update(changes)
    return row


def _write_archive(folder: Path, rows: list[dict[str, object]]) -> Path:
    data = gzip.compress(("\n".join(json.dumps(r) for r in rows) + "\n").encode(), mtime=0)
    (folder / "ledger_20250101.jsonl.gz").write_bytes(data)
    manifest = folder / "ledger_20250101.manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "format_version": 1,
                "day": "2025-01-01",
                "rows": len(rows),
                "sha256": hashlib.sha256(data).hexdigest(),
                "file": "ledger_20250101.jsonl.gz",
                "columns": EXPORT_FIELDS,
            }
        )
    )
    return manifest


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (_archived(cost_micros=I64), "cost_micros"),
        (_archived(occurred_at="0001-01-01T00:00:00+00:00"), "occurred_at"),
        (_archived(model="a\x00b"), "model"),
        (_archived(input_tokens="12"), "input_tokens"),
    ],
    ids=["cost", "year-1", "nul", "text-number"],
)
async def test_an_archive_with_a_bad_row_is_refused_whole(
    tmp_path: Path,
    tracker: RunningTracker,
    tracker_db: asyncpg.Connection,
    bad: dict[str, object],
    says: str,
) -> None:
    assert tracker.module.pool is not None
    manifest = _write_archive(tmp_path, [_archived(), bad])
    with pytest.raises(InvalidArgumentError, match=f"row 2 .*{says}"):
        await retention.import_archive(tracker.module.pool, manifest)
    assert await tracker_db.fetchval("SELECT count(*) FROM ledger") == 0
    good = _write_archive(tmp_path, [_archived()])
    assert await retention.import_archive(tracker.module.pool, good) == 1


async def test_a_saturated_rollup_or_session_row_does_not_block_ingest(
    admin: grpc.aio.Channel, tracker: RunningTracker, tracker_db: asyncpg.Connection
) -> None:
    """Rollup and session sums already at int64's maximum stay there (saturate) instead of
    failing the batch, whose other events would be retried and dead-lettered with it."""
    hour = _hour(datetime.now(UTC))
    await tracker_db.execute(
        f"INSERT INTO rollup_hourly (hour, model, provider, project, user_id, {SUMS}) "
        "VALUES ($1, 'full', 'anthropic', 'p1', 'ann', 1, 0, $2, 0, 0, 0, 0, $2, 0, 0, $3, 1)",
        hour,
        I64,
        -I64,
    )
    await plant_session(tracker_db, "full", cost_micros=I64)
    full = completed(model="full", session="full", cost=5)
    other = completed(model="other", session="other", cost=7)
    refused = await tracker.module.handle_batch(
        [
            ReceivedEvent(1, 1, new_event(full, source="test://bad-rows"), full),
            ReceivedEvent(2, 1, new_event(other, source="test://bad-rows"), other),
        ]
    )
    assert not refused
    assert await tracker_db.fetchval("SELECT count(*) FROM ledger") == 2
    saturated = await tracker_db.fetchrow(
        "SELECT cost_micros, input_tokens, requests FROM rollup_hourly WHERE model = 'full'"
    )
    assert tuple(saturated) == (I64, I64, 2)
    assert (
        await tracker_db.fetchval("SELECT cost_micros FROM sessions WHERE session_id = 'full'")
        == I64
    )
    reply = await ug.UsageServiceStub(admin).Summary(u.SummaryRequest(group_by=["model"]))
    costs = {r.group["model"]: r.totals.cost_micros for r in reply.rows if not r.error}
    assert costs["other"] == 7


async def test_a_saturated_budget_counter_does_not_block_ingest(
    admin: grpc.aio.Channel, tracker: RunningTracker, tracker_db: asyncpg.Connection
) -> None:
    stub = ug.BudgetServiceStub(admin)
    await stub.CreateBudget(
        u.CreateBudgetRequest(
            budget=u.Budget(
                name="all",
                scope=u.BUDGET_SCOPE_GLOBAL,
                period=u.BUDGET_PERIOD_MONTHLY,
                limit_micros=10**12,
            )
        )
    )
    assert (await stub.Reserve(u.ReserveRequest(estimated_cost_micros=1))).granted
    await tracker_db.execute("UPDATE budget_counters SET spent_micros = $1", I64)
    await ingest_good(tracker)
    assert await tracker_db.fetchval("SELECT count(*) FROM ledger") == 1
    assert await tracker_db.fetchval("SELECT spent_micros FROM budget_counters") == I64
    denied = await stub.Reserve(u.ReserveRequest(estimated_cost_micros=1))
    assert not denied.granted  # a saturated counter refuses, it never wraps around


async def test_an_admin_can_update_and_delete_a_budget_with_a_bad_stored_time(admin, tracker_db):
    """The audit entry reads the old row too: a time Python cannot hold must not fail the change."""
    budget_id = await plant_budget(tracker_db, "odd-date", created_at="20000-01-01")
    stub = ug.BudgetServiceStub(admin)
    listed = (await stub.ListBudgets(u.ListBudgetsRequest())).budgets
    [budget] = [b.budget for b in listed if b.budget.id == str(budget_id)]
    budget.name = "renamed"
    updated = await stub.UpdateBudget(u.UpdateBudgetRequest(budget=budget))
    assert updated.budget.name == "renamed"
    await stub.DeleteBudget(u.DeleteBudgetRequest(id=str(budget_id)))
    assert await tracker_db.fetchval("SELECT count(*) FROM budgets WHERE id = $1", budget_id) == 0
    actions = await tracker_db.fetch(
        "SELECT action FROM audit_log WHERE target = $1 ORDER BY id", f"budget/{budget_id}"
    )
    assert [r["action"] for r in actions] == [
        "BudgetService/UpdateBudget",
        "BudgetService/DeleteBudget",
    ]
