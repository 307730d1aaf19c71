"""Read side: windows, summaries from the rollups, records, exports and sessions."""

# SQL here is assembled from constant identifiers only; every value is a bind parameter.
# ruff: noqa: S608

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
from google.protobuf import timestamp_pb2

from lodestar.common.errors import InvalidArgumentError
from lodestar.usage.v1 import events_pb2, usage_pb2

GROUPS = ("model", "provider", "project", "session", "user", "day", "week", "month")
COLUMN = {
    "model": "model",
    "provider": "provider",
    "project": "project",
    "session": "session_id",
    "user": "user_id",
}
TIME_FORMAT = {
    "day": ("day", "YYYY-MM-DD"),
    "week": ("week", "YYYY-MM-DD"),
    "month": ("month", "YYYY-MM"),
}
SUMS = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cached_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_micros",
    "compute_cost_micros",
    "shadow_cost_micros",
    "savings_micros",
    "duration_ms",
)
MAX_PAGE = 1000
DEFAULT_PAGE = 100
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def zone(name: str, field: str) -> ZoneInfo:
    """The IANA timezone ``name`` (UTC when empty), or INVALID_ARGUMENT naming ``field``."""
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgumentError(
            f"{name[:64]!r} is not an IANA timezone, e.g. 'UTC' or 'Europe/Berlin'", field=field
        ) from None


def _ts(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def period_start(local: datetime, unit: int) -> datetime:
    """The start of the calendar period (day/week/month) that ``local`` falls in."""
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if unit == usage_pb2.CALENDAR_UNIT_WEEK:
        return day - timedelta(days=day.weekday())
    if unit == usage_pb2.CALENDAR_UNIT_MONTH:
        return day.replace(day=1)
    return day


def next_period(start: datetime, unit: int) -> datetime:
    """The start of the period after the one starting at ``start`` (local, wall clock)."""
    if unit == usage_pb2.CALENDAR_UNIT_WEEK:
        return start + timedelta(days=7)
    if unit == usage_pb2.CALENDAR_UNIT_MONTH:
        return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    return start + timedelta(days=1)


def calendar_window(
    unit: int, tz: ZoneInfo, now: datetime, periods_ago: int = 0
) -> tuple[datetime, datetime]:
    """[start, end) of the calendar period ``periods_ago`` before the one containing ``now``."""
    local = now.astimezone(tz).replace(tzinfo=None)
    start = period_start(local, unit)
    for _ in range(periods_ago):
        start = period_start(start - timedelta(days=1), unit)
    end = next_period(start, unit)
    return start.replace(tzinfo=tz).astimezone(UTC), end.replace(tzinfo=tz).astimezone(UTC)


def resolve_window(
    window: usage_pb2.Window, now: datetime, field: str = "window"
) -> tuple[datetime, datetime, str]:
    """[start, end) and the timezone of a window; INVALID_ARGUMENT names the bad field."""
    kind = window.WhichOneof("window")
    if kind == "range":
        rng = window.range
        if not rng.HasField("start"):
            raise InvalidArgumentError("required", field=f"{field}.range.start")
        if not rng.HasField("end"):
            raise InvalidArgumentError("required", field=f"{field}.range.end")
        start, end = _ts(rng.start), _ts(rng.end)
        if end <= start:
            raise InvalidArgumentError(
                f"{end.isoformat()} is not after {field}.range.start {start.isoformat()}",
                field=f"{field}.range.end",
            )
        return start, end, "UTC"
    if kind == "calendar":
        cal = window.calendar
        if (
            cal.unit == usage_pb2.CALENDAR_UNIT_UNSPECIFIED
            or cal.unit not in usage_pb2.CalendarUnit.values()
        ):
            raise InvalidArgumentError("one of DAY, WEEK, MONTH", field=f"{field}.calendar.unit")
        if cal.periods_ago < 0:
            raise InvalidArgumentError(
                "must not be negative", field=f"{field}.calendar.periods_ago"
            )
        tz = zone(cal.timezone, f"{field}.calendar.timezone")
        start, end = calendar_window(cal.unit, tz, now, cal.periods_ago)
        return start, end, cal.timezone or "UTC"
    if kind == "rolling":
        rolling = window.rolling
        if rolling.hours < 0 or rolling.days < 0 or (rolling.hours > 0) == (rolling.days > 0):
            raise InvalidArgumentError(
                "set exactly one of hours or days, a positive number",
                field=f"{field}.rolling",
            )
        span = timedelta(hours=rolling.hours) if rolling.hours else timedelta(days=rolling.days)
        return now - span, now, "UTC"
    start, end = calendar_window(usage_pb2.CALENDAR_UNIT_MONTH, ZoneInfo("UTC"), now)
    return start, end, "UTC"


@dataclass
class Filters:
    """Validated filters."""

    models: list[str] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)
    projects: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)

    @classmethod
    def from_proto(cls, filters: usage_pb2.Filters) -> Filters:
        return cls(
            list(filters.models),
            list(filters.providers),
            list(filters.projects),
            list(filters.sessions),
            list(filters.users),
        )

    def clauses(self, params: list[object], *, with_session: bool) -> list[str]:
        """SQL conditions, appending their parameters to ``params``."""
        out = []
        pairs = [
            ("model", self.models),
            ("provider", self.providers),
            ("project", self.projects),
            ("user_id", self.users),
        ]
        if with_session:
            pairs.append(("session_id", self.sessions))
        for column, values in pairs:
            if values:
                params.append(values)
                out.append(f"{column} = ANY(${len(params)}::text[])")
        return out


