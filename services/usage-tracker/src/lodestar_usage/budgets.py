"""Budgets: definitions, their current windows, admission (Reserve/Commit/Release) and alerts.

Admission holds under concurrency because every Reserve locks the rows of the budgets that apply
(``SELECT … FOR UPDATE``, in id order) before it adds up spend and holds, so two reservations
against one budget are decided one after the other, each seeing the other's hold.
"""

# SQL here is assembled from constant identifiers only; every value is a bind parameter.
# ruff: noqa: S608

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
from google.protobuf import duration_pb2

from lodestar.common.errors import InvalidArgumentError, ModuleError, NotFoundError
from lodestar.usage.v1 import events_pb2, usage_pb2
from lodestar_usage.reports import Filters, calendar_window, stamp, summarize, zone

DEFAULT_THRESHOLDS = (50, 80, 100)
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
MAX_MONEY = 10**15


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
    def per_session(self) -> bool:
        """A session budget without a value applies to every session separately."""
        return self.scope == usage_pb2.BUDGET_SCOPE_SESSION and not self.scope_value

    @classmethod
    def from_record(cls, rec: asyncpg.Record) -> BudgetDef:
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


def budget_from_proto(budget: usage_pb2.Budget, *, require_id: bool) -> BudgetDef:
    """Validate an API budget; INVALID_ARGUMENT names the first bad field."""
    if require_id:
        try:
            budget_id = uuid.UUID(budget.id)
        except ValueError:
            raise InvalidArgumentError(
                "required, the id CreateBudget returned", field="budget.id"
            ) from None
    else:
        budget_id = uuid.uuid4()
    name = budget.name.strip()
    if not name or len(name) > 200:
        raise InvalidArgumentError("required, 1-200 characters", field="budget.name")
    if budget.scope not in SCOPE_NAMES:
        raise InvalidArgumentError("one of GLOBAL, PROJECT, USER, SESSION", field="budget.scope")
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
    rolling = _seconds(budget.rolling)
    if budget.period == usage_pb2.BUDGET_PERIOD_ROLLING:
        if rolling <= 0 or budget.rolling.seconds < 0:
            raise InvalidArgumentError(
                "required for a rolling budget, a positive duration", field="budget.rolling"
            )
    elif budget.HasField("rolling") and rolling:
        raise InvalidArgumentError("only for ROLLING budgets", field="budget.rolling")
    zone(budget.timezone, "budget.timezone")
    limits = budget.session_limits
    session_limits = (_seconds(limits.max_duration), limits.max_tokens, limits.max_cost_micros)
    if any(v < 0 for v in session_limits):
        raise InvalidArgumentError("must not be negative", field="budget.session_limits")
    if any(session_limits) and budget.scope != usage_pb2.BUDGET_SCOPE_SESSION:
        raise InvalidArgumentError("only for SESSION budgets", field="budget.session_limits")
    limit_micros = budget.limit_micros if budget.HasField("limit_micros") else None
    limit_tokens = budget.limit_tokens if budget.HasField("limit_tokens") else None
    if limit_micros is None and limit_tokens is None and not any(session_limits):
        raise InvalidArgumentError(
            "a budget needs a limit: set limit_micros and/or limit_tokens (or session_limits)",
            field="budget.limit_micros",
        )
    for fname, value in (("limit_micros", limit_micros), ("limit_tokens", limit_tokens)):
        if value is not None and not 0 < value <= MAX_MONEY:
            raise InvalidArgumentError(f"must be 1..{MAX_MONEY}", field=f"budget.{fname}")
    thresholds = sorted(set(budget.thresholds_pct)) or list(DEFAULT_THRESHOLDS)
    if any(not 1 <= t <= 1000 for t in thresholds):
        raise InvalidArgumentError("each must be 1..1000 percent", field="budget.thresholds_pct")
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
    rec = await pool.fetchrow(
        f"INSERT INTO budgets ({BUDGET_COLUMNS}) "
        f"VALUES ({', '.join(f'${i}' for i in range(1, 14))}) "
        "RETURNING *",
        *_values(budget),
    )
    return BudgetDef.from_record(rec)


async def update_budget(pool: asyncpg.Pool, budget: BudgetDef) -> BudgetDef:
    sets = ", ".join(
        f"{c.strip()} = ${i}" for i, c in enumerate(BUDGET_COLUMNS.split(",")[1:], start=2)
    )
    rec = await pool.fetchrow(
        f"UPDATE budgets SET {sets}, updated_at = now() WHERE id = $1 RETURNING *", *_values(budget)
    )
    if rec is None:
        raise NotFoundError(f"no budget {budget.id}", field="budget.id")
    return BudgetDef.from_record(rec)


async def delete_budget(pool: asyncpg.Pool, budget_id: str) -> bool:
    try:
        key = uuid.UUID(budget_id)
    except ValueError:
        raise InvalidArgumentError("not a budget id", field="id") from None
    deleted = await pool.fetchval("DELETE FROM budgets WHERE id = $1 RETURNING id", key)
    if deleted is None:
        raise NotFoundError(f"no budget {budget_id}", field="id")
    return True


