"""Group-committed admission (ADR 0009): several trackers on one database never grant more than
a limit, neither does a restart, and overload is answered with RESOURCE_EXHAUSTED and a retry
delay, never CANCELLED."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import timedelta

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lodestar.common.auth import Role
from lodestar.common.cli import free_port
from lodestar.common.db import apply_migrations, create_pool
from lodestar.common.errors import ResourceExhaustedError
from lodestar.common.sdk import connect
from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug
from lodestar_usage import budgets, metrics
from lodestar_usage.admission import Admitter
from lodestar_usage.client import AdmissionUnavailableError, BudgetGate, GatePolicy
from lodestar_usage.service import MIGRATIONS
from lodestar_usage.settings import AdmissionSettings
from lodestar_usage.testing import RunningTracker

from .conftest import StartTracker
from .test_usage_ledger import completed, publish

HUNDRED = u.ReserveRequest(project="p", estimated_cost_micros=100)


def project_budget(limit: int, project: str = "p") -> u.Budget:
    return u.Budget(
        name=f"budget-{project}",
        scope=u.BUDGET_SCOPE_PROJECT,
        scope_value=project,
        period=u.BUDGET_PERIOD_MONTHLY,
        limit_micros=limit,
    )


async def held_and_counted(tracker: RunningTracker) -> tuple[int, int]:
    """What the reservations table holds against budgets, and what the counters say."""
    pool = tracker.module.pool
    assert pool is not None
    used = await pool.fetchval(
        "SELECT coalesce(sum(amount_micros), 0) FROM reservations "
        "WHERE state IN ('active', 'committed')"
    )
    counted = await pool.fetchval("SELECT coalesce(sum(held_micros), 0) FROM budget_counters")
    return int(used), int(counted)


async def test_three_replicas_on_one_database_never_grant_more_than_the_limit(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    """Two replicas deciding in rounds and one deciding every call alone share the counters."""
    replicas = [
        await start_trackers(),
        await start_trackers(),
        await start_trackers(admission=AdmissionSettings(max_batch=1)),
    ]
    async with contextlib.AsyncExitStack() as stack:
        admin = ug.BudgetServiceStub(
            await stack.enter_async_context(connect(replicas[0].target, tokens[Role.ADMIN]))
        )
        await admin.CreateBudget(u.CreateBudgetRequest(budget=project_budget(10_000)))
        gates = [
            ug.BudgetServiceStub(
                await stack.enter_async_context(connect(r.target, tokens[Role.PUBLISHER]))
            )
            for r in replicas
        ]

        async def reserve(i: int) -> u.ReserveResponse:
            return await gates[i % 3].Reserve(
                u.ReserveRequest(project="p", estimated_cost_micros=100)
            )

        first = await asyncio.gather(*(reserve(i) for i in range(300)))
        granted = [r for r in first if r.granted]
        assert len(granted) == 100
        assert {r.denial.budget_name for r in first if not r.granted} == {"budget-p"}

        # Commits (for less), releases and new reserves race on all three replicas.
        async def finish(i: int, reply: u.ReserveResponse) -> None:
            if i % 4 == 0:
                await gates[i % 3].Release(u.ReleaseRequest(reservation_id=reply.reservation_id))
            else:
                await gates[(i + 1) % 3].Commit(
                    u.CommitRequest(reservation_id=reply.reservation_id, actual_cost_micros=40)
                )

        second = await asyncio.gather(
            *(finish(i, r) for i, r in enumerate(granted[:60])),
            *(reserve(i) for i in range(200)),
        )
    new_grants = sum(1 for r in second if isinstance(r, u.ReserveResponse) and r.granted)
    used, counted = await held_and_counted(replicas[0])
    assert used <= 10_000
    assert counted == used
    # 40 untouched holds of 100, 45 commits of 40, 15 releases: what is left was granted again,
    # as far as the races allowed, and never more.
    assert used == 40 * 100 + 45 * 40 + new_grants * 100


async def test_a_restarted_tracker_sees_the_holds_of_the_one_before(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    first = await start_trackers()
    async with connect(first.target, tokens[Role.ADMIN]) as channel:
        stub = ug.BudgetServiceStub(channel)
        await stub.CreateBudget(u.CreateBudgetRequest(budget=project_budget(1_000)))
        replies = await asyncio.gather(
            *(
                stub.Reserve(u.ReserveRequest(project="p", estimated_cost_micros=100))
                for _ in range(6)
            )
        )
        assert all(r.granted for r in replies)
    await first.stop()
    second = await start_trackers()
    async with connect(second.target, tokens[Role.ADMIN]) as channel:
        stub = ug.BudgetServiceStub(channel)
        replies = await asyncio.gather(
            *(
                stub.Reserve(u.ReserveRequest(project="p", estimated_cost_micros=100))
                for _ in range(6)
            )
        )
    assert sum(r.granted for r in replies) == 4
    assert await held_and_counted(second) == (1_000, 1_000)


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay in seconds an error carries, or None."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


async def test_overload_is_refused_with_resource_exhausted_and_a_retry_delay(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    tracker = await start_trackers(
        admission=AdmissionSettings(max_queued=1, rounds_in_flight=1, max_batch=1)
    )
    shed_before = metrics.ADMISSION_SHED.labels("queue_full")._value.get()
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as channel:
        gate = ug.BudgetServiceStub(channel)

        async def reserve() -> u.ReserveResponse | grpc.aio.AioRpcError:
            try:
                return await gate.Reserve(u.ReserveRequest(project="p", estimated_cost_micros=1))
            except grpc.aio.AioRpcError as exc:
                return exc

        outcomes = await asyncio.gather(*(reserve() for _ in range(300)))
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert refused, "300 calls at once against a queue of one: some must be refused"
    assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all((retry_delay(e) or 0) > 0 for e in refused)
    assert all("admission is overloaded" in (e.details() or "") for e in refused)
    granted = [o for o in outcomes if isinstance(o, u.ReserveResponse)]
    assert all(r.granted for r in granted)
    shed = metrics.ADMISSION_SHED.labels("queue_full")._value.get() - shed_before
    assert shed == len(refused)


async def test_a_burst_beyond_the_transport_backlog_is_never_cancelled(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    """grpc-core's default cancelled calls beyond 1,000 waiting for the application."""
    tracker = await start_trackers()
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as channel:
        gate = ug.BudgetServiceStub(channel)

        async def reserve() -> grpc.StatusCode:
            try:
                await gate.Reserve(u.ReserveRequest(project="p", estimated_cost_micros=1))
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        codes = await asyncio.gather(*(reserve() for _ in range(2_000)))
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert grpc.StatusCode.OK in codes


