"""A batching, retrying publisher that spools to disk while core is unreachable.

``publish`` returns once the event is durable: committed by core, or written to the local spool
(``PublishReceipt.spooled``), from which it is replayed in order when core answers again. Event
ids are minted here, so a replay after an unclear failure is stored once.

What a refusal means (``classify``):

- transient (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, CANCELLED, and RESOURCE_EXHAUSTED with a
  ``RetryInfo`` delay, i.e. a rate limit): retried with backoff (at least the delay core asks
  for), then spooled;
- credential (UNAUTHENTICATED): the credential, not the events, is at fault. A live publish fails
  with ``AuthenticationError``; spooled batches stay pending (not quarantined) and are tried again
  every ``CREDENTIAL_RETRY_SECONDS``, in case core's credentials are fixed (new events queue
  behind them in the spool meanwhile, to keep the order);
- permanent (everything else: INVALID_ARGUMENT, PERMISSION_DENIED, FAILED_PRECONDITION,
  OUT_OF_RANGE, RESOURCE_EXHAUSTED without a delay — a message too large —, INTERNAL …): never
  retried as it is. The batch is resent event by event so that only the refused events fail: a
  live publish raises for them (the matching LodestarError, field violations included); a spooled
  one is quarantined in the spool's ``rejected/`` folder with the reason, and the rest go on.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import message
from google.rpc import status_pb2
from grpc_status import rpc_status
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from lodestar.common.errors import (
    AuthenticationError,
    ConfigurationError,
    FieldViolation,
    InvalidArgumentError,
    LodestarError,
    ModuleError,
    NetworkError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    bad_request_violations,
    error_reason,
    retry_info_delay,
)
from lodestar.common.events import new_event
from lodestar.common.logging import get_logger
from lodestar.common.sdk.spool import Refusal, Spool
from lodestar.common.telemetry import inject_trace_context, tracer
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc
from lodestar.events.v1 import event_pb2

#: Codes that say "try again later"; RESOURCE_EXHAUSTED only with a RetryInfo delay (rate limit).
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)
SPOOL_RETRY_SECONDS = 0.5
CREDENTIAL_RETRY_SECONDS = 30.0
MAX_RETRY_DELAY_SECONDS = 30.0

log = get_logger(__name__)


class Verdict(enum.Enum):
    """What a failed publish means for the events in it."""

    TRANSIENT = "transient"
    CREDENTIAL = "credential"
    PERMANENT = "permanent"


def classify(exc: grpc.aio.AioRpcError) -> Verdict:
    """Whether a refusal is worth retrying, blames the credential, or blames the events."""
    code = exc.code()
    if code in TRANSIENT:
        return Verdict.TRANSIENT
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_delay(exc) is not None:
        return Verdict.TRANSIENT
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Verdict.CREDENTIAL
    return Verdict.PERMANENT


def retry_delay(exc: grpc.aio.AioRpcError) -> float | None:
    """The delay core asks for in a ``google.rpc.RetryInfo`` status detail, if any."""
    status = _rich_status(exc)
    return retry_info_delay(status) if status is not None else None


def reason_of(exc: grpc.aio.AioRpcError) -> str | None:
    """The ``google.rpc.ErrorInfo`` reason of a refusal (``SUBSCRIPTION_HELD`` …), if any."""
    status = _rich_status(exc)
    return error_reason(status) if status is not None else None


def refusal_of(exc: grpc.aio.AioRpcError) -> Refusal:
    """A refusal as kept beside a quarantined batch."""
    status = _rich_status(exc)
    violations = bad_request_violations(status) if status is not None else []
    return Refusal(
        code=exc.code().name,
        details=exc.details() or "",
        violations=[{"field": v.field, "description": v.description} for v in violations],
    )


def error_of(exc: grpc.aio.AioRpcError) -> LodestarError:
    """The LodestarError a refused publish raises to the caller, field violations included."""
    status = _rich_status(exc)
    violations: list[FieldViolation] = bad_request_violations(status) if status else []
    details = exc.details() or exc.code().name
    error_cls = _ERRORS.get(exc.code())
    if error_cls is None:
        return NetworkError(f"publish failed: {exc.code().name}: {details}")
    return error_cls(details, violations=violations)


_ERRORS: dict[grpc.StatusCode, type[LodestarError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.FAILED_PRECONDITION: ModuleError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNIMPLEMENTED: ConfigurationError,
}


def _rich_status(exc: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    try:
        status: status_pb2.Status | None = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except ValueError:
        return None
    return status


@dataclass(frozen=True)
class PublishReceipt:
    """Proof that an event is durable, in core or in the local spool."""

    event_id: str
    spooled: bool
    duplicate: bool = False


@dataclass
class _Pending:
    event: event_pb2.Event
    done: asyncio.Future[PublishReceipt]


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and classify(exc) is Verdict.TRANSIENT


_backoff = wait_exponential_jitter(multiplier=0.05, max=1.0)


def _failed_once(exc: BaseException) -> RetryCallState:
    """The retry state of a first attempt that raised ``exc``, to compute the wait after it."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.set_exception((type(exc), exc, exc.__traceback__))
    return state


