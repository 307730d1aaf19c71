"""Read side: windows, summaries from the rollups, records, exports and sessions."""

# SQL here is assembled from constant identifiers only; every value is a bind parameter.
# ruff: noqa: S608

from __future__ import annotations

import base64
import csv
import io
import json
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
from google.protobuf import timestamp_pb2
from prometheus_client import Counter

from lodestar.common.errors import InvalidArgumentError
from lodestar.common.logging import get_logger
from lodestar.usage.v1 import events_pb2, usage_pb2
from lodestar_usage import bounds

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
#: Days a calendar period spans at most, to bound ``periods_ago`` by the look-back.
UNIT_DAYS = {
    usage_pb2.CALENDAR_UNIT_DAY: (1, "days"),
    usage_pb2.CALENDAR_UNIT_WEEK: (7, "weeks"),
    usage_pb2.CALENDAR_UNIT_MONTH: (31, "months"),
}
DEFAULT_LOOKBACK_DAYS = 3660
log = get_logger(__name__)
#: Stored rows a read left out or could not report (label: which read). Each is also logged.
BAD_ROWS = Counter(
    "lodestar_usage_bad_rows_total",
    "Stored rows (or groups) a read left out or flagged because they cannot be shown.",
    ["read"],
)


def zone(name: str, field: str) -> ZoneInfo:
    """The IANA timezone ``name`` (UTC when empty), or INVALID_ARGUMENT naming ``field``."""
    bounds.text(name, field, bounds.MAX_TIMEZONE)
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgumentError(
            f"{name[:64]!r} is not an IANA timezone, e.g. 'UTC' or 'Europe/Berlin'", field=field
        ) from None


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
    window: usage_pb2.Window,
    now: datetime,
    field: str = "window",
    max_lookback_days: int = DEFAULT_LOOKBACK_DAYS,
) -> tuple[datetime, datetime, str]:
    """[start, end) and the timezone of a window; INVALID_ARGUMENT names the bad field.

    Every window lies within bounds.EARLIEST..LATEST; rolling windows and calendar periods reach
    back at most ``max_lookback_days`` (setting ``limits.max_lookback_days``).
    """
    kind = window.WhichOneof("window")
    if kind == "range":
        rng = window.range
        if not rng.HasField("start"):
            raise InvalidArgumentError("required", field=f"{field}.range.start")
        if not rng.HasField("end"):
            raise InvalidArgumentError("required", field=f"{field}.range.end")
        start = bounds.timestamp(rng.start, f"{field}.range.start")
        end = bounds.timestamp(rng.end, f"{field}.range.end")
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
        unit_days, units = UNIT_DAYS[cal.unit]
        bounds.integer(
            cal.periods_ago,
            f"{field}.calendar.periods_ago",
            0,
            max_lookback_days // unit_days,
            why=f"{units} within limits.max_lookback_days = {max_lookback_days}",
        )
        tz = zone(cal.timezone, f"{field}.calendar.timezone")
        start, end = calendar_window(cal.unit, tz, now, cal.periods_ago)
        _reaches_back(start, f"{field}.calendar.periods_ago")
        return start, end, cal.timezone or "UTC"
    if kind == "rolling":
        rolling = window.rolling
        if rolling.hours < 0 or rolling.days < 0 or (rolling.hours > 0) == (rolling.days > 0):
            raise InvalidArgumentError(
                "set exactly one of hours or days, a positive number",
                field=f"{field}.rolling",
            )
        why = f"setting limits.max_lookback_days = {max_lookback_days}"
        if rolling.hours:
            hours = bounds.integer(
                rolling.hours, f"{field}.rolling.hours", 1, max_lookback_days * 24, why=why
            )
            start = _reaches_back(now - timedelta(hours=hours), f"{field}.rolling.hours")
        else:
            days = bounds.integer(
                rolling.days, f"{field}.rolling.days", 1, max_lookback_days, why=why
            )
            start = _reaches_back(now - timedelta(days=days), f"{field}.rolling.days")
        return start, now, "UTC"
    start, end = calendar_window(usage_pb2.CALENDAR_UNIT_MONTH, ZoneInfo("UTC"), now)
    return start, end, "UTC"


