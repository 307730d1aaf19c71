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
import itertools
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from lodestar.common.errors import DATABASE_UNREACHABLE, InvalidArgumentError, StorageError
from lodestar.common.events import uuid7_millis
from lodestar.common.logging import get_logger
from lodestar.events.v1 import event_pb2
from lodestar.usage.v1 import events_pb2
from lodestar_usage import budgets, metrics
from lodestar_usage.pricing import PriceTable, cost_request
from lodestar_usage.settings import PricingSettings

log = get_logger(__name__)

TOKEN_KINDS = ("input", "output", "cached_read", "cache_write", "reasoning")
ERROR = events_pb2.REQUEST_STATUS_ERROR
MAX_TEXT = 512
RETRYABLE: tuple[type[BaseException], ...] = (*DATABASE_UNREACHABLE, StorageError)


@dataclass(frozen=True)
class LedgerRow:
    """One ledger row, ready to insert."""

    occurred_at: datetime
    event_id: uuid.UUID
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
    def hour(self) -> datetime:
        return self.occurred_at.replace(minute=0, second=0, microsecond=0)

    @property
    def day(self) -> datetime:
        return self.occurred_at.replace(hour=0, minute=0, second=0, microsecond=0)

    @property
    def tokens(self) -> int:
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


_names, _arrays = _unnest(LEDGER_COLUMNS)
INSERT_LEDGER = (
    f"INSERT INTO ledger ({_names}) SELECT * FROM unnest({_arrays}) "
    "ON CONFLICT DO NOTHING RETURNING event_id"
)

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


DIMS = [("model", "text"), ("provider", "text"), ("project", "text"), ("user_id", "text")]


def _rollup_from_inserted(table: str, keys: Sequence[tuple[str, str]], where: str = "") -> str:
    """An upsert of ``table`` aggregated in SQL from the ``ins`` CTE (the rows really inserted)."""
    names = [k for k, _ in keys]
    exprs = [
        "date_trunc('hour', occurred_at, 'UTC')"
        if k == "hour"
        else "date_trunc('day', occurred_at, 'UTC')"
        if k == "day"
        else k
        for k in names
    ]
    sums = [
        "count(*)",
        f"count(*) FILTER (WHERE status = {int(ERROR)})",
        *(f"sum({c})::bigint" for c in SUMS[2:]),
    ]
    positions = ", ".join(str(i) for i in range(1, len(names) + 1))
    updates = ", ".join(f"{c} = r.{c} + EXCLUDED.{c}" for c in SUMS)
    return (
        f"INSERT INTO {table} AS r ({', '.join(names + SUMS)}) "
        f"SELECT {', '.join(exprs + sums)} FROM ins {where} "
        f"GROUP BY {positions} ORDER BY {positions} "
        f"ON CONFLICT ({', '.join(names)}) DO UPDATE SET {updates}"
    )


#: The coarse grain: per hour or day, model and provider only (no project, no user).
MODEL_DIMS = DIMS[:2]

#: One statement: the ledger rows, and the hourly, daily and per-session rollups (and the coarse
#: per-model hourly and daily ones) of exactly the rows that were inserted (a redelivered event
#: adds nothing), aggregated by Postgres.
_HOURLY = _rollup_from_inserted("rollup_hourly", [("hour", ""), *DIMS])
_DAILY = _rollup_from_inserted("rollup_daily", [("day", ""), *DIMS])
_SESSION = _rollup_from_inserted(
    "rollup_session_hourly", [("session_id", ""), ("hour", ""), *DIMS], "WHERE session_id <> ''"
)
_HOURLY_MODEL = _rollup_from_inserted("rollup_hourly_model", [("hour", ""), *MODEL_DIMS])
_DAILY_MODEL = _rollup_from_inserted("rollup_daily_model", [("day", ""), *MODEL_DIMS])
_RETURNED = ", ".join(c for c, _ in LEDGER_COLUMNS)
INSERT_WITH_ROLLUPS = (
    f"WITH ins AS ({INSERT_LEDGER.removesuffix('RETURNING event_id')}RETURNING {_RETURNED}), "
    f"h AS ({_HOURLY}), d AS ({_DAILY}), s AS ({_SESSION}), "
    f"hm AS ({_HOURLY_MODEL}), dm AS ({_DAILY_MODEL}) "
    "SELECT event_id FROM ins"
)
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
UPSERT_SESSIONS = (
    f"INSERT INTO sessions AS s ({_snames}) SELECT * FROM unnest({_sarrays}) "
    "ON CONFLICT (session_id) DO UPDATE SET "
    "started_at = least(s.started_at, EXCLUDED.started_at), "
    "last_activity_at = greatest(s.last_activity_at, EXCLUDED.last_activity_at), "
    "last_model = EXCLUDED.last_model, closed = false, "
    + ", ".join(f"{c} = s.{c} + EXCLUDED.{c}" for c in _ADDED)
)

