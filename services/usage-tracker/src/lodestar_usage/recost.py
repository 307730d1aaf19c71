"""Unpriced usage: listing it (ListUnpriced), and re-pricing it once a price covers it (Recost).

A ledger row recorded while no price matched its model on its UTC day has cost 0 and
``cost_source`` UNPRICED. Recost gives such rows the price that applies on their day now, and
adds the difference to every table that counted them — the rollups of both grains, the session
and the budget counters — in the transaction that changes the rows, so Summary stays the exact
sum of the ledger. Rows are locked by the update itself (a row another Recost re-priced
meanwhile no longer matches and is skipped); rollups, sessions and counters are changed in the
key order ingest uses, with ingest's shared side of the counter lock (ADR 0016).
"""

# SQL here is assembled from constant identifiers only; every value is a bind parameter.
# ruff: noqa: S608

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg

from lodestar.common import audit
from lodestar.common.errors import InvalidArgumentError
from lodestar.usage.v1 import events_pb2, usage_pb2
from lodestar_usage import bounds, counters, metrics
from lodestar_usage.bounds import saturating_add
from lodestar_usage.ingest import DIMS, LedgerRow, spend_deltas
from lodestar_usage.pricing import PriceRow, PriceTable, validate_pattern
from lodestar_usage.reports import stamp

UNPRICED = int(usage_pb2.COST_SOURCE_UNPRICED)
PRICED = int(usage_pb2.COST_SOURCE_PRICE_TABLE)
#: Longest window one Recost covers.
MAX_RECOST_DAYS = 366
#: Rows one Recost call re-prices at most (its transaction's size).
DEFAULT_MAX_ROWS = 10_000
MAX_ROWS = 50_000
#: Rows of a ListUnpriced answer.
DEFAULT_LIMIT = 100
MAX_LIMIT = 1_000
#: Unpriced (model, provider, UTC day) groups one call reads at most.
MAX_GROUPS = 100_000
#: The unpriced gauges count the ledger rows of this many days back.
GAUGE_DAYS = 30
DAY = timedelta(hours=24)
INT64_MAX = bounds.INT64_MAX
ACTION = "UsageService/Recost"


def _clamp(value: Any) -> int:
    """A non-negative sum read as numeric, as an int64 (a sum beyond it stays at the limit)."""
    return min(int(value or 0), INT64_MAX)


@dataclass(frozen=True)
class Group:
    """The unpriced ledger rows of one model and provider on one UTC day."""

    model: str
    provider: str
    day: date
    requests: int
    tokens: tuple[int, int, int, int, int]
    first: datetime
    last: datetime

    @property
    def day_start(self) -> datetime:
        """Midnight UTC of the day."""
        return datetime(self.day.year, self.day.month, self.day.day, tzinfo=UTC)


GROUPS = (
    "SELECT model, provider, (occurred_at AT TIME ZONE 'UTC')::date AS day, count(*), "
    "sum(input_tokens), sum(output_tokens), sum(cached_read_tokens), sum(cache_write_tokens), "
    "sum(reasoning_tokens), min(occurred_at), max(occurred_at) FROM ledger "
    f"WHERE cost_source = {UNPRICED} AND occurred_at >= $1 AND occurred_at < $2 "
    "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 LIMIT $3"
)


async def unpriced_groups(conn: asyncpg.Connection, start: datetime, end: datetime) -> list[Group]:
    """The unpriced rows of [start, end) per model, provider and day; too many is refused."""
    records = await conn.fetch(GROUPS, start, end, MAX_GROUPS + 1)
    if len(records) > MAX_GROUPS:
        raise InvalidArgumentError(
            f"more than {MAX_GROUPS} unpriced (model, provider, day) groups in the window "
            f"{start.isoformat()}..{end.isoformat()}; narrow it",
            field="window",
        )
    return [
        Group(
            r[0],
            r[1],
            r[2],
            _clamp(r[3]),
            (_clamp(r[4]), _clamp(r[5]), _clamp(r[6]), _clamp(r[7]), _clamp(r[8])),
            r[9],
            r[10],
        )
        for r in records
    ]


