"""A gateway's client of budget admission: Reserve before an LLM call, Commit or Release after.

It has one configured answer for when admission itself cannot answer.

The tracker refuses work it cannot do in time with RESOURCE_EXHAUSTED and a ``RetryInfo`` delay
(ADR 0009). :class:`BudgetGate` retries such a refusal after the delay while the wait stays within
``GatePolicy.max_wait_seconds``; past that, and on UNAVAILABLE or DEADLINE_EXCEEDED, it answers by
``GatePolicy.fail_open``:

* ``fail_open=True``: the call may go ahead; the reply is granted with ``fail_open=True`` and no
  reservation (nothing to commit); counted by the caller as unbudgeted.
* ``fail_open=False`` (the default): :class:`AdmissionUnavailableError` is raised, carrying the
  status and the retry delay, so the gateway can refuse its own caller (HTTP 429/503).

A denial by a budget is never retried or overridden: it is an answer, not a failure.

A gate sends its calls on one long-lived ``AdmitStream`` (opened at the first call, opened again
after it breaks): a call costs the tracker a message, not an RPC. While
``GatePolicy.requests_in_flight`` requests await their answers, the calls queued meanwhile go
together in the next request (of at most ``GatePolicy.max_calls_per_request`` calls), so hundreds
of concurrent callers cost the tracker a few messages, not hundreds. Each caller still gets its
own answer within ``GatePolicy.timeout_seconds``, or its own error raised exactly as the single
RPC would raise it. ``GatePolicy(coalesce=False)`` sends every call as its own RPC. Close a gate
with ``aclose()`` before its channel.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import cast

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc.aio import EOF  # type: ignore[attr-defined]

from lodestar.common.errors import LodestarError
from lodestar.common.logging import get_logger
from lodestar.common.sdk.publisher import retry_delay
from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc

log = get_logger(__name__)

#: The prefix naming a call of an Admit request in its error (``calls[3].reserve.``).
_CALL_PATH = re.compile(r"calls\[\d+\]\.(?:reserve|commit|release)\.")
#: Statuses that mean admission could not answer (as opposed to refusing the request).
UNANSWERED = frozenset(
    {
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


@dataclass(frozen=True)
class GatePolicy:
    """How a gateway treats admission that cannot answer."""

    #: True: let the LLM call go ahead unbudgeted; False: raise AdmissionUnavailableError.
    fail_open: bool = False
    #: Deadline of each Reserve/Commit/Release call.
    timeout_seconds: float = 1.0
    #: Most time spent waiting out RESOURCE_EXHAUSTED retry delays before giving up.
    max_wait_seconds: float = 0.5
    #: Send calls on one AdmitStream, together while they queue (False: one RPC per call).
    coalesce: bool = True
    #: Requests one gate's stream awaits answers to at once; calls queue meanwhile.
    requests_in_flight: int = 8
    #: Most calls in one request (the tracker's admission.max_calls_per_request or less).
    max_calls_per_request: int = 256


class AdmissionUnavailableError(LodestarError):
    """Admission did not answer (overloaded, unreachable or too slow) and the gate fails closed."""

    def __init__(self, status: grpc.StatusCode, message: str, retry_after: float | None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.code = status


class BudgetGate:
    """Reserve, Commit and Release with the policy's answer for admission that cannot answer."""

    def __init__(self, channel: grpc.aio.Channel, policy: GatePolicy | None = None) -> None:
        self._stub = usage_pb2_grpc.BudgetServiceStub(channel)
        self.policy = policy or GatePolicy()
        self._batches = _Coalescer(self._stub, self.policy) if self.policy.coalesce else None

    async def aclose(self) -> None:
        """Close the gate's admission stream once the answers it awaits are in."""
        if self._batches is not None:
            await self._batches.aclose()

    async def reserve(self, request: usage_pb2.ReserveRequest) -> usage_pb2.ReserveResponse:
        """The tracker's answer to ``request``.

        When it cannot answer: granted with ``fail_open`` (fail open), or
        AdmissionUnavailableError (fail closed).
        """
        try:
            reply = await self._call(usage_pb2.AdmissionCall(reserve=request))
            return reply.reserve
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in UNANSWERED:
                raise
            if self.policy.fail_open:
                log.warning("admission unavailable; failing open", code=exc.code().name)
                return usage_pb2.ReserveResponse(granted=True, fail_open=True)
            raise AdmissionUnavailableError(
                exc.code(),
                f"budget admission did not answer ({exc.code().name}: {exc.details()}); "
                "the gate fails closed",
                retry_delay(exc),
            ) from exc

    async def commit(self, request: usage_pb2.CommitRequest) -> bool:
        """Commit; False when admission could not answer in time.

        The lease then returns the hold and the ledger settles the spend.
        """
        return await self._finish(usage_pb2.AdmissionCall(commit=request))

    async def release(self, request: usage_pb2.ReleaseRequest) -> bool:
        """Release; False when admission could not answer in time (the lease then expires)."""
        return await self._finish(usage_pb2.AdmissionCall(release=request))

    async def _finish(self, call: usage_pb2.AdmissionCall) -> bool:
        request = call.commit if call.HasField("commit") else call.release
        if not request.reservation_id:  # a fail-open grant has nothing to finish
            return False
        try:
            await self._call(call)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in UNANSWERED:
                raise
            log.warning("admission did not answer; the lease will expire", code=exc.code().name)
            return False
        return True

    async def _call(self, call: usage_pb2.AdmissionCall) -> usage_pb2.AdmissionResult:
        """The answer to ``call``, retried after RESOURCE_EXHAUSTED while the policy allows."""
        give_up_at = time.monotonic() + self.policy.max_wait_seconds
        while True:
            try:
                return await self._send(call)
            except grpc.aio.AioRpcError as exc:
                delay = retry_delay(exc)
                if (
                    exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED
                    or delay is None
                    or time.monotonic() + delay > give_up_at
                ):
                    raise
                await asyncio.sleep(delay)

    async def _send(self, call: usage_pb2.AdmissionCall) -> usage_pb2.AdmissionResult:
        if self._batches is not None:
            return await self._batches.call(call)
        kind = call.WhichOneof("call")
        assert kind is not None
        method = getattr(self._stub, kind.capitalize())  # Reserve, Commit or Release
        result = usage_pb2.AdmissionResult()
        reply = await method(getattr(call, kind), timeout=self.policy.timeout_seconds)
        getattr(result, kind).CopyFrom(reply)
        return result