def _reaches_back(start: datetime, field: str) -> datetime:
    """``start`` if not before bounds.EARLIEST; INVALID_ARGUMENT naming ``field`` otherwise."""
    if start < bounds.EARLIEST:
        raise InvalidArgumentError(
            f"the window would start at {start.isoformat()}, before {bounds.WINDOW_TEXT}",
            field=field,
        )
    return start


@dataclass
class Filters:
    """Validated filters."""

    models: list[str] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)
    projects: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)

    @classmethod
    def from_proto(cls, filters: usage_pb2.Filters, field: str = "filters") -> Filters:
        """Validated filters: at most MAX_FILTER_VALUES texts each, every text within bounds."""
        return cls(
            bounds.texts(filters.models, f"{field}.models"),
            bounds.texts(filters.providers, f"{field}.providers"),
            bounds.texts(filters.projects, f"{field}.projects"),
            bounds.texts(filters.sessions, f"{field}.sessions"),
            bounds.texts(filters.users, f"{field}.users"),
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
    if len(group_by) > bounds.MAX_GROUPS:
        raise InvalidArgumentError(
            f"at most {bounds.MAX_GROUPS} names; got {len(group_by)}", field="group_by"
        )
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
    """Split [start, end) into rollup segments and the partial hours at its edges.

    The segments are ``hourly``, and ``daily`` when allowed; for the edges see ``_edge``.
    """
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
    """The part [start, end) of one hour, read whichever way spans less of the past.

    It is read from the ledger, or as the hour's rollup minus the ledger rows of the rest of the
    hour (``unledger``).

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
        values = [f"{c}::bigint AS {c}" for c in SUMS[2:]]
        if kind == "unledger":
            ts, sign = "date_trunc('hour', occurred_at, 'UTC')", "-"
            # greatest(): negating a (bad) row holding bigint's minimum would overflow.
            values = [f"greatest({c}, {-bounds.INT64_MAX}) AS {c}" for c in SUMS[2:]]
        values = [
            "1::bigint AS requests",
            f"(status = {int(events_pb2.REQUEST_STATUS_ERROR)})::int::bigint AS errors",
            *values,
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
    """One group of a summary; ``error`` says why its sums cannot be reported (bad rows)."""

    group: dict[str, str]
    sums: dict[str, int]
    error: str = ""


#: Sums that may be negative: savings are the shadow cost minus the cost.
SIGNED_SUMS = frozenset({"savings_micros"})


def _sum_problem(sums: dict[str, int]) -> str:
    """Why ``sums`` cannot be reported (beyond int64, or negative where nothing may be), or ""."""
    for name, value in sums.items():
        if value > bounds.INT64_MAX or value < -bounds.INT64_MAX:
            return f"the sum of {name} ({value}) does not fit int64"
        if value < 0 and name not in SIGNED_SUMS:
            return f"the sum of {name} ({value}) is negative"
    return ""


def _group_row(values: dict[str, str], sums: dict[str, int]) -> Row:
    """A summary row, with an error when its sums or a key (too long) come from bad rows."""
    error = _sum_problem(sums)
    if error:
        error += " (a stored row of this group is bad)"
    for name, value in values.items():
        if len(value) > bounds.MAX_TEXT:
            values[name] = value[: bounds.MAX_TEXT] + "…"
            error = (
                error or f"{name} is longer than {bounds.MAX_TEXT} characters (a bad stored row)"
            )
    if error:
        BAD_ROWS.labels("summary").inc()
        log.warning("summary group not reported", group=values, error=error)
        sums = {s: max(-bounds.INT64_MAX, min(v, bounds.INT64_MAX)) for s, v in sums.items()}
    return Row(values, sums, error)


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
    # numeric sums: a sum beyond int64 is reported for its group instead of failing the query.
    selected += [f"coalesce(sum({s}), 0) AS {s}" for s in SUMS]
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
            _group_row(
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
    """Column sums over the rows without an error (may exceed int64: see ``sum_problem``)."""
    total = dict.fromkeys(SUMS, 0)
    for row in rows:
        if row.error:
            continue
        for key, value in row.sums.items():
            total[key] += value
    return total


def sum_problem(sums: dict[str, int]) -> str:
    """Why ``sums`` cannot be reported, or "" when every sum fits its field."""
    return _sum_problem(sums)


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
#: The largest money a ledger row may hold: a priced cost can exceed a reported cost's bound
#: (every token kind at the price table's maximum).
MAX_ROW_MONEY = 10**15
#: What a sane ledger row holds; a row outside these is left out of reads and named.
RECORD_RANGES: dict[str, tuple[int, int]] = {
    "attempt": (0, bounds.MAX_ATTEMPT),
    "duration_ms": (0, bounds.MAX_DURATION_SECONDS * 1000),
    **dict.fromkeys(
        (
            "input_tokens",
            "output_tokens",
            "cached_read_tokens",
            "cache_write_tokens",
            "reasoning_tokens",
        ),
        (0, bounds.MAX_TOKENS_PER_KIND),
    ),
    "cost_micros": (0, MAX_ROW_MONEY),
    "compute_cost_micros": (0, MAX_ROW_MONEY),
    "shadow_cost_micros": (0, MAX_ROW_MONEY),
    "savings_micros": (-MAX_ROW_MONEY, MAX_ROW_MONEY),
}
RECORD_TEXTS = (
    "model",
    "provider",
    "project",
    "session_id",
    "user_id",
    "task_id",
    "reservation_id",
)
REQUEST_STATUSES = frozenset(events_pb2.RequestStatus.values())
COST_SOURCES = frozenset(usage_pb2.CostSource.values())


def _out_of_range(rec: asyncpg.Record, ranges: dict[str, tuple[int, int]]) -> str:
    for name, (low, high) in ranges.items():
        value = rec[name]
        if not low <= value <= high:
            return f"{name} {value} is outside {low}..{high}"
    return ""


def _too_long(rec: asyncpg.Record, names: Sequence[str]) -> str:
    for name in names:
        if len(rec[name]) > bounds.MAX_TEXT:
            return f"{name} is {len(rec[name])} characters, more than {bounds.MAX_TEXT}"
    return ""


def record_problem(rec: asyncpg.Record) -> str:
    """Why a ledger row cannot be shown as a Record (a bad stored row), or ""."""
    problem = _out_of_range(rec, RECORD_RANGES) or _too_long(rec, RECORD_TEXTS)
    if not problem and rec["status"] not in REQUEST_STATUSES:
        problem = f"status {rec['status']} is not a RequestStatus"
    if not problem and rec["cost_source"] not in COST_SOURCES:
        problem = f"cost_source {rec['cost_source']} is not a CostSource"
    return problem


def skipped(kind: str, key: str, reason: str, read: str) -> usage_pb2.SkippedRecord:
    """A bad stored row left out of ``read``: counted, logged, and named in the answer."""
    if len(key) > bounds.MAX_TEXT:
        key = key[: bounds.MAX_TEXT] + "…"
    BAD_ROWS.labels(read).inc()
    log.warning("bad stored row left out", read=read, kind=kind, id=key, reason=reason)
    return usage_pb2.SkippedRecord(kind=kind, id=key, reason=reason)


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
        raise InvalidArgumentError(f"must be 0..{MAX_PAGE}; got {value}", field=field)
    return value or DEFAULT_PAGE


def encode_token(*parts: str) -> str:
    """An opaque page token."""
    return base64.urlsafe_b64encode("\x1f".join(parts).encode()).decode()


NOT_ISSUED = "not a token this service issued; pass next_page_token back unchanged"


def decode_token(token: str, count: int) -> list[str]:
    """The parts of a page token, or INVALID_ARGUMENT."""
    if len(token) > bounds.MAX_PAGE_TOKEN:
        raise InvalidArgumentError(
            f"at most {bounds.MAX_PAGE_TOKEN} characters; got {len(token)}", field="page_token"
        )
    try:
        parts = base64.urlsafe_b64decode(token.encode()).decode().split("\x1f")
    except (ValueError, UnicodeDecodeError):
        parts = []
    if len(parts) != count or any("\x00" in part for part in parts):
        raise InvalidArgumentError(NOT_ISSUED, field="page_token")
    return parts


def _record_token(token: str) -> tuple[datetime, uuid.UUID]:
    """The (time, event id) a ListRecords page token continues after, or INVALID_ARGUMENT."""
    when, event_id = decode_token(token, 2)
    try:
        at = datetime.fromisoformat(when)
        key = uuid.UUID(event_id)
    except ValueError:
        raise InvalidArgumentError(NOT_ISSUED, field="page_token") from None
    if at.tzinfo is None or not bounds.EARLIEST <= at <= bounds.LATEST:
        raise InvalidArgumentError(NOT_ISSUED, field="page_token")
    return at, key


async def list_records(
    pool: asyncpg.Pool, start: datetime, end: datetime, filters: Filters, size: int, token: str
) -> tuple[list[usage_pb2.Record], str, list[usage_pb2.SkippedRecord]]:
    """A page of ledger rows, newest first, and the page's bad rows that were left out."""
    params: list[object] = [start, end]
    conditions = [
        "occurred_at >= $1",
        "occurred_at < $2",
        *filters.clauses(params, with_session=True),
    ]
    if token:
        params += _record_token(token)
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
    good, bad = [], []
    for rec in records:
        problem = record_problem(rec)
        if problem:
            bad.append(skipped("ledger", str(rec["event_id"]), problem, "list_records"))
        else:
            good.append(record_proto(rec))
    return good, next_token, bad


EXPORT_FIELDS = [c.strip() for c in RECORD_COLUMNS.split(",")]
EXPORT_CHUNK_ROWS = 1000


async def export_records(
    pool: asyncpg.Pool, start: datetime, end: datetime, filters: Filters, fmt: int
) -> AsyncIterator[tuple[bytes, list[usage_pb2.SkippedRecord]]]:
    """Ledger rows oldest first as CSV or JSON lines, in chunks of up to 1000 rows.

    Each chunk comes with the bad rows among its rows that were left out.
    """
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
        bad: list[usage_pb2.SkippedRecord] = []
        async for rec in conn.cursor(sql, *params, prefetch=EXPORT_CHUNK_ROWS):
            rows += 1
            problem = record_problem(rec)
            if problem:
                bad.append(skipped("ledger", str(rec["event_id"]), problem, "export_records"))
            else:
                values = {k: _plain(rec[k]) for k in EXPORT_FIELDS}
                values["status"] = enum_label(
                    events_pb2.RequestStatus.Name(rec["status"]), "REQUEST_STATUS_"
                )
                values["cost_source"] = enum_label(
                    usage_pb2.CostSource.Name(rec["cost_source"]), "COST_SOURCE_"
                )
                if jsonl:
                    buffer.write(json.dumps(values, separators=(",", ":")) + "\n")
                else:
                    writer.writerow(values.values())
            if rows % EXPORT_CHUNK_ROWS == 0:
                yield buffer.getvalue().encode(), bad
                buffer.seek(0)
                buffer.truncate()
                bad = []
        if buffer.getvalue() or bad:
            yield buffer.getvalue().encode(), bad


def enum_label(name: str, prefix: str) -> str:
    """An enum value's name as exports write it: ``COST_SOURCE_PRICE_TABLE`` → ``price_table``."""
    return name.removeprefix(prefix).lower()


def _plain(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, int | str | float) or value is None:
        return value
    return str(value)


# --- sessions -----------------------------------------------------------------------------------

_SANE_FROM = f"'{bounds.EARLIEST.isoformat()}'::timestamptz"
_SANE_TO = f"'{bounds.LATEST.isoformat()}'::timestamptz"


def sane_time(column: str) -> str:
    """``column`` when inside the accepted window, else NULL, plus its text for the report.

    A time outside it (infinity, or a time Python cannot hold) would fail the whole read.
    """
    return (
        f"CASE WHEN {column} >= {_SANE_FROM} AND {column} <= {_SANE_TO} THEN {column} END "
        f"AS {column}, {column}::text AS {column}_text"
    )


SESSION_COUNTS = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cached_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_micros",
    "model_switches",
)
SESSION_SELECT = (
    "SELECT session_id, project, user_id, last_model, savings_micros, "
    + ", ".join(SESSION_COUNTS)
    + f", {sane_time('started_at')}, {sane_time('last_activity_at')} FROM sessions"
)
SESSION_TEXTS = ("session_id", "project", "user_id", "last_model")
#: The text of a timestamptz as Postgres writes it (and ``infinity``), as page tokens carry it.
PG_TIME = re.compile(r"-?infinity|[0-9]{4,6}-[0-9]{2}-[0-9]{2} [0-9:.]{8,15}[+-][0-9:]{2,8}( BC)?")


