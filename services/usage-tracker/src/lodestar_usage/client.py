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
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc

from lodestar.common.errors import LodestarError
from lodestar.common.logging import get_logger
from lodestar.common.sdk.publisher import retry_delay
from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc

log = get_logger(__name__)

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

    async def reserve(self, request: usage_pb2.ReserveRequest) -> usage_pb2.ReserveResponse:
        """The tracker's answer to ``request``.

        When it cannot answer: granted with ``fail_open`` (fail open), or
        AdmissionUnavailableError (fail closed).
        """
        try:
            reply = await self._call(self._stub.Reserve, request)
            assert isinstance(reply, usage_pb2.ReserveResponse)
            return reply
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
        return await self._finish(self._stub.Commit, request)

    async def release(self, request: usage_pb2.ReleaseRequest) -> bool:
        """Release; False when admission could not answer in time (the lease then expires)."""
        return await self._finish(self._stub.Release, request)

    async def _finish(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable,  # type: ignore[type-arg]
        request: usage_pb2.CommitRequest | usage_pb2.ReleaseRequest,
    ) -> bool:
        if not request.reservation_id:  # a fail-open grant has nothing to finish
            return False
        try:
            await self._call(method, request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in UNANSWERED:
                raise
            log.warning("admission did not answer; the lease will expire", code=exc.code().name)
            return False
        return True

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable,  # type: ignore[type-arg]
        request: object,
    ) -> object:
        """``method(request)``, again after RESOURCE_EXHAUSTED while the delays fit the policy."""
        give_up_at = time.monotonic() + self.policy.max_wait_seconds
        while True:
            try:
                return await method(request, timeout=self.policy.timeout_seconds)
            except grpc.aio.AioRpcError as exc:
                delay = retry_delay(exc)
                if (
                    exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED
                    or delay is None
                    or time.monotonic() + delay > give_up_at
                ):
                    raise
                await asyncio.sleep(delay)