# --- ListUnpriced --------------------------------------------------------------------------------


@dataclass
class _Listed:
    """The unpriced usage of one row of a ListUnpriced answer, being added up."""

    requests: int = 0
    tokens: list[int] = field(default_factory=lambda: [0] * 5)
    first: datetime | None = None
    last: datetime | None = None
    priceable: int = 0
    pattern: str = ""

    def add(self, group: Group, price: PriceRow | None) -> None:
        self.requests = min(self.requests + group.requests, INT64_MAX)
        self.tokens = [
            min(a + b, INT64_MAX) for a, b in zip(self.tokens, group.tokens, strict=True)
        ]
        self.first = group.first if self.first is None else min(self.first, group.first)
        if self.last is None or group.last >= self.last:
            self.last = group.last
            self.pattern = price.pattern if price else ""
        if price is not None:
            self.priceable = min(self.priceable + group.requests, INT64_MAX)


def list_unpriced(
    groups: Sequence[Group], table: PriceTable, *, by_day: bool, limit: int
) -> usage_pb2.ListUnpricedResponse:
    """The groups per model and provider (and day), most requests first, at most ``limit``."""
    listed: dict[tuple[str, str, str], _Listed] = defaultdict(_Listed)
    for group in groups:
        key = (group.model, group.provider, group.day.isoformat() if by_day else "")
        listed[key].add(group, table.lookup(group.model, group.provider, group.day))
    order = sorted(listed.items(), key=lambda kv: (-kv[1].requests, kv[0]))
    response = usage_pb2.ListUnpricedResponse(
        unpriced_requests=min(sum(g.requests for g in groups), INT64_MAX),
        priceable_requests=min(sum(v.priceable for v in listed.values()), INT64_MAX),
        more_rows=max(len(order) - limit, 0),
    )
    for (model, provider, day), usage in order[:limit]:
        assert usage.first is not None
        assert usage.last is not None
        response.rows.add(
            model=model,
            provider=provider,
            day=day,
            requests=usage.requests,
            tokens=events_pb2.TokenUsage(
                input=usage.tokens[0],
                output=usage.tokens[1],
                cached_read=usage.tokens[2],
                cache_write=usage.tokens[3],
                reasoning=usage.tokens[4],
            ),
            first_seen=stamp(usage.first),
            last_seen=stamp(usage.last),
            priceable_requests=usage.priceable,
            price_pattern=usage.pattern,
        )
    return response


# --- Recost --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecostQuery:
    """A validated Recost request."""

    start: datetime
    end: datetime
    model_pattern: str
    dry_run: bool
    max_rows: int

    @property
    def target(self) -> str:
        """The audit entry's target."""
        where = f"ledger/{self.start.isoformat()}..{self.end.isoformat()}"
        return f"{where}/{self.model_pattern}" if self.model_pattern else where


@dataclass
class Plan:
    """The unpriced groups a price now covers (with that price), and the rows none covers."""

    priced: list[tuple[Group, PriceRow]]
    still_unpriced: int

    def arrays(self) -> list[list[Any]]:
        """The priced groups as the bind arrays of CANDIDATES ($3..$11)."""
        columns: list[list[Any]] = [[] for _ in range(9)]
        for group, price in self.priced:
            values = (
                group.model,
                group.provider,
                group.day_start,
                price.input,
                price.output,
                price.input if price.cached_read is None else price.cached_read,
                price.input if price.cache_write is None else price.cache_write,
                price.output if price.reasoning is None else price.reasoning,
                price.pattern,
            )
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        return columns


def recost_query(request: usage_pb2.RecostRequest, start: datetime, end: datetime) -> RecostQuery:
    """The validated request over [start, end); INVALID_ARGUMENT names the bad field."""
    if end - start > timedelta(days=MAX_RECOST_DAYS):
        raise InvalidArgumentError(
            f"{start.isoformat()}..{end.isoformat()} is longer than {MAX_RECOST_DAYS} days; "
            "re-cost it in parts",
            field="window",
        )
    pattern = request.model_pattern
    if pattern:
        validate_pattern(pattern, "model_pattern")
    rows = bounds.integer(request.max_rows, "max_rows", 0, MAX_ROWS)
    return RecostQuery(start, end, pattern, request.dry_run, rows or DEFAULT_MAX_ROWS)


