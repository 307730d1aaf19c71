"""Typed clients of every Lodestar service, blocking and asyncio, over the generated stubs.

Each service's RPCs are declared once, by request and response type, on a small class of its own
(``RegistryRpcs`` …); a blocking client (``RegistryClient``) and an asyncio one
(``AsyncRegistryClient``) are that declaration plus ``SyncClient`` or ``AsyncClient``. A declaration
is checked against the service's protobuf descriptor when the module is imported, so a misspelt
method or a wrong type fails at once, and mypy types every call (request in, response out).

Every call:

* has a deadline: ``ClientOptions.timeout_seconds``, or ``timeout=`` on the call. It bounds the
  whole call, retries included. Streams have none unless the call gives one (they stay open);
* is retried with exponential backoff and jitter (``RetryPolicy``) when, and only when, it fails
  UNAVAILABLE (docs/adr/0015-typed-clients.md says why), never past its deadline;
* raises a ``LodestarError`` chosen by the status code on failure (``client_error_from``): the
  status message, field violations, retry delay and ``ErrorInfo`` read into fields, the
  ``grpc.RpcError`` kept as ``__cause__``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar, cast, overload

import grpc
from google.protobuf import descriptor, message
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from lodestar.audit.v1 import audit_pb2, audit_pb2_grpc
from lodestar.common.errors import ConfigurationError, LodestarError, client_error_from
from lodestar.common.logging import get_logger
from lodestar.common.sdk.channel import connect, connect_sync
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc, registry_pb2, registry_pb2_grpc
from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc

Req = TypeVar("Req", bound=message.Message)
Resp = TypeVar("Resp", bound=message.Message)

log = get_logger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How a call that fails UNAVAILABLE is retried: exponential backoff with jitter."""

    #: Tries in all, the first included; 1 never retries.
    attempts: int = 4
    #: The wait before the second try; it doubles after each further one.
    initial_backoff_seconds: float = 0.1
    #: The longest wait between two tries.
    max_backoff_seconds: float = 2.0
    #: At most this much is added at random to each wait, so clients do not retry in step.
    jitter_seconds: float = 0.1

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError("at least 1 (1: no retries)", field="retry.attempts")
        if not 0 <= self.initial_backoff_seconds <= self.max_backoff_seconds:
            raise ConfigurationError(
                "backoffs must satisfy 0 <= initial_backoff_seconds <= max_backoff_seconds",
                field="retry.initial_backoff_seconds",
            )
        if self.jitter_seconds < 0:
            raise ConfigurationError("must not be negative", field="retry.jitter_seconds")


@dataclass(frozen=True)
class ClientOptions:
    """Where a client connects, with which credentials, and how long and often it tries."""

    #: host:port of the service.
    target: str
    #: Bearer token sent on every call (never shown by ``repr``).
    token: str | None = field(default=None, repr=False)
    #: Connect with TLS; implied by ``root_ca`` or ``client_cert``.
    tls: bool = False
    #: CA certificates (PEM) that verify the server; the system's roots when unset.
    root_ca: Path | None = None
    #: Client certificate and key (PEM) for mutual TLS; both or neither.
    client_cert: Path | None = None
    client_key: Path | None = None
    #: The name the server's certificate must carry, when it is not the target's host.
    server_name: str | None = None
    #: Deadline of each unary call, retries included; None: no deadline.
    timeout_seconds: float | None = 10.0
    retry: RetryPolicy = RetryPolicy()

    def __post_init__(self) -> None:
        if not self.target.strip():
            raise ConfigurationError("required, the service's host:port", field="target")
        if (self.client_cert is None) != (self.client_key is None):
            raise ConfigurationError(
                "mutual TLS needs both client_cert and client_key", field="client_key"
            )
        if self.timeout_seconds is not None:
            check_timeout(self.timeout_seconds, "timeout_seconds")
        if self.token is not None and not _sendable(self.token):
            raise ConfigurationError(
                "a bearer token is printable ASCII without spaces or line breaks", field="token"
            )

    @property
    def uses_tls(self) -> bool:
        """Whether the channel is TLS: asked for, or implied by a CA or client certificate."""
        return self.tls or self.root_ca is not None or self.client_cert is not None

    def sync_channel(self) -> grpc.Channel:
        """A blocking channel with these options (``connect_sync``)."""
        return connect_sync(self.target, self.token, **self._tls())

    def async_channel(self) -> grpc.aio.Channel:
        """An asyncio channel with these options (``connect``)."""
        return connect(self.target, self.token, **self._tls())

    def _tls(self) -> dict[str, Any]:
        return {
            "tls": self.uses_tls,
            "root_ca": self.root_ca,
            "client_cert": self.client_cert,
            "client_key": self.client_key,
            "server_name": self.server_name,
        }


