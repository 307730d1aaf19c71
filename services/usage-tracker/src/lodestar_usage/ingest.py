"""Writing RequestCompleted events into the ledger, exactly once, with their rollups.

A single writer task takes events from many concurrent handler calls and commits them in
batches: one transaction inserts the ledger rows (``ON CONFLICT DO NOTHING`` on the event) and
adds only the rows that were really inserted to the rollups (both grains: per model, provider,
project and user, and per model and provider only) and sessions. Each handler call
returns (and so its delivery is acked) only after that transaction committed. While the database
is unreachable the batch is retried, never nacked, so an outage cannot dead-letter events.
"""

# SQL here is assembled from constant identifiers only; every value is a bind parameter.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import contextlib
import functools
import operator
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import asyncpg
from opentelemetry import context as otel_context
from opentelemetry import trace

from lodestar.common import bounds as event_bounds
from lodestar.common.errors import DATABASE_UNREACHABLE, InvalidArgumentError, StorageError
from lodestar.common.events import uuid7_millis
from lodestar.common.logging import get_logger
from lodestar.common.telemetry import telemetry_enabled, tracer
from lodestar.events.v1 import event_pb2
from lodestar.usage.v1 import events_pb2, usage_pb2
from lodestar_usage import budgets, counters, metrics
from lodestar_usage.bounds import (
    EARLIEST_SECONDS,
    LATEST_SECONDS,
    WINDOW_TEXT,
    plain_add,
    saturating_add,
)
from lodestar_usage.pricing import PriceTable, cost_request
from lodestar_usage.settings import PricingSettings

log = get_logger(__name__)

TOKEN_KINDS = ("input", "output", "cached_read", "cache_write", "reasoning")
ERROR = events_pb2.REQUEST_STATUS_ERROR
UNPRICED = usage_pb2.COST_SOURCE_UNPRICED
MAX_TEXT = event_bounds.MAX_LABEL_CHARS
MAX_NANOS = event_bounds.MAX_NANOS
RETRYABLE: tuple[type[BaseException], ...] = (*DATABASE_UNREACHABLE, StorageError)
#: The span a ledger transaction (and so its SQL statements) runs under.
WRITE_SPAN = "lodestar.ingest.write"
_TRACER = tracer("lodestar.usage")


class LedgerRow(NamedTuple):
    """One ledger row, ready to insert: the fields are the ledger's columns, in order."""

    occurred_at: datetime
    event_id: str  # canonical (lower-case) UUID text
    model: str
    provider: str
    project: str
    session_id: str
    user_id: str
    task_id: str
    attempt: int
    status: int
    duration_ms: int
    input: int
    output: int
    cached_read: int
    cache_write: int
    reasoning: int
    cost_micros: int
    cost_source: int
    compute_cost_micros: int
    shadow_cost_micros: int
    savings_micros: int
    reservation_id: str

    @property
    def tokens(self) -> int:
        """All tokens of every kind."""
        return self.input + self.output + self.cached_read + self.cache_write + self.reasoning


LEDGER_COLUMNS = [
    ("occurred_at", "timestamptz"),
    ("event_id", "uuid"),
    ("model", "text"),
    ("provider", "text"),
    ("project", "text"),
    ("session_id", "text"),
    ("user_id", "text"),
    ("task_id", "text"),
    ("attempt", "integer"),
    ("status", "smallint"),
    ("duration_ms", "bigint"),
    ("input_tokens", "bigint"),
    ("output_tokens", "bigint"),
    ("cached_read_tokens", "bigint"),
    ("cache_write_tokens", "bigint"),
    ("reasoning_tokens", "bigint"),
    ("cost_micros", "bigint"),
    ("cost_source", "smallint"),
    ("compute_cost_micros", "bigint"),
    ("shadow_cost_micros", "bigint"),
    ("savings_micros", "bigint"),
    ("reservation_id", "text"),
]


def _unnest(columns: Sequence[tuple[str, str]]) -> tuple[str, str]:
    names = ", ".join(c for c, _ in columns)
    arrays = ", ".join(f"${i}::{t}[]" for i, (_, t) in enumerate(columns, start=1))
    return names, arrays


