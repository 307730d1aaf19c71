"""Budgets: their definitions, validation, storage (audited) and current windows.

A budget limits the cost or tokens spent in a window (a calendar period in a timezone, or a
rolling span) by everything, a project, a user or a session. What a budget has used is kept by
:mod:`lodestar_usage.counters`; admission (:mod:`lodestar_usage.admission`) holds against it;
:mod:`lodestar_usage.alerts` reports when it crosses its thresholds.
"""

# SQL here is assembled from constant identifiers only; every value is a bind parameter.
# ruff: noqa: S608

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from google.protobuf import duration_pb2

from lodestar.common import audit
from lodestar.common.errors import InvalidArgumentError
from lodestar.common.logging import get_logger
from lodestar.usage.v1 import usage_pb2
from lodestar_usage import bounds
from lodestar_usage.errors import (
    BudgetNotFoundError,
)
from lodestar_usage.reports import (
    BAD_ROWS,
    Filters,
    calendar_window,
    sane_time,
    stamp,
    zone,
)

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

    @property
    def sums_ledger(self) -> bool:
        """Whether admission adds up the ledger for this budget (rolling, with a limit)."""
        return self.period == usage_pb2.BUDGET_PERIOD_ROLLING and self.has_limit

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
