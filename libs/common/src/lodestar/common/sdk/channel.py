"""Channels to Lodestar services with credentials, TLS and tracing: asyncio and blocking."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, cast

import grpc

from lodestar.common.auth import BearerToken, token_metadata
from lodestar.common.telemetry import client_interceptors, is_traced, telemetry_enabled

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def connect(
    target: str,
    token: str | None = None,
    *,
    tls: bool = False,
    root_ca: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    server_name: str | None = None,
) -> grpc.aio.Channel:
    """A channel to ``target`` (host:port) sending ``token`` on every call.

    On a plaintext channel the token travels as call metadata; with TLS it is attached as call
    credentials. ``client_cert``/``client_key`` present a client certificate for mutual TLS.
    """
    interceptors = client_interceptors()
    options = channel_options(server_name if tls else None)
    if not tls:
        if token:
            interceptors = [*interceptors, *token_interceptors(token)]
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    credentials = tls_credentials(token, root_ca, client_cert, client_key)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


def connect_sync(
    target: str,
    token: str | None = None,
    *,
    tls: bool = False,
    root_ca: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """A blocking channel to ``target`` with the credentials rules of ``connect``."""
    options = channel_options(server_name if tls else None)
    if tls:
        credentials = tls_credentials(token, root_ca, client_cert, client_key)
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
        if token:
            channel = grpc.intercept_channel(channel, _SyncToken(token))
    return _traced(channel)


def channel_options(server_name: str | None = None) -> list[tuple[str, Any]]:
    """Every Lodestar channel's options; ``server_name`` overrides the TLS name checked."""
    options: list[tuple[str, Any]] = list(CHANNEL_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def tls_credentials(
    token: str | None,
    root_ca: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials (mutual with a client certificate) carrying ``token`` if any.

    Without ``root_ca`` the system's trusted roots verify the server.
    """
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root_ca.read_bytes() if root_ca else None,
        private_key=client_key.read_bytes() if client_key else None,
        certificate_chain=client_cert.read_bytes() if client_cert else None,
    )
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.metadata_call_credentials(BearerToken(token))
        )
    return credentials


def _traced(channel: grpc.Channel) -> grpc.Channel:
    """``channel`` with OpenTelemetry's client spans (as it is when telemetry is off)."""
    if not telemetry_enabled():
        return channel
    from opentelemetry.instrumentation.grpc import client_interceptor, grpcext

    interceptor = client_interceptor(filter_=is_traced)  # type: ignore[no-untyped-call]
    traced: grpc.Channel = grpcext.intercept_channel(channel, interceptor)  # type: ignore[no-untyped-call]
    return traced


class _SyncCallDetails(
    collections.namedtuple(
        "_SyncCallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """Call details of a blocking call, rebuilt with one more metadata entry."""


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds ``authorization: Bearer <token>`` to every call of a blocking plaintext channel."""

    def __init__(self, token: str) -> None:
        self._metadata = token_metadata(token)

    def _details(self, details: Any) -> _SyncCallDetails:
        return _SyncCallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), *self._metadata],
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """Send the unary call with the token."""
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        """Send the server-streaming call with the token."""
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        """Send the client-streaming call with the token."""
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        """Send the bidirectional call with the token."""
        return continuation(self._details(details), requests)


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add("authorization", f"Bearer {token}")
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _WithToken:
    def __init__(self, token: str) -> None:
        self._token = token


class _UnaryUnaryToken(_WithToken, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(
        self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_token(details, self._token), request)


class _UnaryStreamToken(_WithToken, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(
        self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_token(details, self._token), request)


class _StreamUnaryToken(_WithToken, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_unary(
        self, continuation: Any, details: grpc.aio.ClientCallDetails, requests: Any
    ) -> Any:
        return await continuation(_with_token(details, self._token), requests)


class _StreamStreamToken(_WithToken, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_stream(
        self, continuation: Any, details: grpc.aio.ClientCallDetails, requests: Any
    ) -> Any:
        return await continuation(_with_token(details, self._token), requests)


def token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors adding ``authorization: Bearer <token>`` to every kind of call."""
    kinds: tuple[type[_WithToken], ...] = (
        _UnaryUnaryToken,
        _UnaryStreamToken,
        _StreamUnaryToken,
        _StreamStreamToken,
    )
    return [cast(grpc.aio.ClientInterceptor, kind(token)) for kind in kinds]
