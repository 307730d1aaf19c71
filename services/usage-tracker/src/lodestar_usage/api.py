"""The gRPC servicers: UsageService and BudgetService."""

# SQL here is assembled from constant identifiers only; every value is a bind parameter.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
from google.protobuf.message import Message

from lodestar.common import audit
from lodestar.common.auth import caller, charge_calls
from lodestar.common.errors import (
    DATABASE_UNREACHABLE,
    UNSTORABLE_TEXT,
    FieldViolation,
    InvalidArgumentError,
    LodestarError,
    StorageError,
    status_message,
)
from lodestar.common.logging import get_logger
from lodestar.usage.v1 import usage_pb2
from lodestar_usage import (
    bounds,
    budgets,
    counters,
    metrics,
    recost,
    reports,
    reservations,
    stored,
)
from lodestar_usage.admission import Admitter
from lodestar_usage.counters import Key
from lodestar_usage.pricing import (
    PRICE_COLUMNS,
    PriceRow,
    PriceTable,
    parse_day,
    price_from_proto,
    validate_pattern,
)
from lodestar_usage.settings import LimitsSettings, UsageSettings

log = get_logger(__name__)
Context = Any
UNREACHABLE: tuple[type[BaseException], ...] = (*DATABASE_UNREACHABLE, StorageError, TimeoutError)
#: What a bad stored row can raise while a read computes with it (never the database going away).
BAD_ROW_ERRORS: tuple[type[BaseException], ...] = (
    ArithmeticError,
    ValueError,
    TypeError,
    asyncpg.DataError,
    InvalidArgumentError,
)


