"""Budgets: definitions, their current windows, admission (Reserve/Commit/Release) and alerts.

Admission holds under concurrency because every Reserve locks the rows of the budgets that apply
(``SELECT … FOR UPDATE``, in id order) before it reads their usage, so two reservations against
one budget are decided one after the other, each seeing the other's hold.

Reading the usage is O(1): calendar budgets keep a running counter per scope value and window
(``budget_counters``: spent and held micro-dollars and tokens), changed in the same transaction
as the ledger rows (ingest), and as each hold (Reserve, Commit, Release, expiry, settlement).
A missing counter (a new window, session or budget) is initialised from the ledger and the holds
under an exclusive advisory lock that ingest takes shared, so no ledger row is counted twice or
missed. Rolling budgets have no fixed window to count in and still add up the ledger.
"""

# SQL here is assembled from constant identifiers only; every value is a bind parameter.
# ruff: noqa: S608

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import asyncpg
from asyncpg.exceptions import DeadlockDetectedError
from google.protobuf import duration_pb2
from tenacity import retry, retry_if_exception_type, stop_after_attempt

from lodestar.common import audit
from lodestar.common.errors import InvalidArgumentError
from lodestar.common.logging import get_logger
from lodestar.usage.v1 import events_pb2, usage_pb2
from lodestar_usage import bounds, metrics
from lodestar_usage.errors import (
    BudgetNotFoundError,
    ReservationCommittedError,
    ReservationNotFoundError,
    ReservationNotYoursError,
    ReservationReleasedError,
)
from lodestar_usage.reports import (
    BAD_ROWS,
    Filters,
    calendar_window,
    sane_time,
    stamp,
    summarize,
    zone,
)

