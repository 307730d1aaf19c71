"""The EventBusService: durable publish and durable, ordered, acked subscriptions."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import grpc
from opentelemetry import trace
from prometheus_client import Counter, Gauge

from lodestar.common.auth import Principal, Role, caller
from lodestar.common.errors import (
    DATABASE_UNREACHABLE,
    InvalidArgumentError,
    LodestarError,
    ModuleError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from lodestar.common.logging import get_logger
from lodestar.common.telemetry import context_from_event, telemetry_enabled
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc
from lodestar.events.v1 import event_pb2
from lodestar_core.identity import publish_refusals, require_module_identity, stamp
from lodestar_core.registry import Registry
from lodestar_core.replicas import ReplicaPresence
from lodestar_core.settings import BusSettings
from lodestar_core.store import AppendResult, EventStore
from lodestar_core.subscriptions import (
    HoldLost,
    SubscriptionHeld,
    SubscriptionRow,
    SubscriptionStore,
)
from lodestar_core.validation import (
    TimeWindow,
    check_event_types,
    describe_rejections,
    refusal,
    rejection_violations,
    validate_batch,
)

SUBSCRIPTION_NAME = re.compile(r"^[a-z][a-z0-9._-]{0,127}$")
IDLE_WAKE_SECONDS = 1.0
DELIVERIES_PER_MESSAGE = 1024
#: A stream message stays well under the SDK's 16 MiB receive limit, however large the events.
DELIVERY_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_RETRY_DELAY_SECONDS = 5.0

log = get_logger(__name__)
tracer = trace.get_tracer("lodestar.core.bus")

EVENTS_PUBLISHED = Counter(
    "lodestar_bus_events_published_total", "Events newly committed to the log.", ["type"]
)
EVENTS_DUPLICATE = Counter(
    "lodestar_bus_events_duplicate_total", "Published events already stored under their id."
)
EVENTS_DELIVERED = Counter(
    "lodestar_bus_deliveries_total", "Deliveries sent to subscribers.", ["subscription"]
)
DEAD_LETTERED = Counter(
    "lodestar_bus_dead_letters_total", "Events given up on after N attempts.", ["subscription"]
)
SUBSCRIPTION_LAG = Gauge(
    "lodestar_bus_subscription_lag", "Matching events stored after the last ack.", ["subscription"]
)
HEAD_SEQUENCE = Gauge("lodestar_bus_head_sequence", "Sequence of the newest committed event.")


@dataclass
class _InFlight:
    attempt: int
    envelope: bytes
    replayed: bool = False


@dataclass(frozen=True)
class _Refused:
    """A batch refused as a whole: by validation, or because the caller may not publish it."""

    rejections: list[bus_pb2.Rejection]
    permission: bool = False

    def error(self, total: int) -> LodestarError:
        """The error a unary Publish answers with, one field violation per rejection."""
        if not self.permission:
            return refusal(self.rejections, total)
        return PermissionDeniedError(
            describe_rejections(self.rejections, total),
            violations=rejection_violations(self.rejections),
        )


class EventBus(bus_pb2_grpc.EventBusServiceServicer):
    """gRPC handlers of the event bus."""

    def __init__(
        self,
        store: EventStore,
        subscriptions: SubscriptionStore,
        registry: Registry,
        settings: BusSettings,
        presence: ReplicaPresence,
    ) -> None:
        self._store = store
        self._subscriptions = subscriptions
        self._registry = registry
        self._settings = settings
        self.presence = presence
        self._window = TimeWindow.from_settings(settings)
        self._sessions: dict[str, _Session] = {}
        self._opening: set[str] = set()
        self._releasing: set[asyncio.Task[None]] = set()

    async def _append(
        self, events: list[event_pb2.Event], principal: Principal
    ) -> AppendResult | _Refused:
        valid, rejections = validate_batch(
            events,
            self._settings.max_batch_events,
            self._settings.max_event_bytes,
            self._window,
            stamp(principal),
        )
        if rejections:
            return _Refused(rejections)
        refused = publish_refusals(principal, valid)
        if refused:
            return _Refused(refused, permission=True)
        with tracer.start_as_current_span("lodestar.persist.batch") as span:
            span.set_attribute("messaging.batch.message_count", len(valid))
            with _event_spans("lodestar.persist", events):
                result = await self._store.append(valid)
        for event_type, count in collections.Counter(map(itemgetter(1), valid)).items():
            EVENTS_PUBLISHED.labels(event_type).inc(count)
        EVENTS_DUPLICATE.inc(result.duplicates)
        HEAD_SEQUENCE.set(self._store.head)
        return result

    async def Publish(
        self, request: bus_pb2.PublishRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bus_pb2.PublishResponse:
        """Store a batch; all or nothing."""
        outcome = await self._append(list(request.events), caller())
        if isinstance(outcome, _Refused):
            raise outcome.error(len(request.events))
        return bus_pb2.PublishResponse(
            accepted=outcome.accepted,
            duplicates=outcome.duplicates,
            last_sequence=outcome.last_sequence,
        )

    async def PublishStream(
        self,
        request_iterator: AsyncIterator[bus_pb2.PublishStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[bus_pb2.PublishStreamResponse]:
        """Store batches from a stream, acking each once committed; a bad batch is refused alone."""
        principal = caller()
        async for request in request_iterator:
            outcome = await self._append(list(request.events), principal)
            if isinstance(outcome, _Refused):
                yield bus_pb2.PublishStreamResponse(
                    batch_id=request.batch_id,
                    rejections=outcome.rejections,
                    error=describe_rejections(outcome.rejections, len(request.events)),
                )
                continue
            yield bus_pb2.PublishStreamResponse(
                batch_id=request.batch_id,
                accepted=outcome.accepted,
                duplicates=outcome.duplicates,
                last_sequence=outcome.last_sequence,
            )

    async def Subscribe(
        self,
        request_iterator: AsyncIterator[bus_pb2.SubscribeRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[bus_pb2.SubscribeResponse]:
        """Open a durable subscription and stream deliveries until the client goes away."""
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("action") != "open":
            raise InvalidArgumentError("the first message on Subscribe must be `open`")
        session = await self._open(first.open, context.peer())

        def end_with_rpc(_: object) -> None:
            # gRPC drops, without closing, a response generator cancelled while it writes.
            self._end(session)

        # The stub declares the callback type as a class rather than a Protocol.
        context.add_done_callback(end_with_rpc)  # type: ignore[arg-type]
        try:
            yield bus_pb2.SubscribeResponse(
                opened=bus_pb2.SubscribeOpened(
                    subscription=session.name, acked_sequence=session.cursor
                )
            )
            async for response in session.run(request_iterator):
                yield response
        finally:
            await asyncio.shield(self._end(session))

    def _end(self, session: _Session) -> asyncio.Task[None]:
        """Forget a session whose stream ended; the task giving up its hold."""
        if session.ended is None:
            if self._sessions.get(session.name) is session:
                del self._sessions[session.name]
            session.stop()
            session.ended = asyncio.get_running_loop().create_task(self._release(session))
            self._releasing.add(session.ended)
            session.ended.add_done_callback(self._releasing.discard)
            log.info("subscription disconnected", subscription=session.name)
        return session.ended

    async def _release(self, session: _Session) -> None:
        """Give up the hold, so another replica may take the subscription over at once."""
        try:
            await self._subscriptions.release(session.name, session.epoch)
        except DATABASE_UNREACHABLE as exc:  # the hold then lapses with this replica's heartbeat
            log.warning("cannot release subscription", subscription=session.name, error=str(exc))

    async def drain(self) -> None:
        """Wait for the holds of ended streams to be given up."""
        await asyncio.gather(*self._releasing, return_exceptions=True)

    async def follow_other_replicas(self) -> None:
        """While streams are open and other replicas live, pick up the events they appended."""
        if self._sessions and self.presence.peers:
            await self._store.refresh_head()

    async def _open(self, request: bus_pb2.SubscribeOpen, peer: str) -> _Session:
        _validate_open(request, self._settings)
        name = request.subscription
        principal = caller()
        if request.module:
            require_module_identity(principal, request.module, "open.module")
        holder = await self._require_owner(name, principal, "open.subscription", missing_ok=True)
        if holder is None and principal.role is not Role.ADMIN:
            await self._require_room(principal.name)
        if name in self._sessions or name in self._opening:
            session = self._sessions.get(name)
            raise SubscriptionHeld(
                f"subscription {name!r} is already connected "
                f"({session.peer if session else 'opening'}); one consumer at a time",
                field="open.subscription",
            )
        # Reserved before the first await, so that concurrent opens of one name admit one.
        self._opening.add(name)
        try:
            if request.module and not await self._registry.exists(request.module):
                raise ModuleError(
                    f"module {request.module!r} is not registered; register it before subscribing",
                    field="open.module",
                )
            # Shielded: a stream cancelled while its claim commits must still give the hold back.
            claim = asyncio.ensure_future(self._claim(request, principal.owner_scope, peer))
            try:
                session = await asyncio.shield(claim)
            except asyncio.CancelledError:
                claim.add_done_callback(self._give_back)
                raise
            self._sessions[name] = session
        finally:
            self._opening.discard(name)
        log.info("subscription connected", subscription=name, acked=session.cursor, peer=peer)
        return session

    async def _claim(
        self, request: bus_pb2.SubscribeOpen, owner: str | None, peer: str
    ) -> _Session:
        """Hold the subscription on this replica (creating it if new), with its failures loaded."""
        latest = request.start == bus_pb2.START_POSITION_LATEST
        start = await self._store.refresh_head() if latest else 0
        row = await self._subscriptions.open(
            request.subscription,
            request.module,
            list(request.event_types),
            start,
            owner=owner,
            replica=self.presence.id,
            takeover_after=self.presence.takeover_after,
        )
        window = request.max_in_flight or self._settings.default_in_flight
        session = _Session(self, row, window, peer)
        await session.load_failures()
        return session

    def _give_back(self, claim: asyncio.Future[_Session]) -> None:
        """Release a claim whose stream was cancelled before it could use it."""
        if not claim.cancelled() and claim.exception() is None:
            self._end(claim.result())

    async def _require_owner(
        self, name: str, principal: Principal, field: str, *, missing_ok: bool = False
    ) -> str | None:
        """Refuse a subscription that is not the caller's (admins may use any); its owner."""
        holder = await self._subscriptions.owner_of(name)
        if holder is None:
            if missing_ok:
                return None
            raise NotFoundError(f"no subscription named {name[:128]!r}", field=field)
        if principal.role is not Role.ADMIN and holder != principal.name:
            raise PermissionDeniedError(
                f"subscription {name!r} belongs to {holder or 'the admins'!r}, not to "
                f"{principal.name}",
                field=field,
            )
        return holder

    async def _require_room(self, owner: str) -> None:
        """Refuse a new subscription to an owner that has as many as it may."""
        limit = self._settings.max_subscriptions_per_owner
        if await self._subscriptions.count_owned(owner) >= limit:
            raise ResourceExhaustedError(
                f"{owner} owns {limit} subscriptions already (bus.max_subscriptions_per_owner); "
                "reuse one, or ask an admin to delete those no longer needed",
                field="open.subscription",
            )

    def wake_module(self, module: str) -> None:
        """Tell the sessions of ``module`` that its enabled state changed."""
        for session in self._sessions.values():
            if session.module == module:
                session.wake()

    async def ListSubscriptions(
        self, request: bus_pb2.ListSubscriptionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bus_pb2.ListSubscriptionsResponse:
        """Every subscription with its position, lag and dead letters."""
        return bus_pb2.ListSubscriptionsResponse(subscriptions=await self.describe_subscriptions())

    async def describe_subscriptions(self) -> list[bus_pb2.Subscription]:
        """Subscriptions as API messages; also refreshes the lag gauge."""
        head = await self._store.refresh_head()  # other replicas may have appended
        dead = await self._subscriptions.dead_letter_counts()
        described = []
        for row in await self._subscriptions.list(self.presence.takeover_after):
            lag = await self._subscriptions.lag(row, head)
            SUBSCRIPTION_LAG.labels(row.name).set(lag)
            described.append(
                bus_pb2.Subscription(
                    name=row.name,
                    module=row.module,
                    event_types=row.event_types,
                    acked_sequence=row.acked_seq,
                    head_sequence=head,
                    lag=lag,
                    connected=row.connected,
                    dead_letters=dead.get(row.name, 0),
                )
            )
        return described

    async def ListDeadLetters(
        self, request: bus_pb2.ListDeadLettersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bus_pb2.ListDeadLettersResponse:
        """Dead letters of one subscription, or of all."""
        if request.limit < 0:
            raise InvalidArgumentError("must not be negative", field="limit")
        principal = caller()
        if request.subscription:
            await self._require_owner(request.subscription, principal, "subscription")
        rows = await self._subscriptions.dead_letters(
            request.subscription, request.limit or 100, principal.owner_scope
        )
        return bus_pb2.ListDeadLettersResponse(
            dead_letters=[
                bus_pb2.DeadLetter(
                    subscription=r.subscription,
                    sequence=r.seq,
                    attempts=r.attempts,
                    last_error=r.last_error,
                    event=event_pb2.Event.FromString(r.envelope),
                )
                for r in rows
            ]
        )

    async def ReplayDeadLetters(
        self, request: bus_pb2.ReplayDeadLettersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bus_pb2.ReplayDeadLettersResponse:
        """Queue dead letters for redelivery to their subscription."""
        if not request.subscription:
            raise InvalidArgumentError("required, the subscription to replay", field="subscription")
        replayed = await self._subscriptions.replay(request.subscription, list(request.sequences))
        session = self._sessions.get(request.subscription)
        if session is not None:
            session.replays_queued()
        return bus_pb2.ReplayDeadLettersResponse(replayed=replayed)

    async def DeleteSubscription(
        self,
        request: bus_pb2.DeleteSubscriptionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> bus_pb2.DeleteSubscriptionResponse:
        """Forget a subscription no stream has open (its owner's or, for admins, any)."""
        name = request.subscription
        if not name:
            raise InvalidArgumentError("required, the subscription to delete", field="subscription")
        await self._require_owner(name, caller(), "subscription")
        if name in self._sessions or name in self._opening:
            raise ModuleError(
                f"subscription {name!r} has a stream open; stop its consumer, then delete it",
                field="subscription",
            )
        dead_letters = await self._subscriptions.delete(name)
        log.info("subscription deleted", subscription=name, dead_letters=dead_letters)
        return bus_pb2.DeleteSubscriptionResponse(dead_letters=dead_letters)


@contextlib.contextmanager
def _event_spans(
    name: str,
    events: list[event_pb2.Event],
    kind: trace.SpanKind = trace.SpanKind.CONSUMER,
) -> Iterator[None]:
    """One span per traced event, each continuing its publisher's trace (only when tracing)."""
    if not telemetry_enabled():
        yield
        return
    spans = [
        tracer.start_span(name, context=context_from_event(e), kind=kind)
        for e in events
        if e.traceparent
    ]
    try:
        yield
    finally:
        for span in spans:
            span.end()


def _validate_open(request: bus_pb2.SubscribeOpen, settings: BusSettings) -> None:
    if not SUBSCRIPTION_NAME.fullmatch(request.subscription):
        raise InvalidArgumentError(
            f"{request.subscription[:64]!r} must match {SUBSCRIPTION_NAME.pattern}",
            field="open.subscription",
        )
    check_event_types(request.event_types, "open.event_types")
    if request.start not in bus_pb2.StartPosition.values():
        raise InvalidArgumentError(
            f"unknown start position {request.start}; use START_POSITION_EARLIEST or "
            "START_POSITION_LATEST",
            field="open.start",
        )
    if not 0 <= request.max_in_flight <= settings.max_in_flight:
        raise InvalidArgumentError(
            f"must be between 1 and {settings.max_in_flight} (0 for the default)",
            field="open.max_in_flight",
        )


class _Session:
    """One connected subscription: fills the in-flight window, applies acks and nacks."""

    def __init__(self, bus: EventBus, row: SubscriptionRow, window: int, peer: str) -> None:
        self.bus = bus
        self.name = row.name
        self.module = row.module
        self.event_types = row.event_types
        self.cursor = row.acked_seq
        self.epoch = row.epoch
        self.generation = bus.presence.generation
        self.peer = peer
        self._delivered = EVENTS_DELIVERED.labels(row.name)
        self._scan = row.acked_seq
        self._window = window
        self._in_flight: dict[int, _InFlight] = {}
        self._failures: dict[int, int] = {}
        self._retry: deque[int] = deque()
        self._wake = asyncio.Event()
        self._replays_waiting = True  # replays may have been queued while disconnected
        self._reader: asyncio.Task[None] | None = None
        self.ended: asyncio.Task[None] | None = None  # giving up the hold once the stream ended

    def stop(self) -> None:
        """Stop reading acks: the stream has ended."""
        if self._reader is not None:
            self._reader.cancel()

    def wake(self) -> None:
        """Re-run the send loop now."""
        self._wake.set()

    def replays_queued(self) -> None:
        """Dead letters were queued for redelivery: look for them on the next pass."""
        self._replays_waiting = True
        self.wake()

    async def load_failures(self) -> None:
        """Recorded failed attempts, so attempt numbers survive reconnects."""
        self._failures = await self.bus._subscriptions.failure_counts(self.name, self.cursor)

    async def run(
        self, requests: AsyncIterator[bus_pb2.SubscribeRequest]
    ) -> AsyncIterator[bus_pb2.SubscribeResponse]:
        """Deliveries for this subscription, while acks are read from ``requests``."""
        reader = self._reader = asyncio.create_task(self._read(requests), name=f"acks-{self.name}")
        try:
            while not reader.done():
                presence = self.bus.presence
                if presence.generation != self.generation:  # we may have been taken for dead
                    raise HoldLost(f"core replica {presence.id} lost its holds; reconnect")
                deliveries = await self._next_deliveries()
                if deliveries and not presence.may_deliver(self.generation):
                    raise HoldLost(
                        f"core replica {presence.id} cannot prove it is alive (the database is "
                        "slow or away); reconnect"
                    )
                for chunk in _message_chunks(deliveries):
                    yield bus_pb2.SubscribeResponse(batch=bus_pb2.DeliveryBatch(deliveries=chunk))
                self._delivered.inc(len(deliveries))
                await self._idle(reader)
            reader.result()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _idle(self, reader: asyncio.Task[None]) -> None:
        """Wait until there may be something to send: new events, a wake-up, or the reader ends.

        While the module is disabled only a wake-up (enable, retry, replay) or the reader ends
        the wait; new events must not turn this into a busy loop.
        """
        paused = not await self._enabled()
        if self._wake.is_set() or (
            not paused and self._has_room() and self.bus._store.head > self._scan
        ):
            self._wake.clear()
            return
        woken = asyncio.create_task(self._wake.wait())
        waiters: set[asyncio.Future[Any]] = {woken, reader}
        if not paused and self._has_room():
            waiters.add(
                asyncio.create_task(self.bus._store.wait_for_append(self._scan, IDLE_WAKE_SECONDS))
            )
        else:
            waiters.add(asyncio.create_task(asyncio.sleep(IDLE_WAKE_SECONDS)))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in waiters - {reader}:
            task.cancel()
        await asyncio.gather(*(waiters - {reader}), return_exceptions=True)
        self._wake.clear()

    async def _enabled(self) -> bool:
        return not self.module or await self.bus._registry.is_enabled(self.module)

    def _has_room(self) -> bool:
        return len(self._in_flight) < self._window

    async def _next_deliveries(self) -> list[bus_pb2.Delivery]:
        if not await self._enabled():
            return []
        deliveries = self._retries()
        deliveries += await self._replays()
        if self._has_room():
            deliveries += await self._fresh()
        if not self._in_flight and self._scan > self.cursor:
            await self._advance(self._scan)
        return deliveries

    def _retries(self) -> list[bus_pb2.Delivery]:
        deliveries = []
        while self._retry:
            seq = self._retry.popleft()
            item = self._in_flight.get(seq)
            if item is not None:
                item.attempt += 1
                deliveries.append(_delivery(seq, item))
        return deliveries

    async def _replays(self) -> list[bus_pb2.Delivery]:
        if not (self._replays_waiting and self._has_room()):
            return []
        waiting = await self.bus._subscriptions.redeliveries(self.name, self._window)
        self._replays_waiting = len(waiting) == self._window
        deliveries = []
        for seq, envelope in waiting:
            if seq in self._in_flight or not self._has_room():
                continue
            self._in_flight[seq] = _InFlight(attempt=1, envelope=envelope, replayed=True)
            deliveries.append(_delivery(seq, self._in_flight[seq]))
        return deliveries

    async def _fresh(self) -> list[bus_pb2.Delivery]:
        head = self.bus._store.head
        if head <= self._scan:
            return []
        limit = self._window - len(self._in_flight)
        rows = await self.bus._store.fetch(self._scan, head, limit, self.event_types)
        self._scan = rows[-1].seq if len(rows) == limit else head
        deliveries = []
        for row in rows:
            item = _InFlight(attempt=self._failures.get(row.seq, 0) + 1, envelope=row.envelope)
            self._in_flight[row.seq] = item
            deliveries.append(_delivery(row.seq, item))
        return deliveries

    async def _read(self, requests: AsyncIterator[bus_pb2.SubscribeRequest]) -> None:
        async for request in requests:
            action = request.WhichOneof("action")
            if action == "ack":
                await self._ack(request.ack.sequences)
            elif action == "nack":
                await self._nack(request.nack.sequence, request.nack.error, request.nack.permanent)
            else:
                raise InvalidArgumentError("`open` may only be sent once per stream")
            self.wake()

    async def _ack(self, sequences: Any) -> None:
        recovered = []
        for seq in sequences:
            item = self._in_flight.pop(seq, None)
            if item is not None and item.replayed:
                await self.bus._subscriptions.finish_redelivery(self.name, seq)
            if self._failures.pop(seq, None) is not None:
                recovered.append(seq)
        if recovered:
            await self.bus._subscriptions.clear_failures(self.name, recovered)
        # Fresh deliveries enter _in_flight in sequence order, so the first one left is the oldest.
        oldest = next((s for s, item in self._in_flight.items() if not item.replayed), None)
        await self._advance(oldest - 1 if oldest is not None else self._scan)

    async def _advance(self, position: int) -> None:
        if position > self.cursor:
            self.cursor = position
            await self.bus._subscriptions.advance(self.name, position, self.epoch)

    async def _nack(self, seq: int, error: str, permanent: bool = False) -> None:
        item = self._in_flight.get(seq)
        if item is None:
            return
        attempts = await self.bus._subscriptions.record_failure(
            self.name, seq, error[:2000].replace("\x00", "\ufffd")
        )
        self._failures[seq] = attempts
        if permanent or attempts >= self.bus._settings.max_delivery_attempts:
            log.warning("dead-lettered", subscription=self.name, seq=seq, attempts=attempts)
            await self.bus._subscriptions.dead_letter(self.name, seq, item.envelope)
            del self._failures[seq]  # dead_letter moved its failure row already
            DEAD_LETTERED.labels(self.name).inc()
            await self._ack([seq])
            return
        delay = min(0.05 * 2**attempts, MAX_RETRY_DELAY_SECONDS)
        asyncio.get_running_loop().call_later(delay, self._schedule_retry, seq)

    def _schedule_retry(self, seq: int) -> None:
        self._retry.append(seq)
        self.wake()


def _delivery(seq: int, item: _InFlight) -> bus_pb2.Delivery:
    event = event_pb2.Event.FromString(item.envelope)
    if event.traceparent and telemetry_enabled():  # a point in the trace: started and ended
        context = context_from_event(event)
        tracer.start_span("lodestar.deliver", context=context, kind=trace.SpanKind.PRODUCER).end()
    return bus_pb2.Delivery(sequence=seq, attempt=item.attempt, event=event)


def _message_chunks(deliveries: list[bus_pb2.Delivery]) -> Iterator[list[bus_pb2.Delivery]]:
    """``deliveries`` in order, cut into stream messages of bounded count and size."""
    chunk: list[bus_pb2.Delivery] = []
    size = 0
    for delivery in deliveries:
        event_bytes = delivery.event.ByteSize()
        if chunk and (
            len(chunk) == DELIVERIES_PER_MESSAGE or size + event_bytes > DELIVERY_MESSAGE_BYTES
        ):
            yield chunk
            chunk, size = [], 0
        chunk.append(delivery)
        size += event_bytes
    if chunk:
        yield chunk
