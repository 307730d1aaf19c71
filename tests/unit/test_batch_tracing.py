"""Which span is current while a batch handler runs, and which one a ledger write runs under.

A span has one parent: a batch of one traced event continues that event's trace; a batch of
several traced events runs under a span of its own that links to every event's consumer span.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lodestar.common.events import new_event
from lodestar.common.sdk import subscriber
from lodestar.common.sdk.subscriber import ReceivedEvent, Subscriber
from lodestar.core.v1 import bus_pb2
from lodestar.usage.v1 import events_pb2 as usage
from lodestar_usage import ingest

HANDLE = "lodestar.handle lodestar.usage.v1.RequestCompleted"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Tracing on for the subscriber and the ledger writer, into an in-memory exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    test_tracer = provider.get_tracer("test")
    for module in (subscriber, ingest):
        monkeypatch.setattr(module, "_TRACER", test_tracer)
        monkeypatch.setattr(module, "telemetry_enabled", lambda: True)
    return exporter


def traced_delivery(sequence: int, trace_id: int, span_id: int) -> bus_pb2.Delivery:
    event = new_event(usage.RequestCompleted(model="m"), source="test://batch-tracing")
    event.traceparent = f"00-{trace_id:032x}-{span_id:016x}-01"
    return bus_pb2.Delivery(sequence=sequence, attempt=1, event=event)


async def handle(deliveries: Sequence[bus_pb2.Delivery]) -> trace.Span:
    """Run a batch handler over ``deliveries``; returns the span current inside it."""
    seen: list[trace.Span] = []

    async def handler(batch: Sequence[ReceivedEvent]) -> dict[int, str]:
        seen.append(trace.get_current_span())
        return {}

    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        consumer = Subscriber(channel, subscription="s", batch_handler=handler)
        refused = await consumer._handle_batch(handler, deliveries)
    assert refused == {}
    (current,) = seen
    return current


def finished(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def test_a_batch_of_one_traced_event_runs_under_its_consumer_span(spans):
    current = await handle([traced_delivery(7, trace_id=0xA1, span_id=0xB1)])
    (consumer,) = finished(spans, HANDLE)
    assert current.get_span_context() == consumer.context
    assert consumer.context.trace_id == 0xA1
    assert consumer.parent is not None
    assert consumer.parent.span_id == 0xB1
    assert finished(spans, subscriber.BATCH_SPAN) == []


async def test_a_batch_of_several_traced_events_runs_under_a_span_linking_to_each(spans):
    current = await handle(
        [
            traced_delivery(1, trace_id=0xA1, span_id=0xB1),
            traced_delivery(2, trace_id=0xA2, span_id=0xB2),
            bus_pb2.Delivery(
                sequence=3,
                attempt=1,
                event=new_event(usage.RequestCompleted(model="m"), source="test://untraced"),
            ),
        ]
    )
    consumers = finished(spans, HANDLE)
    assert sorted(s.context.trace_id for s in consumers) == [0xA1, 0xA2]
    (batch,) = finished(spans, subscriber.BATCH_SPAN)
    assert current.get_span_context() == batch.context
    assert batch.parent is None
    assert batch.context.trace_id not in (0xA1, 0xA2)
    assert [link.context for link in batch.links] == [s.context for s in consumers]
    assert batch.attributes == {"messaging.batch.message_count": 3}


async def test_an_untraced_batch_has_no_spans(spans):
    event = new_event(usage.RequestCompleted(model="m"), source="test://untraced")
    current = await handle([bus_pb2.Delivery(sequence=1, attempt=1, event=event)])
    assert not current.get_span_context().is_valid
    assert spans.get_finished_spans() == ()


def submitter(trace_id: int, span_id: int) -> trace.SpanContext:
    sampled = trace.TraceFlags(trace.TraceFlags.SAMPLED)
    return trace.SpanContext(trace_id, span_id, is_remote=False, trace_flags=sampled)


def pending(context: trace.SpanContext) -> ingest._Pending:
    return ingest._Pending([], asyncio.get_running_loop().create_future(), context)


async def test_a_write_for_one_trace_is_a_child_of_its_submitter(spans):
    first, second = submitter(0xA1, 0xB1), submitter(0xA1, 0xB2)
    with ingest._write_span([pending(first), pending(second)], events=2):
        current = trace.get_current_span().get_span_context()
    (write,) = finished(spans, ingest.WRITE_SPAN)
    assert write.context == current
    assert write.context.trace_id == 0xA1
    assert write.parent is not None
    assert write.parent.span_id == 0xB1
    assert [link.context for link in write.links] == [first, second]
    assert write.attributes == {"lodestar.ingest.events": 2}


async def test_a_write_for_several_traces_links_to_each_and_has_no_parent(spans):
    first, second = submitter(0xA1, 0xB1), submitter(0xA2, 0xB2)
    untraced = trace.INVALID_SPAN_CONTEXT
    with ingest._write_span([pending(first), pending(untraced), pending(second)], events=3):
        pass
    (write,) = finished(spans, ingest.WRITE_SPAN)
    assert write.parent is None
    assert write.context.trace_id not in (0xA1, 0xA2)
    assert [link.context for link in write.links] == [first, second]


async def test_a_write_submitted_outside_any_span_has_no_parent_and_no_links(spans):
    with ingest._write_span([pending(trace.INVALID_SPAN_CONTEXT)], events=1):
        pass
    (write,) = finished(spans, ingest.WRITE_SPAN)
    assert write.parent is None
    assert list(write.links) == []
