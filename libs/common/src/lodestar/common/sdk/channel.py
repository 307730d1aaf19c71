"""Channels to Lodestar services with credentials, TLS and tracing."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import grpc

from lodestar.common.auth import BearerToken
from lodestar.common.telemetry import client_interceptors

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
    options: list[tuple[str, Any]] = list(CHANNEL_OPTIONS)
    if not tls:
        if token:
            interceptors = [*interceptors, *token_interceptors(token)]
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root_ca.read_bytes() if root_ca else None,
        private_key=client_key.read_bytes() if client_key else None,
        certificate_chain=client_cert.read_bytes() if client_cert else None,
    )
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.metadata_call_credentials(BearerToken(token))
        )
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


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