LEDGER_COLUMN_NAMES = [name for name, _ in LEDGER_COLUMNS]
assert len(LEDGER_COLUMNS) == len(LedgerRow._fields)

#: Each writer connection's own staging table: rows are COPYed in, then moved into the ledger.
#: COPY costs a fraction of binding one array per column, on both sides of the connection.
STAGING = "ledger_incoming"
CREATE_STAGING = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGING} ("
    + ", ".join(f"{name} {kind}" for name, kind in LEDGER_COLUMNS)
    + ") ON COMMIT DELETE ROWS"
)
_names = ", ".join(LEDGER_COLUMN_NAMES)
#: Moves the staged rows into the ledger; fails on an event already there (see write_rows).
INSERT_NEW_LEDGER = f"INSERT INTO ledger ({_names}) SELECT {_names} FROM pg_temp.{STAGING}"
INSERT_LEDGER = f"{INSERT_NEW_LEDGER} ON CONFLICT DO NOTHING"

SUMS = [
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
]


DIMS = ["model", "provider", "project", "user_id"]


def _rollup(
    table: str, keys: Sequence[str], where: str = "", add: Callable[[str, str], str] = plain_add
) -> str:
    """An upsert of ``table`` from the ``fine`` CTE, re-summed to ``keys``.

    The ``fine`` CTE holds the inserted rows summed per session, hour and every dimension;
    ``day`` is derived from ``hour``.
    """
    exprs = ["date_trunc('day', hour, 'UTC')" if k == "day" else k for k in keys]
    positions = ", ".join(str(i) for i in range(1, len(keys) + 1))
    updates = ", ".join(f"{c} = {add(f'r.{c}', f'EXCLUDED.{c}')}" for c in SUMS)
    return (
        f"INSERT INTO {table} AS r ({', '.join([*keys, *SUMS])}) "
        f"SELECT {', '.join(exprs)}, {', '.join(f'sum({c})::bigint' for c in SUMS)} "
        f"FROM fine {where} GROUP BY {positions} ORDER BY {positions} "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
    )


_FINE_SUMS = ", ".join(
    [
        "count(*) AS requests",
        f"count(*) FILTER (WHERE status = {int(ERROR)}) AS errors",
        *(f"sum({c}) AS {c}" for c in SUMS[2:]),
    ]
)


def _rollups(add: Callable[[str, str], str]) -> dict[str, str]:
    return {
        "h": _rollup("rollup_hourly", ["hour", *DIMS], add=add),
        "d": _rollup("rollup_daily", ["day", *DIMS], add=add),
        "s": _rollup(
            "rollup_session_hourly", ["session_id", "hour", *DIMS], "WHERE session_id <> ''", add
        ),
        "hm": _rollup("rollup_hourly_model", ["hour", *DIMS[:2]], add=add),
        "dm": _rollup("rollup_daily_model", ["day", *DIMS[:2]], add=add),
    }


def _with_rollups(insert: str, add: Callable[[str, str], str] = plain_add) -> str:
    """``insert`` (RETURNING the rows it inserted), then the rollups of exactly those rows.

    The rollups at every grain — hourly, daily, per session, and per model only — are all
    re-summed from one aggregation. Returns NULL when all ``$1`` staged rows were new, else the
    new event ids.
    """
    return (
        f"WITH ins AS ({insert} RETURNING *), "
        "fine AS MATERIALIZED (SELECT session_id, date_trunc('hour', occurred_at, 'UTC') AS hour, "
        f"{', '.join(DIMS)}, {_FINE_SUMS} FROM ins GROUP BY 1, 2, 3, 4, 5, 6), "
        + ", ".join(f"{name} AS ({statement})" for name, statement in _rollups(add).items())
        + " SELECT CASE WHEN count(*) = $1 THEN NULL "
        "ELSE coalesce(array_agg(event_id), '{}') END FROM ins"
    )