def session_problem(rec: asyncpg.Record) -> str:
    """Why a sessions row cannot be shown as a Session (a bad stored row), or ""."""
    for column in ("started_at", "last_activity_at"):
        if rec[column] is None:
            return f"{column} {rec[column + '_text']} is outside {bounds.WINDOW_TEXT}"
    if rec["started_at"] > rec["last_activity_at"]:
        return "started_at is after last_activity_at"
    for name in SESSION_COUNTS:
        if rec[name] < 0:
            return f"{name} {rec[name]} is negative"
    return _too_long(rec, SESSION_TEXTS)


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


def _session_token(token: str) -> tuple[str, str]:
    """The (last activity as Postgres text, session id) a page token continues after."""
    when, sid = decode_token(token, 2)
    if not PG_TIME.fullmatch(when) or len(sid) > bounds.MAX_TEXT:
        raise InvalidArgumentError(NOT_ISSUED, field="page_token")
    return when, sid


async def list_sessions(
    pool: asyncpg.Pool,
    window: tuple[datetime, datetime] | None,
    filters: Filters,
    size: int,
    token: str,
) -> tuple[list[usage_pb2.Session], str, list[usage_pb2.SkippedRecord]]:
    """A page of sessions, most recently active first, and the page's bad rows left out."""
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
        params += _session_token(token)
        conditions.append(
            f"(last_activity_at, session_id) < (${len(params) - 1}::text::timestamptz, "
            f"${len(params)})"
        )
    params.append(size + 1)
    sql = (
        f"{SESSION_SELECT} WHERE {' AND '.join(conditions)} "
        f"ORDER BY sessions.last_activity_at DESC, session_id DESC LIMIT ${len(params)}"
    )
    try:
        records = await pool.fetch(sql, *params)
    except asyncpg.DataError:  # a token whose time text Postgres does not read
        if not token:
            raise
        raise InvalidArgumentError(NOT_ISSUED, field="page_token") from None
    more = len(records) > size
    records = records[:size]
    next_token = ""
    if more and records:
        last = records[-1]
        # A (bad) id beyond MAX_TEXT continues from its prefix: only ids as long sort between.
        next_token = encode_token(
            last["last_activity_at_text"], last["session_id"][: bounds.MAX_TEXT]
        )
    good, bad = [], []
    for rec in records:
        problem = session_problem(rec)
        if problem:
            bad.append(skipped("session", rec["session_id"], problem, "list_sessions"))
        else:
            good.append(session_proto(rec))
    return good, next_token, bad