def list_limit(value: int) -> int:
    """The rows of a ListUnpriced answer; INVALID_ARGUMENT naming ``limit`` outside 0..MAX."""
    return bounds.integer(value, "limit", 0, MAX_LIMIT) or DEFAULT_LIMIT


def matches(pattern: str, model: str, provider: str) -> bool:
    """Whether the glob ``pattern`` matches ``model`` or ``provider/model``, as a price's does."""
    return not pattern or PriceRow(pattern, date.min, 0, 0).matches(model, provider)


def plan(groups: Iterable[Group], table: PriceTable, pattern: str) -> Plan:
    """Which groups matching ``pattern`` a price in ``table`` now covers on their day."""
    result = Plan([], 0)
    for group in groups:
        if not matches(pattern, group.model, group.provider):
            continue
        price = table.lookup(group.model, group.provider, group.day)
        if price is None:
            result.still_unpriced = min(result.still_unpriced + group.requests, INT64_MAX)
        else:
            result.priced.append((group, price))
    return result


#: A ledger row's cost at its group's price: exact, rounded half up once (PriceRow.cost_micros).
_NEW_COST = (
    "div(l.input_tokens::numeric * g.pi + l.output_tokens::numeric * g.po "
    "+ l.cached_read_tokens::numeric * g.pcr + l.cache_write_tokens::numeric * g.pcw "
    "+ l.reasoning_tokens::numeric * g.pr + 500000, 1000000)::bigint"
)
#: The unpriced rows of [$1, $2) in the priced groups ($3..$11), with their new cost.
CANDIDATES = (
    "SELECT l.occurred_at, l.event_id, l.model, l.provider, l.cost_micros AS old, "
    f"{_NEW_COST} AS cost, g.pattern "
    "FROM ledger l JOIN unnest($3::text[], $4::text[], $5::timestamptz[], $6::bigint[], "
    "$7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::text[]) "
    "AS g(model, provider, day, pi, po, pcr, pcw, pr, pattern) "
    "ON l.model = g.model AND l.provider = g.provider "
    "AND l.occurred_at >= g.day AND l.occurred_at < g.day + interval '24 hours' "
    f"WHERE l.cost_source = {UNPRICED} AND l.occurred_at >= $1 AND l.occurred_at < $2"
)
#: What re-pricing every candidate would add, per model, provider and price.
DRY_RUN = (
    "SELECT model, provider, pattern, count(*), sum(cost - old) "
    f"FROM ({CANDIDATES}) c GROUP BY 1, 2, 3"
)
MORE = f"SELECT EXISTS ({CANDIDATES} LIMIT 1)"


def _cost_rollup(table: str, keys: Sequence[str], where: str = "") -> str:
    """Adds the ``fine`` CTE's cost deltas to ``table``, re-summed to ``keys``, in key order."""
    exprs = ["date_trunc('day', hour, 'UTC')" if k == "day" else k for k in keys]
    positions = ", ".join(str(i) for i in range(1, len(keys) + 1))
    added = saturating_add("r.cost_micros", "EXCLUDED.cost_micros")
    return (
        f"INSERT INTO {table} AS r ({', '.join(keys)}, cost_micros) "
        f"SELECT {', '.join(exprs)}, sum(cost)::bigint FROM fine {where} "
        f"GROUP BY {positions} ORDER BY {positions} "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET cost_micros = {added}"
    )