class UsageApi:
    """Reports and prices."""

    def __init__(
        self, pool: asyncpg.Pool, on_prices_changed: Any, limits: LimitsSettings | None = None
    ) -> None:
        self._pool = pool
        self._prices_changed = on_prices_changed
        self._limits = limits or LimitsSettings()

    def _window(self, window: usage_pb2.Window) -> tuple[datetime, datetime, str]:
        return reports.resolve_window(
            window, datetime.now(UTC), max_lookback_days=self._limits.max_lookback_days
        )

    async def Summary(
        self, request: usage_pb2.SummaryRequest, context: Context
    ) -> usage_pb2.SummaryResponse:
        """Tokens, cost, requests, errors and savings over a window, grouped."""
        group_by = reports.validate_group_by(request.group_by)
        start, end, tz = self._window(request.window)
        tz_field = "window.calendar.timezone"
        if request.timezone:
            reports.zone(request.timezone, "timezone")
            tz, tz_field = request.timezone, "timezone"
        filters = reports.Filters.from_proto(request.filters)
        try:
            rows = await reports.summarize(self._pool, start, end, group_by, filters, tz)
        except asyncpg.InvalidParameterValueError:  # a zone Python knows and Postgres does not
            raise InvalidArgumentError(
                f"{tz[:64]!r} is not a timezone the database knows", field=tz_field
            ) from None
        return _summary_response(rows, start, end)

    async def ListRecords(
        self, request: usage_pb2.ListRecordsRequest, context: Context
    ) -> usage_pb2.ListRecordsResponse:
        """A page of ledger rows, newest first."""
        size = reports.page_size(request.page_size)
        start, end, _ = self._window(request.window)
        records, token, skipped = await reports.list_records(
            self._pool,
            start,
            end,
            reports.Filters.from_proto(request.filters),
            size,
            request.page_token,
        )
        return usage_pb2.ListRecordsResponse(
            records=records, next_page_token=token, skipped_records=skipped
        )

    async def ExportRecords(
        self, request: usage_pb2.ExportRecordsRequest, context: Context
    ) -> AsyncIterator[usage_pb2.ExportRecordsResponse]:
        """Ledger rows as CSV or JSON lines, oldest first, streamed in chunks."""
        if request.format not in usage_pb2.ExportFormat.values():
            raise InvalidArgumentError("CSV or JSONL", field="format")
        start, end, _ = self._window(request.window)
        async for chunk, skipped in reports.export_records(
            self._pool, start, end, reports.Filters.from_proto(request.filters), request.format
        ):
            yield usage_pb2.ExportRecordsResponse(chunk=chunk, skipped_records=skipped)

    async def ListSessions(
        self, request: usage_pb2.ListSessionsRequest, context: Context
    ) -> usage_pb2.ListSessionsResponse:
        """A page of sessions with their duration, tokens, cost and model switches."""
        size = reports.page_size(request.page_size)
        window = None
        if request.HasField("window"):
            start, end, _ = self._window(request.window)
            window = (start, end)
        sessions, token, skipped = await reports.list_sessions(
            self._pool,
            window,
            reports.Filters.from_proto(request.filters),
            size,
            request.page_token,
        )
        return usage_pb2.ListSessionsResponse(
            sessions=sessions, next_page_token=token, skipped_records=skipped
        )

    async def ListPrices(
        self, request: usage_pb2.ListPricesRequest, context: Context
    ) -> usage_pb2.ListPricesResponse:
        """The effective-dated price table, or the rows that match ``request.model``."""
        bounds.text(request.model, "model")
        table = await PriceTable.load(self._pool)
        rows = sorted(table.rows, key=lambda r: (r.pattern, r.valid_from))
        if request.model:
            rows = [r for r in rows if r.matches(request.model, "")]
        return usage_pb2.ListPricesResponse(prices=[r.to_proto() for r in rows])

    async def SetPrice(
        self, request: usage_pb2.SetPriceRequest, context: Context
    ) -> usage_pb2.SetPriceResponse:
        """Add or replace the price of a model pattern from a date (audited)."""
        row = dataclasses.replace(price_from_proto(request.price), source=SET_BY_HAND)
        bounds.day_in_window(row.valid_from, "price.valid_from")
        async with self._pool.acquire() as conn, conn.transaction():
            before = await _locked_price(conn, row.pattern, row.valid_from)
            await _upsert_prices(conn, [row])
            await audit.record(
                conn,
                action="UsageService/SetPrice",
                target=_price_target(row.pattern, row.valid_from),
                before=before.to_proto() if before else None,
                after=row.to_proto(),
            )
        await self._prices_changed()
        return usage_pb2.SetPriceResponse(price=row.to_proto())

    async def ImportPrices(
        self, request: usage_pb2.ImportPricesRequest, context: Context
    ) -> usage_pb2.ImportPricesResponse:
        """Add or replace many prices from one source in one transaction (audited once)."""
        rows = _imported_rows(request)
        keys = sorted({(row.pattern, row.valid_from) for row in rows})
        async with self._pool.acquire() as conn, conn.transaction():
            stored = {
                (r.pattern, r.valid_from): r
                for r in (
                    PriceRow(*rec.values())
                    for rec in await conn.fetch(
                        f"SELECT {PRICE_COLUMNS} FROM prices p JOIN unnest($1::text[], "
                        "$2::date[]) AS k(m, d) ON p.model_pattern = k.m AND p.valid_from = k.d "
                        "ORDER BY p.model_pattern, p.valid_from FOR UPDATE OF p",
                        [k[0] for k in keys],
                        [k[1] for k in keys],
                    )
                )
            }
            counts = usage_pb2.ImportPricesResponse()
            for row in rows:
                before = stored.get((row.pattern, row.valid_from))
                if before is None:
                    counts.added += 1
                elif before.same_price(row):
                    counts.unchanged += 1
                else:
                    counts.replaced += 1
            await _upsert_prices(conn, rows)
            await audit.record(
                conn,
                action="UsageService/ImportPrices",
                target=f"prices/{request.source}",
                before=None,
                after=counts,
            )
        await self._prices_changed()
        return counts

    async def DeletePrice(
        self, request: usage_pb2.DeletePriceRequest, context: Context
    ) -> usage_pb2.DeletePriceResponse:
        """Remove one price row (audited); says whether there was one."""
        pattern = validate_pattern(request.model_pattern, "model_pattern")
        day = parse_day(request.valid_from, "valid_from")
        async with self._pool.acquire() as conn, conn.transaction():
            before = await _locked_price(conn, pattern, day)
            await conn.execute(
                "DELETE FROM prices WHERE model_pattern = $1 AND valid_from = $2", pattern, day
            )
            await audit.record(
                conn,
                action="UsageService/DeletePrice",
                target=_price_target(pattern, day),
                before=before.to_proto() if before else None,
                after=None,
            )
        await self._prices_changed()
        return usage_pb2.DeletePriceResponse(deleted=before is not None)

    async def ListUnpriced(
        self, request: usage_pb2.ListUnpricedRequest, context: Context
    ) -> usage_pb2.ListUnpricedResponse:
        """Usage recorded without a price, per model and provider (and day)."""
        start, end, _ = self._window(request.window)
        limit = recost.list_limit(request.limit)
        async with self._pool.acquire() as conn:
            groups = await recost.unpriced_groups(conn, start, end)
            table = await PriceTable.load(conn)
        response = recost.list_unpriced(groups, table, by_day=request.by_day, limit=limit)
        response.start.CopyFrom(reports.stamp(start))
        response.end.CopyFrom(reports.stamp(end))
        return response

    async def Recost(
        self, request: usage_pb2.RecostRequest, context: Context
    ) -> usage_pb2.RecostResponse:
        """Re-price unpriced rows a price now covers, with all that counted them (audited)."""
        if not request.HasField("window"):
            raise InvalidArgumentError(
                "required: the time range of the rows to re-cost", field="window"
            )
        start, end, _ = self._window(request.window)
        query = recost.recost_query(request, start, end)
        response, rows = await recost.run(self._pool, query)
        if rows:
            recost.record_metrics(rows)
            log.info(
                "unpriced usage re-costed",
                rows=response.rows_recosted,
                micros_added=response.micros_added,
                more=response.more,
            )
        return response


