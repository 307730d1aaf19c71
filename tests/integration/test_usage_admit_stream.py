"""AdmitStream: Admit requests on one long-lived stream, each answered by its request_id; and
BudgetGate, which keeps one such stream per channel for its callers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import status_pb2

from lodestar.common.auth import Role
from lodestar.common.errors import bad_request_violations
from lodestar.common.ratelimit import RateLimitSettings, TokenBucketLimit
from lodestar.common.sdk import connect
from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug
from lodestar_usage.client import AdmissionUnavailableError, BudgetGate, GatePolicy
from lodestar_usage.settings import AdmissionSettings

from .conftest import StartTracker
from .test_usage_admission import held_and_counted, project_budget, publishers_on
from .test_usage_admit import code_of, reserve, stored_reservations

ADMIT_STREAM = "/lodestar.usage.v1.BudgetService/AdmitStream"
StreamCall = grpc.aio.StreamStreamCall[u.AdmitStreamRequest, u.AdmitStreamResponse]


def request(
    request_id: int, *calls: u.AdmissionCall, timeout: float | None = None
) -> u.AdmitStreamRequest:
    message = u.AdmitStreamRequest(request_id=request_id, calls=calls)
    if timeout is not None:
        message.timeout.FromTimedelta(timedelta(seconds=timeout))
    return message


async def answers(stream: StreamCall, count: int) -> dict[int, u.AdmitStreamResponse]:
    """The next ``count`` responses of ``stream``, by request_id."""
    by_id: dict[int, u.AdmitStreamResponse] = {}
    for _ in range(count):
        response = await stream.read()
        assert isinstance(response, u.AdmitStreamResponse)
        by_id[response.request_id] = response
    return by_id


def error_code(response: u.AdmitStreamResponse) -> grpc.StatusCode:
    assert response.HasField("error"), response
    assert not response.results
    return next(c for c in grpc.StatusCode if c.value[0] == response.error.code)


async def ends_with(
    stream: grpc.aio.StreamStreamCall[object, object], code: grpc.StatusCode, says: str
) -> None:
    """``stream``'s next read fails with ``code``, its message saying ``says``."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.read()
    assert info.value.code() == code
    assert says in (info.value.details() or "")


@contextlib.asynccontextmanager
async def admit_stream(stub: ug.BudgetServiceStub) -> AsyncIterator[StreamCall]:
    stream: StreamCall = stub.AdmitStream()  # type: ignore[call-arg,assignment]
    try:
        yield stream
    finally:
        stream.cancel()


async def test_each_request_is_answered_by_its_id_as_admit_would_answer_it(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    tracker = await start_trackers()
    async with contextlib.AsyncExitStack() as stack:
        (stub,) = await publishers_on(stack, [tracker], tokens, project_budget(1_000))
        async with admit_stream(stub) as stream:
            await stream.write(request(7, reserve(600), reserve(600)))
            await stream.write(request(8, reserve(1, estimated_tokens=-1)))
            bad_commit = u.AdmissionCall(commit=u.CommitRequest(reservation_id="not-a-uuid"))
            await stream.write(request(9, bad_commit, u.AdmissionCall()))
            by_id = await answers(stream, 3)
            granted, denied = by_id[7].results
            assert granted.reserve.granted
            assert not denied.reserve.granted
            assert denied.reserve.denial.remaining_micros == 400
            (bad,) = by_id[8].results
            assert code_of(bad) == grpc.StatusCode.INVALID_ARGUMENT
            status = status_pb2.Status.FromString(bad.error.SerializeToString())
            assert [v.field for v in bad_request_violations(status)] == [
                "calls[0].reserve.estimated_tokens"
            ]
            commit, empty = by_id[9].results
            assert "calls[0].commit.reservation_id" in commit.error.message
            assert code_of(empty) == grpc.StatusCode.INVALID_ARGUMENT

            done = u.CommitRequest(
                reservation_id=granted.reserve.reservation_id, actual_cost_micros=700
            )
            await stream.write(request(10, u.AdmissionCall(commit=done)))
            (committed,) = (await answers(stream, 1))[10].results
            assert committed.commit.committed
            assert committed.commit.over_estimate_micros == 100
            await stream.done_writing()
            assert await stream.read() is grpc.aio.EOF
            assert await stream.code() == grpc.StatusCode.OK
        assert await held_and_counted(tracker) == (700, 700)


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (request(1, *[reserve(1)] * 4), "at most 3 per request"),
        (
            u.AdmitStreamRequest(request_id=1, calls=[reserve(1)], timeout=Duration(seconds=-1)),
            "must not be negative",
        ),
        (request(1, reserve(1), timeout=0), "timeout must be positive"),
        (request(1, reserve(1), timeout=61), "at most 60 seconds"),
        (
            u.AdmitStreamRequest(
                request_id=1, calls=[reserve(1)], timeout=Duration(seconds=1, nanos=-5)
            ),
            "not a valid Duration",
        ),
    ],
)
async def test_a_request_refused_as_a_whole_is_answered_with_its_error_and_the_stream_goes_on(
    start_trackers: StartTracker,
    tokens: dict[Role | str, str],
    bad: u.AdmitStreamRequest,
    says: str,
) -> None:
    tracker = await start_trackers(admission=AdmissionSettings(max_calls_per_request=3))
    async with contextlib.AsyncExitStack() as stack:
        (stub,) = await publishers_on(stack, [tracker], tokens, project_budget(1_000))
        async with admit_stream(stub) as stream:
            await stream.write(bad)
            refused = (await answers(stream, 1))[1]
            assert error_code(refused) == grpc.StatusCode.INVALID_ARGUMENT
            assert says in refused.error.message
            assert await stored_reservations(tracker) == 0
            await stream.write(request(2, reserve(5), timeout=60))
            (granted,) = (await answers(stream, 1))[2].results
            assert granted.reserve.granted
        assert await stored_reservations(tracker) == 1