#: The longest deadline a call may be given: one day (grpc refuses far larger ones).
MAX_TIMEOUT_SECONDS = 86_400.0


def check_timeout(seconds: float, field: str) -> None:
    """Refuse a deadline that is not a positive, finite number of seconds up to one day."""
    if not 0 < seconds <= MAX_TIMEOUT_SECONDS:  # False for nan as well
        raise ConfigurationError(
            f"{seconds!r} s: a deadline is more than 0 and at most {MAX_TIMEOUT_SECONDS:g} s",
            field=field,
        )


def _sendable(token: str) -> bool:
    """Whether ``token`` can travel in an HTTP/2 header as ``Bearer <token>``."""
    return bool(token) and token.isascii() and token.isprintable() and " " not in token


class ClientClosedError(LodestarError):
    """A call on a client that was closed (``close``, or the end of its ``with`` block)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class _Client:
    """What every client has: its options, and its service's descriptor and generated stub."""

    #: The service whose RPCs the client's declarations name.
    service: ClassVar[descriptor.ServiceDescriptor]
    #: The generated stub class (it serves blocking and asyncio channels alike).
    stub_class: ClassVar[type[Any]]

    options: ClientOptions
    #: The generated stub over the client's channel, for what the typed methods do not cover.
    stub: Any
    #: Set by ``close``: every later call raises ClientClosedError.
    closed: bool = False

    def _timeout(self, timeout: float | None) -> float | None:
        if timeout is None:
            return self.options.timeout_seconds
        check_timeout(timeout, "timeout")
        return timeout


class SyncClient(_Client):
    """A blocking client: a channel of its own (or one given), closed by ``close`` or ``with``."""

    def __init__(self, options: ClientOptions, *, channel: grpc.Channel | None = None) -> None:
        self.options = options
        self._owns_channel = channel is None
        self.channel = channel if channel is not None else options.sync_channel()
        self.stub = self.stub_class(self.channel)

    def close(self) -> None:
        """Close the channel, unless it was given to the client; later calls are refused."""
        self.closed = True
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient(_Client):
    """An asyncio client: its own channel (or one given), closed by ``close`` or ``async with``."""

    def __init__(self, options: ClientOptions, *, channel: grpc.aio.Channel | None = None) -> None:
        self.options = options
        self._owns_channel = channel is None
        self.channel = channel if channel is not None else options.async_channel()
        self.stub = self.stub_class(self.channel)

    async def close(self) -> None:
        """Close the channel, unless it was given to the client; later calls are refused."""
        self.closed = True
        if self._owns_channel:
            await self.channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _Rpc(Generic[Req, Resp]):
    """One RPC of a service, declared on a client class by its request and response types.

    The attribute's name is the RPC's in snake_case (``list_modules`` is ``ListModules``).
    """

    client_streaming: ClassVar[bool] = False
    server_streaming: ClassVar[bool] = False

    def __init__(self, request: type[Req], response: type[Resp]) -> None:
        self.request = request
        self.response = response
        self.name = self.attribute = ""

    def __set_name__(self, owner: type[_Client], attribute: str) -> None:
        self.attribute = attribute
        self.name = "".join(part.capitalize() for part in attribute.split("_"))
        method = owner.service.methods_by_name.get(self.name)
        declared = (
            self.request.DESCRIPTOR,
            self.response.DESCRIPTOR,
            self.client_streaming,
            self.server_streaming,
        )
        if method is None or declared != (
            method.input_type,
            method.output_type,
            method.client_streaming,
            method.server_streaming,
        ):
            raise TypeError(
                f"{owner.__name__}.{attribute} does not match an RPC {self.name} of "
                f"{owner.service.full_name} with these types and this kind of stream"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.request.__name__} -> {self.response.__name__})"

    def _bind(
        self,
        client: _Client | None,
        sync: type[_Bound[Req, Resp]],
        asyncio: type[_Bound[Req, Resp]],
    ) -> Any:
        """The declaration itself on the class; on a client, the RPC bound to it (kept there)."""
        if client is None:
            return self
        bound = (asyncio if isinstance(client, AsyncClient) else sync)(client, self)
        vars(client)[self.attribute] = bound  # later lookups skip the descriptor
        return bound