async def all_budgets(conn: asyncpg.Connection | asyncpg.Pool) -> list[BudgetDef]:
    return [
        BudgetDef.from_record(r)
        for r in await conn.fetch("SELECT * FROM budgets ORDER BY name, id")
    ]


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
        if limit is None:
            return 0
        used = (
            self.spent_micros + self.reserved_micros
            if kind == "micros"
            else self.spent_tokens + self.reserved_tokens
        )
        return limit - used


HELD = (
    "SELECT coalesce(sum(r.amount_micros), 0)::bigint, coalesce(sum(r.amount_tokens), 0)::bigint "
    "FROM reservation_budgets rb JOIN reservations r ON r.id = rb.reservation_id "
    "WHERE rb.budget_id = $1 AND rb.scope_value = $2 "
    "AND ((r.state = 'active' AND r.lease_expires_at > now()) "
    "OR (r.state = 'committed' AND r.created_at >= $3))"
)


async def usage_of(
    conn: asyncpg.Connection | asyncpg.Pool, budget: BudgetDef, value: str, now: datetime
) -> Usage:
    """What ``budget`` has spent and holds for ``value`` in its current window."""
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


APPLICABLE = (
    f"SELECT * FROM budgets WHERE scope = {usage_pb2.BUDGET_SCOPE_GLOBAL} "
    f"OR (scope = {usage_pb2.BUDGET_SCOPE_PROJECT} AND scope_value = $1 AND $1 <> '') "
    f"OR (scope = {usage_pb2.BUDGET_SCOPE_USER} AND scope_value = $2 AND $2 <> '') "
    f"OR (scope = {usage_pb2.BUDGET_SCOPE_SESSION} AND $3 <> '' AND scope_value IN ($3, '')) "
    "ORDER BY id FOR UPDATE"
)


def validate_reserve(request: usage_pb2.ReserveRequest) -> None:
    if request.estimated_cost_micros < 0:
        raise InvalidArgumentError("must not be negative", field="estimated_cost_micros")
    if request.estimated_tokens < 0:
        raise InvalidArgumentError("must not be negative", field="estimated_tokens")
    if request.estimated_cost_micros > MAX_MONEY:
        raise InvalidArgumentError(f"at most {MAX_MONEY}", field="estimated_cost_micros")
    if request.lease.seconds < 0 or request.lease.nanos < 0:
        raise InvalidArgumentError("must not be negative", field="lease")
    for fname in ("project", "user", "session_id", "model"):
        if len(getattr(request, fname)) > 512:
            raise InvalidArgumentError("at most 512 characters", field=fname)


async def reserve(
    pool: asyncpg.Pool, request: usage_pb2.ReserveRequest, lease: timedelta
) -> Admission:
    """Hold the estimate against every applicable budget, or deny naming the first that refuses."""
    validate_reserve(request)
    async with pool.acquire() as conn, conn.transaction():
        now: datetime = await conn.fetchval("SELECT now()")
        budgets = [
            BudgetDef.from_record(r)
            for r in await conn.fetch(APPLICABLE, request.project, request.user, request.session_id)
        ]
        holds: list[tuple[uuid.UUID, str]] = []
        for budget in budgets:
            value = request.session_id if budget.per_session else budget.scope_value
            denial = await _check(conn, budget, value, request, now)
            if denial is not None:
                return Admission(False, denial=denial)
            holds.append((budget.id, value))
        reservation_id = uuid.uuid4()
        expires = now + lease
        await conn.execute(
            "INSERT INTO reservations (id, project, user_id, session_id, model, state, "
            "amount_micros, amount_tokens, created_at, lease_expires_at) "
            "VALUES ($1, $2, $3, $4, $5, 'active', $6, $7, $8, $9)",
            reservation_id,
            request.project,
            request.user,
            request.session_id,
            request.model,
            request.estimated_cost_micros,
            request.estimated_tokens,
            now,
            expires,
        )
        if holds:
            await conn.executemany(
                "INSERT INTO reservation_budgets (reservation_id, budget_id, scope_value) "
                "VALUES ($1, $2, $3)",
                [(reservation_id, bid, value) for bid, value in holds],
            )
    return Admission(True, str(reservation_id), expires, budget_ids=[str(b) for b, _ in holds])


