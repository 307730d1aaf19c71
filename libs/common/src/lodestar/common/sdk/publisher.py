"""A batching, retrying publisher that spools to disk while core is unreachable.

``publish`` returns once the event is durable: committed by core, or written to the local spool
(``PublishReceipt.spooled``), from which it is replayed in order when core answers again. Event
ids are minted here, so a replay after an unclear failure is stored once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import message
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from lodestar.common.errors import InvalidArgumentError, NetworkError
from lodestar.common.events import new_event
from lodestar.common.logging import get_logger
from lodestar.common.sdk.spool import Spool
from lodestar.common.telemetry import inject_trace_context, tracer
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc
from lodestar.events.v1 import event_pb2

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
SPOOL_RETRY_SECONDS = 0.5

log = get_logger(__name__)


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
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in RETRYABLE


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
            if await self._drain_spool() is False:
                self._spool_buffer()
                if self._closing:
                    return
                await asyncio.sleep(SPOOL_RETRY_SECONDS)
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

    async def _drain_spool(self) -> bool:
        """Send spooled batches oldest first; False while core is unreachable."""
        while self._spool is not None and (oldest := self._spool.oldest()) is not None:
            path, request = oldest
            try:
                await self._stub.Publish(request, timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in RETRYABLE:
                    return False
                if not await self._replay_one_by_one(request):
                    return False
            self._spool.remove(path)
            log.info("replayed spooled batch", events=len(request.events))
        return True

    async def _replay_one_by_one(self, request: bus_pb2.PublishRequest) -> bool:
        """Replay a refused spooled batch event by event; refused events are quarantined."""
        assert self._spool is not None
        for event in request.events:
            single = bus_pb2.PublishRequest(events=[event])
            try:
                await self._stub.Publish(single, timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in RETRYABLE:
                    return False
                path = self._spool.quarantine(single)
                log.error(
                    "core refuses a spooled event; kept aside",
                    error=exc.details(),
                    event_id=event.id,
                    file=str(path),
                )
        return True

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
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                await self._isolate_invalid(batch)
            elif exc.code() in RETRYABLE and self._spool is not None:
                self._buffer = batch + self._buffer
                self._spool_buffer()
            else:
                error = NetworkError(f"publish failed: {exc.code().name}: {exc.details()}")
                for p in batch:
                    _fail(p, error)
            return
        for p in batch:
            _resolve(p, PublishReceipt(p.event.id, spooled=False))

    async def _send_with_retries(self, request: bus_pb2.PublishRequest) -> bus_pb2.PublishResponse:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(self._attempts),
            wait=wait_exponential_jitter(multiplier=0.05, max=1.0),
            reraise=True,
        ):
            with attempt:
                response: bus_pb2.PublishResponse = await self._stub.Publish(
                    request, timeout=self._timeout
                )
                return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def _isolate_invalid(self, batch: list[_Pending]) -> None:
        """Resend one by one so only the invalid events fail."""
        for p in batch:
            try:
                await self._send_with_retries(bus_pb2.PublishRequest(events=[p.event]))
            except grpc.aio.AioRpcError as exc:
                _fail(p, InvalidArgumentError(exc.details() or "invalid event"))
            else:
                _resolve(p, PublishReceipt(p.event.id, spooled=False))


def _resolve(pending: _Pending, receipt: PublishReceipt) -> None:
    if not pending.done.done():
        pending.done.set_result(receipt)


def _fail(pending: _Pending, error: Exception) -> None:
    if not pending.done.done():
        pending.done.set_exception(error)