def validate_group_by(group_by: Sequence[str]) -> list[str]:
    """The group-by names, or INVALID_ARGUMENT naming the first unknown one."""
    seen: list[str] = []
    for index, name in enumerate(group_by):
        key = name.strip().lower()
        if key not in GROUPS:
            raise InvalidArgumentError(
                f"unknown group {name[:40]!r}; use any of {', '.join(GROUPS)}",
                field=f"group_by[{index}]",
            )
        if key not in seen:
            seen.append(key)
    return seen


def _floor(ts: datetime, step: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + ((ts - epoch) // step) * step


def _ceil(ts: datetime, step: timedelta) -> datetime:
    floor = _floor(ts, step)
    return floor if floor == ts else floor + step


def segments(
    start: datetime, end: datetime, *, daily: bool, now: datetime | None = None
) -> list[tuple[str, datetime, datetime]]:
    """Split [start, end) into rollup segments (``hourly``, and ``daily`` when allowed) and the
    partial hours at its edges (see ``_edge``)."""
    now = now or datetime.now(UTC)
    h1, h2 = _ceil(start, HOUR), _floor(end, HOUR)
    if h1 > h2:  # start and end inside one hour
        return _edge(start, end, now)
    out: list[tuple[str, datetime, datetime]] = []
    if start < h1:
        out += _edge(start, h1, now)
    d1, d2 = _ceil(h1, DAY), _floor(h2, DAY)
    if daily and d1 < d2:
        if h1 < d1:
            out.append(("hourly", h1, d1))
        out.append(("daily", d1, d2))
        if d2 < h2:
            out.append(("hourly", d2, h2))
    elif h1 < h2:
        out.append(("hourly", h1, h2))
    if h2 < end:
        out += _edge(h2, end, now)
    return out


def _edge(start: datetime, end: datetime, now: datetime) -> list[tuple[str, datetime, datetime]]:
    """The part [start, end) of one hour: read from the ledger, or as the hour's rollup minus the
    ledger rows of the rest of the hour (``unledger``), whichever spans less of the past.

    A window ending now takes the second form: the rest of its last hour is in the future, so
    the current hour costs one rollup row however many events it already holds.
    """
    if start >= end:
        return []
    hour = _floor(start, HOUR)
    rest = [(a, b) for a, b in ((hour, start), (end, hour + HOUR)) if a < b]
    if sum((_past(a, b, now) for a, b in rest), timedelta()) >= _past(start, end, now):
        return [("ledger", start, end)]
    return [("hourly", hour, hour + HOUR), *(("unledger", a, b) for a, b in rest)]


def _past(start: datetime, end: datetime, now: datetime) -> timedelta:
    return max(timedelta(), min(end, now) - start)


#: Groups the coarse rollups (per hour or day, model and provider only) can answer.
COARSE_GROUPS = frozenset({"model", "provider", "day", "week", "month"})


def coarse_grain(group_by: Sequence[str], filters: Filters) -> bool:
    """Whether the per-model rollups answer: no group or filter needs project, user or session."""
    return set(group_by) <= COARSE_GROUPS and not (
        filters.projects or filters.users or filters.sessions
    )


def _source(kind: str, grain: str, start_param: int, end_param: int) -> str:
    """The rows of one segment: ``grain`` is ``session``, ``fine`` or ``model`` (coarse)."""
    sums = ", ".join(SUMS)
    if kind in ("ledger", "unledger"):
        # unledger rows cancel rows of an hourly rollup: negated, and dated like the rollup row.
        ts, sign = "occurred_at", ""
        if kind == "unledger":
            ts, sign = "date_trunc('hour', occurred_at, 'UTC')", "-"
        values = [
            "1::bigint AS requests",
            f"(status = {int(events_pb2.REQUEST_STATUS_ERROR)})::int::bigint AS errors",
            *(f"{c}::bigint AS {c}" for c in SUMS[2:]),
        ]
        only_sessions = " AND session_id <> ''" if grain == "session" else ""
        return (
            f"SELECT {ts} AS ts, model, provider, project, user_id, session_id, "
            + ", ".join(sign + v for v in values)
            + f" FROM ledger WHERE occurred_at >= ${start_param} AND occurred_at < ${end_param}"
            + only_sessions
        )
    if grain == "session":
        return (
            f"SELECT hour AS ts, model, provider, project, user_id, session_id, {sums} "
            f"FROM rollup_session_hourly WHERE hour >= ${start_param} AND hour < ${end_param}"
        )
    table, column = ("rollup_daily", "day") if kind == "daily" else ("rollup_hourly", "hour")
    dims = "project, user_id"
    if grain == "model":
        table += "_model"
        dims = "''::text AS project, ''::text AS user_id"
    return (
        f"SELECT {column} AS ts, model, provider, {dims}, ''::text AS session_id, "
        f"{sums} FROM {table} WHERE {column} >= ${start_param} AND {column} < ${end_param}"
    )


@dataclass
class Row:
    """One group of a summary."""

    group: dict[str, str]
    sums: dict[str, int]


async def summarize(
    conn: asyncpg.Connection | asyncpg.Pool,
    start: datetime,
    end: datetime,
    group_by: Sequence[str],
    filters: Filters,
    tz: str = "UTC",
    now: datetime | None = None,
) -> list[Row]:
    """Totals over [start, end) grouped by ``group_by``, exact to the microsecond.

    Whole hours come from the hourly rollups (whole UTC days from the daily ones when no group
    needs local time), the partial hours at the edges from the ledger. When no group or filter
    needs project, user or session, the coarse per-model rollups stand in for the fine ones.
    """
    session = "session" in group_by or bool(filters.sessions)
    grain = "session" if session else "model" if coarse_grain(group_by, filters) else "fine"
    time_grouped = any(g in TIME_FORMAT for g in group_by)
    daily = not session and (not time_grouped or tz in ("UTC", "Etc/UTC"))
    params: list[object] = []
    parts = []
    for kind, seg_start, seg_end in segments(start, end, daily=daily, now=now):
        params += [seg_start, seg_end]
        sql = _source(kind, grain, len(params) - 1, len(params))
        conditions = filters.clauses(params, with_session=session or kind in ("ledger", "unledger"))
        parts.append(" AND ".join([sql, *conditions]))
    params.append(tz)
    tz_param = len(params)
    keys, shown = [], []
    for i, name in enumerate(group_by):
        if name in TIME_FORMAT:
            unit, fmt = TIME_FORMAT[name]
            keys.append(f"date_trunc('{unit}', ts AT TIME ZONE ${tz_param})")
            shown.append(f"to_char(g{i}, '{fmt}') AS g{i}")  # formatted once per group, not row
        else:
            keys.append(COLUMN[name])
            shown.append(f"g{i}")
    selected = [f"{k} AS g{i}" for i, k in enumerate(keys)]
    selected += [f"coalesce(sum({s}), 0)::bigint AS {s}" for s in SUMS]
    grouping = ordering = ""
    if keys:
        positions = ", ".join(str(i) for i in range(1, len(keys) + 1))
        grouping = f" GROUP BY {positions}"
        ordering = " ORDER BY " + ", ".join(f"agg.g{i}" for i in range(len(keys)))
    union = " UNION ALL ".join(parts)
    sql = (
        f"SELECT {', '.join([*shown, *SUMS])} FROM ("
        f"SELECT {', '.join(selected)} FROM ({union}) AS x "
        f"WHERE ${tz_param}::text IS NOT NULL{grouping}) AS agg{ordering}"
    )
    records = await conn.fetch(sql, *params)
    rows = []
    for rec in records:
        if not keys and rec["requests"] == 0:
            continue
        rows.append(
            Row(
                {name: str(rec[f"g{i}"]) for i, name in enumerate(group_by)},
                {s: int(rec[s]) for s in SUMS},
            )
        )
    return rows


def totals_proto(sums: dict[str, int]) -> usage_pb2.Totals:
    """The API form of summed columns."""
    return usage_pb2.Totals(
        tokens=events_pb2.TokenUsage(
            input=sums["input_tokens"],
            output=sums["output_tokens"],
            cached_read=sums["cached_read_tokens"],
            cache_write=sums["cache_write_tokens"],
            reasoning=sums["reasoning_tokens"],
        ),
        cost_micros=sums["cost_micros"],
        requests=sums["requests"],
        errors=sums["errors"],
        savings_micros=sums["savings_micros"],
        shadow_cost_micros=sums["shadow_cost_micros"],
        compute_cost_micros=sums["compute_cost_micros"],
        duration_ms=sums["duration_ms"],
    )


def add_sums(rows: Sequence[Row]) -> dict[str, int]:
    """Column sums over rows."""
    total = dict.fromkeys(SUMS, 0)
    for row in rows:
        for key, value in row.sums.items():
            total[key] += value
    return total


def stamp(value: datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp."""
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


# --- records ------------------------------------------------------------------------------------

RECORD_COLUMNS = (
    "occurred_at, event_id, model, provider, project, session_id, user_id, task_id, attempt, "
    "status, duration_ms, input_tokens, output_tokens, cached_read_tokens, cache_write_tokens, "
    "reasoning_tokens, cost_micros, cost_source, compute_cost_micros, shadow_cost_micros, "
    "savings_micros, reservation_id"
)


def record_proto(rec: asyncpg.Record) -> usage_pb2.Record:
    """The API form of a ledger row."""
    return usage_pb2.Record(
        event_id=str(rec["event_id"]),
        time=stamp(rec["occurred_at"]),
        model=rec["model"],
        provider=rec["provider"],
        project=rec["project"],
        session_id=rec["session_id"],
        user=rec["user_id"],
        task_id=rec["task_id"],
        attempt=rec["attempt"],
        status=rec["status"],
        duration_ms=rec["duration_ms"],
        tokens=events_pb2.TokenUsage(
            input=rec["input_tokens"],
            output=rec["output_tokens"],
            cached_read=rec["cached_read_tokens"],
            cache_write=rec["cache_write_tokens"],
            reasoning=rec["reasoning_tokens"],
        ),
        cost_micros=rec["cost_micros"],
        cost_source=rec["cost_source"],
        compute_cost_micros=rec["compute_cost_micros"],
        shadow_cost_micros=rec["shadow_cost_micros"],
        savings_micros=rec["savings_micros"],
        reservation_id=rec["reservation_id"],
    )


def page_size(value: int, field: str = "page_size") -> int:
    """The page size, or INVALID_ARGUMENT."""
    if value < 0 or value > MAX_PAGE:
        raise InvalidArgumentError(f"must be 0..{MAX_PAGE}", field=field)
    return value or DEFAULT_PAGE


def encode_token(*parts: str) -> str:
    """An opaque page token."""
    return base64.urlsafe_b64encode("\x1f".join(parts).encode()).decode()


def decode_token(token: str, count: int) -> list[str]:
    """The parts of a page token, or INVALID_ARGUMENT."""
    try:
        parts = base64.urlsafe_b64decode(token.encode()).decode().split("\x1f")
    except (ValueError, UnicodeDecodeError):
        parts = []
    if len(parts) != count:
        raise InvalidArgumentError("not a token this service issued", field="page_token")
    return parts


async def list_records(
    pool: asyncpg.Pool, start: datetime, end: datetime, filters: Filters, size: int, token: str
) -> tuple[list[usage_pb2.Record], str]:
    """A page of ledger rows, newest first."""
    params: list[object] = [start, end]
    conditions = [
        "occurred_at >= $1",
        "occurred_at < $2",
        *filters.clauses(params, with_session=True),
    ]
    if token:
        when, event_id = decode_token(token, 2)
        try:
            params += [datetime.fromisoformat(when), event_id]
        except ValueError:
            raise InvalidArgumentError(
                "not a token this service issued", field="page_token"
            ) from None
        conditions.append(f"(occurred_at, event_id) < (${len(params) - 1}, ${len(params)}::uuid)")
    params.append(size + 1)
    sql = (
        f"SELECT {RECORD_COLUMNS} FROM ledger WHERE {' AND '.join(conditions)} "
        f"ORDER BY occurred_at DESC, event_id DESC LIMIT ${len(params)}"
    )
    records = await pool.fetch(sql, *params)
    more = len(records) > size
    records = records[:size]
    next_token = ""
    if more and records:
        last = records[-1]
        next_token = encode_token(last["occurred_at"].isoformat(), str(last["event_id"]))
    return [record_proto(r) for r in records], next_token


EXPORT_FIELDS = [c.strip() for c in RECORD_COLUMNS.split(",")]


async def export_records(
    pool: asyncpg.Pool, start: datetime, end: datetime, filters: Filters, fmt: int
) -> AsyncIterator[bytes]:
    """Ledger rows oldest first as CSV or JSON lines, in chunks of up to 1000 rows."""
    params: list[object] = [start, end]
    conditions = [
        "occurred_at >= $1",
        "occurred_at < $2",
        *filters.clauses(params, with_session=True),
    ]
    sql = (
        f"SELECT {RECORD_COLUMNS} FROM ledger WHERE {' AND '.join(conditions)} "
        "ORDER BY occurred_at, event_id"
    )
    jsonl = fmt == usage_pb2.EXPORT_FORMAT_JSONL
    async with pool.acquire() as conn, conn.transaction():
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        if not jsonl:
            writer.writerow(EXPORT_FIELDS)
        rows = 0
        async for rec in conn.cursor(sql, *params, prefetch=1000):
            values = {k: _plain(rec[k]) for k in EXPORT_FIELDS}
            if jsonl:
                buffer.write(json.dumps(values, separators=(",", ":")) + "\n")
            else:
                writer.writerow(values.values())
            rows += 1
            if rows % 1000 == 0:
                yield buffer.getvalue().encode()
                buffer.seek(0)
                buffer.truncate()
        if buffer.getvalue():
            yield buffer.getvalue().encode()


def _plain(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, int | str | float) or value is None:
        return value
    return str(value)


# --- sessions -----------------------------------------------------------------------------------


def session_proto(rec: asyncpg.Record) -> usage_pb2.Session:
    """The API form of a sessions row."""
    session = usage_pb2.Session(
        session_id=rec["session_id"],
        project=rec["project"],
        user=rec["user_id"],
        started_at=stamp(rec["started_at"]),
        last_activity_at=stamp(rec["last_activity_at"]),
        tokens=events_pb2.TokenUsage(
            input=rec["input_tokens"],
            output=rec["output_tokens"],
            cached_read=rec["cached_read_tokens"],
            cache_write=rec["cache_write_tokens"],
            reasoning=rec["reasoning_tokens"],
        ),
        cost_micros=rec["cost_micros"],
        requests=rec["requests"],
        errors=rec["errors"],
        model_switches=rec["model_switches"],
        last_model=rec["last_model"],
        savings_micros=rec["savings_micros"],
    )
    session.duration.FromTimedelta(rec["last_activity_at"] - rec["started_at"])
    return session


async def list_sessions(
    pool: asyncpg.Pool,
    window: tuple[datetime, datetime] | None,
    filters: Filters,
    size: int,
    token: str,
) -> tuple[list[usage_pb2.Session], str]:
    """A page of sessions, most recently active first."""
    params: list[object] = []
    conditions = ["true"]
    if window is not None:
        params += [window[0], window[1]]
        conditions += ["last_activity_at >= $1", "started_at < $2"]
    for column, values in (
        ("project", filters.projects),
        ("user_id", filters.users),
        ("session_id", filters.sessions),
        ("last_model", filters.models),
    ):
        if values:
            params.append(values)
            conditions.append(f"{column} = ANY(${len(params)}::text[])")
    if token:
        when, sid = decode_token(token, 2)
        try:
            params += [datetime.fromisoformat(when), sid]
        except ValueError:
            raise InvalidArgumentError(
                "not a token this service issued", field="page_token"
            ) from None
        conditions.append(f"(last_activity_at, session_id) < (${len(params) - 1}, ${len(params)})")
    params.append(size + 1)
    records = await pool.fetch(
        f"SELECT * FROM sessions WHERE {' AND '.join(conditions)} "
        f"ORDER BY last_activity_at DESC, session_id DESC LIMIT ${len(params)}",
        *params,
    )
    more = len(records) > size
    records = records[:size]
    next_token = ""
    if more and records:
        last = records[-1]
        next_token = encode_token(last["last_activity_at"].isoformat(), last["session_id"])
    return [session_proto(r) for r in records], next_token