async def _check(
    conn: asyncpg.Connection,
    budget: BudgetDef,
    value: str,
    request: usage_pb2.ReserveRequest,
    now: datetime,
) -> usage_pb2.Denial | None:
    def deny(reason: str, usage: Usage | None) -> usage_pb2.Denial:
        return usage_pb2.Denial(
            budget_id=str(budget.id),
            budget_name=budget.name,
            reason=reason,
            limit_micros=budget.limit_micros or 0,
            limit_tokens=budget.limit_tokens or 0,
            remaining_micros=max(usage.remaining(budget.limit_micros, "micros"), 0) if usage else 0,
            remaining_tokens=max(usage.remaining(budget.limit_tokens, "tokens"), 0) if usage else 0,
        )

    if budget.scope == usage_pb2.BUDGET_SCOPE_SESSION and request.session_id:
        session = await conn.fetchrow(
            "SELECT started_at, cost_micros, input_tokens + output_tokens + cached_read_tokens "
            "+ cache_write_tokens + reasoning_tokens AS tokens FROM sessions WHERE session_id = $1",
            request.session_id,
        )
        if session is not None:
            ran = now - session["started_at"]
            if (
                budget.session_max_duration_seconds
                and ran.total_seconds() > budget.session_max_duration_seconds
            ):
                return deny(
                    f"session has run {int(ran.total_seconds())}s, the limit is "
                    f"{budget.session_max_duration_seconds}s",
                    None,
                )
            if (
                budget.session_max_tokens
                and session["tokens"] + request.estimated_tokens > budget.session_max_tokens
            ):
                return deny(
                    f"session has used {session['tokens']} tokens of {budget.session_max_tokens}",
                    None,
                )
            if (
                budget.session_max_cost_micros
                and session["cost_micros"] + request.estimated_cost_micros
                > budget.session_max_cost_micros
            ):
                return deny(
                    f"session has spent {session['cost_micros']} of "
                    f"{budget.session_max_cost_micros} micro-dollars",
                    None,
                )
    if budget.limit_micros is None and budget.limit_tokens is None:
        return None
    usage = await usage_of(conn, budget, value, now)
    if (
        budget.limit_micros is not None
        and usage.remaining(budget.limit_micros, "micros") < request.estimated_cost_micros
    ):
        return deny("the estimated cost exceeds what the budget has left", usage)
    if (
        budget.limit_tokens is not None
        and usage.remaining(budget.limit_tokens, "tokens") < request.estimated_tokens
    ):
        return deny("the estimated tokens exceed what the budget has left", usage)
    return None


def _reservation_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgumentError(
            "required, the id Reserve returned", field="reservation_id"
        ) from None


async def commit(pool: asyncpg.Pool, request: usage_pb2.CommitRequest) -> bool:
    """Replace a hold by the actual usage; idempotent."""
    key = _reservation_id(request.reservation_id)
    if request.actual_cost_micros < 0:
        raise InvalidArgumentError("must not be negative", field="actual_cost_micros")
    if request.actual_tokens < 0:
        raise InvalidArgumentError("must not be negative", field="actual_tokens")
    async with pool.acquire() as conn, conn.transaction():
        state = await conn.fetchval("SELECT state FROM reservations WHERE id = $1 FOR UPDATE", key)
        if state is None:
            raise NotFoundError(f"no reservation {key}", field="reservation_id")
        if state in ("committed", "settled"):
            return True
        if state == "released":
            raise ModuleError("the reservation was released; reserve again", field="reservation_id")
        await conn.execute(
            "UPDATE reservations SET state = 'committed', amount_micros = $2, amount_tokens = $3, "
            "finished_at = now() WHERE id = $1",
            key,
            request.actual_cost_micros,
            request.actual_tokens,
        )
    return True


async def release(pool: asyncpg.Pool, request: usage_pb2.ReleaseRequest) -> bool:
    """Give the hold back; True if it was still held."""
    key = _reservation_id(request.reservation_id)
    state = await pool.fetchval("SELECT state FROM reservations WHERE id = $1", key)
    if state is None:
        raise NotFoundError(f"no reservation {key}", field="reservation_id")
    done = await pool.fetchval(
        "UPDATE reservations SET state = 'released', finished_at = now() "
        "WHERE id = $1 AND state IN ('active', 'expired') RETURNING id",
        key,
    )
    return done is not None


async def expire_reservations(pool: asyncpg.Pool) -> int:
    """Mark holds whose lease ran out as expired (they already stopped counting)."""
    result: str = await pool.execute(
        "UPDATE reservations SET state = 'expired', finished_at = now() "
        "WHERE state = 'active' AND lease_expires_at <= now()"
    )
    return int(result.split()[-1])


# --- alerts -------------------------------------------------------------------------------------


def alert_event_id(
    budget_id: uuid.UUID, value: str, window_start: datetime, kind: int, threshold: int
) -> str:
    """A deterministic UUIDv7: the window start's milliseconds plus a hash of the alert's key."""
    key = f"{budget_id}|{value}|{window_start.isoformat()}|{kind}|{threshold}".encode()
    digest = int.from_bytes(hashlib.sha256(key).digest()[:10], "big")
    millis = int(window_start.timestamp() * 1000) & ((1 << 48) - 1)
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
    for c in crossings:
        wstart = c.payload.window_start.ToDatetime(tzinfo=UTC)
        event_id = alert_event_id(c.budget.id, c.value, wstart, c.kind, c.threshold)
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
