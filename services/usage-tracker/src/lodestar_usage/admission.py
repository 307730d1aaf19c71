"""Group-committed admission: every Reserve, Commit and Release is decided in a round.

Each process queues the admission calls it receives; a round takes what is queued (up to
``max_batch``) and decides all of it in one Postgres transaction:

1. for reserves that read the ledger (a rolling budget with a limit, or a session budget with
   session limits), a transaction-scoped advisory lock per rolling (budget, value) and per
   session, taken in one statement in key order, so that reservations against the same rolling
   budget or session are decided one after the other, each seeing the others' holds;
2. one call of ``admission_lock`` (migration 0007): the reservations being committed or released
   locked in id order, then every counter the round touches locked once in key order (the order
   every writer uses); then the round's ``now()``, the budget generation, those reservations and
   the counters with the expired holds subtracted, read after the locks;
3. budget definitions are cached per process and reloaded when the generation (bumped by a
   trigger on every change of ``budgets``) has moved; a round whose calls then need other locks
   than it took is run again;
4. the rolling budgets' spend and holds and the sessions' use read from the ledger (only for
   the reserves that need them);
5. every decision made in memory, in arrival order, by one rule (:meth:`Admitter._admit`);
6. one statement writing the new holds, the finished reservations and the counter deltas.

Postgres stays the arbiter: the counters (and the advisory locks) are held for the whole round,
so rounds of several replicas touching one budget are decided one after the other, each seeing
the others' holds. Nothing is granted before the round's transaction has committed.

Overload is explicit: a call that finds the queue full, or whose deadline is shorter than the
expected wait, is refused at once with RESOURCE_EXHAUSTED and a retry delay (counted in
``lodestar_usage_admission_shed_total``), never left to time out in the queue.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
from asyncpg.exceptions import DeadlockDetectedError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from lodestar.common.errors import DATABASE_UNREACHABLE, ResourceExhaustedError, StorageError
from lodestar.common.logging import get_logger
from lodestar.usage.v1 import usage_pb2
from lodestar_usage import budgets, counters, metrics, reservations
from lodestar_usage.budgets import BudgetDef, Usage
from lodestar_usage.counters import Key
from lodestar_usage.reservations import Admission, Finished

#: A hold's counter key, or None for a budget without a counter (no limit, or rolling).
log = get_logger(__name__)
#: A counted budget of a Reserve: the budget, its scope value and its window [start, end).
Counted = tuple[BudgetDef, str, datetime, datetime]
#: Every applicable budget of a Reserve, with its window when it has a counter.
Plan = list[tuple[BudgetDef, str, datetime | None, datetime | None]]
#: A round retried after a deadlock (a lock-order clash with ingest's settlement) or after
#: creating missing counters.
ROUND_ATTEMPTS = 8
#: A call is refused at once when its deadline leaves less than this many times the expected wait
#: (the answer still has to be sent, by a process that is busy).
DEADLINE_MARGIN = 2.0
#: How long a round runner keeps its connection once the queue is empty, for the next call.
CONNECTION_LINGER_SECONDS = 0.25
#: The smallest retry delay a shed call is told.
MIN_RETRY_SECONDS = 0.05
#: Class of the advisory locks that serialise reserves reading the ledger: the two-key form, a key
#: space apart from the one-key COUNTER_LOCK.
LEDGER_LOCK_CLASS = 0x6C656467  # "ledg"
#: Takes the advisory locks of a round's ledger reads, in key order (every round's order).
LOCK_LEDGER_KEYS = (
    "SELECT count(pg_advisory_xact_lock($1, l.h)) FROM "
    "(SELECT DISTINCT hashtext(k) AS h FROM unnest($2::text[]) AS k ORDER BY h) AS l"
)
#: What a session has spent (the ledger) and holds (reservations not yet in the ledger: active
#: ones whose lease runs, and committed ones).
SESSION_USE = """
    SELECT s.started_at, coalesce(s.cost_micros, 0) AS spent_micros,
           coalesce(s.input_tokens + s.output_tokens + s.cached_read_tokens + s.cache_write_tokens
                    + s.reasoning_tokens, 0) AS spent_tokens,
           h.micros AS held_micros, h.tokens AS held_tokens
    FROM (SELECT coalesce(sum(amount_micros), 0) AS micros,
                 coalesce(sum(amount_tokens), 0) AS tokens
          FROM reservations
          WHERE session_id = $1
            AND (state = 'committed' OR (state = 'active' AND lease_expires_at > now()))) h
    LEFT JOIN sessions s ON s.session_id = $1
