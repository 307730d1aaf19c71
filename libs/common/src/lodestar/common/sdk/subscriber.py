"""The subscriber runtime modules use: a durable subscription with ack-after-success.

Each delivery runs the handler (at most ``concurrency`` at once) inside a span that continues the
publisher's trace; success acks it, an exception nacks it so core retries and, after its limit,
dead-letters it. A broken stream reconnects with backoff and resumes after the last ack, so a
handler must be idempotent on ``event.id``: delivery is at-least-once.

A batch handler gets every delivery of one stream message at once (up to about a thousand) and
says which of them it refuses; the rest are acked. An event that can never be handled (invalid for
this consumer) is refused with ``PermanentFailure``: core dead-letters it at once instead of
retrying it. It suits handlers whose work is itself batched
(one database transaction per batch), saving the per-event scheduling of the single-event form.
Each traced event of a batch gets its consumer span. While the batch handler runs, the current
span (the parent of the spans the handler makes, such as its SQL statements) is that span when
the batch holds one traced event; otherwise it is a ``lodestar.handle.batch`` span that links to
every event's consumer span, since a span has only one parent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import NamedTuple

import grpc
from google.protobuf import message
from opentelemetry import context as otel_context
from opentelemetry import trace

from lodestar.common.events import unpack
from lodestar.common.logging import get_logger
from lodestar.common.sdk.publisher import reason_of
from lodestar.common.telemetry import context_from_event, telemetry_enabled, tracer
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc
from lodestar.events.v1 import event_pb2

FATAL = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
MAX_BACKOFF_SECONDS = 5.0
#: The refusal of a subscription another consumer holds: wait as a standby, then take over.
SUBSCRIPTION_HELD = "SUBSCRIPTION_HELD"
#: The span a batch handler runs under when its batch holds several traced events.
BATCH_SPAN = "lodestar.handle.batch"

log = get_logger(__name__)
_TRACER = tracer("lodestar.sdk")


class ReceivedEvent(NamedTuple):
    """One delivery handed to a handler."""

    sequence: int
    attempt: int
    event: event_pb2.Event
    payload: message.Message

    @property
    def principal(self) -> str:
        """The authenticated principal that published the event, as stamped by core."""
        return self.event.authid


class PermanentFailure(Exception):
    """An event that can never be handled: dead-lettered at once instead of retried.

    Raise it from a handler, or give it as a batch handler's refusal of one sequence.
    """


class _Refusal(NamedTuple):
    error: str
    permanent: bool


Handler = Callable[[ReceivedEvent], Awaitable[None]]

#: Handles a batch; returns the events it refuses (sequence → error text, retried, or a
#: PermanentFailure, dead-lettered at once) or raises to refuse them all.
BatchHandler = Callable[[Sequence[ReceivedEvent]], Awaitable[Mapping[int, str | PermanentFailure]]]


class Subscriber:
    """Consumes one named subscription until ``stop``."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        subscription: str,
        handler: Handler | None = None,
        batch_handler: BatchHandler | None = None,
        module: str = "",
        event_types: Sequence[str] = (),
        start: bus_pb2.StartPosition.ValueType = bus_pb2.START_POSITION_EARLIEST,
        concurrency: int = 1,
        max_in_flight: int = 0,
        ack_interval_seconds: float = 0.005,
    ) -> None:
        self._stub = bus_pb2_grpc.EventBusServiceStub(channel)
        self._open = bus_pb2.SubscribeOpen(
            subscription=subscription,
            module=module,
            event_types=list(event_types),
            start=start,
            max_in_flight=max_in_flight,
        )
        if (handler is None) == (batch_handler is None):
            raise ValueError("give exactly one of handler and batch_handler")
        self._handler = handler
        self._batch_handler = batch_handler
        self._concurrency = concurrency
        self._ack_interval = ack_interval_seconds
        self._stopping = asyncio.Event()
        self.connected = asyncio.Event()
        self.handled = 0

    def stop(self) -> None:
        """Finish after the current stream closes."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume, reconnecting with backoff; raises on errors a retry cannot fix."""
        backoff = 0.1
        standing_by = False
        while not self._stopping.is_set():
            try:
                await self._consume_once()
                backoff, standing_by = 0.1, False
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL:
                    raise
                if reason_of(exc) == SUBSCRIPTION_HELD:  # another replica of us consumes
                    if not standing_by:
                        log.info("standing by: the subscription is held", details=exc.details())
                    standing_by = True
                else:
                    self._log_interruption(exc)
            finally:
                self.connected.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def _log_interruption(self, exc: grpc.aio.AioRpcError) -> None:
        # A stream that was open and ends UNAVAILABLE is routine: the server closes connections
        # at their maximum age, or is rolling over.
        routine = self.connected.is_set() and exc.code() == grpc.StatusCode.UNAVAILABLE
        (log.info if routine else log.warning)(
            "subscription interrupted; reconnecting",
            code=exc.code().name,
            details=exc.details(),
            subscription=self._open.subscription,
        )

    async def _consume_once(self) -> None:
        outbox: asyncio.Queue[bus_pb2.SubscribeRequest | None] = asyncio.Queue()
        outbox.put_nowait(bus_pb2.SubscribeRequest(open=self._open))
        acks = _PendingAcks()
        inbox: asyncio.Queue[Sequence[bus_pb2.Delivery]] = asyncio.Queue(self._concurrency * 2)
        call = self._stub.Subscribe(_drain(outbox))
        helpers = [
            asyncio.create_task(self._flush_acks(acks, outbox)),
            asyncio.create_task(self._cancel_on_stop(call)),
            *(
                asyncio.create_task(self._work(inbox, acks, outbox))
                for _ in range(self._concurrency)
            ),
        ]
        try:
            async for response in _responses(call, self._stopping):
                if response.WhichOneof("message") == "opened":
                    self.connected.set()
                    continue
                if self._batch_handler is not None:
                    await inbox.put(response.batch.deliveries)
                    continue
                for delivery in response.batch.deliveries:
                    await inbox.put((delivery,))
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            outbox.put_nowait(None)

    async def _cancel_on_stop(self, call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        await self._stopping.wait()
        await asyncio.sleep(self._ack_interval * 4)  # let the last acks go out
        call.cancel()

    async def _work(
        self,
        inbox: asyncio.Queue[Sequence[bus_pb2.Delivery]],
        acks: _PendingAcks,
        outbox: asyncio.Queue[bus_pb2.SubscribeRequest | None],
    ) -> None:
        while True:
            deliveries = await inbox.get()
            if self._batch_handler is not None:
                refused = await self._handle_batch(self._batch_handler, deliveries)
            else:
                refused = {}
                for delivery in deliveries:
                    refused |= await self._handle_one(delivery)
            for delivery in deliveries:
                refusal = refused.get(delivery.sequence)
                if refusal is None:
                    acks.add(delivery.sequence)
                    self.handled += 1
                    continue
                log.warning(
                    "handler failed; nacking",
                    seq=delivery.sequence,
                    error=refusal.error,
                    permanent=refusal.permanent,
                )
                nack = bus_pb2.SubscribeNack(
                    sequence=delivery.sequence, error=refusal.error, permanent=refusal.permanent
                )
                outbox.put_nowait(bus_pb2.SubscribeRequest(nack=nack))

    async def _handle_one(self, delivery: bus_pb2.Delivery) -> dict[int, _Refusal]:
        assert self._handler is not None
        event = delivery.event
        try:
            received = ReceivedEvent(delivery.sequence, delivery.attempt, event, unpack(event))
            if not (event.traceparent and telemetry_enabled()):
                await self._handler(received)
                return {}
            with _TRACER.start_as_current_span(
                _span_name(event), context=context_from_event(event), kind=trace.SpanKind.CONSUMER
            ):
                await self._handler(received)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return {delivery.sequence: _refusal(exc)}
        return {}

    async def _handle_batch(
        self, handler: BatchHandler, deliveries: Sequence[bus_pb2.Delivery]
    ) -> dict[int, _Refusal]:
        refused: dict[int, _Refusal] = {}
        batch = []
        for delivery in deliveries:
            try:
                payload = unpack(delivery.event)
            except Exception as exc:
                refused[delivery.sequence] = _Refusal(_describe(exc), permanent=True)
                continue
            batch.append(
                ReceivedEvent(delivery.sequence, delivery.attempt, delivery.event, payload)
            )
        spans = _consumer_spans(batch) if telemetry_enabled() else {}
        try:
            if batch:
                with _current_for_handler(spans, len(batch)):
                    refusals = await handler(batch)
                refused |= _checked_refusals(refusals, batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            refused |= dict.fromkeys((r.sequence for r in batch), _refusal(exc))
        finally:
            for sequence, span in spans.items():
                if sequence in refused:
                    span.set_status(trace.StatusCode.ERROR, refused[sequence].error)
                span.end()
        return refused

    async def _flush_acks(
        self, acks: _PendingAcks, outbox: asyncio.Queue[bus_pb2.SubscribeRequest | None]
    ) -> None:
        """One ack message per interval while there is something to ack; asleep otherwise."""
        while True:
            await acks.pending.wait()
            await asyncio.sleep(self._ack_interval)  # the acks of this interval go in one message
            outbox.put_nowait(
                bus_pb2.SubscribeRequest(ack=bus_pb2.SubscribeAck(sequences=acks.take()))
            )


class _PendingAcks:
    """Sequences handled and not yet acked, with an event set while there are any."""

    def __init__(self) -> None:
        self._sequences: list[int] = []
        self.pending = asyncio.Event()

    def add(self, sequence: int) -> None:
        self._sequences.append(sequence)
        self.pending.set()

    def take(self) -> list[int]:
        """The pending sequences, which are then no longer pending."""
        batch, self._sequences = self._sequences, []
        self.pending.clear()
        return batch


def _checked_refusals(
    refusals: Mapping[int, str | PermanentFailure] | None, batch: Sequence[ReceivedEvent]
) -> dict[int, _Refusal]:
    """The handler's refusals by sequence; a key outside the batch is a handler bug."""
    if not refusals:
        return {}
    sequences = {r.sequence for r in batch}
    checked = {}
    for sequence, error in refusals.items():
        if sequence not in sequences:
            raise TypeError(f"refused {sequence!r}, which is not a sequence of this batch")
        if isinstance(error, PermanentFailure):
            checked[sequence] = _Refusal(str(error), permanent=True)
        else:
            checked[sequence] = _Refusal(str(error), permanent=False)
    return checked


def _refusal(exc: Exception) -> _Refusal:
    return _Refusal(_describe(exc), permanent=isinstance(exc, PermanentFailure))


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _span_name(event: event_pb2.Event) -> str:
    return f"lodestar.handle {event.type}"


def _consumer_spans(batch: Sequence[ReceivedEvent]) -> dict[int, trace.Span]:
    """One consumer span per traced event, each continuing its publisher's trace."""
    return {
        r.sequence: _TRACER.start_span(
            _span_name(r.event), context=context_from_event(r.event), kind=trace.SpanKind.CONSUMER
        )
        for r in batch
        if r.event.traceparent
    }


def _current_for_handler(
    spans: Mapping[int, trace.Span], events: int
) -> contextlib.AbstractContextManager[object]:
    """The span current while a batch handler runs, so that its own spans (SQL) join a trace.

    A span has one parent, so: with one traced event, that event's consumer span, and the
    handler's spans are in the event's trace; with several, a ``lodestar.handle.batch`` span
    that links to every event's consumer span (a trace of its own, found from any of them).
    """
    if not spans:
        return contextlib.nullcontext()
    if len(spans) == 1:
        (only,) = spans.values()
        return trace.use_span(only, end_on_exit=False)
    return _TRACER.start_as_current_span(
        BATCH_SPAN,
        context=otel_context.Context(),
        kind=trace.SpanKind.CONSUMER,
        links=[trace.Link(span.get_span_context()) for span in spans.values()],
        attributes={"messaging.batch.message_count": events},
    )


async def _responses(
    call: grpc.aio.StreamStreamCall,  # type: ignore[type-arg]
    stopping: asyncio.Event,
) -> AsyncIterator[bus_pb2.SubscribeResponse]:
    """The call's responses; ends quietly when ``stop`` cancelled the call."""
    try:
        async for response in call:
            yield response
    except asyncio.CancelledError:
        if stopping.is_set() and call.cancelled():
            return
        raise


async def _drain(
    outbox: asyncio.Queue[bus_pb2.SubscribeRequest | None],
) -> AsyncIterator[bus_pb2.SubscribeRequest]:
    while (request := await outbox.get()) is not None:
        yield request
