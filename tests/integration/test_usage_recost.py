"""Unpriced usage: visible (ListUnpriced, CLI, metrics), then re-priced by Recost exactly.

After Recost the ledger, every rollup (both grains and the per-session one), the sessions and
the budget counters agree to the micro-dollar; a second Recost changes nothing; refusals change
nothing.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, date, datetime, timedelta

import asyncpg
import grpc
import pytest
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from lodestar.common.auth import Role
from lodestar.common.cli import app
from lodestar.common.sdk import connect
from lodestar.usage.v1 import events_pb2 as ev
from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug
from lodestar_usage import recost
from lodestar_usage.pricing import PriceRow

from .test_usage_ledger import completed, publish, wait_requests

MODEL, PROVIDER = "new-model-1", "acme"
TOKENS = ev.TokenUsage(input=1234, output=567, cached_read=89)
#: $3 / $15 / $0.30 per million input / output / cached-read tokens.
PRICE = PriceRow("new-model*", date(2000, 1, 1), 3_000_000, 15_000_000, cached_read=300_000)
#: 1234 * 3 + 567 * 15 + 89 * 0.3 = 12,233.7 micro-dollars, rounded half up once.
COST = 12_234
REPORTED = 777
ROLLUPS = {
    "rollup_hourly": "date_trunc('hour', occurred_at, 'UTC'), model, provider, project, user_id",
    "rollup_daily": "date_trunc('day', occurred_at, 'UTC'), model, provider, project, user_id",
    "rollup_session_hourly": (
        "session_id, date_trunc('hour', occurred_at, 'UTC'), model, provider, project, user_id"
    ),
    "rollup_hourly_model": "date_trunc('hour', occurred_at, 'UTC'), model, provider",
    "rollup_daily_model": "date_trunc('day', occurred_at, 'UTC'), model, provider",
}
KEYS = {
    "rollup_hourly": "hour, model, provider, project, user_id",
    "rollup_daily": "day, model, provider, project, user_id",
    "rollup_session_hourly": "session_id, hour, model, provider, project, user_id",
    "rollup_hourly_model": "hour, model, provider",
    "rollup_daily_model": "day, model, provider",
}
MONTH = u.Window(rolling=u.RollingWindow(days=30))


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels or None) or 0.0


def set_price_request(valid_from: date, pattern: str = PRICE.pattern) -> u.SetPriceRequest:
    price = PRICE.to_proto()
    price.model_pattern = pattern
    price.valid_from = valid_from.isoformat()
    return u.SetPriceRequest(price=price)


async def assert_consistent(db) -> None:
    """Every rollup and session holds exactly the cost of its ledger rows."""
    for table, key in ROLLUPS.items():
        ledger = await db.fetch(
            f"SELECT {key}, sum(cost_micros)::bigint FROM ledger "
            f"{'WHERE session_id <> $$$$' if 'session' in table else ''} GROUP BY {key} "
            f"ORDER BY {key}"
        )
        rolled = await db.fetch(
            f"SELECT {KEYS[table]}, cost_micros FROM {table} ORDER BY {KEYS[table]}"
        )
        assert [tuple(r) for r in rolled] == [tuple(r) for r in ledger], table
    sessions = await db.fetch("SELECT session_id, cost_micros FROM sessions ORDER BY 1")
    ledger = await db.fetch(
        "SELECT session_id, sum(cost_micros)::bigint FROM ledger WHERE session_id <> '' "
        "GROUP BY 1 ORDER BY 1"
    )
    assert [tuple(r) for r in sessions] == [tuple(r) for r in ledger]


async def run_cli(*args: str) -> tuple[int, str]:
    """``lodestar …`` in a thread (its commands run an event loop of their own)."""
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args))
    return result.exit_code, result.output


def json_line(out: str) -> dict:
    """The JSON a command printed (the in-process servers log to the same stdout)."""
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


async def ledger_state(db) -> list[tuple]:
    rows = await db.fetch(
        "SELECT event_id, cost_micros, cost_source FROM ledger ORDER BY occurred_at, event_id"
    )
    return [tuple(r) for r in rows]


async def test_unpriced_usage_is_visible_then_recosted_exactly_once(
    admin, tracker, tracker_db, publisher_channel, tokens
):
    usage, budget_stub = ug.UsageServiceStub(admin), ug.BudgetServiceStub(admin)
    await budget_stub.CreateBudget(
        u.CreateBudgetRequest(
            budget=u.Budget(
                name="all",
                scope=u.BUDGET_SCOPE_GLOBAL,
                period=u.BUDGET_PERIOD_DAILY,
                limit_micros=10**12,
            )
        )
    )
    # A Reserve creates today's counter; ingest then adds spend to it.
    held = await budget_stub.Reserve(u.ReserveRequest(project="p1", estimated_cost_micros=1))
    await budget_stub.Release(u.ReleaseRequest(reservation_id=held.reservation_id))
    now = datetime.now(UTC)
    recent = max(now - timedelta(minutes=5), now.replace(hour=0, minute=0, second=1))
    old = now - timedelta(days=3)
    before = metric("lodestar_usage_unpriced_requests_total", model=MODEL)
    make = lambda **kw: completed(model=MODEL, provider=PROVIDER, tokens=TOKENS, **kw)  # noqa: E731
    await publish(publisher_channel, [make(session="s1") for _ in range(3)], when=recent)
    await publish(publisher_channel, [make(session="s2", project="p2") for _ in range(2)], when=old)
    await publish(publisher_channel, [make(session="s1", cost=REPORTED)], when=recent)
    await publish(publisher_channel, [completed(model="nobody-prices-me", session="")], when=recent)
    await wait_requests(admin, 7)

    # Visible: the API, the metric, the gauges, the CLI.
    listed = await usage.ListUnpriced(u.ListUnpricedRequest(window=MONTH))
    assert [(r.model, r.provider, r.requests, r.priceable_requests) for r in listed.rows] == [
        (MODEL, PROVIDER, 5, 0),
        ("nobody-prices-me", "anthropic", 1, 0),
    ]
    first = listed.rows[0]
    assert first.tokens.input == 5 * 1234
    assert first.first_seen.ToDatetime(tzinfo=UTC) < first.last_seen.ToDatetime(tzinfo=UTC)
    assert (listed.unpriced_requests, listed.priceable_requests, listed.more_rows) == (6, 0, 0)
    by_day = await usage.ListUnpriced(u.ListUnpricedRequest(window=MONTH, by_day=True, limit=1))
    assert [(r.model, r.day, r.requests) for r in by_day.rows] == [
        (MODEL, recent.date().isoformat(), 3)
    ]
    assert by_day.more_rows == 2
    assert metric("lodestar_usage_unpriced_requests_total", model=MODEL) - before == 5
    await recost.refresh_gauges(tracker.module.pool, datetime.now(UTC))
    assert metric("lodestar_usage_ledger_unpriced_requests") == 6
    assert metric("lodestar_usage_ledger_unpriced_models") == 2
    code, out = await run_cli(
        "usage", "unpriced", "--target", tracker.target, "--token", tokens[Role.ADMIN],
        "--window", "30d", "--json",
    )  # fmt: skip
    assert code == 0, out
    assert [(r["model"], r["requests"]) for r in json_line(out)["rows"]] == [
        (MODEL, 5),
        ("nobody-prices-me", 1),
    ]

    # A price from before the oldest row: it now covers them.
    await usage.SetPrice(set_price_request(old.date() - timedelta(days=2)))
    listed = await usage.ListUnpriced(u.ListUnpricedRequest(window=MONTH))
    assert (listed.rows[0].priceable_requests, listed.rows[0].price_pattern) == (5, PRICE.pattern)
    assert PRICE.cost_micros(TOKENS) == COST

    ledger_before = await ledger_state(tracker_db)
    summary_before = (await usage.Summary(u.SummaryRequest(window=MONTH))).totals
    window = u.Window(rolling=u.RollingWindow(days=10))
    dry = await usage.Recost(u.RecostRequest(window=window, dry_run=True, max_rows=1))
    assert (dry.dry_run, dry.rows_recosted, dry.micros_added) == (True, 5, 5 * COST)
    assert (dry.rows_still_unpriced, dry.more, dry.audit_entry_id) == (1, False, 0)
    assert [(m.model, m.rows, list(m.price_patterns)) for m in dry.models] == [
        (MODEL, 5, [PRICE.pattern])
    ]
    assert await ledger_state(tracker_db) == ledger_before
    assert (await usage.Summary(u.SummaryRequest(window=MONTH))).totals == summary_before

    # Applied in two calls (max_rows), oldest first.
    one = await usage.Recost(u.RecostRequest(window=window, max_rows=2))
    assert (one.rows_recosted, one.micros_added, one.more) == (2, 2 * COST, True)
    two = await usage.Recost(u.RecostRequest(window=window))
    assert (two.rows_recosted, two.micros_added, two.more) == (3, 3 * COST, False)
    assert two.rows_still_unpriced == 1
    again = await usage.Recost(u.RecostRequest(window=window))
    assert (again.rows_recosted, again.micros_added, again.audit_entry_id) == (0, 0, 0)

    # Everything agrees, to the micro-dollar.
    total = 5 * COST + REPORTED
    assert await tracker_db.fetchval("SELECT sum(cost_micros) FROM ledger") == total
    await assert_consistent(tracker_db)
    summary = await usage.Summary(u.SummaryRequest(window=MONTH))
    assert summary.totals.cost_micros == total
    assert summary.totals.requests == 7
    by_model_day = await usage.Summary(u.SummaryRequest(window=MONTH, group_by=["model", "day"]))
    assert sorted(
        (r.group["model"], r.group["day"], r.totals.cost_micros) for r in by_model_day.rows
    ) == sorted(
        [
            (MODEL, old.date().isoformat(), 2 * COST),
            (MODEL, recent.date().isoformat(), 3 * COST + REPORTED),
            ("nobody-prices-me", recent.date().isoformat(), 0),
        ]
    )
    by_session = await usage.Summary(u.SummaryRequest(window=MONTH, group_by=["session"]))
    assert {r.group["session"]: r.totals.cost_micros for r in by_session.rows} == {
        "s1": 3 * COST + REPORTED,
        "s2": 2 * COST,
    }
    by_project = await usage.Summary(
        u.SummaryRequest(window=MONTH, filters=u.Filters(projects=["p2"]))
    )
    assert by_project.totals.cost_micros == 2 * COST
    sessions = await usage.ListSessions(u.ListSessionsRequest())
    assert {s.session_id: s.cost_micros for s in sessions.sessions} == {
        "s1": 3 * COST + REPORTED,
        "s2": 2 * COST,
    }
    records = await usage.ListRecords(u.ListRecordsRequest(window=MONTH, page_size=100))
    assert sorted((r.cost_source, r.cost_micros) for r in records.records) == sorted(
        [(u.COST_SOURCE_PRICE_TABLE, COST)] * 5
        + [(u.COST_SOURCE_REPORTED, REPORTED), (u.COST_SOURCE_UNPRICED, 0)]
    )
    # Today's counter of the daily budget counts today's rows (the old ones are in an earlier day).
    spent = await tracker_db.fetchval("SELECT spent_micros FROM budget_counters")
    assert spent == 3 * COST + REPORTED
    status = (await budget_stub.ListBudgets(u.ListBudgetsRequest())).budgets[0]
    assert status.spent_micros == 3 * COST + REPORTED

    # Audited: who, the window, the rows and the money, once per change.
    entries = await tracker_db.fetch(
        "SELECT id, principal, role, target, after FROM audit_log "
        "WHERE action = 'UsageService/Recost' ORDER BY id"
    )
    assert [e["id"] for e in entries] == [one.audit_entry_id, two.audit_entry_id]
    assert (entries[0]["principal"], entries[0]["role"]) == ("test-admin", "admin")
    assert entries[0]["target"].startswith("ledger/")
    after = [json.loads(e["after"]) for e in entries]
    assert [(a["rows_recosted"], a["micros_added"]) for a in after] == [
        (2, 2 * COST),
        (3, 3 * COST),
    ]
    listed = await usage.ListUnpriced(u.ListUnpricedRequest(window=MONTH))
    assert [(r.model, r.requests) for r in listed.rows] == [("nobody-prices-me", 1)]


async def test_recost_by_the_cli_and_a_model_pattern(
    admin, tracker, tracker_db, publisher_channel, tokens
):
    usage = ug.UsageServiceStub(admin)
    now = datetime.now(UTC)
    await publish(
        publisher_channel,
        [completed(model=MODEL, provider=PROVIDER, tokens=TOKENS) for _ in range(3)]
        + [completed(model="other-model", provider=PROVIDER, tokens=TOKENS)],
        when=now - timedelta(seconds=30),
    )
    await wait_requests(admin, 4)
    await usage.SetPrice(set_price_request(now.date() - timedelta(days=1)))
    await usage.SetPrice(set_price_request(now.date() - timedelta(days=1), "other-*"))
    common = ("--target", tracker.target, "--token", tokens[Role.ADMIN], "--json")
    since = (now - timedelta(days=1)).date().isoformat()
    code, out = await run_cli(
        "prices", "recost", "--since", since, "--model", "new-*", "--dry-run", *common
    )
    assert code == 0, out
    assert json_line(out)["rows_recosted"] == 3
    assert json_line(out)["micros_added"] == 3 * COST
    code, out = await run_cli(
        "prices", "recost", "--since", since, "--model", "acme/new-*", "--batch", "2", *common
    )
    assert code == 0, out
    reply = json_line(out)
    assert (reply["rows_recosted"], reply["micros_added"], reply["calls"]) == (3, 3 * COST, 2)
    assert len(reply["audit_entry_ids"]) == 2
    assert reply["rows_still_unpriced"] == 0
    assert (
        await tracker_db.fetchval(
            "SELECT count(*) FROM ledger WHERE cost_source = $1", u.COST_SOURCE_UNPRICED
        )
        == 1
    )
    code, out = await run_cli("prices", "recost", "--since", "yesterday", *common)
    assert code != 0
    assert "--since" in out
    await assert_consistent(tracker_db)


async def test_only_an_admin_recosts(admin, tracker, tokens):
    async with connect(tracker.target, tokens[Role.MODULE]) as module:
        stub = ug.UsageServiceStub(module)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Recost(u.RecostRequest(window=MONTH))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        listed = await stub.ListUnpriced(u.ListUnpricedRequest())
        assert listed.unpriced_requests == 0


def _range(days: int) -> u.Window:
    window = u.Window()
    end = datetime(2026, 6, 1, tzinfo=UTC)
    window.range.start.FromDatetime(end - timedelta(days=days))
    window.range.end.FromDatetime(end)
    return window


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (u.RecostRequest(), "window"),
        (u.RecostRequest(window=_range(367)), "window"),
        (u.RecostRequest(window=MONTH, model_pattern="bad pattern"), "model_pattern"),
        (u.RecostRequest(window=MONTH, model_pattern="*" * 201), "model_pattern"),
        (u.RecostRequest(window=MONTH, max_rows=-1), "max_rows"),
        (u.RecostRequest(window=MONTH, max_rows=recost.MAX_ROWS + 1), "max_rows"),
        (u.RecostRequest(window=u.Window(rolling=u.RollingWindow(days=-1))), "window.rolling"),
        (u.ListUnpricedRequest(limit=recost.MAX_LIMIT + 1), "limit"),
        (u.ListUnpricedRequest(limit=-1), "limit"),
    ],
)
async def test_bad_requests_name_the_field_and_change_nothing(
    admin, tracker_db, publisher_channel, request_, field
):
    usage = ug.UsageServiceStub(admin)
    await publish(
        publisher_channel,
        [completed(model=MODEL, provider=PROVIDER, tokens=TOKENS)],
        when=datetime.now(UTC) - timedelta(seconds=10),
    )
    await wait_requests(admin, 1)
    await usage.SetPrice(set_price_request(datetime.now(UTC).date() - timedelta(days=1)))
    state = await ledger_state(tracker_db)
    audited = await tracker_db.fetchval("SELECT count(*) FROM audit_log")
    method = usage.Recost if isinstance(request_, u.RecostRequest) else usage.ListUnpriced
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await method(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(f"{field}:"), info.value.details()
    assert await ledger_state(tracker_db) == state
    assert await tracker_db.fetchval("SELECT count(*) FROM audit_log") == audited
    await assert_consistent(tracker_db)


async def test_concurrent_recosts_during_ingest_count_every_row_once(
    admin, tracker_db, publisher_channel
):
    usage = ug.UsageServiceStub(admin)
    now = datetime.now(UTC)
    base = now - timedelta(hours=2)
    payloads = [
        completed(model=MODEL, provider=PROVIDER, tokens=TOKENS, session=f"s{i % 7}")
        for i in range(300)
    ]
    for i in range(0, 300, 50):
        await publish(
            publisher_channel, payloads[i : i + 50], when=base + timedelta(minutes=i // 5)
        )
    await wait_requests(admin, 300)
    await usage.SetPrice(set_price_request(now.date() - timedelta(days=1)))

    async def recost_all() -> int:
        done = 0
        while True:
            reply = await usage.Recost(u.RecostRequest(window=MONTH, max_rows=40))
            done += reply.rows_recosted
            if not reply.more:
                return done

    async def ingest_more() -> None:
        for i in range(5):
            more = [
                completed(model=MODEL, provider=PROVIDER, tokens=TOKENS, session=f"s{j % 7}")
                for j in range(20)
            ]
            await publish(publisher_channel, more, when=now - timedelta(minutes=i))

    counts = await asyncio.gather(recost_all(), recost_all(), ingest_more())
    await wait_requests(admin, 400)
    assert counts[0] + counts[1] == 300
    # The rows ingested meanwhile were priced at ingest (the price was already set) or are
    # left unpriced for the next Recost; either way each row is counted once.
    await usage.Recost(u.RecostRequest(window=MONTH))
    assert await tracker_db.fetchval("SELECT sum(cost_micros) FROM ledger") == 400 * COST
    summary = await usage.Summary(u.SummaryRequest(window=MONTH))
    assert (summary.totals.requests, summary.totals.cost_micros) == (400, 400 * COST)
    await assert_consistent(tracker_db)


async def test_recosts_on_two_replicas_count_every_row_once(
    start_trackers, tokens, database_url, tracker_schema, publisher_channel
):
    replicas = [await start_trackers(), await start_trackers()]
    async with (
        connect(replicas[0].target, tokens[Role.ADMIN]) as first,
        connect(replicas[1].target, tokens[Role.ADMIN]) as second,
    ):
        now = datetime.now(UTC)
        payloads = [
            completed(model=MODEL, provider=PROVIDER, tokens=TOKENS, session=f"s{i % 5}")
            for i in range(200)
        ]
        await publish(publisher_channel, payloads, when=now - timedelta(minutes=30))
        await wait_requests(first, 200)
        await ug.UsageServiceStub(first).SetPrice(set_price_request(now.date()))

        async def recost_all(channel) -> int:
            done = 0
            while True:
                reply = await ug.UsageServiceStub(channel).Recost(
                    u.RecostRequest(window=MONTH, max_rows=30)
                )
                done += reply.rows_recosted
                if not reply.more:
                    return done

        counts = await asyncio.gather(recost_all(first), recost_all(second))
        assert sum(counts) == 200
        for channel in (first, second):
            summary = await ug.UsageServiceStub(channel).Summary(u.SummaryRequest(window=MONTH))
            assert summary.totals.cost_micros == 200 * COST
    db = await asyncpg.connect(database_url, server_settings={"search_path": tracker_schema})
    try:
        await assert_consistent(db)
        entries = await db.fetch("SELECT after FROM audit_log WHERE action = 'UsageService/Recost'")
        assert sum(json.loads(e["after"])["rows_recosted"] for e in entries) == 200
    finally:
        await db.close()