SETTLE = (
    "WITH s AS (UPDATE reservations SET state = 'settled', finished_at = now() "
    "WHERE id = ANY($1::uuid[]) AND state IN ('active', 'committed') "
    "RETURNING id, amount_micros, amount_tokens) "
    "SELECT rb.budget_id, rb.scope_value, rb.window_start, s.amount_micros, s.amount_tokens "
    "FROM s JOIN reservation_budgets rb ON rb.reservation_id = s.id "
    "WHERE rb.window_start IS NOT NULL"
)


class InvalidEvent(InvalidArgumentError):
    """A RequestCompleted that must not enter the ledger."""


def _text(value: str, field: str) -> str:
    if len(value) > MAX_TEXT:
        raise InvalidEvent(f"at most {MAX_TEXT} characters", field=field)
    return value


def row_from_event(
    envelope: event_pb2.Event,
    payload: events_pb2.RequestCompleted,
    prices: PriceTable,
    pricing: PricingSettings,
) -> LedgerRow:
    """Validate and cost one event; raises InvalidEvent naming the bad field."""
    try:
        event_id = uuid.UUID(envelope.id)
    except ValueError:
        raise InvalidEvent("not a UUID", field="id") from None
    tokens = payload.tokens
    counts = (tokens.input, tokens.output, tokens.cached_read, tokens.cache_write, tokens.reasoning)
    if min(counts) < 0:
        kind = TOKEN_KINDS[next(i for i, n in enumerate(counts) if n < 0)]
        raise InvalidEvent("must not be negative", field=f"tokens.{kind}")
    if payload.reported_cost.micros < 0:
        raise InvalidEvent("must not be negative", field="reported_cost.micros")
    model = payload.model
    if not model:
        raise InvalidEvent("required, the model that answered", field="model")
    duration = payload.duration
    duration_ms = duration.seconds * 1000 + duration.nanos // 1_000_000
    if duration_ms < 0:
        raise InvalidEvent("must not be negative", field="duration")
    stamp = envelope.time
    if stamp.seconds or stamp.nanos:
        occurred = datetime.fromtimestamp(stamp.seconds, UTC) + timedelta(
            microseconds=stamp.nanos // 1000
        )
    else:
        occurred = datetime.fromtimestamp(uuid7_millis(event_id) / 1000, UTC)
    costing = cost_request(payload, occurred.date(), duration_ms, prices, pricing)
    return LedgerRow(
        occurred_at=occurred,
        event_id=event_id,
        model=_text(model, "model"),
        provider=_text(payload.provider, "provider"),
        project=_text(payload.project, "project"),
        session_id=_text(payload.session_id, "session_id"),
        user_id=_text(payload.user, "user"),
        task_id=_text(payload.task_id, "task_id"),
        attempt=payload.attempt,
        status=payload.status,
        duration_ms=duration_ms,
        input=counts[0],
        output=counts[1],
        cached_read=counts[2],
        cache_write=counts[3],
        reasoning=counts[4],
        cost_micros=costing.cost_micros,
        cost_source=costing.source,
        compute_cost_micros=costing.compute_cost_micros,
        shadow_cost_micros=costing.shadow_cost_micros,
        savings_micros=costing.savings_micros,
        reservation_id=_text(payload.reservation_id, "reservation_id"),
    )


async def write_rows(conn: asyncpg.Connection, rows: Sequence[LedgerRow]) -> list[LedgerRow]:
    """Insert ``rows`` and their rollups in the caller's transaction; returns the new rows."""
    unique = list({row.event_id: row for row in rows}.values())
    if not unique:
        return []
    columns = [[getattr(r, a) for r in unique] for a in LedgerRow.__dataclass_fields__]
    inserted = {rec["event_id"] for rec in await conn.fetch(INSERT_WITH_ROLLUPS, *columns)}
    new = [row for row in unique if row.event_id in inserted]
    if not new:
        return []
    with_session = [r for r in new if r.session_id]
    if with_session:
        await _update_sessions(conn, with_session)
    settle = []
    for row in new:
        if row.reservation_id:
            with contextlib.suppress(ValueError):
                settle.append(uuid.UUID(row.reservation_id))
    deltas: dict[budgets.Key, list[int]] = {}
    if settle:
        # A settled reservation stops holding; its spend is now in the ledger (below).
        for rec in await conn.fetch(SETTLE, sorted(settle)):
            acc = deltas.setdefault((rec[0], rec[1], rec[2]), [0, 0, 0, 0])
            acc[2] -= rec[3]
            acc[3] -= rec[4]
    counted = await budgets.ingest_budgets(conn)
    if counted:
        _spend_deltas(new, counted, deltas)
    await budgets.add_to_counters(conn, deltas)
    return new


