"""Admit: several Reserve, Commit and Release calls in one request, each answered as its own RPC
would answer it; and the gateway's BudgetGate, which sends its callers' concurrent calls that way.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2
from grpc_status import rpc_status

from lodestar.common.auth import Role
from lodestar.common.errors import bad_request_violations
from lodestar.common.ratelimit import RateLimitSettings, TokenBucketLimit
from lodestar.common.sdk import connect
from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug
from lodestar_usage.client import BudgetGate, GatePolicy
from lodestar_usage.settings import AdmissionSettings
from lodestar_usage.testing import RunningTracker

from .conftest import StartTracker
from .test_usage_admission import held_and_counted, project_budget, publishers_on

OK = grpc.StatusCode.OK


def reserve(micros: int, project: str = "p", **fields: Any) -> u.AdmissionCall:
    return u.AdmissionCall(
        reserve=u.ReserveRequest(project=project, estimated_cost_micros=micros, **fields)
    )


def code_of(result: u.AdmissionResult) -> grpc.StatusCode:
    if not result.HasField("error"):
        return OK
    return next(c for c in grpc.StatusCode if c.value[0] == result.error.code)


async def stored_reservations(tracker: RunningTracker) -> int:
    assert tracker.module.pool is not None
    return int(await tracker.module.pool.fetchval("SELECT count(*) FROM reservations"))


async def test_each_call_is_answered_as_its_own_rpc_would_be(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    tracker = await start_trackers()
    async with contextlib.AsyncExitStack() as stack:
        (stub,) = await publishers_on(stack, [tracker], tokens, project_budget(1_000))
        reply = await stub.Admit(
            u.AdmitRequest(
                calls=[
                    reserve(600),
                    reserve(600),  # the first one's hold leaves 400
                    reserve(1, estimated_tokens=-1),
                    u.AdmissionCall(commit=u.CommitRequest(reservation_id="not-a-uuid")),
                    u.AdmissionCall(),
                ]
            )
        )
        granted, denied, bad, bad_commit, empty = reply.results
        assert granted.reserve.granted
        assert granted.reserve.reservation_id
        assert not denied.reserve.granted
        assert denied.reserve.denial.budget_name == "budget-p"
        assert denied.reserve.denial.remaining_micros == 400
        assert code_of(bad) == grpc.StatusCode.INVALID_ARGUMENT
        status = status_pb2.Status.FromString(bad.error.SerializeToString())
        assert [v.field for v in bad_request_violations(status)] == [
            "calls[2].reserve.estimated_tokens"
        ]
        assert "calls[2].reserve.estimated_tokens" in bad.error.message
        assert code_of(bad_commit) == grpc.StatusCode.INVALID_ARGUMENT
        assert "calls[3].commit.reservation_id" in bad_commit.error.message
        assert code_of(empty) == grpc.StatusCode.INVALID_ARGUMENT
        assert "calls[4]" in empty.error.message
        assert await stored_reservations(tracker) == 1

        # Commit and Release in one request, each with its own answer.
        second = await stub.Reserve(u.ReserveRequest(project="p", estimated_cost_micros=100))
        finished = await stub.Admit(
            u.AdmitRequest(
                calls=[
                    u.AdmissionCall(
                        commit=u.CommitRequest(
                            reservation_id=granted.reserve.reservation_id, actual_cost_micros=700
                        )
                    ),
                    u.AdmissionCall(release=u.ReleaseRequest(reservation_id=second.reservation_id)),
                    u.AdmissionCall(release=u.ReleaseRequest(reservation_id=second.reservation_id)),
                ]
            )
        )
        commit, release, again = finished.results
        assert commit.commit.committed
        assert commit.commit.over_estimate_micros == 100
        assert release.release.released
        assert code_of(again) == OK
        assert not again.release.released
        assert await held_and_counted(tracker) == (700, 700)


async def test_another_principal_cannot_finish_a_reservation_through_admit(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    tracker = await start_trackers()
    async with (
        connect(tracker.target, tokens[Role.PUBLISHER]) as publisher,
        connect(tracker.target, tokens["usage-tracker"]) as other,
    ):
        mine = await ug.BudgetServiceStub(publisher).Reserve(
            u.ReserveRequest(project="p", estimated_cost_micros=10)
        )
        calls = [
            u.AdmissionCall(
                commit=u.CommitRequest(reservation_id=mine.reservation_id, actual_cost_micros=1)
            ),
            u.AdmissionCall(release=u.ReleaseRequest(reservation_id=mine.reservation_id)),
        ]
        theirs = ug.BudgetServiceStub(other)
        together = (await theirs.Admit(u.AdmitRequest(calls=calls))).results
        alone = [(await theirs.Admit(u.AdmitRequest(calls=[c]))).results[0] for c in calls]
        for result in [*together, *alone]:
            assert code_of(result) == grpc.StatusCode.PERMISSION_DENIED
            assert "another principal" in result.error.message
        (empty,) = (await theirs.Admit(u.AdmitRequest(calls=[u.AdmissionCall()]))).results
        assert code_of(empty) == grpc.StatusCode.INVALID_ARGUMENT
        assert "calls[0]" in empty.error.message
        assert await held_and_counted(tracker) == (10, 0)


async def test_a_request_with_too_many_calls_is_refused_and_stores_nothing(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    tracker = await start_trackers(admission=AdmissionSettings(max_calls_per_request=3))
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as publisher:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ug.BudgetServiceStub(publisher).Admit(u.AdmitRequest(calls=[reserve(1)] * 4))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 3" in (info.value.details() or "")
        assert await stored_reservations(tracker) == 0


async def test_every_call_of_a_request_counts_against_the_rate_limit(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    limits = RateLimitSettings(
        principals={"test-publisher": TokenBucketLimit(rate_per_second=0.01, burst=8)}
    )
    tracker = await start_trackers(rate_limits=limits)
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as publisher:
        stub = ug.BudgetServiceStub(publisher)
        with pytest.raises(grpc.aio.AioRpcError) as never:
            await stub.Admit(u.AdmitRequest(calls=[reserve(1)] * 9))
        assert never.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "can never fit" in (never.value.details() or "")
        first = await stub.Admit(u.AdmitRequest(calls=[reserve(1)] * 5))
        assert all(r.reserve.granted for r in first.results)
        with pytest.raises(grpc.aio.AioRpcError) as later:
            await stub.Admit(u.AdmitRequest(calls=[reserve(1)] * 5))
        assert later.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry in" in (later.value.details() or "")
        assert await stored_reservations(tracker) == 5


# --- BudgetGate: concurrent callers share Admit requests -----------------------------------------


async def test_concurrent_callers_through_one_gate_never_overspend(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    tracker = await start_trackers()
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as publisher:
        async with contextlib.AsyncExitStack() as stack:
            await publishers_on(stack, [tracker], tokens, project_budget(10_000))
        gate = BudgetGate(publisher, GatePolicy(timeout_seconds=30, max_calls_per_request=16))

        async def caller() -> int:
            spent = 0
            for _ in range(5):
                reply = await gate.reserve(u.ReserveRequest(project="p", estimated_cost_micros=60))
                if reply.granted:
                    assert await gate.commit(
                        u.CommitRequest(reservation_id=reply.reservation_id, actual_cost_micros=50)
                    )
                    spent += 50
            return spent

        spent = sum(await asyncio.gather(*(caller() for _ in range(200))))
        assert spent <= 10_000
        assert await held_and_counted(tracker) == (spent, spent)
        assert tracker.module.pool is not None
        requests = await tracker.module.pool.fetchval(
            "SELECT count(*) FROM reservations WHERE state = 'committed'"
        )
        assert requests * 50 == spent


async def test_a_callers_error_through_the_gate_is_raised_as_its_own_rpc_would_raise_it(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    tracker = await start_trackers()
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as publisher:
        gate = BudgetGate(publisher)
        good, bad = await asyncio.gather(
            gate.reserve(u.ReserveRequest(project="p", estimated_cost_micros=1)),
            gate.reserve(u.ReserveRequest(project="p", estimated_tokens=-5)),
            return_exceptions=True,
        )
        assert isinstance(good, u.ReserveResponse)
        assert good.granted
        assert isinstance(bad, grpc.aio.AioRpcError)
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(bad)  # type: ignore[arg-type]
        assert status is not None
        assert [v.field for v in bad_request_violations(status)] == ["estimated_tokens"]
        assert (bad.details() or "").startswith("estimated_tokens:")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await gate.commit(
                u.CommitRequest(reservation_id="00000000-0000-4000-8000-000000000000")
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