def _wait(state: RetryCallState) -> float:
    """Exponential backoff with jitter, but at least the delay core asked for."""
    backoff: float = _backoff(state)
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, grpc.aio.AioRpcError):
        delay = retry_delay(exc)
        if delay is not None:
            return max(backoff, min(delay, MAX_RETRY_DELAY_SECONDS))
    return backoff


@dataclass
class DrainResult:
    """What one pass over a spool achieved, and why it stopped early (if it did)."""

    sent_batches: int = 0
    sent_events: int = 0
    quarantined_events: int = 0
    still_refused_events: int = 0
    stopped: str = ""
    retry_after: float = 0.0


async def drain_spool(
    stub: bus_pb2_grpc.EventBusServiceAsyncStub, spool: Spool, timeout: float = 10.0
) -> DrainResult:
    """Send the pending batches oldest first; quarantine the events core refuses for good.

    Stops at the first transient or credential failure (``stopped`` says which, and
    ``retry_after`` how long to wait); what was not sent stays pending, in order.
    """
    result = DrainResult()
    while (oldest := spool.oldest()) is not None:
        path, request = oldest
        try:
            await stub.Publish(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if classify(exc) is not Verdict.PERMANENT:
                return _stopped(result, exc)
            if not await _send_one_by_one(stub, spool, path, request, result, timeout):
                return result
        else:
            result.sent_events += len(request.events)
        spool.remove(path)
        result.sent_batches += 1
        log.info("replayed spooled batch", events=len(request.events))
    return result


async def _send_one_by_one(
    stub: bus_pb2_grpc.EventBusServiceAsyncStub,
    spool: Spool,
    path: Path,
    request: bus_pb2.PublishRequest,
    result: DrainResult,
    timeout: float,
) -> bool:
    """Send a refused batch event by event, quarantining each refused one; False if stopped."""
    events = list(request.events)
    for index, event in enumerate(events):
        single = bus_pb2.PublishRequest(events=[event])
        try:
            await stub.Publish(single, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if classify(exc) is not Verdict.PERMANENT:
                spool.replace(path, bus_pb2.PublishRequest(events=events[index:]))
                _stopped(result, exc)
                return False
            quarantined = spool.quarantine(single, refusal_of(exc))
            result.quarantined_events += 1
            log.error(
                "core refuses a spooled event for good; quarantined",
                error=exc.details(),
                code=exc.code().name,
                event_id=event.id,
                file=str(quarantined),
            )
        else:
            result.sent_events += 1
    return True


async def replay_quarantined(
    stub: bus_pb2_grpc.EventBusServiceAsyncStub, spool: Spool, timeout: float = 10.0
) -> DrainResult:
    """Send every quarantined event again; those still refused stay quarantined (new reason)."""
    result = DrainResult()
    for batch in spool.quarantined():
        refused: list[event_pb2.Event] = []
        last_refusal: Refusal | None = None
        events = list(batch.request.events)
        for index, event in enumerate(events):
            try:
                await stub.Publish(bus_pb2.PublishRequest(events=[event]), timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if classify(exc) is not Verdict.PERMANENT:
                    left = bus_pb2.PublishRequest(events=refused + events[index:])
                    spool.requarantine(batch.path, left, last_refusal or refusal_of(exc))
                    return _stopped(result, exc)
                refused.append(event)
                last_refusal = refusal_of(exc)
            else:
                result.sent_events += 1
        if refused and last_refusal is not None:
            spool.requarantine(batch.path, bus_pb2.PublishRequest(events=refused), last_refusal)
            result.still_refused_events += len(refused)
        else:
            spool.remove(batch.path)
            result.sent_batches += 1
    return result


def _stopped(result: DrainResult, exc: grpc.aio.AioRpcError) -> DrainResult:
    result.stopped = f"{exc.code().name}: {exc.details()}"
    verdict = classify(exc)
    if verdict is Verdict.CREDENTIAL:
        result.retry_after = CREDENTIAL_RETRY_SECONDS
        log.error("core refuses the credential; spooled events wait", error=exc.details())
    else:
        delay = retry_delay(exc)
        result.retry_after = min(delay, MAX_RETRY_DELAY_SECONDS) if delay else SPOOL_RETRY_SECONDS
    return result


class Publisher:
    """Publishes events to core in batches, in the order ``publish`` was called."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        source: str,
        spool_dir: Path | None = None,
        max_batch: int = 1000,
        linger_seconds: float = 0.002,
        attempts: int = 4,
        timeout_seconds: float = 10.0,
    ) -> None:
        self._stub = bus_pb2_grpc.EventBusServiceStub(channel)
        self._source = source
        self._spool = Spool(spool_dir) if spool_dir else None
        self._max_batch = max_batch
        self._linger = linger_seconds
        self._attempts = attempts
        self._timeout = timeout_seconds
        self._buffer: list[_Pending] = []
        self._has_work = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._sending = False

    async def __aenter__(self) -> Publisher:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        """Start the background flusher (also drains a spool left by an earlier run)."""
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop(), name="publisher")
            if self._spool is not None and len(self._spool):
                self._has_work.set()

    @property
    def spooled_batches(self) -> int:
        """Batches waiting in the spool."""
        return len(self._spool) if self._spool else 0

    async def publish(
        self, payload: message.Message, *, subject: str = "", event_id: str | None = None
    ) -> PublishReceipt:
        """Publish one payload; returns when it is durable."""
        with tracer("lodestar.sdk").start_as_current_span("lodestar.publish"):
            event = new_event(payload, source=self._source, subject=subject, event_id=event_id)
            inject_trace_context(event)
            return (await self.publish_events([event]))[0]

    async def publish_events(self, events: Sequence[event_pb2.Event]) -> list[PublishReceipt]:
        """Publish ready-made envelopes; returns when all are durable."""
        if self._flusher is None:
            self.start()
        loop = asyncio.get_running_loop()
        pending = [_Pending(e, loop.create_future()) for e in events]
        self._buffer.extend(pending)
        self._has_work.set()
        return list(await asyncio.gather(*(p.done for p in pending)))

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything published so far is in core: buffer and spool empty."""
        self._has_work.set()
        deadline = asyncio.get_running_loop().time() + timeout
        while self._buffer or self._sending or self.spooled_batches:
            if asyncio.get_running_loop().time() > deadline:
                raise NetworkError(
                    f"core did not take the spooled events within {timeout}s; they stay spooled"
                )
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Flush what is buffered, then stop."""
        self._closing = True
        self._has_work.set()
        if self._flusher is not None:
            await self._flusher
            self._flusher = None

    async def _flush_loop(self) -> None:
        while True:
            await self._wait_for_work()
            retry_after = await self._drain_spool()
            if retry_after is not None:
                self._spool_buffer()
                if self._closing:
                    return
                await asyncio.sleep(retry_after)
                continue
            if not self._buffer:
                if self._closing:
                    return
                self._has_work.clear()
                continue
            batch, self._buffer = self._buffer[: self._max_batch], self._buffer[self._max_batch :]
            self._sending = True
            try:
                await self._send_batch(batch)
            finally:
                self._sending = False

    async def _wait_for_work(self) -> None:
        await self._has_work.wait()
        if len(self._buffer) < self._max_batch and not self._closing:
            await asyncio.sleep(self._linger)

    async def _drain_spool(self) -> float | None:
        """Send spooled batches oldest first; the seconds to wait while core cannot take them."""
        if self._spool is None or not len(self._spool):
            return None
        result = await drain_spool(self._stub, self._spool, self._timeout)
        return result.retry_after if result.stopped else None

    def _spool_buffer(self) -> None:
        """Move everything buffered into the spool, behind what is there already."""
        if not self._buffer or self._spool is None:
            return
        while self._buffer:
            batch = self._buffer[: self._max_batch]
            self._spool.append(bus_pb2.PublishRequest(events=[p.event for p in batch]))
            del self._buffer[: len(batch)]
            for p in batch:
                _resolve(p, PublishReceipt(p.event.id, spooled=True))

    async def _send_batch(self, batch: list[_Pending]) -> None:
        request = bus_pb2.PublishRequest(events=[p.event for p in batch])
        try:
            await self._send_with_retries(request)
        except grpc.aio.AioRpcError as exc:
            verdict = classify(exc)
            if verdict is Verdict.PERMANENT:
                await self._isolate_refused(batch)
            elif verdict is Verdict.TRANSIENT and self._spool is not None:
                self._buffer = batch + self._buffer
                self._spool_buffer()
            else:
                error = error_of(exc)
                for p in batch:
                    _fail(p, error)
            return
        for p in batch:
            _resolve(p, PublishReceipt(p.event.id, spooled=False))

    async def _send_with_retries(self, request: bus_pb2.PublishRequest) -> bus_pb2.PublishResponse:
        """Publish; a transient failure is retried with backoff (tenacity, from the second try).

        The first try runs outside tenacity, whose retry state is a web of reference cycles that
        only the garbage collector frees; built for every batch, it lengthened the collector's
        pauses in the process that publishes (a gateway's, say).
        """
        try:
            response: bus_pb2.PublishResponse = await self._stub.Publish(
                request, timeout=self._timeout
            )
            return response
        except grpc.aio.AioRpcError as exc:
            if self._attempts <= 1 or not _retryable(exc):
                raise
            await asyncio.sleep(_wait(_failed_once(exc)))
        return await self._retry(request)

    async def _retry(self, request: bus_pb2.PublishRequest) -> bus_pb2.PublishResponse:
        """Tries 2 to ``attempts``, each after its backoff."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(self._attempts - 1),
            wait=_wait,
            reraise=True,
        ):
            with attempt:
                response: bus_pb2.PublishResponse = await self._stub.Publish(
                    request, timeout=self._timeout
                )
                return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def _isolate_refused(self, batch: list[_Pending]) -> None:
        """Resend one by one so that only the refused events fail; the others are delivered."""
        for index, p in enumerate(batch):
            try:
                await self._send_with_retries(bus_pb2.PublishRequest(events=[p.event]))
            except grpc.aio.AioRpcError as exc:
                if classify(exc) is Verdict.TRANSIENT and self._spool is not None:
                    self._buffer = batch[index:] + self._buffer
                    self._spool_buffer()
                    return
                _fail(p, error_of(exc))
            else:
                _resolve(p, PublishReceipt(p.event.id, spooled=False))


def _resolve(pending: _Pending, receipt: PublishReceipt) -> None:
    if not pending.done.done():
        pending.done.set_result(receipt)


def _fail(pending: _Pending, error: Exception) -> None:
    if not pending.done.done():
        pending.done.set_exception(error)