def _summary_response(
    rows: list[reports.Row], start: datetime, end: datetime
) -> usage_pb2.SummaryResponse:
    """Summary rows; a group whose sums cannot be reported carries an error and a warning."""
    response = usage_pb2.SummaryResponse(start=reports.stamp(start), end=reports.stamp(end))
    for row in rows:
        if row.error:
            response.rows.add(group=row.group, error=row.error)
            response.warnings.append(f"group {row.group} left out of totals: {row.error}")
        else:
            response.rows.add(group=row.group, totals=reports.totals_proto(row.sums))
    if rows and all(row.error for row in rows):
        response.warnings.append("totals not reported: no group could be")
        return response
    totals = reports.add_sums(rows)
    problem = reports.sum_problem(totals)
    if problem:
        response.warnings.append(f"totals not reported: {problem}")
    else:
        response.totals.CopyFrom(reports.totals_proto(totals))
    return response


def _price_target(pattern: str, valid_from: date) -> str:
    return f"price/{pattern}@{valid_from.isoformat()}"


#: The source of a price set with SetPrice.
SET_BY_HAND = "SetPrice"
#: Most prices one ImportPrices call may carry.
MAX_IMPORTED_PRICES = 20_000
MAX_SOURCE_CHARS = 200


def _imported_rows(request: usage_pb2.ImportPricesRequest) -> list[PriceRow]:
    """The prices of an import, validated; INVALID_ARGUMENT names the first bad field."""
    if not request.source.strip():
        raise InvalidArgumentError(
            "required: where the prices come from, e.g. 'litellm 1.110.2 model cost map'",
            field="source",
        )
    bounds.text(request.source, "source", MAX_SOURCE_CHARS)
    if not request.prices:
        raise InvalidArgumentError("at least one price is required", field="prices")
    if len(request.prices) > MAX_IMPORTED_PRICES:
        raise InvalidArgumentError(
            f"{len(request.prices)} prices; at most {MAX_IMPORTED_PRICES} per call: split them",
            field="prices",
        )
    rows: list[PriceRow] = []
    seen: set[tuple[str, date]] = set()
    for i, price in enumerate(request.prices):
        row = price_from_proto(price, f"prices[{i}]")
        bounds.day_in_window(row.valid_from, f"prices[{i}].valid_from")
        if (row.pattern, row.valid_from) in seen:
            raise InvalidArgumentError(
                f"{row.pattern} from {row.valid_from} is given twice", field=f"prices[{i}]"
            )
        seen.add((row.pattern, row.valid_from))
        rows.append(dataclasses.replace(row, source=request.source))
    return rows


