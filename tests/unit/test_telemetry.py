"""Telemetry: off by default, never fatal, health not traced, event trace-context round trip."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lodestar.common import telemetry
from lodestar.common.telemetry import (
    client_interceptors,
    configure_telemetry,
    context_from_event,
    inject_trace_context,
    is_traced,
    server_interceptors,
    tracing_requested,
)
from lodestar.events.v1 import event_pb2

OTEL_VARS = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
]


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tracer_and_spans() -> tuple[trace.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def test_off_without_otel_env(no_otel_env: None) -> None:
    result = configure_telemetry("core")
    assert result.enabled is False
    assert server_interceptors() == []
    assert client_interceptors() == []
    result.shutdown()  # a no-op, never raises


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "false"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
    ],
)
def test_tracing_requested(env: dict[str, str], expected: bool) -> None:
    assert tracing_requested(env) is expected


def test_configuration_failure_is_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(telemetry, "_span_exporter", broken)
    before = trace.get_tracer_provider()
    result = configure_telemetry("core", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"})
    assert result.enabled is False
    assert server_interceptors() == []
    assert trace.get_tracer_provider() is before


def test_enabled_sets_global_provider_and_interceptors() -> None:
    """Runs in a fresh interpreter: the global tracer provider can only be set once."""
    script = textwrap.dedent(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from lodestar.common.telemetry import (
            client_interceptors, configure_telemetry, server_interceptors)
        t = configure_telemetry("core")
        assert t.enabled, t
        provider = trace.get_tracer_provider()
        assert isinstance(provider, TracerProvider), provider
        name = provider.resource.attributes["service.name"]
        assert name == "lodestar-core", name
        assert configure_telemetry("core") is t
        assert len(server_interceptors()) == 1
        assert len(client_interceptors()) == 4
        t.shutdown()
        t.shutdown()
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:1"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_service_name_from_env() -> None:
    assert telemetry._service_name("core", {"OTEL_SERVICE_NAME": "custom"}) == "custom"
    assert telemetry._service_name("usage", {}) == "lodestar-usage"


@pytest.mark.parametrize(
    ("method", "traced"),
    [
        ("/grpc.health.v1.Health/Check", False),
        ("/grpc.health.v1.Health/Watch", False),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", False),
        ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", False),
        (b"/grpc.health.v1.Health/Check", False),
        ("/lodestar.core.v1.Bus/Publish", True),
        (b"/lodestar.core.v1.Registry/Register", True),
    ],
)
def test_health_and_reflection_are_not_traced(method: str | bytes, traced: bool) -> None:
    assert is_traced(SimpleNamespace(method=method)) is traced


def test_inject_and_extract_round_trip(tracer_and_spans) -> None:
    tracer, spans = tracer_and_spans
    event = event_pb2.Event(id="e1", type="lodestar.test")
    with tracer.start_as_current_span("publish") as producer:
        inject_trace_context(event)
        producer_ctx = producer.get_span_context()
    expected = f"00-{producer_ctx.trace_id:032x}-{producer_ctx.span_id:016x}-"
    assert event.traceparent.startswith(expected)

    with tracer.start_as_current_span("handle", context=context_from_event(event)) as consumer:
        consumer_ctx = consumer.get_span_context()
    assert consumer_ctx.trace_id == producer_ctx.trace_id
    handle = next(s for s in spans.get_finished_spans() if s.name == "handle")
    assert handle.parent is not None
    assert handle.parent.span_id == producer_ctx.span_id
    assert handle.parent.is_remote


def test_tracestate_survives_the_round_trip(tracer_and_spans) -> None:
    tracer, _ = tracer_and_spans
    event = event_pb2.Event(
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        tracestate="vendor=abc",
    )
    with tracer.start_as_current_span("handle", context=context_from_event(event)) as span:
        carried = event_pb2.Event()
        inject_trace_context(carried)
        ctx = span.get_span_context()
    assert f"{ctx.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert carried.tracestate == "vendor=abc"


def test_no_span_leaves_fields_empty() -> None:
    event = event_pb2.Event(traceparent="stale", tracestate="stale")
    inject_trace_context(event)
    assert event.traceparent == ""
    assert event.tracestate == ""


def test_event_without_context_gives_a_root_span(tracer_and_spans) -> None:
    tracer, spans = tracer_and_spans
    with (
        tracer.start_as_current_span("outer"),
        tracer.start_as_current_span("handle", context=context_from_event(event_pb2.Event())),
    ):
        pass
    handle = next(s for s in spans.get_finished_spans() if s.name == "handle")
    assert handle.parent is None


def test_garbage_traceparent_gives_a_root_span(tracer_and_spans) -> None:
    tracer, spans = tracer_and_spans
    event = event_pb2.Event(traceparent="not-a-traceparent")
    with tracer.start_as_current_span("handle", context=context_from_event(event)):
        pass
    assert spans.get_finished_spans()[0].parent is None


def test_tracer_is_usable_when_off() -> None:
    assert not telemetry.telemetry_enabled()
    with telemetry.tracer("lodestar.test").start_as_current_span("noop") as span:
        assert trace.get_current_span() is span
        assert not span.is_recording()
        assert not span.get_span_context().is_valid
