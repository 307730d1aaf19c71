"""usage-tracker bounds: every number and time a request or an event carries is checked.

Each case is an attack value that was accepted on main (and then broke reads for everyone, held a
budget for millennia, or answered INTERNAL). Each must be refused with INVALID_ARGUMENT naming the
field and the bound, and must store nothing. Every case asserts the bound's own text, so removing
that one check makes its case fail.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from grpc_status import rpc_status

from lodestar.common.errors import bad_request_violations
from lodestar.common.events import new_event
from lodestar.common.sdk import ReceivedEvent
from lodestar.usage.v1 import events_pb2 as ev
from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug
from lodestar_usage import bounds
from lodestar_usage.reports import encode_token
from lodestar_usage.testing import RunningTracker

from .test_usage_ledger import completed

I32 = 2**31 - 1
I64 = 2**63 - 1
YEAR_1 = -62_135_596_800  # 0001-01-01T00:00:00Z, Timestamp's minimum
YEAR_9999 = 253_402_300_799  # 9999-12-31T23:59:59Z, Timestamp's maximum
CALL_TIMEOUT = 20.0
TABLES = ("ledger", "sessions", "budgets", "reservations", "prices", "budget_counters")


def ts(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def at(year: int, month: int = 1, day: int = 1) -> timestamp_pb2.Timestamp:
    return ts(int(datetime(year, month, day, tzinfo=UTC).timestamp()))


def rng(start: timestamp_pb2.Timestamp, end: timestamp_pb2.Timestamp) -> u.Window:
    return u.Window(range=u.TimeRange(start=start, end=end))


def secs(seconds: int, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


def budget(**kw: object) -> u.Budget:
    values: dict[str, object] = {
        "name": "b",
        "scope": u.BUDGET_SCOPE_GLOBAL,
        "period": u.BUDGET_PERIOD_MONTHLY,
        "limit_micros": 1000,
    }
    values.update(kw)
    return u.Budget(**values)  # type: ignore[arg-type]


def rolling_budget(rolling: duration_pb2.Duration) -> u.Budget:
    return budget(period=u.BUDGET_PERIOD_ROLLING, rolling=rolling)


async def stored(conn: asyncpg.Connection) -> dict[str, int]:
    return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}


def assert_refused(error: grpc.aio.AioRpcError, field: str, bound: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    details = error.details() or ""
    assert details.startswith(f"{field}: "), details
    assert bound in details, details
    status = rpc_status.from_call(error)
    assert status is not None
    assert [v.field for v in bad_request_violations(status)] == [field]


# --- requests -----------------------------------------------------------------------------------

THE_WINDOW = bounds.WINDOW_TEXT
LOOKBACK = "3660"  # limits.max_lookback_days

WINDOW_CASES = [
    pytest.param(
        rng(ts(YEAR_1), ts(YEAR_9999)), "window.range.start", THE_WINDOW, id="year-1-9999"
    ),
    pytest.param(
        rng(at(2025), ts(YEAR_9999 + 1)), "window.range.end", THE_WINDOW, id="past-ts-max"
    ),
    pytest.param(rng(ts(YEAR_1 - 1), at(2025)), "window.range.start", THE_WINDOW, id="pre-ts-min"),
    pytest.param(rng(at(2025), at(2200)), "window.range.end", THE_WINDOW, id="year-2200"),
    pytest.param(rng(at(1999, 12, 31), at(2025)), "window.range.start", THE_WINDOW, id="1999"),
    pytest.param(
        rng(ts(at(2025).seconds, -1), at(2026)), "window.range.start", "0..999999999", id="-nanos"
    ),
    pytest.param(
        rng(at(2025), ts(at(2026).seconds, 10**9)), "window.range.end", "0..999999999", id="nanos"
    ),
    pytest.param(
        u.Window(rolling=u.RollingWindow(hours=I32)), "window.rolling.hours", LOOKBACK, id="hours"
    ),
    pytest.param(
        u.Window(rolling=u.RollingWindow(days=I32)), "window.rolling.days", LOOKBACK, id="days"
    ),
    pytest.param(
        u.Window(calendar=u.CalendarWindow(unit=u.CALENDAR_UNIT_MONTH, periods_ago=I32)),
        "window.calendar.periods_ago",
        LOOKBACK,
        id="periods-ago",
    ),
    pytest.param(
        u.Window(calendar=u.CalendarWindow(unit=u.CALENDAR_UNIT_DAY, timezone="x" * 100)),
        "window.calendar.timezone",
        "at most 64",
        id="calendar-tz",
    ),
]


@pytest.mark.parametrize(("window", "field", "bound"), WINDOW_CASES)
async def test_summary_windows_out_of_bounds_are_refused(
    admin: grpc.aio.Channel, window: u.Window, field: str, bound: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ug.UsageServiceStub(admin).Summary(
            u.SummaryRequest(window=window, group_by=["model", "day"]), timeout=CALL_TIMEOUT
        )
    assert_refused(info.value, field, bound)


@pytest.mark.parametrize(
    ("window", "field", "bound"),
    [WINDOW_CASES[0], WINDOW_CASES[5], WINDOW_CASES[8], WINDOW_CASES[9]],
)
async def test_every_read_checks_its_window(
    admin: grpc.aio.Channel, window: u.Window, field: str, bound: str
) -> None:
    stub = ug.UsageServiceStub(admin)
    calls = [
        stub.ListRecords(u.ListRecordsRequest(window=window), timeout=CALL_TIMEOUT),
        stub.ListSessions(u.ListSessionsRequest(window=window), timeout=CALL_TIMEOUT),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert_refused(info.value, field, bound)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.ExportRecords(
            u.ExportRecordsRequest(window=window), timeout=CALL_TIMEOUT
        ):
            pass
    assert_refused(info.value, field, bound)


NUL = "a\x00b"
LONG = "x" * (bounds.MAX_TEXT + 1)
TOKEN_BAD_UUID = encode_token("2025-01-01T00:00:00+00:00", "not-a-uuid")
TOKEN_YEAR_1 = encode_token("0001-01-01T00:00:00+00:00", str(uuid.uuid4()))
TOKEN_NUL_SESSION = encode_token("2025-01-01T00:00:00+00:00", NUL)


@pytest.mark.parametrize(
    ("method", "request_", "field", "bound"),
    [
        ("Summary", u.SummaryRequest(group_by=["model"] * 9), "group_by", "at most 8"),
        ("Summary", u.SummaryRequest(timezone="x" * 100), "timezone", "at most 64"),
        ("Summary", u.SummaryRequest(filters=u.Filters(models=[NUL])), "filters.models[0]", "NUL"),
        (
            "Summary",
            u.SummaryRequest(filters=u.Filters(projects=["p"] * 101)),
            "filters.projects",
            "at most 100",
        ),
        (
            "Summary",
            u.SummaryRequest(filters=u.Filters(users=[LONG])),
            "filters.users[0]",
            "at most 512",
        ),
        ("ListRecords", u.ListRecordsRequest(page_size=I32), "page_size", "0..1000"),
        ("ListRecords", u.ListRecordsRequest(page_token=TOKEN_BAD_UUID), "page_token", "issued"),
        ("ListRecords", u.ListRecordsRequest(page_token=TOKEN_YEAR_1), "page_token", "issued"),
        ("ListRecords", u.ListRecordsRequest(page_token="A" * 5000), "page_token", "at most 4096"),
        (
            "ListRecords",
            u.ListRecordsRequest(filters=u.Filters(sessions=[NUL])),
            "filters.sessions[0]",
            "NUL",
        ),
        ("ListSessions", u.ListSessionsRequest(page_size=-1), "page_size", "0..1000"),
        (
            "ListSessions",
            u.ListSessionsRequest(page_token=TOKEN_NUL_SESSION),
            "page_token",
            "issued",
        ),
        ("ListPrices", u.ListPricesRequest(model=LONG), "model", "at most 512"),
        (
            "SetPrice",
            u.SetPriceRequest(
                price=u.Price(model_pattern="m*", valid_from="0001-01-01", input_micros_per_mtok=1)
            ),
            "price.valid_from",
            THE_WINDOW,
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
async def test_usage_requests_out_of_bounds_are_refused(
    admin: grpc.aio.Channel,
    tracker_db: asyncpg.Connection,
    method: str,
    request_: object,
    field: str,
    bound: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(ug.UsageServiceStub(admin), method)(request_, timeout=CALL_TIMEOUT)
    assert_refused(info.value, field, bound)
    assert set((await stored(tracker_db)).values()) == {0}


LEASE_MAX = "3600"  # admission.max_lease_seconds
BUDGET_WINDOW_MAX = str(366 * 86400)  # limits.max_budget_window_days


@pytest.mark.parametrize(
    ("budget_", "field", "bound"),
    [
        (rolling_budget(secs(10**11)), "budget.rolling", BUDGET_WINDOW_MAX),
        (rolling_budget(secs(I64)), "budget.rolling", "not a valid Duration"),
        (rolling_budget(secs(60, -5)), "budget.rolling", "not a valid Duration"),
        (rolling_budget(secs(60, 2 * 10**9)), "budget.rolling", "not a valid Duration"),
        (rolling_budget(secs(0, 500_000_000)), "budget.rolling", "a whole number of seconds"),
        (rolling_budget(secs(90, 1)), "budget.rolling", "a whole number of seconds"),
        (
            budget(
                scope=u.BUDGET_SCOPE_SESSION,
                session_limits=u.SessionLimits(max_duration=secs(10**11)),
            ),
            "budget.session_limits.max_duration",
            BUDGET_WINDOW_MAX,
        ),
        (
            budget(scope=u.BUDGET_SCOPE_SESSION, session_limits=u.SessionLimits(max_tokens=I64)),
            "budget.session_limits.max_tokens",
            str(bounds.MAX_LIMIT),
        ),
        (
            budget(
                scope=u.BUDGET_SCOPE_SESSION, session_limits=u.SessionLimits(max_cost_micros=I64)
            ),
            "budget.session_limits.max_cost_micros",
            str(bounds.MAX_LIMIT),
        ),
        (budget(limit_tokens=I64), "budget.limit_tokens", str(bounds.MAX_LIMIT)),
        (budget(thresholds_pct=list(range(1, 30))), "budget.thresholds_pct", "at most 20"),
        (budget(name=NUL), "budget.name", "NUL"),
        (budget(scope=u.BUDGET_SCOPE_PROJECT, scope_value=NUL), "budget.scope_value", "NUL"),
        (
            budget(scope=u.BUDGET_SCOPE_PROJECT, scope_value=LONG),
            "budget.scope_value",
            "at most 512",
        ),
        (budget(timezone="x" * 100), "budget.timezone", "at most 64"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_budgets_out_of_bounds_are_refused(
    admin: grpc.aio.Channel,
    tracker_db: asyncpg.Connection,
    budget_: u.Budget,
    field: str,
    bound: str,
) -> None:
    stub = ug.BudgetServiceStub(admin)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateBudget(u.CreateBudgetRequest(budget=budget_), timeout=CALL_TIMEOUT)
    assert_refused(info.value, field, bound)
    assert set((await stored(tracker_db)).values()) == {0}
    # UpdateBudget validates the same way and changes nothing.
    created = await stub.CreateBudget(u.CreateBudgetRequest(budget=budget(name="ok")))
    before = await tracker_db.fetchrow("SELECT * FROM budgets")
    changed = u.Budget()
    changed.CopyFrom(budget_)
    changed.id = created.budget.id
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.UpdateBudget(u.UpdateBudgetRequest(budget=changed), timeout=CALL_TIMEOUT)
    assert_refused(info.value, field, bound)
    assert await tracker_db.fetchrow("SELECT * FROM budgets") == before
    # ListBudgets still answers.
    assert len((await stub.ListBudgets(u.ListBudgetsRequest())).budgets) == 1


@pytest.mark.parametrize(
    ("method", "request_", "field", "bound"),
    [
        ("Reserve", u.ReserveRequest(lease=secs(10**11)), "lease", LEASE_MAX),
        ("Reserve", u.ReserveRequest(lease=secs(I64)), "lease", "not a valid Duration"),
        ("Reserve", u.ReserveRequest(lease=secs(1, 10**9)), "lease", "not a valid Duration"),
        (
            "Reserve",
            u.ReserveRequest(estimated_tokens=I64),
            "estimated_tokens",
            str(bounds.MAX_TOKENS),
        ),
        (
            "Reserve",
            u.ReserveRequest(estimated_cost_micros=bounds.MAX_COST_MICROS + 1),
            "estimated_cost_micros",
            str(bounds.MAX_COST_MICROS),
        ),
        ("Reserve", u.ReserveRequest(project=NUL), "project", "NUL"),
        ("Reserve", u.ReserveRequest(model=LONG), "model", "at most 512"),
        (
            "Commit",
            u.CommitRequest(reservation_id=str(uuid.uuid4()), actual_cost_micros=I64),
            "actual_cost_micros",
            str(bounds.MAX_COST_MICROS),
        ),
        (
            "Commit",
            u.CommitRequest(reservation_id=str(uuid.uuid4()), actual_tokens=I64),
            "actual_tokens",
            str(bounds.MAX_TOKENS),
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
async def test_admission_requests_out_of_bounds_are_refused(
    admin: grpc.aio.Channel,
    tracker_db: asyncpg.Connection,
    method: str,
    request_: object,
    field: str,
    bound: str,
) -> None:
    stub = ug.BudgetServiceStub(admin)
    await stub.CreateBudget(u.CreateBudgetRequest(budget=budget(limit_micros=10**12)))
    await stub.CreateBudget(
        u.CreateBudgetRequest(budget=u.Budget(name="r", **_rolling()))  # type: ignore[arg-type]
    )
    before = await stored(tracker_db)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(stub, method)(request_, timeout=CALL_TIMEOUT)
    assert_refused(info.value, field, bound)
    after = await stored(tracker_db)
    assert after == before
    assert after["reservations"] == 0


def _rolling() -> dict[str, object]:
    return {
        "scope": u.BUDGET_SCOPE_GLOBAL,
        "period": u.BUDGET_PERIOD_ROLLING,
        "rolling": secs(3600),
        "limit_tokens": 10**12,
    }


async def test_a_lease_up_to_the_maximum_is_granted(admin: grpc.aio.Channel) -> None:
    reply = await ug.BudgetServiceStub(admin).Reserve(
        u.ReserveRequest(estimated_cost_micros=1, lease=secs(3600))
    )
    assert reply.granted
    expires = reply.lease_expires_at.ToDatetime(tzinfo=UTC)
    assert timedelta(seconds=3590) < expires - datetime.now(UTC) <= timedelta(seconds=3600)


# --- ingest (defence in depth: core refuses these at the edge too) ------------------------------


def _event(payload: ev.RequestCompleted, **envelope: object) -> ReceivedEvent:
    event = new_event(payload, source="test://bounds")
    for name, value in envelope.items():
        if isinstance(value, timestamp_pb2.Timestamp):
            getattr(event, name).CopyFrom(value)
        else:
            setattr(event, name, value)
    return event


def _uuid7_at(millis: int) -> str:
    """A UUIDv7 whose embedded time is ``millis`` since 1970."""
    rand = uuid.uuid4().int
    rand_a, rand_b = rand >> 64 & 0xFFF, rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=(millis << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b))


def _payload(**changes: object) -> ev.RequestCompleted:
    payload = completed(session="bad")
    for name, value in changes.items():
        if name == "cost":
            payload.reported_cost.CopyFrom(ev.Money(currency="USD", micros=value))  # type: ignore[arg-type]
        elif name in ("duration", "time_to_first_token"):
            getattr(payload, name).CopyFrom(value)
        elif name.startswith("tokens."):
            setattr(payload.tokens, name.removeprefix("tokens."), value)
        else:
            setattr(payload, name, value)
    return payload


#: The largest time a UUIDv7 can hold: 2^48 - 1 ms after 1970, in the year 10889.
EPOCH_10889 = (1 << 48) - 1


@pytest.mark.parametrize(
    ("payload", "envelope", "field"),
    [
        (_payload(cost=I64), {}, "reported_cost.micros"),
        (_payload(cost=bounds.MAX_COST_MICROS + 1), {}, "reported_cost.micros"),
        (_payload(**{"tokens.input": I64}), {}, "tokens.input"),
        (_payload(**{"tokens.reasoning": bounds.MAX_TOKENS_PER_KIND + 1}), {}, "tokens.reasoning"),
        (_payload(duration=secs(2**62)), {}, "duration"),
        (_payload(duration=secs(1, -5)), {}, "duration"),
        (_payload(time_to_first_token=secs(2**62)), {}, "time_to_first_token"),
        (_payload(time_to_first_token=secs(0, -1)), {}, "time_to_first_token"),
        (
            _payload(duration=secs(2), time_to_first_token=secs(2, 1)),
            {},
            "time_to_first_token",
        ),
        (_payload(status=70_000), {}, "status"),
        (_payload(attempt=-1), {}, "attempt"),
        (_payload(model=NUL), {}, "model"),
        (_payload(project=NUL), {}, "project"),
        (_payload(), {"time": ts(YEAR_1)}, "time"),
        (_payload(), {"time": ts(YEAR_9999 + 10**6)}, "time"),
        (_payload(), {"time": ts(1_700_000_000, -1)}, "time"),
        (_payload(), {"time": ts(0, 0), "id": _uuid7_at(0)}, "id"),
        (_payload(), {"time": ts(0, 0), "id": _uuid7_at(EPOCH_10889)}, "id"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_events_out_of_bounds_are_refused_and_the_rest_written(
    admin: grpc.aio.Channel,
    tracker: RunningTracker,
    tracker_db: asyncpg.Connection,
    payload: ev.RequestCompleted,
    envelope: dict[str, object],
    field: str,
) -> None:
    good = completed(session="good", cost=5)
    batch = [
        ReceivedEvent(1, 1, _event(payload, **envelope), payload),
        ReceivedEvent(2, 1, new_event(good, source="test://bounds"), good),
    ]
    refused = await tracker.module.handle_batch(batch)
    assert set(refused) == {1}
    assert f"invalid RequestCompleted: {field}: " in str(refused[1])
    rows = await tracker_db.fetch("SELECT session_id, cost_micros FROM ledger")
    assert [tuple(r) for r in rows] == [("good", 5)]
    # Every read answers afterwards.
    usage = ug.UsageServiceStub(admin)
    assert (await usage.Summary(u.SummaryRequest())).totals.cost_micros == 5
    assert [s.session_id for s in (await usage.ListSessions(u.ListSessionsRequest())).sessions] == [
        "good"
    ]