_ROLLUPS = {  # the tables and order of ingest's statement (ingest._rollups)
    "h": _cost_rollup("rollup_hourly", ["hour", *DIMS]),
    "d": _cost_rollup("rollup_daily", ["day", *DIMS]),
    "s": _cost_rollup(
        "rollup_session_hourly", ["session_id", "hour", *DIMS], "WHERE session_id <> ''"
    ),
    "hm": _cost_rollup("rollup_hourly_model", ["hour", *DIMS[:2]]),
    "dm": _cost_rollup("rollup_daily_model", ["day", *DIMS[:2]]),
}
#: Re-prices at most $12 candidates (oldest first) and adds the difference to the rollups;
#: returns the rows re-priced with the cost each gained.
APPLY = (
    f"WITH t AS ({CANDIDATES} ORDER BY l.occurred_at, l.event_id LIMIT $12), "
    f"upd AS (UPDATE ledger l SET cost_micros = t.cost, cost_source = {PRICED} FROM t "
    "WHERE l.occurred_at = t.occurred_at AND l.event_id = t.event_id "
    f"AND l.cost_source = {UNPRICED} "
    "RETURNING l.occurred_at, l.event_id, l.model, l.provider, l.project, l.session_id, "
    "l.user_id, t.cost - t.old AS cost, t.pattern), "
    "fine AS MATERIALIZED (SELECT session_id, date_trunc('hour', occurred_at, 'UTC') AS hour, "
    f"{', '.join(DIMS)}, sum(cost) AS cost FROM upd GROUP BY 1, 2, 3, 4, 5, 6), "
    + ", ".join(f"{name} AS ({statement})" for name, statement in _ROLLUPS.items())
    + " SELECT occurred_at, event_id, model, provider, project, session_id, user_id, cost, "
    "pattern FROM upd"
)
LOCK_SESSIONS = (
    "SELECT session_id FROM sessions WHERE session_id = ANY($1::text[]) "
    "ORDER BY session_id FOR UPDATE"
)
ADD_TO_SESSIONS = (
    f"UPDATE sessions s SET cost_micros = {saturating_add('s.cost_micros', 'd.cost')} "
    "FROM unnest($1::text[], $2::bigint[]) AS d(session_id, cost) "
    "WHERE s.session_id = d.session_id"
)


class _Totals:
    """Rows and micro-dollars per model and provider, with the price patterns used."""

    def __init__(self) -> None:
        self.by_model: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self.patterns: dict[tuple[str, str], set[str]] = defaultdict(set)

    def add(self, model: str, provider: str, pattern: str, rows: int, micros: int) -> None:
        acc = self.by_model[(model, provider)]
        acc[0] = min(acc[0] + rows, INT64_MAX)
        acc[1] = min(acc[1] + micros, INT64_MAX)
        self.patterns[(model, provider)].add(pattern)

    def fill(self, response: usage_pb2.RecostResponse) -> None:
        for (model, provider), (rows, micros) in sorted(self.by_model.items()):
            response.models.add(
                model=model,
                provider=provider,
                rows=rows,
                micros_added=micros,
                price_patterns=sorted(self.patterns[(model, provider)]),
            )
        response.rows_recosted = min(sum(m.rows for m in response.models), INT64_MAX)
        response.micros_added = min(sum(m.micros_added for m in response.models), INT64_MAX)


def _args(query: RecostQuery, chosen: Plan) -> list[Any]:
    return [query.start, query.end, *chosen.arrays()]


async def dry_run(conn: asyncpg.Connection, query: RecostQuery, chosen: Plan) -> _Totals:
    """What re-pricing every candidate of ``chosen`` would add (nothing is changed)."""
    totals = _Totals()
    if chosen.priced:
        for rec in await conn.fetch(DRY_RUN, *_args(query, chosen)):
            totals.add(rec[0], rec[1], rec[2], _clamp(rec[3]), _clamp(rec[4]))
    return totals