# --- property: rounds of several admitters (as several replicas) straight against Postgres ------


async def _replicated_round(
    dsn: str, schema: str, limit: int, calls: list[tuple[int, int, bool]]
) -> None:
    pools = [await create_pool(dsn, schema, max_size=4) for _ in range(3)]
    try:
        async with pools[0].acquire() as conn:
            await apply_migrations(conn, schema, MIGRATIONS)
            await conn.execute(
                "TRUNCATE budgets, reservations, reservation_budgets, budget_counters"
            )
        budget = budgets.budget_from_proto(project_budget(limit), require_id=False)
        await budgets.create_budget(pools[0], budget)
        admitters = [Admitter(pool, max_batch=16) for pool in pools]

        async def one(i: int, estimate: int, actual: int, release: bool) -> None:
            admitter = admitters[i % 3]
            admission = await admitter.reserve(
                u.ReserveRequest(project="p", estimated_cost_micros=estimate),
                timedelta(seconds=30),
                "gateway",
                None,
            )
            if admission.granted:
                await admitters[(i + 1) % 3].finish(
                    uuid.UUID(admission.reservation_id),
                    "gateway",
                    None,
                    commit=not release,
                    micros=min(actual, estimate),
                )

        await asyncio.gather(*(one(i, *call) for i, call in enumerate(calls)))
        used = await pools[0].fetchval(
            "SELECT coalesce(sum(amount_micros), 0) FROM reservations "
            "WHERE state IN ('active', 'committed')"
        )
        assert used <= limit
        assert await pools[0].fetchval("SELECT held_micros FROM budget_counters") == used
    finally:
        for pool in pools:
            await pool.close()


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    limit=st.integers(min_value=1, max_value=5_000),
    calls=st.lists(
        st.tuples(st.integers(0, 200), st.integers(0, 200), st.booleans()),
        min_size=200,
        max_size=200,
    ),
)
def test_property_replicas_never_grant_more_than_the_limit(
    database_url: str, schema: str, limit: int, calls: list[tuple[int, int, bool]]
) -> None:
    asyncio.run(_replicated_round(database_url, f"{schema}_rep", limit, calls))


# --- the gateway's client: fail open or closed, by policy ----------------------------------------