#: For staged rows none of which is in the ledger yet (the usual case; a plain insert is cheaper
#: than ON CONFLICT's speculative one), and for any staged rows (a redelivered event adds nothing).
INSERT_NEW_WITH_ROLLUPS = _with_rollups(INSERT_NEW_LEDGER)
INSERT_WITH_ROLLUPS = _with_rollups(INSERT_LEDGER)
SESSION_COLUMNS = [
    ("session_id", "text"),
    ("project", "text"),
    ("user_id", "text"),
    ("started_at", "timestamptz"),
    ("last_activity_at", "timestamptz"),
    ("last_model", "text"),
    ("requests", "bigint"),
    ("errors", "bigint"),
    ("input_tokens", "bigint"),
    ("output_tokens", "bigint"),
    ("cached_read_tokens", "bigint"),
    ("cache_write_tokens", "bigint"),
    ("reasoning_tokens", "bigint"),
    ("cost_micros", "bigint"),
    ("savings_micros", "bigint"),
    ("model_switches", "bigint"),
]
_snames, _sarrays = _unnest(SESSION_COLUMNS)
_ADDED = [c for c, _ in SESSION_COLUMNS[6:]]


def _upsert_sessions(add: Callable[[str, str], str]) -> str:
    return (
        f"INSERT INTO sessions AS s ({_snames}) SELECT * FROM unnest({_sarrays}) "
        "ON CONFLICT (session_id) DO UPDATE SET "
        "started_at = least(s.started_at, EXCLUDED.started_at), "
        "last_activity_at = greatest(s.last_activity_at, EXCLUDED.last_activity_at), "
        "last_model = EXCLUDED.last_model, closed = false, "
        + ", ".join(f"{c} = {add(f's.{c}', f'EXCLUDED.{c}')}" for c in _ADDED)
    )


UPSERT_SESSIONS = _upsert_sessions(plain_add)


class Written(NamedTuple):
    """What one ingest transaction wrote: the new rows, and how it changed the budget counters."""

    new: list[LedgerRow]
    #: ``[spent_micros, spent_tokens, held_micros, held_tokens]`` per counter key, as admission
    #: reads the counters: a settled hold whose lease had lapsed is not in it (it no longer
    #: counted); a key without a counter row changed nothing.
    counter_changes: dict[counters.Key, list[int]]


class WriteSql(NamedTuple):
    """The statements that write a batch: new rows, any rows, sessions."""

    insert_new: str
    insert: str
    sessions: str


#: The usual statements, and the same with sums that saturate at ±(2^63 - 1) instead of failing:
#: the writer retries a batch with these when a stored sum (a bad row) would overflow, so the
#: plain ones stay as cheap as before.
PLAIN_SQL = WriteSql(INSERT_NEW_WITH_ROLLUPS, INSERT_WITH_ROLLUPS, UPSERT_SESSIONS)
SATURATING_SQL = WriteSql(
    _with_rollups(INSERT_NEW_LEDGER, saturating_add),
    _with_rollups(INSERT_LEDGER, saturating_add),
    _upsert_sessions(saturating_add),
)

#: Settles the reservations the new rows name; per counter hold, the amounts it held and whether
#: its lease had lapsed (an active hold past its lease, which admission already reads as gone).
SETTLE = (
    "WITH s AS (UPDATE reservations r SET state = 'settled', finished_at = now() "
    "FROM reservations was WHERE was.id = ANY($1::uuid[]) AND r.id = was.id "
    "AND r.state IN ('active', 'committed') "
    "RETURNING r.id, r.amount_micros, r.amount_tokens, "
    "was.state = 'active' AND was.lease_expires_at <= now() AS lapsed) "
    "SELECT rb.budget_id, rb.scope_value, rb.window_start, s.amount_micros, s.amount_tokens, "
    "s.lapsed FROM s JOIN reservation_budgets rb ON rb.reservation_id = s.id "
    "WHERE rb.window_start IS NOT NULL"
)


class InvalidEvent(InvalidArgumentError):
    """A RequestCompleted that must not enter the ledger."""


CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@functools.lru_cache(maxsize=4096)
def _utc_second(seconds: int) -> datetime:
    """The UTC datetime of a Unix second (events arrive many per second)."""
    return datetime.fromtimestamp(seconds, UTC)


#: The event's free-text fields, in ledger column order (``user`` is the user_id column).
TEXT_FIELDS = ("model", "provider", "project", "session_id", "user", "task_id")


def row_from_event(
    envelope: event_pb2.Event,
    payload: events_pb2.RequestCompleted,
    prices: PriceTable,
    pricing: PricingSettings,
) -> LedgerRow:
    """Validate and cost one event; raises InvalidEvent naming the bad field."""
    event_id = envelope.id
    if not CANONICAL_UUID.fullmatch(event_id):
        try:
            event_id = str(uuid.UUID(event_id))
        except ValueError:
            raise InvalidEvent("not a UUID", field="id") from None
    try:  # the bounds core checks at the edge: a stored old event must not poison the ledger
        event_bounds.check_request_completed(payload)
    except event_bounds.BoundViolation as exc:
        raise InvalidEvent(exc.description, field=exc.field) from None
    tokens = payload.tokens
    counts = (tokens.input, tokens.output, tokens.cached_read, tokens.cache_write, tokens.reasoning)
    texts = (
        payload.model,
        payload.provider,
        payload.project,
        payload.session_id,
        payload.user,
        payload.task_id,
    )
    reservation_id = payload.reservation_id
    duration = payload.duration
    duration_ms = duration.seconds * 1000 + duration.nanos // 1_000_000
    occurred = _occurred(envelope, event_id)
    costing = cost_request(payload, occurred.date(), duration_ms, prices, pricing)
    return LedgerRow(
        occurred,
        event_id,
        *texts,
        payload.attempt,
        payload.status,
        duration_ms,
        *counts,
        *costing,
        reservation_id,
    )