class Unary(_Rpc[Req, Resp]):
    """A unary RPC: a blocking or awaitable method, deadline and retries applied."""

    @overload
    def __get__(self, client: None, owner: type[Any]) -> Unary[Req, Resp]: ...
    @overload
    def __get__(self, client: SyncClient, owner: type[Any]) -> SyncUnary[Req, Resp]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type[Any]) -> AsyncUnary[Req, Resp]: ...
    def __get__(self, client: _Client | None, owner: type[Any]) -> Any:
        return self._bind(client, SyncUnary, AsyncUnary)


class ServerStream(_Rpc[Req, Resp]):
    """A server-streaming RPC: one request, an iterator of responses (not retried)."""

    server_streaming = True

    @overload
    def __get__(self, client: None, owner: type[Any]) -> ServerStream[Req, Resp]: ...
    @overload
    def __get__(self, client: SyncClient, owner: type[Any]) -> SyncServerStream[Req, Resp]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type[Any]) -> AsyncServerStream[Req, Resp]: ...
    def __get__(self, client: _Client | None, owner: type[Any]) -> Any:
        return self._bind(client, SyncServerStream, AsyncServerStream)


class BidiStream(_Rpc[Req, Resp]):
    """A bidirectional RPC: an iterable of requests in, an iterator of responses (not retried)."""

    client_streaming = True
    server_streaming = True

    @overload
    def __get__(self, client: None, owner: type[Any]) -> BidiStream[Req, Resp]: ...
    @overload
    def __get__(self, client: SyncClient, owner: type[Any]) -> SyncBidiStream[Req, Resp]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type[Any]) -> AsyncBidiStream[Req, Resp]: ...
    def __get__(self, client: _Client | None, owner: type[Any]) -> Any:
        return self._bind(client, SyncBidiStream, AsyncBidiStream)


class _Bound(Generic[Req, Resp]):
    """An RPC of one client: what calling it needs."""

    def __init__(self, client: _Client, rpc: _Rpc[Req, Resp]) -> None:
        self._client = client
        self._rpc = rpc
        self._method: Any = getattr(client.stub, rpc.name)
        self.__doc__ = f"{client.service.full_name}/{rpc.name}: {rpc!r}"

    def _retrying(self, timeout: float | None) -> dict[str, Any]:
        """Tenacity's arguments: retry UNAVAILABLE with the policy's backoff, within ``timeout``."""
        policy = self._client.options.retry
        stop: stop_base = stop_after_attempt(policy.attempts)
        if timeout is not None:  # no retry whose wait would end past the deadline
            stop = stop | stop_before_delay(timeout)
        backoff = wait_exponential_jitter(
            multiplier=policy.initial_backoff_seconds,
            max=policy.max_backoff_seconds,
            jitter=policy.jitter_seconds,
        )

        def wait(state: RetryCallState) -> float:
            """The backoff, but at least a RetryInfo delay the server sent (up to the max)."""
            delay: float = backoff(state)
            error = state.outcome.exception() if state.outcome else None
            hint = (
                client_error_from(error).retry_after if isinstance(error, grpc.RpcError) else None
            )
            return max(delay, min(hint or 0.0, policy.max_backoff_seconds))

        return {
            "retry": retry_if_exception(_unavailable),
            "stop": stop,
            "wait": wait,
            "reraise": True,
            "before_sleep": self._log_retry,
        }

    def _log_retry(self, state: RetryCallState) -> None:
        log.info(
            "call unavailable; retrying",
            method=f"{self._client.service.full_name}/{self._rpc.name}",
            target=self._client.options.target,
            attempt=state.attempt_number,
            wait_seconds=round(state.upcoming_sleep, 3),
        )

    def _check_open(self) -> None:
        if self._client.closed:
            raise ClientClosedError(
                f"{self._client.service.full_name}/{self._rpc.name} called on a closed client; "
                "make a new one"
            )

    @staticmethod
    def _stream_timeout(timeout: float | None) -> float | None:
        if timeout is not None:
            check_timeout(timeout, "timeout")
        return timeout

    def _request(self, request: Req | None) -> Req:
        """``request`` (an empty one when None), checked to be the RPC's request type."""
        self._check_open()
        if request is None:
            return self._rpc.request()
        if not isinstance(request, self._rpc.request):
            raise TypeError(
                f"{self._rpc.name} takes a {self._rpc.request.__name__}, "
                f"not a {type(request).__name__}"
            )
        return request