async def _locked_price(
    conn: asyncpg.Connection, pattern: str, valid_from: date
) -> PriceRow | None:
    """The stored price of (pattern, valid_from), locked for this transaction even if absent."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        f"lodestar:{_price_target(pattern, valid_from)}",
    )
    rec = await conn.fetchrow(
        f"SELECT {PRICE_COLUMNS} FROM prices WHERE model_pattern = $1 AND valid_from = $2",
        pattern,
        valid_from,
    )
    return PriceRow(*rec.values()) if rec else None


#: Adds or replaces price rows given as arrays, one per column.
UPSERT_PRICES = (
    f"INSERT INTO prices ({PRICE_COLUMNS}) "
    "SELECT * FROM unnest($1::text[], $2::date[], $3::bigint[], $4::bigint[], $5::bigint[], "
    "$6::bigint[], $7::bigint[], $8::text[]) "
    "ON CONFLICT (model_pattern, valid_from) DO UPDATE SET "
    "input_micros_per_mtok = EXCLUDED.input_micros_per_mtok, "
    "output_micros_per_mtok = EXCLUDED.output_micros_per_mtok, "
    "cached_read_micros_per_mtok = EXCLUDED.cached_read_micros_per_mtok, "
    "cache_write_micros_per_mtok = EXCLUDED.cache_write_micros_per_mtok, "
    "reasoning_micros_per_mtok = EXCLUDED.reasoning_micros_per_mtok, "
    "source = EXCLUDED.source, updated_at = now()"
)


async def _upsert_prices(conn: asyncpg.Connection, rows: Sequence[PriceRow]) -> None:
    columns = list(zip(*(dataclasses.astuple(row) for row in rows), strict=True))
    await conn.execute(UPSERT_PRICES, *(list(column) for column in columns))


class BudgetApi:
    """Budgets and admission."""

    def __init__(self, pool: asyncpg.Pool, settings: UsageSettings) -> None:
        self._pool = pool
        self._settings = settings.admission
        self._max_window = settings.limits.max_budget_window_seconds
        admission = settings.admission
        self._admitter = Admitter(
            pool,
            max_batch=admission.max_batch,
            max_queued=admission.max_queued,
            rounds_in_flight=admission.rounds_in_flight,
            durable=admission.durable_commit,
        )

    def counters_changed(self, changes: dict[Key, list[int]]) -> None:
        """Ingest committed ``changes`` to the budget counters (``Admitter.counters_changed``)."""
        self._admitter.counters_changed(changes)

    async def CreateBudget(
        self, request: usage_pb2.CreateBudgetRequest, context: Context
    ) -> usage_pb2.CreateBudgetResponse:
        """Add a budget (audited); the budget as stored."""
        budget = budgets.budget_from_proto(
            request.budget, require_id=False, max_window_seconds=self._max_window
        )
        return usage_pb2.CreateBudgetResponse(
            budget=(await budgets.create_budget(self._pool, budget)).to_proto()
        )

    async def UpdateBudget(
        self, request: usage_pb2.UpdateBudgetRequest, context: Context
    ) -> usage_pb2.UpdateBudgetResponse:
        """Replace a budget's definition (audited); the budget as stored."""
        budget = budgets.budget_from_proto(
            request.budget, require_id=True, max_window_seconds=self._max_window
        )
        return usage_pb2.UpdateBudgetResponse(
            budget=(await budgets.update_budget(self._pool, budget)).to_proto()
        )

    async def ListBudgets(
        self, request: usage_pb2.ListBudgetsRequest, context: Context
    ) -> usage_pb2.ListBudgetsResponse:
        """Every budget with its spend in the current window; bad ones are named as skipped."""
        now = datetime.now(UTC)
        out = []
        defs, skipped = await stored.read_budgets(self._pool)
        for budget in defs:
            try:
                usage = await counters.usage_of(self._pool, budget, budget.scope_value, now)
                out.append(budgets.status_proto(budget, usage))
            except BAD_ROW_ERRORS as exc:  # one budget's bad rows must not fail the others
                reason = f"its spend or holds cannot be shown ({exc}): a stored row is bad"
                skipped.append(reports.skipped("budget", str(budget.id), reason, "list_budgets"))
        return usage_pb2.ListBudgetsResponse(budgets=out, skipped_records=skipped)

    async def DeleteBudget(
        self, request: usage_pb2.DeleteBudgetRequest, context: Context
    ) -> usage_pb2.DeleteBudgetResponse:
        """Remove a budget and its counters (audited)."""
        return usage_pb2.DeleteBudgetResponse(
            deleted=await budgets.delete_budget(self._pool, request.id)
        )

    async def Reserve(
        self, request: usage_pb2.ReserveRequest, context: Context
    ) -> usage_pb2.ReserveResponse:
        """Hold a worst-case amount against every budget that applies, or say which one refuses."""
        return await self._reserve_call(request, _deadline(context))

    async def Commit(
        self, request: usage_pb2.CommitRequest, context: Context
    ) -> usage_pb2.CommitResponse:
        """Replace a reservation's hold by the actual usage."""
        return await self._commit_call(request, _deadline(context))

    async def Release(
        self, request: usage_pb2.ReleaseRequest, context: Context
    ) -> usage_pb2.ReleaseResponse:
        """Give a reservation's hold back without spending."""
        return await self._release_call(request, _deadline(context))

    async def Admit(
        self, request: usage_pb2.AdmitRequest, context: Context
    ) -> usage_pb2.AdmitResponse:
        """Several Reserve, Commit and Release calls, each answered as its own RPC would be."""
        self._check_calls(request.calls)
        return usage_pb2.AdmitResponse(
            results=await self._admission_calls(request.calls, _deadline(context))
        )

    async def AdmitStream(
        self, requests: AsyncIterator[usage_pb2.AdmitStreamRequest], context: Context
    ) -> AsyncIterator[usage_pb2.AdmitStreamResponse]:
        """Admit requests on one stream, each answered by its request_id once decided."""
        answers: asyncio.Queue[usage_pb2.AdmitStreamResponse | None] = asyncio.Queue()
        in_flight = asyncio.Semaphore(self._settings.stream_requests_in_flight)
        stream_deadline = _deadline(context)

        async def answer(request: usage_pb2.AdmitStreamRequest) -> None:
            await answers.put(await self._stream_answer(request, stream_deadline))

        async def read() -> None:
            deciding: set[asyncio.Task[None]] = set()
            try:
                async for request in requests:
                    await in_flight.acquire()
                    task = asyncio.create_task(answer(request))
                    deciding.add(task)
                    task.add_done_callback(deciding.discard)
                await asyncio.gather(*deciding)
            except BaseException:
                for task in deciding:
                    task.cancel()
                raise
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
                in_flight.release()  # counted until written: a caller that does not read is held
            await reader  # the stream's own error: an undecodable message, the rate limit
        finally:
            reader.cancel()

    async def _stream_answer(
        self, request: usage_pb2.AdmitStreamRequest, stream_deadline: float | None
    ) -> usage_pb2.AdmitStreamResponse:
        """The answer to one request of an AdmitStream: its results, or why it was refused."""
        try:
            self._check_calls(request.calls)
            deadline = _earlier(stream_deadline, _request_deadline(request))
        except LodestarError as exc:
            return usage_pb2.AdmitStreamResponse(
                request_id=request.request_id, error=_call_status(exc)
            )
        results = await self._admission_calls(request.calls, deadline)
        return usage_pb2.AdmitStreamResponse(request_id=request.request_id, results=results)

    def _check_calls(self, calls: Sequence[usage_pb2.AdmissionCall]) -> None:
        """Refuse more calls than a request may carry; charge the rest to the rate limit."""
        most = self._settings.max_calls_per_request
        if len(calls) > most:
            raise InvalidArgumentError(
                f"{len(calls)} calls; at most {most} per request "
                "(setting admission.max_calls_per_request): send fewer",
                field="calls",
            )
        charge_calls(len(calls) - 1)

    async def _admission_calls(
        self, calls: Sequence[usage_pb2.AdmissionCall], deadline: float | None
    ) -> list[usage_pb2.AdmissionResult]:
        if len(calls) == 1:  # a gateway's usual request: no task and no gather for it
            return [await self._admission_call(calls[0], 0, deadline)]
        return list(
            await asyncio.gather(
                *(self._admission_call(call, index, deadline) for index, call in enumerate(calls))
            )
        )

    async def _admission_call(
        self, call: usage_pb2.AdmissionCall, index: int, deadline: float | None
    ) -> usage_pb2.AdmissionResult:
        kind = call.WhichOneof("call")
        handlers: dict[str, Callable[[Any, float | None], Awaitable[Message]]] = {
            "reserve": self._reserve_call,
            "commit": self._commit_call,
            "release": self._release_call,
        }
        try:
            if kind is None:
                raise InvalidArgumentError(
                    "set one of reserve, commit or release", field=f"calls[{index}]"
                )
            result = usage_pb2.AdmissionResult()
            getattr(result, kind).CopyFrom(await handlers[kind](getattr(call, kind), deadline))
            return result
        except Exception as exc:
            return usage_pb2.AdmissionResult(error=_call_status(exc, f"calls[{index}].{kind}"))

    async def _reserve_call(
        self, request: usage_pb2.ReserveRequest, deadline: float | None
    ) -> usage_pb2.ReserveResponse:
        reservations.validate_reserve(request)
        lease = timedelta(seconds=self._settings.default_lease_seconds)
        if request.HasField("lease"):
            most = self._settings.max_lease_seconds
            asked = bounds.duration(
                request.lease,
                "lease",
                max_seconds=most,
                why=f"setting admission.max_lease_seconds = {bounds.number(most)}",
            )
            lease = asked or lease
        try:
            admission = await self._admitter.reserve(request, lease, caller().name, deadline)
        except UNREACHABLE as exc:
            if not self._settings.fail_open:
                metrics.RESERVATIONS.labels("unavailable").inc()
                raise StorageError(
                    "the budget database is unreachable and admission fails closed; retry"
                ) from exc
            metrics.RESERVATIONS.labels("fail_open").inc()
            log.warning("database unreachable; admitting (fail_open)", error=str(exc))
            return usage_pb2.ReserveResponse(granted=True, fail_open=True)
        metrics.RESERVATIONS.labels("granted" if admission.granted else "denied").inc()
        response = usage_pb2.ReserveResponse(
            granted=admission.granted,
            reservation_id=admission.reservation_id,
            budget_ids=admission.budget_ids,
        )
        if admission.lease_expires_at is not None:
            response.lease_expires_at.CopyFrom(reports.stamp(admission.lease_expires_at))
        if admission.denial is not None:
            response.denial.CopyFrom(admission.denial)
        return response

    async def _commit_call(
        self, request: usage_pb2.CommitRequest, deadline: float | None
    ) -> usage_pb2.CommitResponse:
        owner = caller().owner_scope
        key = reservations.validate_commit(request)
        found = await self._admitter.finish(
            key,
            owner,
            deadline,
            commit=True,
            micros=request.actual_cost_micros,
            tokens=request.actual_tokens,
        )
        return reservations.check_commit(request, key, owner, found)

    async def _release_call(
        self, request: usage_pb2.ReleaseRequest, deadline: float | None
    ) -> usage_pb2.ReleaseResponse:
        owner = caller().owner_scope
        key: uuid.UUID = reservations.reservation_key(request.reservation_id)
        found = await self._admitter.finish(key, owner, deadline, commit=False)
        return usage_pb2.ReleaseResponse(
            released=reservations.check_release_state(found.state, key, owner)
        )


