"""Budgets and admission: concurrency never overspends, leases expire, alerts fire once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lodestar.common.auth import Role
from lodestar.common.db import apply_migrations, create_pool
from lodestar.common.sdk import ReceivedEvent, Subscriber, connect
from lodestar.usage.v1 import events_pb2 as ev
from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug
from lodestar_usage import alerts, budgets, counters, reservations
from lodestar_usage.admission import Admitter
from lodestar_usage.client import call_error
from lodestar_usage.service import MIGRATIONS

from .test_usage_ledger import completed, publish, wait_requests


def global_budget(**kw):
    return u.Budget(name="all", scope=u.BUDGET_SCOPE_GLOBAL, period=u.BUDGET_PERIOD_MONTHLY, **kw)


async def test_200_concurrent_reserves_never_exceed_the_limit(admin, tracker, tokens):
    stub = ug.BudgetServiceStub(admin)
    await stub.CreateBudget(u.CreateBudgetRequest(budget=global_budget(limit_micros=10_000)))
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as publisher:
        gate = ug.BudgetServiceStub(publisher)
        replies = await asyncio.gather(
            *(
                gate.Reserve(u.ReserveRequest(project="p", estimated_cost_micros=100))
                for _ in range(200)
            )
        )
        granted = [r for r in replies if r.granted]
        assert len(granted) == 100
        denied = next(r for r in replies if not r.granted)
        assert denied.denial.budget_name == "all"
        assert denied.denial.remaining_micros == 0
        now = datetime.now(UTC)  # a monthly UTC budget resets at the start of the next month
        next_month = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
        assert denied.denial.resets_at.ToDatetime(tzinfo=UTC) == next_month
        # Committing less than reserved frees the difference; releasing frees it all.
        await gate.Commit(
            u.CommitRequest(reservation_id=granted[0].reservation_id, actual_cost_micros=40)
        )
        await gate.Release(u.ReleaseRequest(reservation_id=granted[1].reservation_id))
        status = (await stub.ListBudgets(u.ListBudgetsRequest())).budgets[0]
        assert status.reserved_micros == 98 * 100 + 40
        assert status.remaining_micros == 10_000 - 9840


async def test_rolling_and_calendar_budgets_together_never_overspend(admin, tracker, tokens):
    """A rolling budget and a calendar one in the same rounds: neither is ever overspent."""
    stub = ug.BudgetServiceStub(admin)
    await stub.CreateBudget(u.CreateBudgetRequest(budget=global_budget(limit_micros=4_500)))
    rolling = u.Budget(
        name="hour",
        scope=u.BUDGET_SCOPE_PROJECT,
        scope_value="r",
        period=u.BUDGET_PERIOD_ROLLING,
        rolling=duration_pb2.Duration(seconds=3600),
        limit_micros=1_000,
    )
    await stub.CreateBudget(u.CreateBudgetRequest(budget=rolling))
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as publisher:
        gate = ug.BudgetServiceStub(publisher)
        replies = await asyncio.gather(
            *(
                gate.Reserve(
                    u.ReserveRequest(project="r" if i % 2 else "c", estimated_cost_micros=100)
                )
                for i in range(80)
            )
        )
    granted_r = sum(r.granted for i, r in enumerate(replies) if i % 2)
    granted_c = sum(r.granted for i, r in enumerate(replies) if not i % 2)
    assert granted_r <= 10  # the rolling budget's limit
    assert granted_r + granted_c == 45  # the global budget's limit, exactly used up
    denied = {r.denial.budget_name for r in replies if not r.granted}
    assert denied <= {"all", "hour"}


async def test_a_rolling_budget_denies_without_a_reset_time(admin, tracker, tokens):
    """Its spend leaves the window as it ages; there is no moment it starts from zero."""
    rolling = u.Budget(
        name="hour",
        scope=u.BUDGET_SCOPE_GLOBAL,
        period=u.BUDGET_PERIOD_ROLLING,
        rolling=duration_pb2.Duration(seconds=3600),
        limit_micros=100,
    )
    await ug.BudgetServiceStub(admin).CreateBudget(u.CreateBudgetRequest(budget=rolling))
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as publisher:
        reply = await ug.BudgetServiceStub(publisher).Reserve(
            u.ReserveRequest(project="p", estimated_cost_micros=200)
        )
    assert not reply.granted
    assert reply.denial.budget_name == "hour"
    assert not reply.denial.HasField("resets_at")


async def test_leaked_reservations_expire(admin, tracker, tokens):
    stub = ug.BudgetServiceStub(admin)
    await stub.CreateBudget(u.CreateBudgetRequest(budget=global_budget(limit_micros=100)))
    first = await stub.Reserve(
        u.ReserveRequest(estimated_cost_micros=100, lease=duration_pb2.Duration(nanos=300_000_000))
    )
    assert first.granted
    assert not (await stub.Reserve(u.ReserveRequest(estimated_cost_micros=1))).granted
    await asyncio.sleep(0.4)
    assert (await stub.Reserve(u.ReserveRequest(estimated_cost_micros=100))).granted


@pytest.mark.parametrize(
    ("budget", "field"),
    [
        (global_budget(), "budget.limit_micros"),
        (
            u.Budget(
                name="x", scope=u.BUDGET_SCOPE_PROJECT, period=u.BUDGET_PERIOD_DAILY, limit_micros=1
            ),
            "budget.scope_value",
        ),
        (global_budget(limit_micros=1, timezone="Nowhere/Land"), "budget.timezone"),
        (
            u.Budget(
                name="x",
                scope=u.BUDGET_SCOPE_GLOBAL,
                period=u.BUDGET_PERIOD_ROLLING,
                limit_micros=1,
            ),
            "budget.rolling",
        ),
        (global_budget(limit_micros=-5), "budget.limit_micros"),
    ],
)
async def test_bad_budgets_are_refused_and_nothing_stored(admin, budget, field):
    stub = ug.BudgetServiceStub(admin)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateBudget(u.CreateBudgetRequest(budget=budget))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field)
    assert list((await stub.ListBudgets(u.ListBudgetsRequest())).budgets) == []


async def test_negative_estimates_are_invalid(admin):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ug.BudgetServiceStub(admin).Reserve(u.ReserveRequest(estimated_tokens=-1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("estimated_tokens")


@pytest.mark.parametrize(
    ("reservation_id", "says"),
    [("", "required"), ("r-42", "'r-42' is not a reservation id")],
    ids=["empty", "malformed"],
)
async def test_release_and_commit_name_what_is_wrong_with_the_id(admin, reservation_id, says):
    stub = ug.BudgetServiceStub(admin)
    for call in (
        stub.Release(u.ReleaseRequest(reservation_id=reservation_id)),
        stub.Commit(u.CommitRequest(reservation_id=reservation_id)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(f"reservation_id: {says}")


async def commit_on_path(
    path: str, gate: ug.BudgetServiceStub, request: u.CommitRequest
) -> u.CommitResponse:
    """A Commit as its own RPC, or as a call of an Admit request (raised as the RPC would)."""
    if path == "Commit":
        return await gate.Commit(request)
    reply = await gate.Admit(u.AdmitRequest(calls=[u.AdmissionCall(commit=request)]))
    (result,) = reply.results
    if result.HasField("error"):
        raise call_error(result.error)
    return result.commit


@pytest.mark.parametrize("path", ["Commit", "Admit"])
async def test_a_commit_is_final_a_repeat_is_answered_other_amounts_are_refused(
    admin, tracker, tokens, path
):
    stub = ug.BudgetServiceStub(admin)
    await stub.CreateBudget(u.CreateBudgetRequest(budget=global_budget(limit_micros=10_000)))
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as publisher:
        gate = ug.BudgetServiceStub(publisher)
        reserved = await gate.Reserve(u.ReserveRequest(project="p", estimated_cost_micros=500))
        commit = u.CommitRequest(
            reservation_id=reserved.reservation_id, actual_cost_micros=300, actual_tokens=7
        )
        first = await commit_on_path(path, gate, commit)
        again = await commit_on_path(path, gate, commit)
        assert (first.committed, first.repeated) == (True, False)
        assert (again.committed, again.repeated) == (True, True)
        other = u.CommitRequest(reservation_id=reserved.reservation_id, actual_cost_micros=900)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await commit_on_path(path, gate, other)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        message = refused.value.details()
        assert "committed with 300 micro-dollars and 7 tokens; a commit is final" in message
    status = (await stub.ListBudgets(u.ListBudgetsRequest())).budgets[0]
    assert status.reserved_micros == 300  # the first commit's amount, nothing else


@pytest.mark.parametrize("path", ["Commit", "Admit"])
async def test_a_commit_says_when_it_exceeds_the_hold_or_comes_after_the_lease(
    admin, tracker, tokens, path
):
    """Both are counted in full (the call happened); neither is silent."""
    stub = ug.BudgetServiceStub(admin)
    await stub.CreateBudget(u.CreateBudgetRequest(budget=global_budget(limit_micros=10_000)))
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as publisher:
        gate = ug.BudgetServiceStub(publisher)

        async def reserve(lease: float) -> str:
            reply = await gate.Reserve(
                u.ReserveRequest(
                    project="p",
                    estimated_cost_micros=100,
                    estimated_tokens=10,
                    lease=duration_pb2.Duration(seconds=int(lease), nanos=int(lease % 1 * 1e9)),
                )
            )
            return reply.reservation_id

        async def commit(rid: str, micros: int, tokens_: int) -> u.CommitResponse:
            request = u.CommitRequest(
                reservation_id=rid, actual_cost_micros=micros, actual_tokens=tokens_
            )
            return await commit_on_path(path, gate, request)

        within = await commit(await reserve(30), 80, 10)
        assert not within.lease_expired
        assert within.over_estimate_micros == within.over_estimate_tokens == 0
        beyond = await commit(await reserve(30), 250, 12)
        assert (beyond.over_estimate_micros, beyond.over_estimate_tokens) == (150, 2)
        late_id = await reserve(0.3)
        await asyncio.sleep(0.6)
        late = await commit(late_id, 90, 9)
        assert late.committed
        assert late.lease_expired
    status = (await stub.ListBudgets(u.ListBudgetsRequest())).budgets[0]
    assert status.reserved_micros == 80 + 250 + 90  # every actual amount, counted in full


async def test_session_limits_hold_reservations_under_concurrency(admin, tracker, tokens):
    """A 1,000-token session limit: of three concurrent 400-token reservations on a new session,
    two are granted; a released one makes room again."""
    per_session = u.Budget(
        name="per session",
        scope=u.BUDGET_SCOPE_SESSION,
        period=u.BUDGET_PERIOD_MONTHLY,
        session_limits=u.SessionLimits(max_tokens=1_000),
    )
    await ug.BudgetServiceStub(admin).CreateBudget(u.CreateBudgetRequest(budget=per_session))
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as publisher:
        gate = ug.BudgetServiceStub(publisher)

        def ask(session: str) -> u.ReserveRequest:
            return u.ReserveRequest(project="p", session_id=session, estimated_tokens=400)

        replies = await asyncio.gather(*(gate.Reserve(ask("s-new")) for _ in range(3)))
        granted = [r for r in replies if r.granted]
        assert len(granted) == 2
        (denied,) = [r for r in replies if not r.granted]
        assert denied.denial.budget_name == "per session"
        assert "session has used 0 and holds 800 of its 1000 tokens" in denied.denial.reason
        assert (await gate.Reserve(ask("s-other"))).granted  # another session has its own
        await gate.Release(u.ReleaseRequest(reservation_id=granted[0].reservation_id))
        assert (await gate.Reserve(ask("s-new"))).granted


async def test_budget_changes_need_admin(tracker, tokens):
    async with connect(tracker.target, tokens[Role.MODULE]) as module:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ug.BudgetServiceStub(module).CreateBudget(
                u.CreateBudgetRequest(budget=global_budget(limit_micros=1))
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_threshold_alerts_published_once_also_under_replay(
    admin, tracker, publisher_channel, module_channel
):
    stub = ug.BudgetServiceStub(admin)
    await stub.CreateBudget(
        u.CreateBudgetRequest(
            budget=u.Budget(
                name="p1-daily",
                scope=u.BUDGET_SCOPE_PROJECT,
                scope_value="p1",
                period=u.BUDGET_PERIOD_DAILY,
                limit_micros=1000,
            )
        )
    )
    events = await publish(publisher_channel, [completed(project="p1", cost=300) for _ in range(3)])
    await wait_requests(admin, 3)
    seen: list[ev.BudgetThresholdCrossed] = []

    async def handle(received: ReceivedEvent) -> None:
        seen.append(received.payload)

    sub = Subscriber(
        module_channel,
        subscription="alerts-test",
        event_types=["lodestar.usage.v1.BudgetThresholdCrossed"],
        handler=handle,
    )
    task = asyncio.create_task(sub.run())
    for _ in range(100):
        if {(a.kind, a.threshold_pct) for a in seen} >= {
            (ev.ALERT_KIND_THRESHOLD, 50),
            (ev.ALERT_KIND_THRESHOLD, 80),
        }:
            break
        await asyncio.sleep(0.1)
    # Replaying the events and re-checking many times adds no alert.
    from lodestar.common.events import unpack

    await tracker.module.handle_batch(
        [ReceivedEvent(i, 2, e, unpack(e)) for i, e in enumerate(events)]
    )
    for _ in range(3):
        await tracker.module.check_alerts()
    await asyncio.sleep(0.5)
    sub.stop()
    await task
    thresholds = sorted(a.threshold_pct for a in seen if a.kind == ev.ALERT_KIND_THRESHOLD)
    assert thresholds == [50, 80]
    assert all(a.spent_micros == 900 and a.scope_value == "p1" for a in seen)


async def test_counters_equal_the_ledger_and_the_holds(admin, tracker, tokens, publisher_channel):
    """After ingest, settlement, commits, releases and expiry the O(1) counters are exact."""
    stub = ug.BudgetServiceStub(admin)
    await stub.CreateBudget(u.CreateBudgetRequest(budget=global_budget(limit_micros=10**9)))
    await stub.CreateBudget(
        u.CreateBudgetRequest(
            budget=u.Budget(
                name="p1",
                scope=u.BUDGET_SCOPE_PROJECT,
                scope_value="p1",
                period=u.BUDGET_PERIOD_DAILY,
                timezone="America/New_York",
                limit_tokens=10**9,
            )
        )
    )
    await stub.CreateBudget(
        u.CreateBudgetRequest(
            budget=u.Budget(
                name="each-session",
                scope=u.BUDGET_SCOPE_SESSION,
                period=u.BUDGET_PERIOD_WEEKLY,
                limit_micros=10**9,
            )
        )
    )
    # Spend before the first Reserve: counted when the counters are initialised.
    await publish(publisher_channel, [completed(project="p1", cost=111) for _ in range(5)])
    await wait_requests(admin, 5)

    async def reserve(lease_ms: int = 60_000, session: str = "s1") -> u.ReserveResponse:
        reply = await stub.Reserve(
            u.ReserveRequest(
                project="p1",
                session_id=session,
                estimated_cost_micros=1_000,
                estimated_tokens=500,
                lease=duration_pb2.Duration(
                    seconds=lease_ms // 1000, nanos=(lease_ms % 1000) * 1_000_000
                ),
            )
        )
        assert reply.granted
        return reply

    held = await asyncio.gather(*(reserve(session=f"s{i % 3}") for i in range(30)))
    leaked = await asyncio.gather(*(reserve(lease_ms=200) for _ in range(4)))
    for r in held[:10]:
        await stub.Commit(
            u.CommitRequest(
                reservation_id=r.reservation_id, actual_cost_micros=400, actual_tokens=7
            )
        )
    for r in held[10:15]:
        await stub.Release(u.ReleaseRequest(reservation_id=r.reservation_id))
    # Settle five committed and five still-active reservations, plus spend without one.
    settle = [r.reservation_id for r in held[:5] + held[20:25]]
    await publish(
        publisher_channel,
        [completed(project="p1", session="s1", cost=400, reservation=rid) for rid in settle]
        + [completed(project="p1", session="s2", cost=50) for _ in range(7)]
        + [completed(project="other", session="s9", cost=3) for _ in range(3)],
    )
    await wait_requests(admin, 25)
    await asyncio.sleep(0.5)
    pool = tracker.module.pool
    await reservations.expire_reservations(pool)  # as the sweeper does every second
    assert {
        r["state"]
        for r in await pool.fetch(
            "SELECT state FROM reservations WHERE id = ANY($1::uuid[])",
            [uuid.UUID(r.reservation_id) for r in leaked],
        )
    } == {"expired"}
    stored = await pool.fetch("SELECT * FROM budget_counters")
    assert len(stored) >= 5  # global, p1 and three sessions
    now = await pool.fetchval("SELECT now()")
    defs = {b.id: b for b in await budgets.all_budgets(pool)}
    for c in stored:
        budget = defs[c["budget_id"]]
        assert c["window_start"] == budget.window(now)[0]
        usage = await counters.usage_from_ledger(pool, budget, c["scope_value"], now)
        held_now = await pool.fetchrow(
            counters.HELD_IN_WINDOW, budget.id, c["scope_value"], c["window_start"]
        )
        assert (c["spent_micros"], c["spent_tokens"]) == (usage.spent_micros, usage.spent_tokens)
        assert (c["held_micros"], c["held_tokens"]) == (held_now[0], held_now[1])
        # ListBudgets and the alerts read the counter: the same answer as the ledger's
        assert await counters.usage_of(pool, budget, c["scope_value"], now) == usage
    # The alert check reads them all at once, and the ledger where no counter exists yet.
    wanted = [(defs[c["budget_id"]], c["scope_value"]) for c in stored]
    wanted.append((next(iter(defs.values())), "a value never used"))
    async with pool.acquire() as conn:
        at_once = await counters.usages_of(conn, wanted, now)
    assert at_once == [await counters.usage_from_ledger(pool, b, v, now) for b, v in wanted]
    glob = next(c for c in stored if defs[c["budget_id"]].name == "all")
    assert glob["spent_micros"] == 5 * 111 + 10 * 400 + 7 * 50 + 3 * 3
    # 10 committed at 400 (5 of them settled), 5 released, 5 active settled, 10 active held.
    assert glob["held_micros"] == 5 * 400 + 10 * 1_000


# --- property: admission under concurrency, straight against Postgres -------------------------


async def _admission_round(
    dsn: str, schema: str, limit: int, estimates: list[int], commits: list[int]
) -> None:
    pool = await create_pool(dsn, schema, max_size=20)
    try:
        async with pool.acquire() as conn:
            await apply_migrations(conn, schema, MIGRATIONS)
            await conn.execute(
                "TRUNCATE budgets, reservations, reservation_budgets, budget_counters"
            )
        budget = budgets.budget_from_proto(global_budget(limit_micros=limit), require_id=False)
        await budgets.create_budget(pool, budget)

        # Rounds of at most 7 calls, 3 at once: many rounds race for the one counter.
        admitter = Admitter(pool, max_batch=7, rounds_in_flight=3)

        async def one(estimate: int, actual: int) -> None:
            admission = await admitter.reserve(
                u.ReserveRequest(session_id="s", estimated_cost_micros=estimate),
                timedelta(seconds=30),
                "gateway",
                None,
            )
            if admission.granted:
                await admitter.finish(
                    uuid.UUID(admission.reservation_id),
                    "gateway",
                    None,
                    commit=True,
                    micros=min(actual, estimate),
                )

        await asyncio.gather(*(one(e, c) for e, c in zip(estimates, commits, strict=True)))
        used = await pool.fetchval(
            "SELECT coalesce(sum(amount_micros), 0) FROM reservations "
            "WHERE state IN ('active', 'committed')"
        )
        assert used <= limit
        counter = await pool.fetchval("SELECT held_micros FROM budget_counters")
        assert counter == used
    finally:
        await pool.close()


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    limit=st.integers(min_value=1, max_value=5_000),
    pairs=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 200)), min_size=200, max_size=200),
)
def test_property_reserved_plus_committed_never_exceeds_limit(database_url, schema, limit, pairs):
    estimates, commits = [p[0] for p in pairs], [p[1] for p in pairs]
    asyncio.run(_admission_round(database_url, f"{schema}_adm", limit, estimates, commits))


def test_alert_event_ids_are_deterministic_uuid7():
    bid = uuid.uuid4()
    from datetime import UTC, datetime

    start = datetime(2026, 1, 1, tzinfo=UTC)
    seen = datetime(2026, 1, 20, 12, 30, tzinfo=UTC)
    a = alerts.alert_event_id(bid, "p", start, 1, 80, seen)
    assert a == alerts.alert_event_id(bid, "p", start, 1, 80, seen)
    assert a != alerts.alert_event_id(bid, "p", start, 1, 100, seen)
    assert uuid.UUID(a).version == 7
    assert uuid.UUID(a).int >> 80 == int(seen.timestamp() * 1000), "dated when detected"


_ = asyncpg


async def test_a_reservation_is_finished_only_by_the_principal_that_made_it(admin, tracker, tokens):
    """Another principal's Commit once pushed a victim's budget 9,000 dollars under zero."""
    stub = ug.BudgetServiceStub(admin)
    await stub.CreateBudget(u.CreateBudgetRequest(budget=global_budget(limit_micros=10_000)))
    async with (
        connect(tracker.target, tokens[Role.PUBLISHER]) as publisher,
        connect(tracker.target, tokens[Role.MODULE]) as module,
    ):
        gate, other = ug.BudgetServiceStub(publisher), ug.BudgetServiceStub(module)
        held = await gate.Reserve(u.ReserveRequest(project="victim", estimated_cost_micros=100))
        rid = held.reservation_id
        for call in (
            other.Commit(u.CommitRequest(reservation_id=rid, actual_cost_micros=10**10)),
            other.Release(u.ReleaseRequest(reservation_id=rid)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert (info.value.details() or "").startswith("reservation_id:")
        row = await tracker.module.pool.fetchrow(
            "SELECT state, amount_micros, owner FROM reservations WHERE id = $1", uuid.UUID(rid)
        )
        assert tuple(row) == ("active", 100, "test-publisher")

        second = await gate.Reserve(u.ReserveRequest(project="victim", estimated_cost_micros=100))
        await stub.Release(u.ReleaseRequest(reservation_id=second.reservation_id))  # an admin may
        assert (
            await gate.Commit(u.CommitRequest(reservation_id=rid, actual_cost_micros=70))
        ).committed
    status = (await stub.ListBudgets(u.ListBudgetsRequest())).budgets[0]
    assert (status.reserved_micros, status.remaining_micros) == (70, 10_000 - 70)


async def test_finished_reservations_are_deleted_after_their_keep_time(
    admin, tracker, tokens, tracker_db
):
    """Held ones never are; a Commit of a deleted one is told it does not exist."""
    stub = ug.BudgetServiceStub(admin)
    await stub.CreateBudget(u.CreateBudgetRequest(budget=global_budget(limit_micros=10_000)))
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as publisher:
        gate = ug.BudgetServiceStub(publisher)
        ids = [
            (await gate.Reserve(u.ReserveRequest(estimated_cost_micros=10))).reservation_id
            for _ in range(4)
        ]
        await gate.Release(u.ReleaseRequest(reservation_id=ids[0]))
        await gate.Commit(u.CommitRequest(reservation_id=ids[1], actual_cost_micros=5))
        await gate.Release(u.ReleaseRequest(reservation_id=ids[2]))
        # ids[0] finished two hours ago, ids[2] just now; ids[1] is committed, ids[3] active.
        await tracker_db.execute(
            "UPDATE reservations SET finished_at = now() - interval '2 hours', "
            "lease_expires_at = now() - interval '2 hours' WHERE id = ANY($1::uuid[])",
            [uuid.UUID(i) for i in ids[:2]] + [uuid.UUID(ids[3])],
        )
        assert await reservations.prune_finished(tracker.module.pool, timedelta(hours=1)) == 1
        left = {
            str(r["id"]): r["state"]
            for r in await tracker_db.fetch("SELECT id, state FROM reservations")
        }
        assert left == {ids[1]: "committed", ids[2]: "released", ids[3]: "active"}
        assert (
            await tracker_db.fetchval(
                "SELECT count(*) FROM reservation_budgets WHERE reservation_id = $1",
                uuid.UUID(ids[0]),
            )
            == 0
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gate.Commit(u.CommitRequest(reservation_id=ids[0], actual_cost_micros=5))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