class SyncUnary(_Bound[Req, Resp]):
    """A unary RPC of a blocking client: ``client.list_modules(request, timeout=…)``."""

    def __call__(self, request: Req | None = None, *, timeout: float | None = None) -> Resp:
        """The response to ``request`` (an empty request when None); a LodestarError on failure."""
        budget = self._client._timeout(timeout)
        deadline = None if budget is None else time.monotonic() + budget
        try:
            return Retrying(**self._retrying(budget))(self._once, self._request(request), deadline)
        except grpc.RpcError as exc:
            raise client_error_from(exc) from exc

    def _once(self, request: Req, deadline: float | None) -> Resp:
        return cast(Resp, self._method(request, timeout=_left(deadline)))


class AsyncUnary(_Bound[Req, Resp]):
    """A unary RPC of an asyncio client: ``await client.list_modules(request, timeout=…)``."""

    async def __call__(self, request: Req | None = None, *, timeout: float | None = None) -> Resp:
        """The response to ``request`` (an empty request when None); a LodestarError on failure."""
        budget = self._client._timeout(timeout)
        deadline = None if budget is None else time.monotonic() + budget
        retrying = AsyncRetrying(**self._retrying(budget))
        try:
            return await retrying(self._once, self._request(request), deadline)
        except grpc.RpcError as exc:
            raise client_error_from(exc) from exc

    async def _once(self, request: Req, deadline: float | None) -> Resp:
        return cast(Resp, await self._method(request, timeout=_left(deadline)))


class SyncServerStream(_Bound[Req, Resp]):
    """A server-streaming RPC of a blocking client: iterate over the responses."""

    def __call__(
        self, request: Req | None = None, *, timeout: float | None = None
    ) -> Iterator[Resp]:
        """The responses to ``request``; no deadline unless ``timeout`` is given."""
        request = self._request(request)
        return _errors_mapped(self._method(request, timeout=self._stream_timeout(timeout)))


class AsyncServerStream(_Bound[Req, Resp]):
    """A server-streaming RPC of an asyncio client: ``async for`` over the responses."""

    def __call__(
        self, request: Req | None = None, *, timeout: float | None = None
    ) -> AsyncIterator[Resp]:
        """The responses to ``request``; no deadline unless ``timeout`` is given."""
        request = self._request(request)
        return _errors_mapped_async(self._method(request, timeout=self._stream_timeout(timeout)))


class SyncBidiStream(_Bound[Req, Resp]):
    """A bidirectional RPC of a blocking client: requests from an iterable, responses iterated."""

    def __call__(self, requests: Iterable[Req], *, timeout: float | None = None) -> Iterator[Resp]:
        """The responses to ``requests``; no deadline unless ``timeout`` is given."""
        self._check_open()
        return _errors_mapped(self._method(iter(requests), timeout=self._stream_timeout(timeout)))