def _call_status(error: Exception, path: str | None = None) -> usage_pb2.CallStatus:
    """``error`` as a status; a call's fields named from the request's root (``path``)."""
    if isinstance(error, LodestarError):
        if path is not None:
            error.violations = tuple(
                FieldViolation(f"{path}.{v.field}", v.description) for v in error.violations
            )
            if error.field and not error.field.startswith("calls["):
                error.field = f"{path}.{error.field}"
    elif not isinstance(error, (*DATABASE_UNREACHABLE, *UNSTORABLE_TEXT)):
        log.error(
            "unhandled error in an admission call", error_type=type(error).__name__, exc_info=error
        )
    return usage_pb2.CallStatus.FromString(status_message(error).SerializeToString())


#: Longest timeout an AdmitStream request may carry.
MAX_STREAM_TIMEOUT_SECONDS = 60


def _request_deadline(request: usage_pb2.AdmitStreamRequest) -> float | None:
    """The request's own deadline on the ``time.monotonic`` clock, or None when it sets none."""
    if not request.HasField("timeout"):
        return None
    timeout = bounds.duration(
        request.timeout,
        "timeout",
        max_seconds=MAX_STREAM_TIMEOUT_SECONDS,
        why="an admission call waits at most a minute",
    )
    if timeout <= timedelta(0):
        raise InvalidArgumentError(
            "timeout must be positive: how long the caller waits for the answer", field="timeout"
        )
    return time.monotonic() + timeout.total_seconds()


def _earlier(first: float | None, second: float | None) -> float | None:
    return second if first is None else first if second is None else min(first, second)


def _deadline(context: Context) -> float | None:
    """The call's deadline on the ``time.monotonic`` clock, or None when it has none."""
    remaining = context.time_remaining() if context is not None else None
    return None if remaining is None else time.monotonic() + remaining