"""

#: Starts a round (migration 0007): locks, then the round's time, generation, reservations and
#: counters as rows of kind 'head', 'reservation' and 'counter'.
ADMISSION_LOCK = (
    "SELECT * FROM admission_lock($1, $2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[])"
)
#: What a round writes: new holds, finished reservations, counter deltas (migration 0012).
WRITE = (
    "SELECT admission_write($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, "
    "$16, $17, $18, $19, $20, $21, $22, $23, $24)"
)
#: A round decided on what the process knew, written in one call if that still holds, else the
#: rows as they are (migration 0012).
ADMISSION_APPLY = (
    "SELECT * FROM admission_apply($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, "
    "$14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, "
    "$31, $32, $33, $34, $35, $36, $37, $38, $39, $40, $41)"
)
#: Tries of a round decided on what the process knows, before it takes the locked path.
KNOWN_ROUND_TRIES = 2
#: Most counters, and most reservations, a process remembers for such rounds.
MAX_KNOWN = 100_000
#: Bounds of the time window of a round whose decisions do not depend on the time.
ALWAYS = (datetime(1, 1, 2, tzinfo=UTC), datetime(9999, 12, 30, tzinfo=UTC))


@dataclass
class BudgetCache:
    """The usable budgets as of a generation of the ``budgets`` table, indexed by scope."""

    generation: int = -1
    budgets: list[BudgetDef] = field(default_factory=list)
    #: Budgets by (scope, value); a session budget without a value is under (SESSION, "").
    _by_scope: dict[tuple[int, str], list[BudgetDef]] = field(default_factory=dict)
    #: The current window of each calendar budget, reused while it contains the round's time.
    _windows: dict[uuid.UUID, tuple[datetime, datetime]] = field(default_factory=dict)

    async def load(self, conn: asyncpg.Connection, generation: int) -> None:
        """Read every budget again (in the caller's transaction)."""
        recs = await conn.fetch(f"{budgets.BUDGET_ROWS} FROM budgets ORDER BY id")
        self.budgets = budgets.usable_budgets(recs)
        self.generation = generation
        self._by_scope = {}
        for budget in self.budgets:
            self._by_scope.setdefault((budget.scope, budget.scope_value), []).append(budget)
        self._windows = {}

    def applicable(self, request: usage_pb2.ReserveRequest) -> list[tuple[BudgetDef, str]]:
        """The budgets ``request`` counts against with their scope values, in id order."""
        found = list(self._by_scope.get((usage_pb2.BUDGET_SCOPE_GLOBAL, ""), ()))
        for scope, key in (
            (usage_pb2.BUDGET_SCOPE_PROJECT, request.project),
            (usage_pb2.BUDGET_SCOPE_USER, request.user),
            (usage_pb2.BUDGET_SCOPE_SESSION, request.session_id),
        ):
            if key:
                found += self._by_scope.get((scope, key), ())
        if request.session_id:
            found += self._by_scope.get((usage_pb2.BUDGET_SCOPE_SESSION, ""), ())
        found.sort(key=lambda budget: budget.id)
        return [
            (budget, value)
            for budget in found
            if (value := budget.value_for(request.project, request.user, request.session_id))
            is not None
        ]

    def window(self, budget: BudgetDef, now: datetime) -> tuple[datetime, datetime]:
        """``budget.window(now)`` of a calendar budget, computed once per window."""
        known = self._windows.get(budget.id)
        if known is None or not known[0] <= now < known[1]:
            known = self._windows[budget.id] = budget.window(now)
        return known


def ledger_locks(plan: Plan, session_id: str) -> set[str]:
    """The advisory lock keys a Reserve with ``plan`` needs: its reads of the ledger.

    One per rolling budget with a limit (its spend is summed from the ledger) and one for the
    session when a budget limits sessions (its use is read from the session).
    """
    keys = {f"rolling:{budget.id}:{value}" for budget, value, _, _ in plan if budget.sums_ledger}
    if session_id and any(budget.limits_sessions for budget, _, _, _ in plan):
        keys.add(f"session:{session_id}")
    return keys


@dataclass
class SessionUse:
    """What a session has spent and holds, and when it started (None: no request yet)."""

    started_at: datetime | None
    spent_micros: int
    spent_tokens: int
    held_micros: int
    held_tokens: int

    def refusal(
        self, budget: BudgetDef, request: usage_pb2.ReserveRequest, now: datetime
    ) -> str | None:
        """Why ``budget``'s session limits refuse ``request``, counting the session's holds."""
        if self.started_at is not None and budget.session_max_duration_seconds:
            ran = int((now - self.started_at).total_seconds())
            if ran > budget.session_max_duration_seconds:
                return (
                    f"session has run {ran}s, the limit is {budget.session_max_duration_seconds}s"
                )
        for unit, limit, spent, held, asked in (
            (
                "tokens",
                budget.session_max_tokens,
                self.spent_tokens,
                self.held_tokens,
                request.estimated_tokens,
            ),
            (
                "micro-dollars",
                budget.session_max_cost_micros,
                self.spent_micros,
                self.held_micros,
                request.estimated_cost_micros,
            ),
        ):
            if limit and spent + held + asked > limit:
                return f"session has used {spent} and holds {held} of its {limit} {unit}"
        return None


@dataclass
class _Call:
    """A queued admission call and the future its answer goes to."""

    deadline: float | None
    future: asyncio.Future[object]


@dataclass
class _Reserve(_Call):
    request: usage_pb2.ReserveRequest = field(default_factory=usage_pb2.ReserveRequest)
    lease: timedelta = timedelta()
    owner: str = ""


@dataclass
class _Finish(_Call):
    """A Commit (``commit`` True, with the actual amounts) or a Release."""

    key: uuid.UUID = field(default_factory=uuid.uuid4)
    commit: bool = True
    micros: int = 0
    tokens: int = 0
    owner: str | None = None


@dataclass
class _Locked:
    """A reservation locked by the round: its state and the counters its hold is in."""

    state: str
    micros: int
    tokens: int
    owner: str
    #: Active, but the lease ran out: the counters as read already leave it out.
    lapsed: bool
    keys: list[Key] = field(default_factory=list)


class _Replan(Exception):
    """The round locked other counters than its calls need (budgets or the window changed)."""


class _MissingCounters(Exception):
    def __init__(self, missing: list[Counted]) -> None:
        super().__init__("counters missing")
        self.missing = missing


#: What makes a round run again: a deadlock, counter rows to create first, or a stale plan.
RETRIED_ROUND_ERRORS = (DeadlockDetectedError, _MissingCounters, _Replan)


@dataclass
class _Round:
    """What one round decided and must write."""

    now: datetime
    counters: dict[Key, list[int]]
    deltas: dict[Key, list[int]] = field(default_factory=lambda: collections.defaultdict(_zero))
    new: list[tuple[uuid.UUID, _Reserve]] = field(default_factory=list)
    holds: list[tuple[uuid.UUID, uuid.UUID, str, datetime | None]] = field(default_factory=list)
    finished: dict[uuid.UUID, tuple[str, int, int]] = field(default_factory=dict)
    answers: list[tuple[_Call, object]] = field(default_factory=list)
    #: Spend and holds of the rolling budgets the reserves count against, by (budget, value).
    rolling: dict[tuple[uuid.UUID, str], Usage] = field(default_factory=dict)
    #: Use of the sessions whose limits the reserves count against.
    sessions: dict[str, SessionUse] = field(default_factory=dict)
    #: The time window inside which the round's decisions hold (its reserves' windows).
    valid: tuple[datetime, datetime] = ALWAYS


def _zero() -> list[int]:
    return [0, 0, 0, 0]


@dataclass
class _Known:
    """The counters and reservations as this process last read or wrote them.

    A round decided on them is written only if the database still holds exactly these rows; they
    are a guess that saves the read, never the truth.
    """

    #: Counter values ``[spent_micros, spent_tokens, held_micros, held_tokens]``, lapsed holds
    #: subtracted, as a round would read them.
    counters: dict[Key, list[int]] = field(default_factory=dict)
    #: Reservations a Commit or Release may finish.
    reservations: dict[uuid.UUID, _Locked] = field(default_factory=dict)
    #: The database's clock minus this process's, as of the last round.
    clock_offset: timedelta = timedelta()

    def now(self) -> datetime:
        """The database's time, as well as this process can tell without asking."""
        return datetime.now(UTC) + self.clock_offset

    def remember(self, state: _Round) -> None:
        """What ``state`` leaves behind once written: its counters, holds and finished ones."""
        for key, values in state.counters.items():
            self.counters[key] = list(values)
        for reservation_id in state.finished:
            self.reservations.pop(reservation_id, None)
        windowed: dict[uuid.UUID, list[Key]] = collections.defaultdict(list)
        for reservation_id, budget_id, value, start in state.holds:
            if start is not None:
                windowed[reservation_id].append((budget_id, value, start))
        for reservation_id, call in state.new:
            request = call.request
            self.reservations[reservation_id] = _Locked(
                "active",
                request.estimated_cost_micros,
                request.estimated_tokens,
                call.owner,
                False,
                windowed[reservation_id],
            )
        self._bound()

    def refresh(
        self,
        asked: Iterable[uuid.UUID],
        locked: dict[uuid.UUID, _Locked],
        wanted: Iterable[Key],
        counters: dict[Key, list[int]],
    ) -> None:
        """Replace what was ``asked`` and ``wanted`` by the rows the database returned."""
        for reservation_id in asked:
            self.reservations.pop(reservation_id, None)
        for key in wanted:
            self.counters.pop(key, None)
        self.reservations.update(locked)
        self.counters.update(counters)
        self._bound()

    def add(self, changes: dict[Key, list[int]]) -> None:
        """Add what another writer (ingest) committed to the counters known here."""
        for key, delta in changes.items():
            values = self.counters.get(key)
            if values is not None:
                for i, change in enumerate(delta):
                    values[i] += change

    def forget(self) -> None:
        """Drop everything (after a round failed half-way)."""
        self.counters.clear()
        self.reservations.clear()

    def _bound(self) -> None:
        _drop_oldest(self.counters)
        _drop_oldest(self.reservations)


def _drop_oldest(known: dict[Any, Any]) -> None:
    """Keep the newest ``MAX_KNOWN`` entries of ``known``."""
    while len(known) > MAX_KNOWN:
        del known[next(iter(known))]


def _wanted(plans: Iterable[Plan]) -> dict[Key, Counted]:
    """The counters the reserves of a round touch, with what initialises a missing one."""
    wanted: dict[Key, Counted] = {}
    for plan in plans:
        for budget, value, start, end in plan:
            if start is not None and end is not None:
                wanted[(budget.id, value, start)] = (budget, value, start, end)
    return wanted


def _refused(budget: BudgetDef, reason: str, usage: Usage | None) -> Admission:
    return Admission(False, denial=reservations.denial_for(budget, reason, usage))


class Admitter:
    """Queues admission calls and decides them in group-committed rounds (see the module)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_batch: int = 512,
        max_queued: int = 4096,
        rounds_in_flight: int = 2,
        durable: bool = False,
        decide_on_known: bool = True,
    ) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._max_queued = max_queued
        self._rounds = rounds_in_flight
        self._durable = durable
        self._decide_on_known = decide_on_known
        self._known = _Known()
        self._queue: collections.deque[_Call] = collections.deque()
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: Set when a call is queued: wakes a round runner keeping its connection.
        self._arrived = asyncio.Event()
        self._cache = BudgetCache()
        #: Calls answered per second of wall-clock time while busy, smoothed: how long a queue
        #: takes to drain (it includes the gRPC work between rounds, which competes for the CPU).
        self._rate = 1000.0
        self._last_done = 0.0
        #: The database's time of the last round that had to plan again (clocks may differ).
        self._now_hint: datetime | None = None

    def counters_changed(self, changes: dict[Key, list[int]]) -> None:
        """Take in ``changes`` ingest committed to the counters (as a round reads them).

        The next round decides on the counters with them added. Without this, every Reserve
        after a settled request would find its counters stale and take a second round; a wrong
        guess here costs only that round, never a grant.
        """
        self._known.add(changes)

    @property
    def queued(self) -> int:
        """Calls waiting for a round."""
        return len(self._queue)

    async def reserve(
        self,
        request: usage_pb2.ReserveRequest,
        lease: timedelta,
        owner: str,
        deadline: float | None,
    ) -> Admission:
        """Decide ``request`` in a round."""
        call = _Reserve(deadline, self._future(), request=request, lease=lease, owner=owner)
        answer = await self._submit(call)
        assert isinstance(answer, Admission)
        return answer

    async def finish(
        self,
        key: uuid.UUID,
        owner: str | None,
        deadline: float | None,
        *,
        commit: bool,
        micros: int = 0,
        tokens: int = 0,
    ) -> Finished:
        """Commit or release reservation ``key``: its state and amounts before the call.

        The state is 'missing' or 'foreign' as ``commit_hold`` and ``release_hold`` say.
        """
        call = _Finish(
            deadline,
            self._future(),
            key=key,
            commit=commit,
            micros=micros,
            tokens=tokens,
            owner=owner,
        )
        answer = await self._submit(call)
        assert isinstance(answer, Finished)
        return answer

    def _future(self) -> asyncio.Future[object]:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, call: _Call) -> object:
        self._refuse_if_overloaded(call.deadline)
        self._queue.append(call)
        metrics.ADMISSION_QUEUED.set(len(self._queue))
        self._arrived.set()
        self._kick()
        return await call.future

    def _refuse_if_overloaded(self, deadline: float | None) -> None:
        waiting = len(self._queue)
        expected = (waiting + 1) / self._rate
        if waiting >= self._max_queued:
            metrics.ADMISSION_SHED.labels("queue_full").inc()
            raise ResourceExhaustedError(
                f"admission is overloaded: {waiting} calls are waiting (setting "
                f"admission.max_queued = {self._max_queued}); retry after the delay given",
                retry_after=max(MIN_RETRY_SECONDS, expected),
            )
        if deadline is not None and deadline - time.monotonic() < DEADLINE_MARGIN * expected:
            metrics.ADMISSION_SHED.labels("deadline").inc()
            raise ResourceExhaustedError(
                f"admission is overloaded: the call's deadline is shorter than the expected wait "
                f"of {expected * 1000:.0f} ms ({waiting} calls waiting); retry after the delay "
                "given",
                retry_after=max(MIN_RETRY_SECONDS, expected),
            )

    def _kick(self) -> None:
        while self._running < self._rounds and self._queue:
            self._running += 1
            task = asyncio.create_task(self._drain(), name="admission-round")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        """Run rounds while calls wait, on one connection held meanwhile.

        The connection is kept for ``CONNECTION_LINGER_SECONDS`` after the queue empties (a
        pool release costs a reset round trip), then given back.
        """
        conn: asyncpg.Connection | None = None
        try:
            while True:
                if not self._queue:
                    if conn is None or not await self._next_call_within(CONNECTION_LINGER_SECONDS):
                        return
                    continue
                if conn is None or conn.is_closed():
                    if conn is not None:
                        await self._pool.release(conn)
                        conn = None
                    try:
                        conn = await self._pool.acquire()
                    except Exception as exc:  # no connection: the next calls get the error
                        self._fail(self._take(), exc)
                        continue
                await self._drain_on(conn)
        finally:
            self._running -= 1
            if conn is not None:
                await self._pool.release(conn)

    async def _next_call_within(self, seconds: float) -> bool:
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), seconds)
        except TimeoutError:
            return bool(self._queue)
        return True

    async def _drain_on(self, conn: asyncpg.Connection) -> None:
        while self._queue and not conn.is_closed():
            calls = self._take()
            if calls:
                await self._decide(conn, calls)

    def _take(self) -> list[_Call]:
        """Up to max_batch queued calls; those whose deadline has passed are dropped."""
        now = time.monotonic()
        calls: list[_Call] = []
        while self._queue and len(calls) < self._max_batch:
            call = self._queue.popleft()
            if call.future.done():
                continue
            if call.deadline is not None and call.deadline <= now:
                metrics.ADMISSION_SHED.labels("expired_in_queue").inc()
                call.future.set_exception(
                    ResourceExhaustedError(
                        "admission is overloaded: the deadline passed in the queue",
                        retry_after=MIN_RETRY_SECONDS,
                    )
                )
                continue
            calls.append(call)
        metrics.ADMISSION_QUEUED.set(len(self._queue))
        return calls

    async def _decide(self, conn: asyncpg.Connection, calls: list[_Call]) -> None:
        began = time.perf_counter()
        try:
            answers = await self._round_with_retries(conn, calls)
        except (DeadlockDetectedError, _MissingCounters, _Replan) as exc:
            failure = StorageError("admission could not settle its counters; retry")
            failure.__cause__ = exc
            self._fail(calls, failure)
            return
        except asyncpg.PostgresError as exc:
            if len(calls) == 1 or isinstance(exc, DATABASE_UNREACHABLE):
                self._fail(calls, exc)
                return
            # One call's values refused by the database must not fail the others: alone each.
            log.warning("admission round failed; deciding its calls one by one", error=str(exc))
            for call in calls:
                await self._decide(conn, [call])
            return
        except Exception as exc:  # the database went away: every call of the round gets it
            self._fail(calls, exc)
            return
        for call, answer in answers:
            if call.future.done():
                continue
            if isinstance(answer, BaseException):
                call.future.set_exception(answer)
            else:
                call.future.set_result(answer)
        seconds = time.perf_counter() - began
        metrics.ADMISSION_ROUND_SIZE.observe(len(calls))
        metrics.ADMISSION_ROUND_SECONDS.observe(seconds)
        done = time.perf_counter()
        busy_since = max(began, self._last_done)  # back to back: the gap since the last round
        self._last_done = done
        self._rate = 0.8 * self._rate + 0.2 * (len(calls) / max(done - busy_since, 1e-4))

    @staticmethod
    def _fail(calls: list[_Call], exc: BaseException) -> None:
        for call in calls:
            if not call.future.done():
                call.future.set_exception(exc)

    async def _round_with_retries(
        self, conn: asyncpg.Connection, calls: list[_Call]
    ) -> list[tuple[_Call, object]]:
        """The round; after a deadlock, missing counter rows or a stale plan, the round again.

        The first attempt runs outside tenacity: its retry state is a web of reference cycles
        that only the garbage collector frees, and building it for every round made the
        collector's pauses the admission's slowest calls.
        """
        try:
            return await self._attempt(conn, calls)
        except RETRIED_ROUND_ERRORS:
            pass  # rare: the attempts below start afresh
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(RETRIED_ROUND_ERRORS),
            stop=stop_after_attempt(ROUND_ATTEMPTS - 1),
            reraise=True,
        ):
            with attempt:
                return await self._attempt(conn, calls)
        raise AssertionError("unreachable")

    async def _attempt(
        self, conn: asyncpg.Connection, calls: list[_Call]
    ) -> list[tuple[_Call, object]]:
        try:
            if self._decide_on_known:
                answers = await self._round_on_known(conn, calls)
                if answers is not None:
                    return answers
            metrics.ADMISSION_ROUNDS.labels("locked").inc()
            return await self._round(conn, calls)
        except _MissingCounters as missing:
            async with conn.transaction():
                await counters.init_counters(conn, missing.missing)
            raise

    async def _round(
        self, conn: asyncpg.Connection, calls: list[_Call]
    ) -> list[tuple[_Call, object]]:
        reserves = [c for c in calls if isinstance(c, _Reserve)]
        finishes = [c for c in calls if isinstance(c, _Finish)]
        async with conn.transaction():
            guess = self._plans(reserves, self._now_hint or datetime.now(UTC))
            locked_keys = set(_wanted(guess.values()))
            ledger_keys = _ledger_locks(reserves, guess)
            if ledger_keys:
                await conn.fetchval(LOCK_LEDGER_KEYS, LEDGER_LOCK_CLASS, sorted(ledger_keys))
            now, generation, locked, counters = await self._lock(conn, finishes, locked_keys)
            if generation != self._cache.generation:
                await self._cache.load(conn, generation)
            plans = self._plans(reserves, now)
            wanted = _wanted(plans.values())
            if not (wanted.keys() <= locked_keys and _ledger_locks(reserves, plans) <= ledger_keys):
                self._now_hint = now  # budgets or the window changed meanwhile
                raise _Replan()
            missing = [item for key, item in wanted.items() if key not in counters]
            if missing:
                raise _MissingCounters(missing)
            state = _Round(now, counters)
            await self._read_ledger(conn, reserves, plans, state)
            for finish in finishes:
                self._finish(finish, locked, state)
            for reserve in reserves:
                self._admit(reserve, plans[id(reserve)], state)
            await self._write(conn, state)
        self._now_hint = None
        self._known.remember(state)
        self._known.clock_offset = now - datetime.now(UTC)
        return state.answers

    def _plans(self, reserves: list[_Reserve], now: datetime) -> dict[int, Plan]:
        return {id(call): self._plan(call, now) for call in reserves}

    async def _read_ledger(
        self,
        conn: asyncpg.Connection,
        reserves: list[_Reserve],
        plans: dict[int, Plan],
        state: _Round,
    ) -> None:
        """Spend and holds of the rolling budgets and use of the limited sessions (locked)."""
        for reserve in reserves:
            session_id = reserve.request.session_id
            for budget, value, _, _ in plans[id(reserve)]:
                key = (budget.id, value)
                if budget.sums_ledger and key not in state.rolling:
                    state.rolling[key] = await counters.usage_from_ledger(
                        conn, budget, value, state.now
                    )
                if budget.limits_sessions and session_id and session_id not in state.sessions:
                    use = await conn.fetchrow(SESSION_USE, session_id)
                    assert use is not None
                    state.sessions[session_id] = SessionUse(*use)

    async def _lock(
        self, conn: asyncpg.Connection, finishes: list[_Finish], keys: set[Key]
    ) -> tuple[datetime, int, dict[uuid.UUID, _Locked], dict[Key, list[int]]]:
        """Lock what the round touches (one call) and read what the round decides on.

        Returns the round's time and budget generation, the finished reservations, and every
        counter ``[spent_micros, spent_tokens, held_micros, held_tokens]`` with lapsed holds
        subtracted.
        """
        ordered = counters.in_lock_order(keys)
        rows = await conn.fetch(
            ADMISSION_LOCK,
            self._sync,
            sorted({f.key for f in finishes}),
            [k[0] for k in ordered],
            [k[1] for k in ordered],
            [k[2] for k in ordered],
        )
        return _rows_read(rows)

    @property
    def _sync(self) -> str:
        """The round's synchronous_commit."""
        return "on" if self._durable else "off"

    def _plan(self, call: _Reserve, now: datetime) -> Plan:
        """The applicable budgets, with their windows when they have a counter."""
        plan: Plan = []
        for budget, value in self._cache.applicable(call.request):
            if budget.counted:
                start, end = self._cache.window(budget, now)
                plan.append((budget, value, start, end))
            else:
                plan.append((budget, value, None, None))
        return plan

    def _finish(self, call: _Finish, locked: dict[uuid.UUID, _Locked], state: _Round) -> None:
        held = locked.get(call.key)
        if held is None:
            state.answers.append((call, Finished("missing")))
            return
        if call.owner is not None and held.owner and held.owner != call.owner:
            state.answers.append((call, Finished("foreign")))
            return
        before = held.state
        state.answers.append((call, Finished(before, held.micros, held.tokens, held.lapsed)))
        if before not in ("active", "expired"):
            return
        # An active hold is replaced by the actual usage (Commit) or nothing (Release); an
        # expired one no longer counted.
        # The stored counter still has a lapsed hold; the one read (in memory) has not.
        was = (held.micros, held.tokens) if before == "active" else (0, 0)
        was_read = (0, 0) if held.lapsed else was
        now_holds = (call.micros, call.tokens) if call.commit else (0, 0)
        for key in held.keys:
            if key in state.counters:
                delta, counter = state.deltas[key], state.counters[key]
                for i in (0, 1):
                    delta[2 + i] += now_holds[i] - was[i]
                    counter[2 + i] += now_holds[i] - was_read[i]
        held.lapsed = False
        held.state = "committed" if call.commit else "released"
        if call.commit:
            held.micros, held.tokens = call.micros, call.tokens
        state.finished[call.key] = (held.state, held.micros, held.tokens)

    def _admit(self, call: _Reserve, plan: Plan, state: _Round) -> None:
        """The admission rule: grant unless a budget refuses, the first in id order named."""
        request = call.request
        for budget, value, start, end in plan:
            refusal = self._refusal(budget, value, start, end, request, state)
            if refusal is not None:
                state.answers.append((call, refusal))
                return
        micros, tokens = request.estimated_cost_micros, request.estimated_tokens
        reservation_id = uuid.uuid4()
        for budget, value, start, _ in plan:
            state.holds.append((reservation_id, budget.id, value, start))
            if start is not None:
                key = (budget.id, value, start)
                for held in (state.counters[key], state.deltas[key]):
                    held[2] += micros
                    held[3] += tokens
            elif (budget.id, value) in state.rolling:
                rolling = state.rolling[(budget.id, value)]
                rolling.reserved_micros += micros
                rolling.reserved_tokens += tokens
        if request.session_id in state.sessions:
            session = state.sessions[request.session_id]
            session.held_micros += micros
            session.held_tokens += tokens
        state.new.append((reservation_id, call))
        state.answers.append(
            (
                call,
                Admission(
                    True,
                    str(reservation_id),
                    state.now + call.lease,
                    budget_ids=[str(b.id) for b, _, _, _ in plan],
                ),
            )
        )

    @staticmethod
    def _refusal(
        budget: BudgetDef,
        value: str,
        start: datetime | None,
        end: datetime | None,
        request: usage_pb2.ReserveRequest,
        state: _Round,
    ) -> Admission | None:
        """``budget``'s refusal of ``request`` as the round stands, or None if it admits it."""
        if budget.limits_sessions and request.session_id:
            why = state.sessions[request.session_id].refusal(budget, request, state.now)
            if why is not None:
                return _refused(budget, why, None)
        if not budget.has_limit:
            return None
        if start is not None and end is not None:
            usage = Usage(start, end, *state.counters[(budget.id, value, start)])
        else:
            usage = state.rolling[(budget.id, value)]
        if (
            budget.limit_micros is not None
            and usage.remaining(budget.limit_micros, "micros") < request.estimated_cost_micros
        ):
            return _refused(budget, "the estimated cost exceeds what the budget has left", usage)
        if (
            budget.limit_tokens is not None
            and usage.remaining(budget.limit_tokens, "tokens") < request.estimated_tokens
        ):
            return _refused(budget, "the estimated tokens exceed what the budget has left", usage)
        return None

    async def _write(self, conn: asyncpg.Connection, state: _Round) -> None:
        if state.new or state.finished or any(any(d) for d in state.deltas.values()):
            await conn.execute(WRITE, *_write_args(state))

    async def _round_on_known(
        self, conn: asyncpg.Connection, calls: list[_Call]
    ) -> list[tuple[_Call, object]] | None:
        """The round decided on what the process knows, written in one call if it still holds.

        None when the process does not know enough (a reserve that reads the ledger, a
        reservation or counter it has not seen, budgets changed) or the rows had changed each
        time: the locked round decides then.
        """
        reserves = [c for c in calls if isinstance(c, _Reserve)]
        finishes = [c for c in calls if isinstance(c, _Finish)]
        for _ in range(KNOWN_ROUND_TRIES):
            state = self._decided_on_known(reserves, finishes)
            if state is None:
                return None
            decided, decided_on, locked = state
            try:
                rows = await conn.fetch(
                    ADMISSION_APPLY, *self._apply_args(decided, decided_on, locked)
                )
            except BaseException:
                self._known.forget()
                raise
            now, generation, fresh_locked, fresh_counters = _rows_read(rows)
            self._known.clock_offset = now - datetime.now(UTC)
            if rows[0]["applied"]:
                metrics.ADMISSION_ROUNDS.labels("known").inc()
                for call, answer in decided.answers:
                    if isinstance(answer, Admission) and answer.granted:
                        answer.lease_expires_at = now + cast(_Reserve, call).lease
                self._known.remember(decided)
                return decided.answers
            metrics.ADMISSION_ROUNDS.labels("stale").inc()
            self._known.refresh(locked, fresh_locked, decided_on, fresh_counters)
            if generation != self._cache.generation:
                return None
        return None

    def _decided_on_known(
        self, reserves: list[_Reserve], finishes: list[_Finish]
    ) -> tuple[_Round, dict[Key, tuple[int, ...]], dict[uuid.UUID, _Locked]] | None:
        """The round decided on what the process knows, with the rows it decided on.

        None when it does not know enough.
        """
        if self._cache.generation < 0:
            return None
        now = self._known.now()
        plans = self._plans(reserves, now)
        if _ledger_locks(reserves, plans):
            return None
        locked: dict[uuid.UUID, _Locked] = {}
        for finish in finishes:
            held = self._known.reservations.get(finish.key)
            if held is None:
                return None
            locked[finish.key] = dataclasses.replace(held, keys=list(held.keys))
        keys = set(_wanted(plans.values())).union(*(held.keys for held in locked.values()))
        if not keys <= self._known.counters.keys():
            return None
        decided_on = {key: tuple(self._known.counters[key]) for key in keys}
        as_read = {rid: dataclasses.replace(held) for rid, held in locked.items()}
        state = _Round(now, {key: list(values) for key, values in decided_on.items()})
        for finish in finishes:
            self._finish(finish, locked, state)
        for reserve in reserves:
            self._admit(reserve, plans[id(reserve)], state)
        state.valid = _valid_between(plans.values())
        return state, decided_on, as_read

    def _apply_args(
        self,
        state: _Round,
        decided_on: dict[Key, tuple[int, ...]],
        locked: dict[uuid.UUID, _Locked],
    ) -> list[object]:
        ids = sorted(locked)
        keys = counters.in_lock_order(decided_on)
        return [
            self._sync,
            self._cache.generation,
            *state.valid,
            ids,
            [locked[i].state for i in ids],
            [locked[i].micros for i in ids],
            [locked[i].tokens for i in ids],
            [locked[i].owner for i in ids],
            [locked[i].lapsed for i in ids],
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            *([decided_on[k][i] for k in keys] for i in range(4)),
            *_write_args(state),
        ]


def _write_args(state: _Round) -> list[list[Any]]:
    """The 24 arrays ``admission_write`` takes: what ``state`` decided."""
    deltas = {k: d for k, d in state.deltas.items() if any(d)}
    keys = counters.in_lock_order(deltas)
    new = [call for _, call in state.new]
    finished = list(state.finished.items())
    return [
        [rid for rid, _ in state.new],
        [c.owner for c in new],
        [c.request.project for c in new],
        [c.request.user for c in new],
        [c.request.session_id for c in new],
        [c.request.model for c in new],
        [c.request.estimated_cost_micros for c in new],
        [c.request.estimated_tokens for c in new],
        [c.lease for c in new],
        [h[0] for h in state.holds],
        [h[1] for h in state.holds],
        [h[2] for h in state.holds],
        [h[3] for h in state.holds],
        [key for key, _ in finished],
        [f[0] for _, f in finished],
        [f[1] for _, f in finished],
        [f[2] for _, f in finished],
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        *([deltas[k][i] for k in keys] for i in range(4)),
    ]


def _valid_between(plans: Iterable[Plan]) -> tuple[datetime, datetime]:
    """When the round's decisions hold: inside every calendar window its reserves count in."""
    windows = [(start, end) for plan in plans for _, _, start, end in plan if start and end]
    if not windows:
        return ALWAYS
    return max(start for start, _ in windows), min(end for _, end in windows)


def _ledger_locks(reserves: list[_Reserve], plans: dict[int, Plan]) -> set[str]:
    """The advisory lock keys of every reserve of a round (see :func:`ledger_locks`)."""
    keys: set[str] = set()
    for call in reserves:
        keys |= ledger_locks(plans[id(call)], call.request.session_id)
    return keys


def _rows_read(
    rows: list[asyncpg.Record],
) -> tuple[datetime, int, dict[uuid.UUID, _Locked], dict[Key, list[int]]]:
    """The round's time, budget generation, reservations and counters in the rows read."""
    now, generation = datetime.now(UTC), -1
    locked: dict[uuid.UUID, _Locked] = {}
    counters: dict[Key, list[int]] = {}
    for row in rows:
        if row["kind"] == "head":
            now, generation = row["now_"], row["generation_"]
        elif row["kind"] == "counter":
            key = (row["budget_id"], row["scope_value"], row["window_start"])
            counters[key] = [
                row["spent_micros"],
                row["spent_tokens"],
                row["held_micros"],
                row["held_tokens"],
            ]
        else:
            held = locked.setdefault(
                row["id"],
                _Locked(
                    row["state"],
                    row["amount_micros"],
                    row["amount_tokens"],
                    row["owner"],
                    row["lapsed"],
                ),
            )
            if row["budget_id"] is not None:
                held.keys.append((row["budget_id"], row["scope_value"], row["window_start"]))
    return now, generation, locked, counters