class AsyncBidiStream(_Bound[Req, Resp]):
    """A bidirectional RPC of an asyncio client: requests from an (async) iterable."""

    def __call__(
        self, requests: AsyncIterable[Req] | Iterable[Req], *, timeout: float | None = None
    ) -> AsyncIterator[Resp]:
        """The responses to ``requests``; no deadline unless ``timeout`` is given."""
        self._check_open()
        return _errors_mapped_async(self._method(requests, timeout=self._stream_timeout(timeout)))


def _unavailable(error: BaseException) -> bool:
    code = getattr(error, "code", None)
    return isinstance(error, grpc.RpcError) and callable(code) and code() is _UNAVAILABLE


_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _errors_mapped(call: Any) -> Iterator[Any]:
    """The responses of a blocking stream, its failure raised as a LodestarError."""
    try:
        yield from call
    except grpc.RpcError as exc:
        raise client_error_from(exc) from exc
    finally:
        call.cancel()  # the caller stopped early: end the call (nothing once it is done)


async def _errors_mapped_async(call: Any) -> AsyncIterator[Any]:
    """The responses of an asyncio stream, its failure raised as a LodestarError."""
    try:
        async for response in call:
            yield response
    except grpc.RpcError as exc:
        raise client_error_from(exc) from exc
    finally:
        call.cancel()


# The services. Each declaration names an RPC (snake_case) with its request and response types.


class RegistryRpcs(_Client):
    """Core's RegistryService: modules, their leases and whether they are enabled."""

    service = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"]
    stub_class = registry_pb2_grpc.RegistryServiceStub

    register = Unary(registry_pb2.RegisterRequest, registry_pb2.RegisterResponse)
    heartbeat = Unary(registry_pb2.HeartbeatRequest, registry_pb2.HeartbeatResponse)
    deregister = Unary(registry_pb2.DeregisterRequest, registry_pb2.DeregisterResponse)
    list_modules = Unary(registry_pb2.ListModulesRequest, registry_pb2.ListModulesResponse)
    get_module = Unary(registry_pb2.GetModuleRequest, registry_pb2.GetModuleResponse)
    set_module_enabled = Unary(
        registry_pb2.SetModuleEnabledRequest, registry_pb2.SetModuleEnabledResponse
    )
    watch_modules = ServerStream(
        registry_pb2.WatchModulesRequest, registry_pb2.WatchModulesResponse
    )


class EventBusRpcs(_Client):
    """Core's EventBusService: publish, subscribe, subscriptions and dead letters.

    ``lodestar.common.sdk.Publisher`` and ``Subscriber`` batch, spool and ack on top of these.
    """

    service = bus_pb2.DESCRIPTOR.services_by_name["EventBusService"]
    stub_class = bus_pb2_grpc.EventBusServiceStub

    publish = Unary(bus_pb2.PublishRequest, bus_pb2.PublishResponse)
    publish_stream = BidiStream(bus_pb2.PublishStreamRequest, bus_pb2.PublishStreamResponse)
    subscribe = BidiStream(bus_pb2.SubscribeRequest, bus_pb2.SubscribeResponse)
    list_subscriptions = Unary(bus_pb2.ListSubscriptionsRequest, bus_pb2.ListSubscriptionsResponse)
    list_dead_letters = Unary(bus_pb2.ListDeadLettersRequest, bus_pb2.ListDeadLettersResponse)
    replay_dead_letters = Unary(bus_pb2.ReplayDeadLettersRequest, bus_pb2.ReplayDeadLettersResponse)
    delete_subscription = Unary(
        bus_pb2.DeleteSubscriptionRequest, bus_pb2.DeleteSubscriptionResponse
    )