T = TypeVar("T")
log = get_logger(__name__)
DEFAULT_THRESHOLDS = (50, 80, 100)
TOKEN_SUMS = (
    "input_tokens",
    "output_tokens",
    "cached_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)
SCOPE_NAMES = {
    usage_pb2.BUDGET_SCOPE_GLOBAL: "global",
    usage_pb2.BUDGET_SCOPE_PROJECT: "project",
    usage_pb2.BUDGET_SCOPE_USER: "user",
    usage_pb2.BUDGET_SCOPE_SESSION: "session",
}
CALENDAR_UNIT = {
    usage_pb2.BUDGET_PERIOD_DAILY: usage_pb2.CALENDAR_UNIT_DAY,
    usage_pb2.BUDGET_PERIOD_WEEKLY: usage_pb2.CALENDAR_UNIT_WEEK,
    usage_pb2.BUDGET_PERIOD_MONTHLY: usage_pb2.CALENDAR_UNIT_MONTH,
}
MAX_MONEY = bounds.MAX_LIMIT
#: The default of setting limits.max_budget_window_days, in seconds.
DEFAULT_MAX_WINDOW_SECONDS = 366 * 86_400
#: The advisory lock between counter initialisation (exclusive) and ledger ingest (shared).
COUNTER_LOCK = 0x75736167  # "usag"
DEADLOCK_ATTEMPTS = 5
#: A deadlock (a rare lock-order clash with ingest) aborts only that attempt: it is decided again.
again_after_deadlock = retry(
    retry=retry_if_exception_type(DeadlockDetectedError),
    stop=stop_after_attempt(DEADLOCK_ATTEMPTS),
    reraise=True,
)


@dataclass
class BudgetDef:
    """A validated budget."""

    id: uuid.UUID
    name: str
    scope: int
    scope_value: str
    period: int
    timezone: str
    rolling_seconds: int
    limit_micros: int | None
    limit_tokens: int | None
    thresholds: list[int]
    session_max_duration_seconds: int = 0
    session_max_tokens: int = 0
    session_max_cost_micros: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def limits_sessions(self) -> bool:
        """Whether it is a session budget limiting each session's duration, tokens or cost."""
        return self.scope == usage_pb2.BUDGET_SCOPE_SESSION and bool(
            self.session_max_duration_seconds
            or self.session_max_tokens
            or self.session_max_cost_micros
        )

    @property
    def has_limit(self) -> bool:
        """Whether the budget limits cost or tokens."""
        return self.limit_micros is not None or self.limit_tokens is not None

    @property
    def counted(self) -> bool:
        """Whether admission keeps a running counter for this budget (calendar, with a limit)."""
        return self.period != usage_pb2.BUDGET_PERIOD_ROLLING and (
            self.limit_micros is not None or self.limit_tokens is not None
        )

    def value_for(self, project: str, user: str, session_id: str) -> str | None:
        """The scope value a request or ledger row counts under, or None if it does not apply."""
        if self.scope == usage_pb2.BUDGET_SCOPE_GLOBAL:
            return ""
        if self.scope == usage_pb2.BUDGET_SCOPE_PROJECT:
            return self.scope_value if project and project == self.scope_value else None
        if self.scope == usage_pb2.BUDGET_SCOPE_USER:
            return self.scope_value if user and user == self.scope_value else None
        if not session_id:
            return None
        if self.per_session:
            return session_id
        return self.scope_value if session_id == self.scope_value else None

    @property
    def per_session(self) -> bool:
        """A session budget without a value applies to every session separately."""
        return self.scope == usage_pb2.BUDGET_SCOPE_SESSION and not self.scope_value

    @classmethod
    def from_record(cls, rec: asyncpg.Record) -> BudgetDef:
        """The budget a ``budgets`` row holds."""
        return cls(
            rec["id"],
            rec["name"],
            rec["scope"],
            rec["scope_value"],
            rec["period"],
            rec["timezone"],
            rec["rolling_seconds"],
            rec["limit_micros"],
            rec["limit_tokens"],
            list(rec["thresholds_pct"]),
            rec["session_max_duration_seconds"],
            rec["session_max_tokens"],
            rec["session_max_cost_micros"],
            rec["created_at"],
            rec["updated_at"],
        )

    def to_proto(self) -> usage_pb2.Budget:
        """The budget as the API shows it."""
        budget = usage_pb2.Budget(
            id=str(self.id),
            name=self.name,
            scope=self.scope,  # type: ignore[arg-type]
            scope_value=self.scope_value,
            period=self.period,  # type: ignore[arg-type]
            timezone=self.timezone,
            thresholds_pct=self.thresholds,
            session_limits=usage_pb2.SessionLimits(
                max_tokens=self.session_max_tokens, max_cost_micros=self.session_max_cost_micros
            ),
        )
        budget.session_limits.max_duration.FromSeconds(self.session_max_duration_seconds)
        if self.rolling_seconds:
            budget.rolling.FromSeconds(self.rolling_seconds)
        if self.limit_micros is not None:
            budget.limit_micros = self.limit_micros
        if self.limit_tokens is not None:
            budget.limit_tokens = self.limit_tokens
        if self.created_at is not None:
            budget.created_at.CopyFrom(stamp(self.created_at))
        if self.updated_at is not None:
            budget.updated_at.CopyFrom(stamp(self.updated_at))
        return budget

    def window(self, now: datetime) -> tuple[datetime, datetime]:
        """[start, end) of the window spend counts in."""
        if self.period == usage_pb2.BUDGET_PERIOD_ROLLING:
            return now - timedelta(seconds=self.rolling_seconds), now
        unit = CALENDAR_UNIT[self.period]  # type: ignore[index]
        return calendar_window(unit, zone(self.timezone, "timezone"), now)

    def alert_window(self, now: datetime) -> tuple[datetime, datetime]:
        """The window an alert is keyed by: the calendar period, or a fixed rolling bucket."""
        if self.period == usage_pb2.BUDGET_PERIOD_ROLLING:
            span = timedelta(seconds=self.rolling_seconds)
            epoch = datetime(1970, 1, 1, tzinfo=UTC)
            start = epoch + ((now - epoch) // span) * span
            return start, start + span
        return self.window(now)

    def filters(self, value: str) -> Filters:
        """The ledger filter of this budget's scope for ``value``."""
        if self.scope == usage_pb2.BUDGET_SCOPE_PROJECT:
            return Filters(projects=[value])
        if self.scope == usage_pb2.BUDGET_SCOPE_USER:
            return Filters(users=[value])
        if self.scope == usage_pb2.BUDGET_SCOPE_SESSION:
            return Filters(sessions=[value])
        return Filters()


def _seconds(duration: duration_pb2.Duration) -> int:
    return duration.seconds + (1 if duration.nanos > 0 else 0)


def _window_why(max_seconds: int) -> str:
    return f"setting limits.max_budget_window_days = {max_seconds // 86_400}"


def _rolling_seconds(budget: usage_pb2.Budget, max_seconds: int) -> int:
    """A rolling budget's window in whole seconds (0 for calendar budgets), within bounds."""
    if budget.period != usage_pb2.BUDGET_PERIOD_ROLLING:
        if budget.HasField("rolling") and (budget.rolling.seconds or budget.rolling.nanos):
            raise InvalidArgumentError("only for ROLLING budgets", field="budget.rolling")
        return 0
    span = bounds.duration(
        budget.rolling, "budget.rolling", max_seconds=max_seconds, why=_window_why(max_seconds)
    )
    if not span:
        raise InvalidArgumentError(
            "required for a rolling budget, a positive duration", field="budget.rolling"
        )
    if budget.rolling.nanos:
        raise InvalidArgumentError(
            f"a whole number of seconds, at least 1 (got {span}); a window is never rounded",
            field="budget.rolling",
        )
    return _seconds(budget.rolling)


def _session_limits(budget: usage_pb2.Budget, max_seconds: int) -> tuple[int, int, int]:
    """(max duration seconds, max tokens, max cost) of a session budget, within bounds."""
    limits = budget.session_limits
    field = "budget.session_limits"
    bounds.duration(
        limits.max_duration,
        f"{field}.max_duration",
        max_seconds=max_seconds,
        why=_window_why(max_seconds),
    )
    bounds.integer(limits.max_tokens, f"{field}.max_tokens", 0, MAX_MONEY)
    bounds.integer(limits.max_cost_micros, f"{field}.max_cost_micros", 0, MAX_MONEY)
    values = (_seconds(limits.max_duration), limits.max_tokens, limits.max_cost_micros)
    if any(values) and budget.scope != usage_pb2.BUDGET_SCOPE_SESSION:
        raise InvalidArgumentError("only for SESSION budgets", field=field)
    return values


def budget_from_proto(
    budget: usage_pb2.Budget,
    *,
    require_id: bool,
    max_window_seconds: int = DEFAULT_MAX_WINDOW_SECONDS,
) -> BudgetDef:
    """Validate an API budget; INVALID_ARGUMENT names the first bad field and its bound.

    ``max_window_seconds`` bounds a rolling window and a session's max_duration (setting
    ``limits.max_budget_window_days``).
    """
    if require_id:
        try:
            budget_id = uuid.UUID(bounds.text(budget.id, "budget.id", 64))
        except ValueError:
            raise InvalidArgumentError(
                "required, the id CreateBudget returned", field="budget.id"
            ) from None
    else:
        budget_id = uuid.uuid4()
    name = bounds.text(budget.name, "budget.name", bounds.MAX_NAME).strip()
    if not name:
        raise InvalidArgumentError("required, 1-200 characters", field="budget.name")
    if budget.scope not in SCOPE_NAMES:
        raise InvalidArgumentError("one of GLOBAL, PROJECT, USER, SESSION", field="budget.scope")
    bounds.text(budget.scope_value, "budget.scope_value")
    if budget.scope == usage_pb2.BUDGET_SCOPE_GLOBAL and budget.scope_value:
        raise InvalidArgumentError("must be empty for a global budget", field="budget.scope_value")
    if (
        budget.scope in (usage_pb2.BUDGET_SCOPE_PROJECT, usage_pb2.BUDGET_SCOPE_USER)
        and not budget.scope_value
    ):
        raise InvalidArgumentError(
            "required: the project or user the budget limits", field="budget.scope_value"
        )
    if budget.period not in CALENDAR_UNIT and budget.period != usage_pb2.BUDGET_PERIOD_ROLLING:
        raise InvalidArgumentError("one of DAILY, WEEKLY, MONTHLY, ROLLING", field="budget.period")
    rolling = _rolling_seconds(budget, max_window_seconds)
    zone(budget.timezone, "budget.timezone")
    session_limits = _session_limits(budget, max_window_seconds)
    limit_micros = budget.limit_micros if budget.HasField("limit_micros") else None
    limit_tokens = budget.limit_tokens if budget.HasField("limit_tokens") else None
    if limit_micros is None and limit_tokens is None and not any(session_limits):
        raise InvalidArgumentError(
            "a budget needs a limit: set limit_micros and/or limit_tokens (or session_limits)",
            field="budget.limit_micros",
        )
    for fname, value in (("limit_micros", limit_micros), ("limit_tokens", limit_tokens)):
        if value is not None:
            bounds.integer(value, f"budget.{fname}", 1, MAX_MONEY)
    if len(budget.thresholds_pct) > bounds.MAX_THRESHOLDS:
        raise InvalidArgumentError(
            f"at most {bounds.MAX_THRESHOLDS} values; got {len(budget.thresholds_pct)}",
            field="budget.thresholds_pct",
        )
    thresholds = sorted(set(budget.thresholds_pct)) or list(DEFAULT_THRESHOLDS)
    if any(not 1 <= t <= bounds.MAX_THRESHOLD_PCT for t in thresholds):
        raise InvalidArgumentError(
            f"each must be 1..{bounds.MAX_THRESHOLD_PCT} percent", field="budget.thresholds_pct"
        )
    return BudgetDef(
        budget_id,
        name,
        budget.scope,
        budget.scope_value,
        budget.period,
        budget.timezone or "UTC",
        rolling,
        limit_micros,
        limit_tokens,
        thresholds,
        *session_limits,
    )


BUDGET_COLUMNS = (
    "id, name, scope, scope_value, period, timezone, rolling_seconds, limit_micros, "
    "limit_tokens, thresholds_pct, session_max_duration_seconds, session_max_tokens, "
    "session_max_cost_micros"
)


#: Budget rows for reading: a stored time Python cannot hold (infinity, the year 20000) reads as
#: NULL instead of failing the read, admission or ingest.
BUDGET_RETURNED = f"{BUDGET_COLUMNS}, {sane_time('created_at')}, {sane_time('updated_at')}"
BUDGET_ROWS = f"SELECT {BUDGET_RETURNED}"
#: Longest rolling window or session duration a stored budget may have (the setting's ceiling).
MAX_STORED_WINDOW_SECONDS = bounds.MAX_BUDGET_WINDOW_DAYS * 86_400


def budget_problem(budget: BudgetDef) -> str:
    """Why a stored budget cannot be evaluated (a bad stored row), or "".

    The API never stores such a budget; older builds, restores and hand edits might.
    """
    if budget.scope not in SCOPE_NAMES:
        return f"scope {budget.scope} is not a BudgetScope"
    rolling = budget.period == usage_pb2.BUDGET_PERIOD_ROLLING
    if budget.period not in CALENDAR_UNIT and not rolling:
        return f"period {budget.period} is not a BudgetPeriod"
    if len(budget.name) > bounds.MAX_NAME or len(budget.scope_value) > bounds.MAX_TEXT:
        return "name or scope_value is too long"
    try:
        zone(budget.timezone, "timezone")
    except InvalidArgumentError:
        return f"timezone {budget.timezone[:64]!r} is not an IANA timezone"
    window = MAX_STORED_WINDOW_SECONDS
    checks = [
        ("rolling_seconds", budget.rolling_seconds, 1 if rolling else 0, window),
        ("limit_micros", budget.limit_micros, 1, MAX_MONEY),
        ("limit_tokens", budget.limit_tokens, 1, MAX_MONEY),
        ("session_max_duration_seconds", budget.session_max_duration_seconds, 0, window),
        ("session_max_tokens", budget.session_max_tokens, 0, MAX_MONEY),
        ("session_max_cost_micros", budget.session_max_cost_micros, 0, MAX_MONEY),
        *(("thresholds_pct", t, 1, bounds.MAX_THRESHOLD_PCT) for t in budget.thresholds),
    ]
    for name, value, low, high in checks:
        if value is not None and not low <= value <= high:
            return f"{name} {value} is outside {low}..{high}"
    return ""


_reported_bad: set[uuid.UUID] = set()


def usable_budgets(recs: list[asyncpg.Record]) -> list[BudgetDef]:
    """The budgets of ``recs`` that can be evaluated.

    A bad one is left out of admission, ingest and alerts (logged once per budget, counted, named
    by ListBudgets).
    """
    out = []
    for rec in recs:
        budget = BudgetDef.from_record(rec)
        problem = budget_problem(budget)
        if not problem:
            out.append(budget)
            continue
        BAD_ROWS.labels("budgets").inc()
        if budget.id not in _reported_bad:
            _reported_bad.add(budget.id)
            log.error(
                "stored budget cannot be evaluated; left out",
                budget_id=str(budget.id),
                problem=problem,
            )
    return out


def _values(b: BudgetDef) -> list[object]:
    return [
        b.id,
        b.name,
        b.scope,
        b.scope_value,
        b.period,
        b.timezone,
        b.rolling_seconds,
        b.limit_micros,
        b.limit_tokens,
        b.thresholds,
        b.session_max_duration_seconds,
        b.session_max_tokens,
        b.session_max_cost_micros,
    ]


async def create_budget(pool: asyncpg.Pool, budget: BudgetDef) -> BudgetDef:
    """Store a new budget (audited)."""
    async with pool.acquire() as conn, conn.transaction():
        rec = await conn.fetchrow(
            f"INSERT INTO budgets ({BUDGET_COLUMNS}) "
            f"VALUES ({', '.join(f'${i}' for i in range(1, 14))}) "
            f"RETURNING {BUDGET_RETURNED}",
            *_values(budget),
        )
        created = BudgetDef.from_record(rec)
        await audit.record(
            conn,
            action="BudgetService/CreateBudget",
            target=f"budget/{created.id}",
            before=None,
            after=created.to_proto(),
        )
    return created


async def update_budget(pool: asyncpg.Pool, budget: BudgetDef) -> BudgetDef:
    """Replace the definition of the stored budget ``budget.id`` (audited); the budget as stored.

    NOT_FOUND when there is no such budget. Its counters are dropped, to be rebuilt.
    """
    sets = ", ".join(
        f"{c.strip()} = ${i}" for i, c in enumerate(BUDGET_COLUMNS.split(",")[1:], start=2)
    )
    async with pool.acquire() as conn, conn.transaction():
        old = await conn.fetchrow(
            f"{BUDGET_ROWS} FROM budgets WHERE id = $1 FOR UPDATE",
            budget.id,
        )
        if old is None:
            raise BudgetNotFoundError(f"no budget {budget.id}", field="budget.id")
        rec = await conn.fetchrow(
            f"UPDATE budgets SET {sets}, updated_at = now() WHERE id = $1 "
            f"RETURNING {BUDGET_RETURNED}",
            *_values(budget),
        )
        # Scope, period or timezone may have changed: counters are rebuilt on the next Reserve.
        await conn.execute("DELETE FROM budget_counters WHERE budget_id = $1", budget.id)
        updated = BudgetDef.from_record(rec)
        await audit.record(
            conn,
            action="BudgetService/UpdateBudget",
            target=f"budget/{budget.id}",
            before=BudgetDef.from_record(old).to_proto(),
            after=updated.to_proto(),
        )
    return updated


async def delete_budget(pool: asyncpg.Pool, budget_id: str) -> bool:
    """Delete budget ``budget_id`` and its counters (audited); True once deleted.

    INVALID_ARGUMENT when ``budget_id`` is not an id, NOT_FOUND when there is no such budget.
    """
    try:
        key = uuid.UUID(budget_id)
    except ValueError:
        raise InvalidArgumentError("not a budget id", field="id") from None
    async with pool.acquire() as conn, conn.transaction():
        deleted = await conn.fetchrow(
            f"DELETE FROM budgets WHERE id = $1 RETURNING {BUDGET_RETURNED}",
            key,
        )
        if deleted is None:
            raise BudgetNotFoundError(f"no budget {budget_id}", field="id")
        await conn.execute("DELETE FROM budget_counters WHERE budget_id = $1", key)
        await audit.record(
            conn,
            action="BudgetService/DeleteBudget",
            target=f"budget/{key}",
            before=BudgetDef.from_record(deleted).to_proto(),
            after=None,
        )
    return True


async def all_budgets(conn: asyncpg.Connection | asyncpg.Pool) -> list[BudgetDef]:
    """Every stored budget that can be evaluated (bad ones are logged and left out)."""
    return usable_budgets(await conn.fetch(f"{BUDGET_ROWS} FROM budgets ORDER BY name, id"))


@dataclass
class Usage:
    """Spend and holds of one budget (for one scope value) in its window."""

    start: datetime
    end: datetime
    spent_micros: int = 0
    spent_tokens: int = 0
    reserved_micros: int = 0
    reserved_tokens: int = 0

    def remaining(self, limit: int | None, kind: str) -> int:
        """What is left of ``limit`` after spend and holds of ``kind`` ("micros" or "tokens").

        0 without a limit; negative when overspent.
        """
        return 0 if limit is None else limit - self.used(kind)

    def used(self, kind: str) -> int:
        """Spend plus holds of ``kind`` ("micros" or "tokens")."""
        if kind == "micros":
            return self.spent_micros + self.reserved_micros
        return self.spent_tokens + self.reserved_tokens


HELD = (
    "SELECT coalesce(sum(r.amount_micros), 0)::bigint, coalesce(sum(r.amount_tokens), 0)::bigint "
    "FROM reservation_budgets rb JOIN reservations r ON r.id = rb.reservation_id "
    "WHERE rb.budget_id = $1 AND rb.scope_value = $2 "
    "AND ((r.state = 'active' AND r.lease_expires_at > now()) "
    "OR (r.state = 'committed' AND r.created_at >= $3))"
)


#: A calendar budget's counter for one value and window, with the holds whose lease ran out
#: (still in the counter until the expiry job marks them) left out.
COUNTED_USAGE = (
    "SELECT c.spent_micros, c.spent_tokens, c.held_micros - coalesce(x.m, 0), "
    "c.held_tokens - coalesce(x.t, 0) FROM budget_counters c "
    "LEFT JOIN LATERAL (SELECT sum(r.amount_micros) AS m, sum(r.amount_tokens) AS t "
    "FROM reservations r JOIN reservation_budgets rb ON rb.reservation_id = r.id "
    "WHERE r.state = 'active' AND r.lease_expires_at <= now() AND rb.budget_id = c.budget_id "
    "AND rb.scope_value = c.scope_value AND rb.window_start = c.window_start) x ON true "
    "WHERE c.budget_id = $1 AND c.scope_value = $2 AND c.window_start = $3"
)


async def usage_of(
    conn: asyncpg.Connection | asyncpg.Pool, budget: BudgetDef, value: str, now: datetime
) -> Usage:
    """What ``budget`` has spent and holds for ``value`` in its current window.

    A calendar budget's counter answers in one row; without one (no limit, rolling, or not yet
    created) the ledger and the holds are added up.
    """
    if budget.counted:
        start, end = budget.window(now)
        counted = await conn.fetchrow(COUNTED_USAGE, budget.id, value, start)
        if counted is not None:
            return Usage(start, end, counted[0], counted[1], int(counted[2]), int(counted[3]))
    return await usage_from_ledger(conn, budget, value, now)


async def usage_from_ledger(
    conn: asyncpg.Connection | asyncpg.Pool, budget: BudgetDef, value: str, now: datetime
) -> Usage:
    """What ``budget`` has spent (the ledger) and holds (the reservations) for ``value``."""
    start, end = budget.window(now)
    usage = Usage(start, end)
    spent_end = max(end, now + timedelta(seconds=1))
    rows = await summarize(conn, start, spent_end, [], budget.filters(value))
    if rows:
        sums = rows[0].sums
        usage.spent_micros = sums["cost_micros"]
        usage.spent_tokens = sum(
            sums[k]
            for k in (
                "input_tokens",
                "output_tokens",
                "cached_read_tokens",
                "cache_write_tokens",
                "reasoning_tokens",
            )
        )
    held = await conn.fetchrow(HELD, budget.id, value, start)
    assert held is not None
    usage.reserved_micros, usage.reserved_tokens = int(held[0]), int(held[1])
    return usage


def status_proto(budget: BudgetDef, usage: Usage) -> usage_pb2.BudgetStatus:
    """``budget`` with its window, spend, holds and what remains, as ListBudgets shows it."""
    return usage_pb2.BudgetStatus(
        budget=budget.to_proto(),
        window_start=stamp(usage.start),
        window_end=stamp(usage.end),
        spent_micros=usage.spent_micros,
        spent_tokens=usage.spent_tokens,
        reserved_micros=usage.reserved_micros,
        reserved_tokens=usage.reserved_tokens,
        remaining_micros=usage.remaining(budget.limit_micros, "micros"),
        remaining_tokens=usage.remaining(budget.limit_tokens, "tokens"),
    )


# --- admission ----------------------------------------------------------------------------------


@dataclass
class Admission:
    """The outcome of Reserve."""

    granted: bool
    reservation_id: str = ""
    lease_expires_at: datetime | None = None
    denial: usage_pb2.Denial | None = None
    budget_ids: list[str] = field(default_factory=list)


def validate_reserve(request: usage_pb2.ReserveRequest) -> None:
    """INVALID_ARGUMENT naming the first field of ``request`` out of bounds.

    The lease's maximum is a setting: the API checks it.
    """
    bounds.integer(
        request.estimated_cost_micros, "estimated_cost_micros", 0, bounds.MAX_COST_MICROS
    )
    bounds.integer(request.estimated_tokens, "estimated_tokens", 0, bounds.MAX_TOKENS)
    if request.lease.seconds < 0 or request.lease.nanos < 0:
        raise InvalidArgumentError("must not be negative", field="lease")
    for fname in ("project", "user", "session_id", "model"):
        bounds.text(getattr(request, fname), fname)


Key = tuple[uuid.UUID, str, datetime]

HELD_IN_WINDOW = (
    "SELECT coalesce(sum(r.amount_micros), 0)::bigint, coalesce(sum(r.amount_tokens), 0)::bigint "
    "FROM reservation_budgets rb JOIN reservations r ON r.id = rb.reservation_id "
    "WHERE rb.budget_id = $1 AND rb.scope_value = $2 AND rb.window_start = $3 "
    "AND r.state IN ('active', 'committed')"
)


def _add_to_counters(add: Callable[[str, str], str]) -> str:
    """Adds (spent, held) deltas to counters, locking them in key order (every writer's)."""
    sets = ", ".join(
        f"{column} = {add(f'c.{column}', f'd.{delta}')}"
        for column, delta in (
            ("spent_micros", "sm"),
            ("spent_tokens", "st"),
            ("held_micros", "hm"),
            ("held_tokens", "ht"),
        )
    )
    return (
        f"UPDATE budget_counters c SET {sets} "
        "FROM (SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::bigint[], "
        "$5::bigint[], $6::bigint[], $7::bigint[]) AS u(b, v, w, sm, st, hm, ht) "
        "ORDER BY b, v, w) d "
        "WHERE c.budget_id = d.b AND c.scope_value = d.v AND c.window_start = d.w"
    )


ADD_TO_COUNTERS = _add_to_counters(bounds.plain_add)
#: The same with sums that stay at ±(2^63 - 1): for a batch ingest writes again after a stored
#: counter (a bad row) would overflow.
ADD_TO_COUNTERS_SATURATING = _add_to_counters(bounds.saturating_add)


async def add_to_counters(
    conn: asyncpg.Connection, deltas: dict[Key, list[int]], *, saturate: bool = False
) -> None:
    """Add ``[spent_micros, spent_tokens, held_micros, held_tokens]`` per counter key."""
    deltas = {k: d for k, d in deltas.items() if any(d)}
    if not deltas:
        return
    keys = sorted(deltas, key=lambda k: (k[0].bytes, k[1], k[2]))
    await conn.execute(
        ADD_TO_COUNTERS_SATURATING if saturate else ADD_TO_COUNTERS,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        *([deltas[k][i] for k in keys] for i in range(4)),
    )


async def init_counters(
    conn: asyncpg.Connection, missing: list[tuple[BudgetDef, str, datetime, datetime]]
) -> None:
    """Create counters from the ledger and the holds, with ingest held off meanwhile."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", COUNTER_LOCK)
    for budget, value, start, end in missing:
        rows = await summarize(conn, start, end, [], budget.filters(value))
        spent_micros = spent_tokens = 0
        if rows:
            sums = rows[0].sums
            spent_micros = sums["cost_micros"]
            spent_tokens = sum(sums[k] for k in TOKEN_SUMS)
        held = await conn.fetchrow(HELD_IN_WINDOW, budget.id, value, start)
        assert held is not None
        await conn.execute(
            "INSERT INTO budget_counters (budget_id, scope_value, window_start, spent_micros, "
            "spent_tokens, held_micros, held_tokens) VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT DO NOTHING",
            budget.id,
            value,
            start,
            spent_micros,
            spent_tokens,
            int(held[0]),
            int(held[1]),
        )


def denial_for(budget: BudgetDef, reason: str, usage: Usage | None) -> usage_pb2.Denial:
    """Why ``budget`` refuses a Reserve: ``reason``, its limits and what remains of them.

    With when its window resets, except for rolling windows and session limits (``usage`` None).
    """
    denial = usage_pb2.Denial(
        budget_id=str(budget.id),
        budget_name=budget.name,
        reason=reason,
        limit_micros=budget.limit_micros or 0,
        limit_tokens=budget.limit_tokens or 0,
        remaining_micros=max(usage.remaining(budget.limit_micros, "micros"), 0) if usage else 0,
        remaining_tokens=max(usage.remaining(budget.limit_tokens, "tokens"), 0) if usage else 0,
    )
    if usage is not None and budget.period != usage_pb2.BUDGET_PERIOD_ROLLING:
        denial.resets_at.FromDatetime(usage.end)
    return denial


def reservation_key(value: str) -> uuid.UUID:
    """The reservation id in ``value``; INVALID_ARGUMENT naming ``reservation_id`` otherwise."""
    if not value:
        raise InvalidArgumentError("required: the id Reserve returned", field="reservation_id")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgumentError(
            f"{value[:64]!r} is not a reservation id; pass the id Reserve returned (a UUID)",
            field="reservation_id",
        ) from None


@again_after_deadlock
async def _retrying(pool: asyncpg.Pool, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run ``work`` in a transaction, again after a (rare) deadlock."""
    async with pool.acquire() as conn, conn.transaction():
        return await work(conn)


def validate_commit(request: usage_pb2.CommitRequest) -> uuid.UUID:
    """The reservation id of ``request``; INVALID_ARGUMENT names a field out of bounds."""
    key = reservation_key(request.reservation_id)
    bounds.integer(request.actual_cost_micros, "actual_cost_micros", 0, bounds.MAX_COST_MICROS)
    bounds.integer(request.actual_tokens, "actual_tokens", 0, bounds.MAX_TOKENS)
    return key


@dataclass(frozen=True)
class Finished:
    """A reservation as a Commit or Release found it.

    Its state, and its amounts: the hold, or what was committed.
    """

    state: str
    micros: int = 0
    tokens: int = 0
    #: Active, but its lease had run out (not yet marked expired).
    lapsed: bool = False

    @property
    def lease_ran_out(self) -> bool:
        """Whether the hold had stopped counting before this call."""
        return self.state == "expired" or (self.state == "active" and self.lapsed)


#: States of a reservation whose Commit has happened (settled: the ledger has its usage).
COMMITTED = ("committed", "settled")


def check_commit(
    request: usage_pb2.CommitRequest, key: uuid.UUID, owner: str | None, found: Finished
) -> usage_pb2.CommitResponse:
    """The answer to a Commit that found the reservation ``found``.

    Refuses a missing reservation, another principal's, a released one, and other amounts for
    one already committed (a commit is final); a repeat with the same amounts is answered.
    """
    _refuse_missing_or_foreign(found.state, key, owner)
    if found.state == "released":
        raise ReservationReleasedError(
            "the reservation was released; reserve again", field="reservation_id"
        )
    asked = (request.actual_cost_micros, request.actual_tokens)
    if found.state in COMMITTED and (found.micros, found.tokens) != asked:
        raise ReservationCommittedError(
            f"reservation {key} was committed with {found.micros} micro-dollars and "
            f"{found.tokens} tokens; a commit is final, so {asked[0]} and {asked[1]} were not "
            "recorded",
            field="reservation_id",
        )
    if found.state in COMMITTED:
        metrics.COMMITS.labels("repeated").inc()
        return usage_pb2.CommitResponse(committed=True, repeated=True)
    over = (max(asked[0] - found.micros, 0), max(asked[1] - found.tokens, 0))
    if any(over):
        metrics.OVER_ESTIMATE.inc()
    metrics.COMMITS.labels("after_lease_expiry" if found.lease_ran_out else "committed").inc()
    return usage_pb2.CommitResponse(
        committed=True,
        lease_expired=found.lease_ran_out,
        over_estimate_micros=over[0],
        over_estimate_tokens=over[1],
    )


def check_release_state(state: str, key: uuid.UUID, owner: str | None) -> bool:
    """Whether a Release of a reservation in ``state`` gave a hold back.

    Refuses a missing reservation or another principal's.
    """
    _refuse_missing_or_foreign(state, key, owner)
    return state in ("active", "expired")


def _refuse_missing_or_foreign(state: str, key: uuid.UUID, owner: str | None) -> None:
    if state == "missing":
        raise ReservationNotFoundError(f"no reservation {key}", field="reservation_id")
    if state == "foreign":
        raise ReservationNotYoursError(
            f"reservation {key} was made by another principal; only it (or an admin) may commit "
            f"or release it, not {owner}",
            field="reservation_id",
        )


async def expire_reservations(pool: asyncpg.Pool) -> int:
    """Mark holds whose lease ran out as expired (they already stopped counting)."""

    async def work(conn: asyncpg.Connection) -> int:
        recs = await conn.fetch(
            "WITH e AS (UPDATE reservations SET state = 'expired', finished_at = now() "
            "WHERE state = 'active' AND lease_expires_at <= now() "
            "RETURNING id, amount_micros, amount_tokens) "
            "SELECT e.id, e.amount_micros, e.amount_tokens, rb.budget_id, rb.scope_value, "
            "rb.window_start FROM e LEFT JOIN reservation_budgets rb "
            "ON rb.reservation_id = e.id AND rb.window_start IS NOT NULL"
        )
        deltas: dict[Key, list[int]] = {}
        for r in recs:
            if r["budget_id"] is not None:
                acc = deltas.setdefault(
                    (r["budget_id"], r["scope_value"], r["window_start"]), [0] * 4
                )
                acc[2] -= r["amount_micros"]
                acc[3] -= r["amount_tokens"]
        await add_to_counters(conn, deltas)
        return len({r["id"] for r in recs})

    return await _retrying(pool, work)


async def ingest_budgets(conn: asyncpg.Connection) -> list[BudgetDef]:
    """The counted budgets, with ingest's (shared) side of the counter lock taken."""
    await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", COUNTER_LOCK)
    return [b for b in usable_budgets(await conn.fetch(f"{BUDGET_ROWS} FROM budgets")) if b.counted]


# --- alerts -------------------------------------------------------------------------------------


def alert_event_id(
    budget_id: uuid.UUID,
    value: str,
    window_start: datetime,
    kind: int,
    threshold: int,
    detected_at: datetime,
) -> str:
    """A UUIDv7 of the moment the crossing was detected plus a hash of the alert's key.

    The id is stored with the crossing, so every retry publishes the same id (core drops repeats);
    its time is the detection time, which core's event-time bounds accept (a window start can be
    weeks old).
    """
    key = f"{budget_id}|{value}|{window_start.isoformat()}|{kind}|{threshold}".encode()
    digest = int.from_bytes(hashlib.sha256(key).digest()[:10], "big")
    millis = int(detected_at.timestamp() * 1000) & ((1 << 48) - 1)
    rand_a = digest >> 68 & 0xFFF
    rand_b = digest & ((1 << 62) - 1)
    return str(uuid.UUID(int=(millis << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b))


@dataclass
class Crossing:
    """An alert to record."""

    budget: BudgetDef
    value: str
    kind: int
    threshold: int
    payload: events_pb2.BudgetThresholdCrossed


async def detect_crossings(
    conn: asyncpg.Connection | asyncpg.Pool,
    budget: BudgetDef,
    now: datetime,
    *,
    burn_rate: bool,
    min_elapsed: float,
) -> list[Crossing]:
    """The thresholds (and the burn rate) ``budget`` has crossed in its current window."""
    if budget.limit_micros is None and budget.limit_tokens is None:
        return []
    wstart, wend = budget.alert_window(now)
    values = [budget.scope_value]
    if budget.per_session:
        values = [
            r["session_id"]
            for r in await conn.fetch(
                "SELECT DISTINCT session_id FROM rollup_session_hourly "
                "WHERE hour >= $1 AND session_id <> '' LIMIT 1000",
                wstart - timedelta(hours=1),
            )
        ]
    out = []
    for value in values:
        usage = await usage_of(conn, budget, value, now)
        usage.reserved_micros = usage.reserved_tokens = 0

        def payload(
            kind: int, threshold: int, projected: int = 0, value: str = value, usage: Usage = usage
        ) -> events_pb2.BudgetThresholdCrossed:
            return events_pb2.BudgetThresholdCrossed(
                budget_id=str(budget.id),
                budget_name=budget.name,
                scope=SCOPE_NAMES[budget.scope],  # type: ignore[index]
                scope_value=value,
                window_start=stamp(wstart),
                window_end=stamp(wend),
                kind=kind,  # type: ignore[arg-type]
                threshold_pct=threshold,
                limit_micros=budget.limit_micros or 0,
                spent_micros=usage.spent_micros,
                limit_tokens=budget.limit_tokens or 0,
                spent_tokens=usage.spent_tokens,
                projected_micros=projected,
            )

        for threshold in budget.thresholds:
            hit = (
                budget.limit_micros is not None
                and usage.spent_micros * 100 >= threshold * budget.limit_micros
            ) or (
                budget.limit_tokens is not None
                and usage.spent_tokens * 100 >= threshold * budget.limit_tokens
            )
            if hit:
                out.append(
                    Crossing(
                        budget,
                        value,
                        events_pb2.ALERT_KIND_THRESHOLD,
                        threshold,
                        payload(events_pb2.ALERT_KIND_THRESHOLD, threshold),
                    )
                )
        if burn_rate and budget.limit_micros and 0 < usage.spent_micros < budget.limit_micros:
            elapsed = (now - wstart) / (wend - wstart)
            if elapsed >= min_elapsed and elapsed > 0:
                projected = int(usage.spent_micros / elapsed)
                if projected > budget.limit_micros:
                    out.append(
                        Crossing(
                            budget,
                            value,
                            events_pb2.ALERT_KIND_BURN_RATE,
                            0,
                            payload(events_pb2.ALERT_KIND_BURN_RATE, 0, projected),
                        )
                    )
    return out


async def record_crossings(
    conn: asyncpg.Connection | asyncpg.Pool, crossings: list[Crossing]
) -> int:
    """Insert crossings once per key; returns how many were new."""
    new = 0
    detected_at = datetime.now(UTC)
    for c in crossings:
        wstart = c.payload.window_start.ToDatetime(tzinfo=UTC)
        event_id = alert_event_id(c.budget.id, c.value, wstart, c.kind, c.threshold, detected_at)
        inserted = await conn.fetchval(
            "INSERT INTO budget_crossings (budget_id, scope_value, window_start, kind, "
            "threshold_pct, event_id, payload) VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT DO NOTHING RETURNING 1",
            c.budget.id,
            c.value,
            wstart,
            c.kind,
            c.threshold,
            uuid.UUID(event_id),
            c.payload.SerializeToString(),
        )
        new += int(inserted is not None)
    return new
