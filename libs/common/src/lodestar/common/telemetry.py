"""OpenTelemetry tracing: off unless the standard ``OTEL_*`` variables configure it, never fatal.

Health checks and server reflection are never traced. Events carry W3C trace context in their
``traceparent`` / ``tracestate`` fields so that a consumer's span continues the producer's trace.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from lodestar.common.logging import get_logger
from lodestar.events.v1 import event_pb2

UNTRACED_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

_propagator = TraceContextTextMapPropagator()
_log = get_logger(__name__)


@dataclass
class Telemetry:
    """The outcome of ``configure_telemetry``: whether tracing is on, and how to stop it."""

    enabled: bool
    provider: TracerProvider | None = field(default=None, repr=False)

    def shutdown(self) -> None:
        """Flush pending spans and stop exporting; never raises."""
        if self.provider is None:
            return
        try:
            self.provider.force_flush()
            self.provider.shutdown()
        except Exception as exc:
            _log.warning("telemetry shutdown failed", error=str(exc))


_active: Telemetry | None = None


def configure_telemetry(service: str, environ: Mapping[str, str] | None = None) -> Telemetry:
    """Turn tracing on when ``OTEL_*`` asks for it; otherwise (or on any error) leave it off."""
    global _active
    if _active is not None and _active.enabled:
        return _active
    env = os.environ if environ is None else environ
    if not tracing_requested(env):
        return Telemetry(enabled=False)
    try:
        provider = _build_provider(service, env)
        trace.set_tracer_provider(provider)
        _instrument_asyncpg()
    except Exception as exc:
        _log.warning("telemetry disabled: configuring it failed", error=str(exc), exc_info=True)
        return Telemetry(enabled=False)
    _active = Telemetry(enabled=True, provider=provider)
    return _active


def tracing_requested(env: Mapping[str, str]) -> bool:
    """Whether the standard OpenTelemetry variables ask for traces to be exported."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def telemetry_enabled() -> bool:
    """Whether ``configure_telemetry`` turned tracing on in this process."""
    return _active is not None and _active.enabled


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """OpenTelemetry server interceptors (none when telemetry is off)."""
    if not telemetry_enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=is_traced)]  # type: ignore[no-untyped-call]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """OpenTelemetry client interceptors for a ``grpc.aio`` channel (none when telemetry is off)."""
    if not telemetry_enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    interceptors = aio_client_interceptors(filter_=is_traced)  # type: ignore[no-untyped-call]
    return list(interceptors)


def is_traced(call_details: Any) -> bool:
    """Interceptor filter: every call except health checks and reflection is traced."""
    method = getattr(call_details, "method", "") or ""
    if isinstance(method, bytes):
        method = method.decode("utf-8", "replace")
    service = str(method).lstrip("/").split("/", 1)[0]
    return service not in UNTRACED_SERVICES


def inject_trace_context(event: event_pb2.Event) -> None:
    """Write the current span's W3C trace context into the event (empty without a valid span)."""
    carrier: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        _propagator.inject(carrier)
    event.traceparent = carrier.get("traceparent", "")
    event.tracestate = carrier.get("tracestate", "")


def context_from_event(event: event_pb2.Event) -> otel_context.Context:
    """The trace context the event carries, to start a consumer span as a child of the producer."""
    carrier = {"traceparent": event.traceparent}
    if event.tracestate:
        carrier["tracestate"] = event.tracestate
    return _propagator.extract(carrier)


def tracer(name: str) -> trace.Tracer:
    """A tracer from the global provider (a no-op tracer while telemetry is off)."""
    return trace.get_tracer(name)


def _service_name(service: str, env: Mapping[str, str]) -> str:
    return env.get("OTEL_SERVICE_NAME") or f"lodestar-{service}"


def _build_provider(service: str, env: Mapping[str, str]) -> TracerProvider:
    resource = Resource.create({SERVICE_NAME: _service_name(service, env)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(_span_exporter()))
    return provider


def _span_exporter() -> SpanExporter:
    """The OTLP/gRPC exporter; it reads the standard ``OTEL_EXPORTER_OTLP_*`` variables."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _instrument_asyncpg() -> None:
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()