def _spend_deltas(
    rows: Sequence[LedgerRow],
    counted: Sequence[budgets.BudgetDef],
    deltas: dict[budgets.Key, list[int]],
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


async def _update_sessions(conn: asyncpg.Connection, rows: Sequence[LedgerRow]) -> None:
    by_session: dict[str, list[LedgerRow]] = defaultdict(list)
    for row in rows:
        by_session[row.session_id].append(row)
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
        group = sorted(by_session[sid], key=lambda r: (r.occurred_at, r.event_id))
        switches = sum(1 for a, b in itertools.pairwise(group) if a.model != b.model)
        last_model = group[-1].model
        known = existing.get(sid)
        if known is not None:
            if (
                group[0].occurred_at >= known["last_activity_at"]
                and group[0].model != known["last_model"]
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
            sum(r.status == ERROR for r in group),
            *(sum(getattr(r, k) for r in group) for k in TOKEN_KINDS),
            sum(r.cost_micros for r in group),
            sum(r.savings_micros for r in group),
            switches,
        ]
        for column, value in zip(values, row_values, strict=True):
            column.append(value)
    await conn.execute(UPSERT_SESSIONS, *values)


def record_metrics(rows: Sequence[LedgerRow]) -> None:
    """Count newly recorded rows in the Prometheus metrics (aggregated per model)."""
    per_model: dict[str, list[int]] = defaultdict(lambda: [0] * 8)
    for row in rows:
        acc = per_model[row.model]
        acc[0] += 1
        acc[1] += int(row.status == ERROR)
        acc[2] += row.cost_micros
        for i, kind in enumerate(TOKEN_KINDS, start=3):
            acc[i] += getattr(row, kind)
    for model, acc in per_model.items():
        label = metrics.model_label(model)
        metrics.REQUESTS.labels(label).inc(acc[0])
        if acc[1]:
            metrics.ERRORS.labels(label).inc(acc[1])
        metrics.COST.labels(label).inc(acc[2] / 1_000_000)
        for i, kind in enumerate(TOKEN_KINDS, start=3):
            if acc[i]:
                metrics.TOKENS.labels(label, kind).inc(acc[i])
    metrics.INGESTED.inc(len(rows))


@dataclass
class _Pending:
    row: LedgerRow
    done: asyncio.Future[bool]


class LedgerWriter:
    """Commits rows submitted by concurrent handlers in batches, one transaction each."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_batch: int,
        linger_seconds: float,
        on_committed: Callable[[list[LedgerRow]], None] | None = None,
    ) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._linger = linger_seconds
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_committed = on_committed
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

    async def submit(self, row: LedgerRow) -> bool:
        """Wait until ``row`` is committed; True if it was new, False for a duplicate."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(row, done))
        self._wake.set()
        return await done

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if len(self._pending) < self._max_batch and self._linger:
                await asyncio.sleep(self._linger)
            batch = self._pending[: self._max_batch]
            del self._pending[: len(batch)]
            if not self._pending:
                self._wake.clear()
            if batch:
                await self._commit(batch)

    async def _commit(self, batch: list[_Pending]) -> None:
        backoff = 0.05
        while True:
            started = time.perf_counter()
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    new = await write_rows(conn, [p.row for p in batch])
            except RETRYABLE as exc:
                self.last_error = f"database: {exc}"
                log.warning("ledger write failed; retrying", error=str(exc), events=len(batch))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except Exception as exc:
                log.error("ledger write refused", error=str(exc), events=len(batch))
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(exc)
                return
            break
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        self.last_error = ""
        fresh = {row.event_id for row in new}
        metrics.DUPLICATES.inc(len(batch) - len(fresh))
        record_metrics(new)
        if self._on_committed is not None and new:
            self._on_committed(new)
        for p in batch:
            if not p.done.done():
                p.done.set_result(p.row.event_id in fresh)


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