_Queued = tuple[usage_pb2.AdmissionCall, "asyncio.Future[usage_pb2.AdmissionResult]"]
_AdmitStreamCall = grpc.aio.StreamStreamCall[
    usage_pb2.AdmitStreamRequest, usage_pb2.AdmitStreamResponse
]


class _Coalescer:
    """Sends the calls of concurrent callers on one AdmitStream, together while they queue.

    At most ``requests_in_flight`` requests await their answers at once; calls queued meanwhile
    go in the next request. A stream that breaks fails the calls it was deciding with its status
    (UNAVAILABLE when it just ended); the next call opens a new one.
    """

    def __init__(self, stub: usage_pb2_grpc.BudgetServiceStub, policy: GatePolicy) -> None:
        self._stub = stub
        self._policy = policy
        self._queue: collections.deque[_Queued] = collections.deque()
        self._stream: _Stream | None = None
        self._write_due = False
        self._request_ids = itertools.count(1)

    async def call(self, call: usage_pb2.AdmissionCall) -> usage_pb2.AdmissionResult:
        """The answer to ``call``; its error raised as the single RPC would raise it."""
        answer: asyncio.Future[usage_pb2.AdmissionResult] = (
            asyncio.get_running_loop().create_future()
        )
        self._queue.append((call, answer))
        self._write_soon()
        try:
            async with asyncio.timeout(self._policy.timeout_seconds):
                result = await answer
        except TimeoutError:
            raise _deadline_exceeded(self._policy.timeout_seconds) from None
        if result.HasField("error"):
            raise call_error(result.error)
        return result

    async def aclose(self) -> None:
        """End the stream once its answers are in; calls after this open a new one."""
        self._write()
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()

    def _write_soon(self) -> None:
        if not self._write_due:
            self._write_due = True
            asyncio.get_running_loop().call_soon(self._write)

    def _write(self) -> None:
        """Send what is queued while fewer than ``requests_in_flight`` requests are unanswered."""
        self._write_due = False
        while self._queue:
            stream = self._open_stream()
            if stream.unanswered >= self._policy.requests_in_flight:
                return  # the stream's reader writes again when an answer frees a place
            batch = self._next_batch()
            if batch:
                stream.send(next(self._request_ids), batch, self._policy.timeout_seconds)

    def _next_batch(self) -> list[_Queued]:
        batch: list[_Queued] = []
        while self._queue and len(batch) < self._policy.max_calls_per_request:
            call, answer = self._queue.popleft()
            if not answer.done():  # its caller gave up
                batch.append((call, answer))
        return batch

    def _open_stream(self) -> _Stream:
        if self._stream is None or self._stream.broken:
            self._stream = _Stream(self._stub, on_answer=self._write_soon)
        return self._stream


