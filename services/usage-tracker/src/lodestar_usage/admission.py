"""Group-committed admission: concurrent Reserves, Commits and Releases decided in rounds.

Each process queues the admission calls it receives; a round takes what is queued (up to
``max_batch``) and decides all of it in one Postgres transaction:

1. one call of ``admission_lock`` (migration 0007): the reservations being committed or released
   locked in id order, then every counter the round touches locked once in key order (the order
   every writer uses); then the round's ``now()``, the budget generation, those reservations and
   the counters with the expired holds subtracted, read after the locks;
2. budget definitions are cached per process and reloaded when the generation (bumped by a
   trigger on every change of ``budgets``) has moved; a round whose calls then need other
   counters than it locked is run again;
3. every decision made in memory, in arrival order, against those locked counters;
4. one statement writing the new holds, the finished reservations and the counter deltas.

Postgres stays the arbiter: the counters are locked for the whole round, so rounds of several
replicas (and the older single-call paths) touching one budget are decided one after the other,
each seeing the others' holds. Nothing is granted before the round's transaction has committed.

Overload is explicit: a call that finds the queue full, or whose deadline is shorter than the
expected wait, is refused at once with RESOURCE_EXHAUSTED and a retry delay (counted in
``lodestar_usage_admission_shed_total``), never left to time out in the queue.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
from asyncpg.exceptions import DeadlockDetectedError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from lodestar.common.errors import DATABASE_UNREACHABLE, ResourceExhaustedError, StorageError
from lodestar.common.logging import get_logger
from lodestar.usage.v1 import usage_pb2
from lodestar_usage import budgets, metrics
from lodestar_usage.budgets import Admission, BudgetDef, Finished, Key, Usage

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
#: The smallest retry delay a shed call is told.
MIN_RETRY_SECONDS = 0.05

#: Starts a round (migration 0007): locks, then the round's time, generation, reservations and
#: counters as rows of kind 'head', 'reservation' and 'counter'.
ADMISSION_LOCK = (
    "SELECT * FROM admission_lock($1, $2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[])"
)
WRITE = (
    "WITH new AS (INSERT INTO reservations (id, owner, project, user_id, session_id, model, "
    "state, amount_micros, amount_tokens, created_at, lease_expires_at) "
    "SELECT i, o, p, us, s, m, 'active', am, at, now(), now() + l FROM unnest($1::uuid[], "
    "$2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::bigint[], "
    "$9::interval[]) AS n(i, o, p, us, s, m, am, at, l)), "
    "held AS (INSERT INTO reservation_budgets (reservation_id, budget_id, scope_value, "
    "window_start) SELECT * FROM unnest($10::uuid[], $11::uuid[], $12::text[], "
    "$13::timestamptz[])), "
    "done AS (UPDATE reservations r SET state = f.s, amount_micros = f.am, "
    "amount_tokens = f.at, finished_at = now() FROM unnest($14::uuid[], $15::text[], "
    "$16::bigint[], $17::bigint[]) AS f(i, s, am, at) WHERE r.id = f.i) "
    "UPDATE budget_counters c SET spent_micros = c.spent_micros + d.sm, "
    "spent_tokens = c.spent_tokens + d.st, held_micros = c.held_micros + d.hm, "
    "held_tokens = c.held_tokens + d.ht FROM unnest($18::uuid[], $19::text[], "
    "$20::timestamptz[], $21::bigint[], $22::bigint[], $23::bigint[], $24::bigint[]) "
    "AS d(b, v, w, sm, st, hm, ht) "
    "WHERE c.budget_id = d.b AND c.scope_value = d.v AND c.window_start = d.w"
)


@dataclass
class BudgetCache:
    """The usable budgets as of a generation of the ``budgets`` table."""

    generation: int = -1
    budgets: list[BudgetDef] = field(default_factory=list)

    async def load(self, conn: asyncpg.Connection, generation: int) -> None:
        """Read every budget again (in the caller's transaction)."""
        recs = await conn.fetch(f"{budgets.BUDGET_ROWS} FROM budgets ORDER BY id")
        self.budgets = budgets.usable_budgets(recs)
        self.generation = generation

    def applicable(self, request: usage_pb2.ReserveRequest) -> list[tuple[BudgetDef, str]]:
        """The budgets ``request`` counts against with their scope values, in id order."""
        out = []
        for budget in self.budgets:
            value = budget.value_for(request.project, request.user, request.session_id)
            if value is not None:
                out.append((budget, value))
        return out


def needs_slow_path(applicable: Sequence[tuple[BudgetDef, str]], session_id: str) -> bool:
    """Whether a Reserve must take the single-call path.

    It must for a rolling budget with a limit (it adds up the ledger) or a session budget with
    session limits (it reads the session).
    """
    for budget, _ in applicable:
        if budget.period == usage_pb2.BUDGET_PERIOD_ROLLING and budget.has_limit:
            return True
        if session_id and budget.limits_sessions:
            return True
    return False


class SlowPath(Exception):
    """The Reserve is decided by :func:`budgets.reserve` instead of a round."""


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


def _zero() -> list[int]:
    return [0, 0, 0, 0]


def _wanted(plans: list[Plan | None]) -> dict[Key, Counted]:
    """The counters the reserves of a round touch, with what initialises a missing one."""
    wanted: dict[Key, Counted] = {}
    for plan in plans:
        for budget, value, start, end in plan or ():
            if start is not None and end is not None:
                wanted[(budget.id, value, start)] = (budget, value, start, end)
    return wanted


def _refused(budget: BudgetDef, reason: str, usage: Usage) -> Admission:
    return Admission(False, denial=budgets.denial_for(budget, reason, usage))


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
    ) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._max_queued = max_queued
        self._rounds = rounds_in_flight
        self._durable = durable
        self._queue: collections.deque[_Call] = collections.deque()
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._cache = BudgetCache()
        #: Calls answered per second of wall-clock time while busy, smoothed: how long a queue
        #: takes to drain (it includes the gRPC work between rounds, which competes for the CPU).
        self._rate = 1000.0
        self._last_done = 0.0
        #: The database's time of the last round that had to plan again (clocks may differ).
        self._now_hint: datetime | None = None

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
        """Decide ``request`` in a round; SlowPath when it must take the single-call path."""
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
        """Run rounds while calls wait, on one connection held meanwhile."""
        try:
            while self._queue:
                try:
                    async with self._pool.acquire() as conn:
                        await self._drain_on(conn)
                except Exception as exc:  # no connection: the next calls get the error
                    self._fail(self._take(), exc)
        finally:
            self._running -= 1

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
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((DeadlockDetectedError, _MissingCounters, _Replan)),
            stop=stop_after_attempt(ROUND_ATTEMPTS),
            reraise=True,
        ):
            with attempt:
                try:
                    return await self._round(conn, calls)
                except _MissingCounters as missing:
                    async with conn.transaction():
                        await budgets.init_counters(conn, missing.missing)
                    raise
        raise AssertionError("unreachable")

    async def _round(
        self, conn: asyncpg.Connection, calls: list[_Call]
    ) -> list[tuple[_Call, object]]:
        reserves = [c for c in calls if isinstance(c, _Reserve)]
        finishes = [c for c in calls if isinstance(c, _Finish)]
        async with conn.transaction():
            guess = {id(c): self._plan(c, self._now_hint or datetime.now(UTC)) for c in reserves}
            locked_keys = set(_wanted(list(guess.values())))
            now, generation, locked, counters = await self._lock(conn, finishes, locked_keys)
            if generation != self._cache.generation:
                await self._cache.load(conn, generation)
            plans = {id(c): self._plan(c, now) for c in reserves}
            wanted = _wanted(list(plans.values()))
            if not wanted.keys() <= locked_keys:  # budgets or the window changed meanwhile
                self._now_hint = now
                raise _Replan()
            missing = [item for key, item in wanted.items() if key not in counters]
            if missing:
                raise _MissingCounters(missing)
            state = _Round(now, counters)
            for finish in finishes:
                self._finish(finish, locked, state)
            for reserve in reserves:
                self._admit(reserve, plans[id(reserve)], state)
            await self._write(conn, state)
        self._now_hint = None
        return state.answers

    async def _lock(
        self, conn: asyncpg.Connection, finishes: list[_Finish], keys: set[Key]
    ) -> tuple[datetime, int, dict[uuid.UUID, _Locked], dict[Key, list[int]]]:
        """Lock what the round touches (one call) and read what the round decides on.

        Returns the round's time and budget generation, the finished reservations, and every
        counter ``[spent_micros, spent_tokens, held_micros, held_tokens]`` with lapsed holds
        subtracted.
        """
        ordered = sorted(keys, key=lambda k: (k[0].bytes, k[1], k[2]))
        rows = await conn.fetch(
            ADMISSION_LOCK,
            "on" if self._durable else "off",
            sorted({f.key for f in finishes}),
            [k[0] for k in ordered],
            [k[1] for k in ordered],
            [k[2] for k in ordered],
        )
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

    def _plan(self, call: _Reserve, now: datetime) -> Plan | None:
        """The applicable budgets with their windows, or None for the slow path."""
        applicable = self._cache.applicable(call.request)
        if needs_slow_path(applicable, call.request.session_id):
            return None
        plan: Plan = []
        for budget, value in applicable:
            if budget.counted:
                start, end = budget.window(now)
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

    def _admit(
        self,
        call: _Reserve,
        plan: Plan | None,
        state: _Round,
    ) -> None:
        if plan is None:
            state.answers.append((call, SlowPath()))
            return
        micros, tokens = call.request.estimated_cost_micros, call.request.estimated_tokens
        for budget, value, start, end in plan:
            if start is None or end is None:
                continue
            counter = state.counters[(budget.id, value, start)]
            usage = Usage(start, end, *counter)
            if (
                budget.limit_micros is not None
                and usage.remaining(budget.limit_micros, "micros") < micros
            ):
                reason = "the estimated cost exceeds what the budget has left"
                state.answers.append((call, _refused(budget, reason, usage)))
                return
            if (
                budget.limit_tokens is not None
                and usage.remaining(budget.limit_tokens, "tokens") < tokens
            ):
                reason = "the estimated tokens exceed what the budget has left"
                state.answers.append((call, _refused(budget, reason, usage)))
                return
        reservation_id = uuid.uuid4()
        for budget, value, start, _ in plan:
            state.holds.append((reservation_id, budget.id, value, start))
            if start is not None:
                key = (budget.id, value, start)
                for counts in (state.counters[key], state.deltas[key]):
                    counts[2] += micros
                    counts[3] += tokens
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

    async def _write(self, conn: asyncpg.Connection, state: _Round) -> None:
        deltas = {k: d for k, d in state.deltas.items() if any(d)}
        if not (state.new or state.finished or deltas):
            return
        keys = sorted(deltas, key=lambda k: (k[0].bytes, k[1], k[2]))
        new = [call for _, call in state.new]
        finished = list(state.finished.items())
        await conn.execute(
            WRITE,
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
        )