def _occurred(envelope: event_pb2.Event, event_id: str) -> datetime:
    """When the event happened: its time, else its UUIDv7's; InvalidEvent outside the window."""
    stamp = envelope.time
    seconds, nanos = stamp.seconds, stamp.nanos
    if seconds or nanos:
        if not (EARLIEST_SECONDS <= seconds < LATEST_SECONDS and 0 <= nanos <= MAX_NANOS):
            raise InvalidEvent(
                f"must be within {WINDOW_TEXT} with nanos 0..{MAX_NANOS}; "
                f"got seconds {seconds}, nanos {nanos}",
                field="time",
            )
        return _utc_second(seconds).replace(microsecond=nanos // 1000)
    millis = uuid7_millis(uuid.UUID(event_id))
    if not EARLIEST_SECONDS * 1000 <= millis < LATEST_SECONDS * 1000:
        raise InvalidEvent(
            f"time unset, and the UUIDv7's time ({millis} ms since 1970) is outside {WINDOW_TEXT}",
            field="id",
        )
    return datetime.fromtimestamp(millis / 1000, UTC)


async def stage(conn: asyncpg.Connection, rows: Sequence[LedgerRow]) -> None:
    """Put ``rows`` in the connection's staging table; it empties when the transaction ends."""
    await conn.execute(CREATE_STAGING)
    await conn.copy_records_to_table(
        STAGING, records=rows, columns=LEDGER_COLUMN_NAMES, schema_name="pg_temp"
    )


async def write_rows(
    conn: asyncpg.Connection, rows: Sequence[LedgerRow], sql: WriteSql = PLAIN_SQL
) -> Written:
    """Insert ``rows`` and their rollups in the caller's transaction; what it wrote."""
    unique = list({row.event_id: row for row in rows}.values())
    if not unique:
        return Written([], {})
    await stage(conn, unique)
    try:
        async with conn.transaction():  # a savepoint: a duplicate undoes only this attempt
            inserted = await conn.fetchval(sql.insert_new, len(unique))
    except asyncpg.UniqueViolationError:
        inserted = await conn.fetchval(sql.insert, len(unique))
    if inserted is None:
        new = unique
    else:
        fresh = {str(event_id) for event_id in inserted}
        new = [row for row in unique if row.event_id in fresh]
    if not new:
        return Written([], {})
    with_session = [r for r in new if r.session_id]
    if with_session:
        await _update_sessions(conn, with_session, sql.sessions)
    settle = []
    for row in new:
        if row.reservation_id:
            with contextlib.suppress(ValueError):
                settle.append(uuid.UUID(row.reservation_id))
    deltas: dict[counters.Key, list[int]] = {}
    lapsed: list[asyncpg.Record] = []
    if settle:
        # A settled reservation stops holding; its spend is now in the ledger (below).
        for rec in await conn.fetch(SETTLE, sorted(settle)):
            acc = deltas.setdefault((rec[0], rec[1], rec[2]), [0, 0, 0, 0])
            acc[2] -= rec[3]
            acc[3] -= rec[4]
            if rec[5]:
                lapsed.append(rec)
    counted = await counters.ingest_budgets(conn)
    if counted:
        spend_deltas(new, counted, deltas)
    await counters.add_to_counters(conn, deltas, saturate=sql is SATURATING_SQL)
    return Written(new, _as_read(deltas, lapsed))


def _as_read(
    deltas: dict[counters.Key, list[int]], lapsed: Sequence[asyncpg.Record]
) -> dict[counters.Key, list[int]]:
    """``deltas`` as admission reads the counters: without the holds whose lease had lapsed."""
    if not lapsed:
        return deltas
    changes = {key: list(delta) for key, delta in deltas.items()}
    for rec in lapsed:
        change = changes[(rec[0], rec[1], rec[2])]
        change[2] += rec[3]
        change[3] += rec[4]
    return changes


def spend_deltas(
    rows: Sequence[LedgerRow],
    counted: Sequence[budgets.BudgetDef],
    deltas: dict[counters.Key, list[int]],
) -> None:
    """Add each row's cost and tokens to the counter of every budget window it falls in."""
    windows: dict[tuple[uuid.UUID, datetime], datetime] = {}
    for row in rows:
        # Calendar periods start on whole quarter hours in every timezone.
        quarter = row.occurred_at.replace(
            minute=row.occurred_at.minute // 15 * 15, second=0, microsecond=0
        )
        for budget in counted:
            value = budget.value_for(row.project, row.user_id, row.session_id)
            if value is None:
                continue
            start = windows.get((budget.id, quarter))
            if start is None:
                start = windows[(budget.id, quarter)] = budget.window(quarter)[0]
            acc = deltas.setdefault((budget.id, value, start), [0, 0, 0, 0])
            acc[0] += row.cost_micros
            acc[1] += row.tokens


#: Positions of LedgerRow fields, for summing whole columns of a group of rows at once.
_AT = {name: index for index, name in enumerate(LedgerRow._fields)}
_BY_TIME = operator.itemgetter(_AT["occurred_at"], _AT["event_id"])


def _group(rows: Sequence[LedgerRow], field: str) -> dict[str, list[LedgerRow]]:
    groups: dict[str, list[LedgerRow]] = defaultdict(list)
    key = operator.attrgetter(field)
    for row in rows:
        groups[key(row)].append(row)
    return groups


def _sums(columns: Sequence[Sequence[int]], *fields: str) -> list[int]:
    return [sum(columns[_AT[field]]) for field in fields]


async def _update_sessions(
    conn: asyncpg.Connection, rows: Sequence[LedgerRow], upsert: str = UPSERT_SESSIONS
) -> None:
    by_session = _group(rows, "session_id")
    ids = sorted(by_session)
    existing = {
        rec["session_id"]: rec
        for rec in await conn.fetch(
            "SELECT session_id, last_activity_at, last_model FROM sessions "
            "WHERE session_id = ANY($1::text[]) ORDER BY session_id FOR UPDATE",
            ids,
        )
    }
    values: list[list[object]] = [[] for _ in SESSION_COLUMNS]
    for sid in ids:
        group = sorted(by_session[sid], key=_BY_TIME)
        columns = list(zip(*group, strict=True))
        models = columns[_AT["model"]]
        switches = sum(map(operator.ne, models, models[1:]))
        last_model = models[-1]
        known = existing.get(sid)
        if known is not None:
            if (
                group[0].occurred_at >= known["last_activity_at"]
                and models[0] != known["last_model"]
            ):
                switches += 1
            if group[-1].occurred_at < known["last_activity_at"]:
                last_model = known["last_model"]
        metrics.MODEL_SWITCHES.inc(switches)
        first = group[0]
        row_values: list[object] = [
            sid,
            first.project,
            first.user_id,
            first.occurred_at,
            group[-1].occurred_at,
            last_model,
            len(group),
            columns[_AT["status"]].count(ERROR),
            *_sums(columns, *TOKEN_KINDS, "cost_micros", "savings_micros"),
            switches,
        ]
        for column, value in zip(values, row_values, strict=True):
            column.append(value)
    await conn.execute(upsert, *values)


def record_metrics(rows: Sequence[LedgerRow]) -> None:
    """Count newly recorded rows in the Prometheus metrics (aggregated per model)."""
    for model, group in _group(rows, "model").items():
        columns = list(zip(*group, strict=True))
        label = metrics.model_label(model)
        metrics.REQUESTS.labels(label).inc(len(group))
        errors = columns[_AT["status"]].count(ERROR)
        if errors:
            metrics.ERRORS.labels(label).inc(errors)
        metrics.COST.labels(label).inc(sum(columns[_AT["cost_micros"]]) / 1_000_000)
        unpriced = columns[_AT["cost_source"]].count(UNPRICED)
        if unpriced:
            metrics.UNPRICED.labels(label).inc(unpriced)
        for kind, tokens in zip(TOKEN_KINDS, _sums(columns, *TOKEN_KINDS), strict=True):
            if tokens:
                metrics.TOKENS.labels(label, kind).inc(tokens)
    metrics.INGESTED.inc(len(rows))


@dataclass
class _Pending:
    rows: Sequence[LedgerRow]
    done: asyncio.Future[None]
    submitter: trace.SpanContext = trace.INVALID_SPAN_CONTEXT


def _write_span(
    batch: Sequence[_Pending], events: int
) -> contextlib.AbstractContextManager[object]:
    """The span one ledger transaction runs under, tied to the handler spans that submitted it.

    It links to every submitter's span; when they are all of one trace (one traced delivery,
    the common case when the tracker is not busy) it is also a child of the first, so the
    transaction's SQL statements are in that trace: publisher → core → handler → write → SQL.
    """
    if not telemetry_enabled():
        return contextlib.nullcontext()
    submitters = [p.submitter for p in batch if p.submitter.is_valid]
    traces = {submitter.trace_id for submitter in submitters}
    parent = otel_context.Context()
    if len(traces) == 1:
        parent = trace.set_span_in_context(trace.NonRecordingSpan(submitters[0]), parent)
    return _TRACER.start_as_current_span(
        WRITE_SPAN,
        context=parent,
        links=[trace.Link(submitter) for submitter in submitters],
        attributes={"lodestar.ingest.events": events},
    )


class LedgerWriter:
    """Commits rows submitted by concurrent handlers in batches, one transaction each.

    ``on_counters`` is told, as soon as each transaction committed, how it changed the budget
    counters as admission reads them (``Written.counter_changes``); not after a batch written
    with saturating sums, which are not plain additions.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_batch: int,
        linger_seconds: float,
        on_counters: Callable[[dict[counters.Key, list[int]]], None] | None = None,
    ) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._linger = linger_seconds
        self._pending: list[_Pending] = []
        self._pending_rows = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_counters = on_counters
        self.last_error = ""

    def start(self) -> None:
        """Start the writer task."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def stop(self) -> None:
        """Stop; rows not yet committed fail (their deliveries stay unacked)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for pending in self._pending:
            if not pending.done.done():
                pending.done.set_exception(StorageError("usage-tracker is stopping"))
        self._pending.clear()
        self._pending_rows = 0

    async def submit(self, rows: Sequence[LedgerRow]) -> None:
        """Wait until ``rows`` are committed (rows already in the ledger are left as they are)."""
        if not rows:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        submitter = trace.get_current_span().get_span_context()
        self._pending.append(_Pending(rows, done, submitter))
        self._pending_rows += len(rows)
        self._wake.set()
        await done

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if self._pending_rows < self._max_batch and self._linger:
                await asyncio.sleep(self._linger)
            batch = self._take_batch()
            if not self._pending:
                self._wake.clear()
            if batch:
                await self._commit(batch)

    def _take_batch(self) -> list[_Pending]:
        """Whole submissions from the front, up to ``max_batch`` rows (at least one)."""
        taken, rows = 0, 0
        for pending in self._pending:
            if taken and rows + len(pending.rows) > self._max_batch:
                break
            taken += 1
            rows += len(pending.rows)
        batch = self._pending[:taken]
        del self._pending[:taken]
        self._pending_rows -= rows
        return batch

    @staticmethod
    def _refuse(batch: list[_Pending], exc: Exception) -> None:
        """Fail every submission of ``batch`` with ``exc`` (their deliveries are nacked)."""
        log.error("ledger write refused", error=str(exc), events=sum(len(p.rows) for p in batch))
        for pending in batch:
            if not pending.done.done():
                pending.done.set_exception(exc)

    def _report_counters(self, changes: dict[counters.Key, list[int]]) -> None:
        """Tell ``on_counters``; a failure there is logged, never taken for the write's."""
        if self._on_counters is None or not changes:
            return
        try:
            self._on_counters(changes)
        except Exception as exc:
            log.exception("counter changes not taken in", error=str(exc))

    async def _commit(self, batch: list[_Pending]) -> None:
        rows = [row for pending in batch for row in pending.rows]
        with _write_span(batch, len(rows)):
            await self._write(batch, rows)

    async def _write(self, batch: list[_Pending], rows: list[LedgerRow]) -> None:
        backoff = 0.05
        sql = PLAIN_SQL
        while True:
            started = time.perf_counter()
            try:
                async with self._pool.acquire() as conn:
                    async with conn.transaction():
                        written = await write_rows(conn, rows, sql)
                    if sql is PLAIN_SQL:  # before the connection's reset: one round trip sooner
                        self._report_counters(written.counter_changes)
            except asyncpg.NumericValueOutOfRangeError as exc:
                if sql is SATURATING_SQL:
                    self._refuse(batch, exc)
                    return
                # A stored rollup or session sum near int64 (a bad row): write with sums that
                # stay at the limit rather than fail this batch and every later one of the group.
                log.error("a stored sum would overflow int64; saturating", error=str(exc))
                sql = SATURATING_SQL
                continue
            except RETRYABLE as exc:
                self.last_error = f"database: {exc}"
                log.warning("ledger write failed; retrying", error=str(exc), events=len(rows))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except Exception as exc:
                self._refuse(batch, exc)
                return
            break
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        self.last_error = ""
        metrics.DUPLICATES.inc(len(rows) - len(written.new))
        record_metrics(written.new)
        for pending in batch:
            if not pending.done.done():
                pending.done.set_result(None)


async def ensure_partitions(pool: asyncpg.Pool, first: datetime, last: datetime) -> list[str]:
    """Create the daily ledger partitions for [first, last] (UTC days) that do not exist."""
    created = []
    day = first.replace(hour=0, minute=0, second=0, microsecond=0)
    while day <= last:
        name = f"ledger_p{day:%Y%m%d}"
        nxt = day + timedelta(days=1)
        async with pool.acquire() as conn:
            exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
            if not exists:
                try:
                    await conn.execute(
                        f"CREATE TABLE {name} PARTITION OF ledger "
                        f"FOR VALUES FROM ('{day.isoformat()}') TO ('{nxt.isoformat()}')"
                    )
                    created.append(name)
                except asyncpg.PostgresError as exc:  # e.g. rows for that day in the default
                    log.warning("cannot create ledger partition", partition=name, error=str(exc))
        day = nxt
    return created