async def test_the_gate_fails_open_or_closed_when_admission_is_overloaded(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    tracker = await start_trackers(
        admission=AdmissionSettings(max_queued=1, rounds_in_flight=1, max_batch=1)
    )
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as channel:
        request = u.ReserveRequest(project="p", estimated_cost_micros=1)
        closed = BudgetGate(
            channel, GatePolicy(fail_open=False, timeout_seconds=30, max_wait_seconds=0)
        )

        async def closed_reserve() -> u.ReserveResponse | AdmissionUnavailableError:
            try:
                return await closed.reserve(request)
            except AdmissionUnavailableError as exc:
                return exc

        outcomes = await asyncio.gather(*(closed_reserve() for _ in range(300)))
        refused = [o for o in outcomes if isinstance(o, AdmissionUnavailableError)]
        assert refused
        assert {e.code for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all((e.retry_after or 0) > 0 for e in refused)

        opened = BudgetGate(
            channel, GatePolicy(fail_open=True, timeout_seconds=30, max_wait_seconds=0)
        )
        replies = await asyncio.gather(*(opened.reserve(request) for _ in range(300)))
        assert all(r.granted for r in replies)
        fail_open = [r for r in replies if r.fail_open]
        assert fail_open
        assert all(not r.reservation_id for r in fail_open)
        assert not await opened.commit(u.CommitRequest(reservation_id=""))
        held = next(r for r in replies if not r.fail_open)
        assert await opened.commit(
            u.CommitRequest(reservation_id=held.reservation_id, actual_cost_micros=1)
        )


async def test_the_gate_answers_by_policy_when_admission_is_unreachable(
    tokens: dict[Role | str, str],
) -> None:
    async with connect(f"127.0.0.1:{free_port()}", tokens[Role.PUBLISHER]) as channel:
        request = u.ReserveRequest(project="p", estimated_cost_micros=1)
        policy = GatePolicy(timeout_seconds=0.5)
        with pytest.raises(AdmissionUnavailableError) as info:
            await BudgetGate(channel, policy).reserve(request)
        assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        reply = await BudgetGate(channel, GatePolicy(fail_open=True, timeout_seconds=0.5)).reserve(
            request
        )
        assert (reply.granted, reply.fail_open, reply.reservation_id) == (True, True, "")


async def test_a_request_ingested_leaves_the_next_reserve_decided_in_one_call(
    start_trackers: StartTracker, tokens: dict[Role | str, str], publisher_channel: grpc.aio.Channel
) -> None:
    """Ingest settles the request's hold and counts its cost; the tracker adds the same to the
    counters it remembers, so the next Reserve is not decided on stale ones (ADR 0018)."""
    tracker = await start_trackers()
    pool = tracker.module.pool
    assert pool is not None
    async with contextlib.AsyncExitStack() as stack:
        (stub,) = await publishers_on(stack, [tracker], tokens, project_budget(1_000))
        first = await stub.Reserve(HUNDRED)
        await stub.Commit(
            u.CommitRequest(reservation_id=first.reservation_id, actual_cost_micros=80)
        )
        done = completed(project="p", session="", cost=80, reservation=first.reservation_id)
        ingested = metrics.INGESTED._value.get()
        await publish(publisher_channel, [done])
        async with asyncio.timeout(20):  # counted once the admitter has been told
            while metrics.INGESTED._value.get() == ingested:
                await asyncio.sleep(0.02)
        assert await pool.fetchval("SELECT spent_micros FROM budget_counters") == 80
        assert await held_and_counted(tracker) == (0, 0)
        rounds = metrics.ADMISSION_ROUNDS
        known, stale = rounds.labels("known")._value.get(), rounds.labels("stale")._value.get()
        assert (
            await stub.Reserve(u.ReserveRequest(project="p", estimated_cost_micros=920))
        ).granted
        refused = await stub.Reserve(u.ReserveRequest(project="p", estimated_cost_micros=1))
        assert not refused.granted
        assert refused.denial.remaining_micros == 0
        assert rounds.labels("known")._value.get() == known + 2
        assert rounds.labels("stale")._value.get() == stale


async def test_a_budget_changed_through_one_replica_applies_at_once_on_another(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    """Replicas cache budget definitions; a round checks the generation before it decides."""
    first, second = await start_trackers(), await start_trackers()
    async with (
        connect(first.target, tokens[Role.ADMIN]) as one,
        connect(second.target, tokens[Role.ADMIN]) as other,
    ):
        stub, gate = ug.BudgetServiceStub(one), ug.BudgetServiceStub(other)
        created = await stub.CreateBudget(u.CreateBudgetRequest(budget=project_budget(1_000)))
        assert (await gate.Reserve(HUNDRED)).granted  # the second replica has cached it now
        lowered = u.Budget()
        lowered.CopyFrom(created.budget)
        lowered.limit_micros = 150
        await stub.UpdateBudget(u.UpdateBudgetRequest(budget=lowered))
        refused = await gate.Reserve(HUNDRED)
        assert not refused.granted
        assert refused.denial.limit_micros == 150
        await stub.DeleteBudget(u.DeleteBudgetRequest(id=created.budget.id))
        freed = await gate.Reserve(u.ReserveRequest(project="p", estimated_cost_micros=10**6))
        assert freed.granted
        assert list(freed.budget_ids) == []


async def test_a_call_whose_deadline_is_shorter_than_the_wait_is_refused_at_once(
    database_url: str, schema: str
) -> None:
    pool = await create_pool(database_url, f"{schema}_dl", max_size=2)
    try:
        async with pool.acquire() as conn:
            await apply_migrations(conn, f"{schema}_dl", MIGRATIONS)
        admitter = Admitter(pool, max_batch=1, rounds_in_flight=1)
        lease = timedelta(seconds=30)
        backlog = [
            asyncio.create_task(admitter.reserve(HUNDRED, lease, "gateway", None))
            for _ in range(50)
        ]
        await asyncio.sleep(0)  # they are queued
        assert admitter.queued >= 40
        shed_before = metrics.ADMISSION_SHED.labels("deadline")._value.get()
        with pytest.raises(ResourceExhaustedError) as info:
            await admitter.reserve(HUNDRED, lease, "gateway", time.monotonic() + 0.001)
        assert "deadline is shorter than the expected wait" in info.value.message
        assert (info.value.retry_after or 0) > 0
        assert metrics.ADMISSION_SHED.labels("deadline")._value.get() == shed_before + 1
        patient = await admitter.reserve(HUNDRED, lease, "gateway", time.monotonic() + 60)
        assert patient.granted
        assert all(a.granted for a in await asyncio.gather(*backlog))
    finally:
        await pool.close()


async def publishers_on(
    stack: contextlib.AsyncExitStack,
    replicas: list[RunningTracker],
    tokens: dict[Role | str, str],
    budget: u.Budget,
) -> list[ug.BudgetServiceStub]:
    """Creates ``budget`` through the first replica; a publisher's stub per replica."""
    admin = ug.BudgetServiceStub(
        await stack.enter_async_context(connect(replicas[0].target, tokens[Role.ADMIN]))
    )
    await admin.CreateBudget(u.CreateBudgetRequest(budget=budget))
    return [
        ug.BudgetServiceStub(
            await stack.enter_async_context(connect(r.target, tokens[Role.PUBLISHER]))
        )
        for r in replicas
    ]


# --- one rule: rolling budgets and session limits are decided in the same rounds ----------------


async def test_a_rolling_budget_never_grants_more_than_its_limit_across_replicas(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    """Its spend is read from the ledger under a lock per (budget, value), in the round."""
    replicas = [
        await start_trackers(),
        await start_trackers(admission=AdmissionSettings(max_batch=3)),
    ]
    rolling = u.Budget(
        name="last hour",
        scope=u.BUDGET_SCOPE_PROJECT,
        scope_value="p",
        period=u.BUDGET_PERIOD_ROLLING,
        limit_micros=5_000,
    )
    rolling.rolling.FromSeconds(3600)
    async with contextlib.AsyncExitStack() as stack:
        gates = await publishers_on(stack, replicas, tokens, rolling)
        replies = await asyncio.gather(
            *(gates[i % 2].Reserve(HUNDRED) for i in range(120)),
        )
        granted = [r for r in replies if r.granted]
        assert len(granted) == 50
        denial = next(r.denial for r in replies if not r.granted)
        assert denial.budget_name == "last hour"
        assert denial.remaining_micros == 0
        assert not denial.HasField("resets_at")  # a rolling window never resets at once
        await gates[1].Release(u.ReleaseRequest(reservation_id=granted[0].reservation_id))
        assert (await gates[0].Reserve(HUNDRED)).granted
        assert not (await gates[1].Reserve(HUNDRED)).granted


async def test_session_limits_hold_across_replicas(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    replicas = [await start_trackers(), await start_trackers()]
    per_session = u.Budget(
        name="per session",
        scope=u.BUDGET_SCOPE_SESSION,
        period=u.BUDGET_PERIOD_MONTHLY,
        session_limits=u.SessionLimits(max_tokens=1_000),
    )
    async with contextlib.AsyncExitStack() as stack:
        gates = await publishers_on(stack, replicas, tokens, per_session)
        ask = u.ReserveRequest(project="p", session_id="s-1", estimated_tokens=100)
        replies = await asyncio.gather(*(gates[i % 2].Reserve(ask) for i in range(40)))
        assert sum(r.granted for r in replies) == 10
        other = u.ReserveRequest(project="p", session_id="s-2", estimated_tokens=1_000)
        assert (await gates[1].Reserve(other)).granted