async def test_a_stream_without_a_credential_is_refused(
    start_trackers: StartTracker,
) -> None:
    tracker = await start_trackers()
    async with (
        grpc.aio.insecure_channel(tracker.target) as channel,
        admit_stream(ug.BudgetServiceStub(channel)) as stream,
    ):
        await stream.write(request(1, reserve(1)))
        await ends_with(stream, grpc.StatusCode.UNAUTHENTICATED, "missing credential")
    assert await stored_reservations(tracker) == 0


async def test_a_message_that_does_not_decode_ends_the_stream_with_invalid_argument(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    tracker = await start_trackers()
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as channel:
        raw = channel.stream_stream(ADMIT_STREAM)  # bytes in, bytes out
        stream = raw()
        await stream.write(request(1, reserve(1)).SerializeToString())
        assert isinstance(await stream.read(), bytes)
        await stream.write(b"\xff\xff\xff")
        await ends_with(
            stream, grpc.StatusCode.INVALID_ARGUMENT, "lodestar.usage.v1.AdmitStreamRequest"
        )
    assert await stored_reservations(tracker) == 1


async def test_calls_beyond_the_rate_limit_are_refused_and_a_message_beyond_it_ends_the_stream(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    limits = RateLimitSettings(
        principals={"test-publisher": TokenBucketLimit(rate_per_second=0.01, burst=4)}
    )
    tracker = await start_trackers(rate_limits=limits)
    async with (
        connect(tracker.target, tokens[Role.PUBLISHER]) as channel,
        admit_stream(ug.BudgetServiceStub(channel)) as stream,
    ):
        await stream.write(request(1, reserve(1)))  # charged with the call: 1 of 4
        await stream.write(request(2, reserve(1)))  # each later message: 2 of 4
        await stream.write(request(3, reserve(1), reserve(1), reserve(1)))  # 3, +2 refused
        by_id = await answers(stream, 3)
        assert by_id[1].results[0].reserve.granted
        assert by_id[2].results[0].reserve.granted
        assert error_code(by_id[3]) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry in" in by_id[3].error.message
        await stream.write(request(4, reserve(1)))  # 4 of 4
        assert (await answers(stream, 1))[4].results[0].reserve.granted
        await stream.write(request(5, reserve(1)))  # 5 of 4: the stream ends
        await ends_with(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, "retry in")
    assert await stored_reservations(tracker) == 3


# --- BudgetGate on the stream --------------------------------------------------------------------


async def test_the_gate_answers_by_policy_when_its_stream_breaks_and_reopens_it_after(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    tracker = await start_trackers()
    async with contextlib.AsyncExitStack() as stack:
        await publishers_on(stack, [tracker], tokens, project_budget(1_000))
    port = int(tracker.target.rpartition(":")[2])
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as channel:
        closed = BudgetGate(channel, GatePolicy(timeout_seconds=5))
        opened = BudgetGate(channel, GatePolicy(timeout_seconds=5, fail_open=True))
        for gate in (closed, opened):
            reply = await gate.reserve(u.ReserveRequest(project="p", estimated_cost_micros=10))
            assert reply.granted
            assert reply.reservation_id
        await tracker.stop()
        with pytest.raises(AdmissionUnavailableError) as info:
            await closed.reserve(u.ReserveRequest(project="p", estimated_cost_micros=10))
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        unbudgeted = await opened.reserve(u.ReserveRequest(project="p", estimated_cost_micros=10))
        assert unbudgeted.granted
        assert unbudgeted.fail_open
        assert not unbudgeted.reservation_id

        restarted = await start_trackers(port=port)
        for gate in (closed, opened):
            reply = await _reserve_when_serving(gate)
            assert reply.granted
            assert reply.reservation_id
            assert not reply.fail_open
            await gate.aclose()
        assert await stored_reservations(restarted) == 4


async def _reserve_when_serving(gate: BudgetGate) -> u.ReserveResponse:
    """A Reserve through ``gate`` once the restarted tracker takes calls again."""
    for _ in range(100):
        with contextlib.suppress(AdmissionUnavailableError):
            reply = await gate.reserve(u.ReserveRequest(project="p", estimated_cost_micros=10))
            if not reply.fail_open:
                return reply
        await asyncio.sleep(0.05)
    raise AssertionError("the gate never reached the restarted tracker")


async def test_a_call_unanswered_within_the_gates_timeout_fails_by_policy_and_the_stream_stays(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    tracker = await start_trackers()
    async with contextlib.AsyncExitStack() as stack:
        await publishers_on(stack, [tracker], tokens, project_budget(1_000))
    pool = tracker.module.pool
    assert pool is not None
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as channel:
        gate = BudgetGate(channel, GatePolicy(timeout_seconds=0.5))
        assert (await gate.reserve(u.ReserveRequest(project="p", estimated_cost_micros=1))).granted
        async with pool.acquire() as blocker, blocker.transaction():
            await blocker.execute("LOCK TABLE budget_counters IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(AdmissionUnavailableError) as info:
                await gate.reserve(u.ReserveRequest(project="p", estimated_cost_micros=1))
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "within 0.5 s" in str(info.value)
        after = await gate.reserve(u.ReserveRequest(project="p", estimated_cost_micros=1))
        assert after.granted
        await gate.aclose()


async def test_many_callers_share_few_stream_messages_and_never_overspend(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    tracker = await start_trackers()
    async with contextlib.AsyncExitStack() as stack:
        await publishers_on(stack, [tracker], tokens, project_budget(5_000))
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as channel:
        gate = BudgetGate(channel, GatePolicy(timeout_seconds=30, requests_in_flight=2))
        replies = await asyncio.gather(
            *(
                gate.reserve(u.ReserveRequest(project="p", estimated_cost_micros=100))
                for _ in range(300)
            )
        )
        await gate.aclose()
    granted: Sequence[u.ReserveResponse] = [r for r in replies if r.granted]
    assert len(granted) == 50
    assert all(r.denial.budget_name == "budget-p" for r in replies if not r.granted)
    assert await held_and_counted(tracker) == (5_000, 5_000)


async def test_another_principal_an_extreme_id_and_a_huge_message_on_the_stream(
    start_trackers: StartTracker, tokens: dict[Role | str, str]
) -> None:
    tracker = await start_trackers()
    async with (
        connect(tracker.target, tokens[Role.PUBLISHER]) as publisher,
        connect(tracker.target, tokens["usage-tracker"]) as other_channel,
    ):
        mine = await ug.BudgetServiceStub(publisher).Reserve(
            u.ReserveRequest(project="p", estimated_cost_micros=10)
        )
        theirs = u.AdmissionCall(
            commit=u.CommitRequest(reservation_id=mine.reservation_id, actual_cost_micros=1)
        )
        async with admit_stream(ug.BudgetServiceStub(other_channel)) as stream:
            await stream.write(request(2**64 - 1, theirs))
            (refused,) = (await answers(stream, 1))[2**64 - 1].results
            assert code_of(refused) == grpc.StatusCode.PERMISSION_DENIED
            assert "another principal" in refused.error.message
        async with admit_stream(ug.BudgetServiceStub(publisher)) as stream:
            huge = request(1, reserve(1, project="p" * 5_000_000))
            await stream.write(huge)
            await ends_with(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, "")
        async with admit_stream(ug.BudgetServiceStub(publisher)) as stream:
            await stream.write(request(3, reserve(5)))
            (granted,) = (await answers(stream, 1))[3].results
            assert granted.reserve.granted
        assert await stored_reservations(tracker) == 2
        assert await held_and_counted(tracker) == (15, 0)