class UsageRpcs(_Client):
    """The usage-tracker's UsageService: the ledger's summaries, records, sessions and prices."""

    service = usage_pb2.DESCRIPTOR.services_by_name["UsageService"]
    stub_class = usage_pb2_grpc.UsageServiceStub

    summary = Unary(usage_pb2.SummaryRequest, usage_pb2.SummaryResponse)
    list_records = Unary(usage_pb2.ListRecordsRequest, usage_pb2.ListRecordsResponse)
    export_records = ServerStream(usage_pb2.ExportRecordsRequest, usage_pb2.ExportRecordsResponse)
    list_sessions = Unary(usage_pb2.ListSessionsRequest, usage_pb2.ListSessionsResponse)
    list_prices = Unary(usage_pb2.ListPricesRequest, usage_pb2.ListPricesResponse)
    set_price = Unary(usage_pb2.SetPriceRequest, usage_pb2.SetPriceResponse)
    delete_price = Unary(usage_pb2.DeletePriceRequest, usage_pb2.DeletePriceResponse)
    import_prices = Unary(usage_pb2.ImportPricesRequest, usage_pb2.ImportPricesResponse)
    list_unpriced = Unary(usage_pb2.ListUnpricedRequest, usage_pb2.ListUnpricedResponse)
    recost = Unary(usage_pb2.RecostRequest, usage_pb2.RecostResponse)


class BudgetRpcs(_Client):
    """The usage-tracker's BudgetService: budgets, and admission (Reserve, Commit, Release).

    A gateway admitting calls at a high rate uses ``lodestar_usage.client.BudgetGate``, which
    keeps one ``admit_stream`` open and shares it among its callers.
    """

    service = usage_pb2.DESCRIPTOR.services_by_name["BudgetService"]
    stub_class = usage_pb2_grpc.BudgetServiceStub

    create_budget = Unary(usage_pb2.CreateBudgetRequest, usage_pb2.CreateBudgetResponse)
    update_budget = Unary(usage_pb2.UpdateBudgetRequest, usage_pb2.UpdateBudgetResponse)
    list_budgets = Unary(usage_pb2.ListBudgetsRequest, usage_pb2.ListBudgetsResponse)
    delete_budget = Unary(usage_pb2.DeleteBudgetRequest, usage_pb2.DeleteBudgetResponse)
    reserve = Unary(usage_pb2.ReserveRequest, usage_pb2.ReserveResponse)
    commit = Unary(usage_pb2.CommitRequest, usage_pb2.CommitResponse)
    release = Unary(usage_pb2.ReleaseRequest, usage_pb2.ReleaseResponse)
    admit = Unary(usage_pb2.AdmitRequest, usage_pb2.AdmitResponse)
    admit_stream = BidiStream(usage_pb2.AdmitStreamRequest, usage_pb2.AdmitStreamResponse)


class AuditRpcs(_Client):
    """AuditService, served by core and by the usage-tracker: each one's own audit log."""

    service = audit_pb2.DESCRIPTOR.services_by_name["AuditService"]
    stub_class = audit_pb2_grpc.AuditServiceStub

    list_audit_entries = Unary(
        audit_pb2.ListAuditEntriesRequest, audit_pb2.ListAuditEntriesResponse
    )


class RegistryClient(RegistryRpcs, SyncClient):
    """Blocking client of core's RegistryService."""


class AsyncRegistryClient(RegistryRpcs, AsyncClient):
    """Asyncio client of core's RegistryService."""


class EventBusClient(EventBusRpcs, SyncClient):
    """Blocking client of core's EventBusService."""


class AsyncEventBusClient(EventBusRpcs, AsyncClient):
    """Asyncio client of core's EventBusService."""


class UsageClient(UsageRpcs, SyncClient):
    """Blocking client of the usage-tracker's UsageService."""


class AsyncUsageClient(UsageRpcs, AsyncClient):
    """Asyncio client of the usage-tracker's UsageService."""


class BudgetClient(BudgetRpcs, SyncClient):
    """Blocking client of the usage-tracker's BudgetService."""


class AsyncBudgetClient(BudgetRpcs, AsyncClient):
    """Asyncio client of the usage-tracker's BudgetService."""


class AuditClient(AuditRpcs, SyncClient):
    """Blocking client of a service's AuditService (core's or the usage-tracker's)."""


class AsyncAuditClient(AuditRpcs, AsyncClient):
    """Asyncio client of a service's AuditService (core's or the usage-tracker's)."""