class _Stream:
    """One AdmitStream: the requests it is deciding, and the task reading its answers.

    Requests go out through the call's request iterator: grpc writes them from one task, where
    ``write`` on an intercepted call costs two more tasks per message.
    """

    def __init__(
        self,
        stub: usage_pb2_grpc.BudgetServiceStub,
        on_answer: Callable[[], None],
    ) -> None:
        self._outgoing: asyncio.Queue[usage_pb2.AdmitStreamRequest | None] = asyncio.Queue()
        requests = self._requests()
        self._call = cast(_AdmitStreamCall, stub.AdmitStream(requests))  # type: ignore[arg-type]
        self._on_answer = on_answer
        self._unanswered: dict[int, list[asyncio.Future[usage_pb2.AdmissionResult]]] = {}
        self.broken = False
        self._reader = asyncio.create_task(self._read())

    @property
    def unanswered(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._unanswered)

    def send(self, request_id: int, batch: list[_Queued], timeout_seconds: float) -> None:
        """Send ``batch`` as one request; its answers arrive through the reader.

        If the stream has ended, the reader fails them with its status.
        """
        self._unanswered[request_id] = [answer for _, answer in batch]
        request = usage_pb2.AdmitStreamRequest(
            request_id=request_id, calls=[call for call, _ in batch]
        )
        request.timeout.FromTimedelta(timedelta(seconds=timeout_seconds))
        self._outgoing.put_nowait(request)

    async def close(self) -> None:
        """Half-close the stream and wait for the answers still due."""
        self._outgoing.put_nowait(None)
        await asyncio.wait([self._reader])

    async def _requests(self) -> AsyncIterator[usage_pb2.AdmitStreamRequest]:
        while (request := await self._outgoing.get()) is not None:
            yield request

    async def _read(self) -> None:
        failure: BaseException
        try:
            while (response := await self._call.read()) is not EOF:
                self._answer(cast(usage_pb2.AdmitStreamResponse, response))
            failure = _stream_ended()
        except grpc.aio.AioRpcError as exc:
            failure = exc
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self.broken = True
            for answers in self._unanswered.values():
                for answer in answers:
                    if not answer.done():
                        answer.set_exception(failure)
            self._unanswered.clear()
            self._on_answer()

    def _answer(self, response: usage_pb2.AdmitStreamResponse) -> None:
        answers = self._unanswered.pop(response.request_id, [])
        if response.HasField("error"):
            results = [usage_pb2.AdmissionResult(error=response.error)] * len(answers)
        else:
            results = list(response.results)
        for answer, result in zip(answers, results, strict=True):
            if not answer.done():
                answer.set_result(result)
        self._on_answer()


def _deadline_exceeded(seconds: float) -> grpc.aio.AioRpcError:
    return _rpc_error(
        grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer from budget admission within {seconds:g} s"
    )


def _stream_ended() -> grpc.aio.AioRpcError:
    return _rpc_error(
        grpc.StatusCode.UNAVAILABLE, "the admission stream ended before this call was answered"
    )


def _rpc_error(
    code: grpc.StatusCode, message: str, trailing: grpc.aio.Metadata | None = None
) -> grpc.aio.AioRpcError:
    """The AioRpcError an RPC ending with ``code`` and ``message`` would have raised."""
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), trailing or grpc.aio.Metadata(), message, ""
    )


def call_error(status: usage_pb2.CallStatus) -> grpc.aio.AioRpcError:
    """One call's error as the AioRpcError its single RPC would have raised.

    The tracker names a bad field from the Admit request's root (``calls[3].reserve.lease``);
    the caller sent one call, so the field is named from that call (``lease``).
    """
    rich = status_pb2.Status(code=status.code, message=_CALL_PATH.sub("", status.message))
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                violation.field = _CALL_PATH.sub("", violation.field)
            rich.details.add().Pack(bad_request)
        else:
            rich.details.append(detail)
    code = next((c for c in grpc.StatusCode if c.value[0] == rich.code), grpc.StatusCode.UNKNOWN)
    details = grpc.aio.Metadata(("grpc-status-details-bin", rich.SerializeToString()))
    return _rpc_error(code, rich.message, details)