@counters.again_after_deadlock
async def run(
    pool: asyncpg.Pool, query: RecostQuery
) -> tuple[usage_pb2.RecostResponse, list[asyncpg.Record]]:
    """Re-price at most ``query.max_rows`` rows and all that counted them, in one transaction.

    The audit entry is written in that transaction. Returns the response and the rows re-priced
    (a dry run: none, nothing changed).
    """
    response = usage_pb2.RecostResponse(
        start=stamp(query.start), end=stamp(query.end), dry_run=query.dry_run
    )
    async with pool.acquire() as conn, conn.transaction():
        chosen = plan(
            await unpriced_groups(conn, query.start, query.end),
            await PriceTable.load(conn),
            query.model_pattern,
        )
        response.rows_still_unpriced = chosen.still_unpriced
        if query.dry_run:
            (await dry_run(conn, query, chosen)).fill(response)
            return response, []
        if not chosen.priced:
            return response, []
        rows = await conn.fetch(APPLY, *_args(query, chosen), query.max_rows)
        totals = _Totals()
        for rec in rows:
            totals.add(rec["model"], rec["provider"], rec["pattern"], 1, rec["cost"])
        totals.fill(response)
        # Rows another Recost holds still count as left: their change is not committed yet.
        response.more = bool(await conn.fetchval(MORE, *_args(query, chosen)))
        if rows:
            await _add_to_sessions(conn, rows)
            await _add_to_counters(conn, rows)
            response.audit_entry_id = await audit.record(
                conn,
                action=ACTION,
                target=query.target,
                before=None,
                after=_audited(query, response),
            )
        return response, rows


def _audited(query: RecostQuery, response: usage_pb2.RecostResponse) -> dict[str, Any]:
    """The audit entry's ``after``: the window, the pattern and what changed."""
    return {
        "start": query.start.isoformat(),
        "end": query.end.isoformat(),
        "model_pattern": query.model_pattern,
        "rows_recosted": response.rows_recosted,
        "micros_added": response.micros_added,
        "more": response.more,
        "models": [
            {
                "model": m.model,
                "provider": m.provider,
                "rows": m.rows,
                "micros_added": m.micros_added,
                "price_patterns": list(m.price_patterns),
            }
            for m in response.models
        ],
    }


async def _add_to_sessions(conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> None:
    """Add each re-priced row's cost to its session, locking them in ingest's order."""
    added: dict[str, int] = defaultdict(int)
    for rec in rows:
        if rec["session_id"]:
            added[rec["session_id"]] += rec["cost"]
    ids = sorted(sid for sid, cost in added.items() if cost)
    if ids:
        await conn.fetch(LOCK_SESSIONS, ids)
        await conn.execute(ADD_TO_SESSIONS, ids, [added[sid] for sid in ids])


async def _add_to_counters(conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> None:
    """Add each re-priced row's cost to the counter of every budget window it falls in."""
    counted = await counters.ingest_budgets(conn)
    if not counted:
        return
    deltas: dict[counters.Key, list[int]] = {}
    spend_deltas([_cost_only(rec) for rec in rows], counted, deltas)
    await counters.add_to_counters(conn, deltas, saturate=True)


def _cost_only(rec: asyncpg.Record) -> LedgerRow:
    """A ledger row carrying only what a re-priced row adds: its cost (no tokens)."""
    event_id: uuid.UUID = rec["event_id"]
    return LedgerRow(
        rec["occurred_at"],
        str(event_id),
        rec["model"],
        rec["provider"],
        rec["project"],
        rec["session_id"],
        rec["user_id"],
        "",
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        rec["cost"],
        PRICED,
        0,
        0,
        0,
        "",
    )


def record_metrics(rows: Sequence[asyncpg.Record]) -> None:
    """Add the re-priced cost to the cost counter, per model."""
    added: dict[str, int] = defaultdict(int)
    for rec in rows:
        added[rec["model"]] += rec["cost"]
    for model, micros in added.items():
        if micros:
            metrics.COST.labels(metrics.model_label(model)).inc(micros / 1_000_000)


UNPRICED_RECENTLY = (
    "SELECT count(*), count(DISTINCT (model, provider)) FROM ledger "
    f"WHERE cost_source = {UNPRICED} AND occurred_at >= $1"
)


async def refresh_gauges(pool: asyncpg.Pool, now: datetime) -> None:
    """Set the unpriced gauges from the ledger's last GAUGE_DAYS days."""
    rec = await pool.fetchrow(UNPRICED_RECENTLY, now - timedelta(days=GAUGE_DAYS))
    assert rec is not None
    metrics.UNPRICED_RECENT.set(rec[0])
    metrics.UNPRICED_MODELS.set(rec[1])
