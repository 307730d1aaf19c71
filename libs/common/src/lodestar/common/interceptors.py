"""grpc.aio server interceptors shared by every service: error mapping, metrics and logging.

Each interceptor wraps the method handler returned by ``continuation`` so that it works for all
four RPC kinds. ``default_server_interceptors`` returns them in the order in which the metrics
and the log line see the status code the error mapping produced.

The error mapping also refuses requests that do not decode as the method's request message with
INVALID_ARGUMENT ("the request is not a valid <message>: ..."), for every RPC kind: grpc.aio on its
own answers UNKNOWN for a unary request it cannot decode, and hands the handler of a streaming one
a ``DecodeError`` to fail on. Decoding comes before authorization, as in grpc itself (a unary
request is decoded before any interceptor's behaviour runs): a malformed unary request without a
valid credential is INVALID_ARGUMENT too, which tells the caller nothing about credentials.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from lodestar.common.errors import (
    FieldViolation,
    InvalidArgumentError,
    LodestarError,
    rich_status,
    status_for,
)
from lodestar.common.logging import get_logger
from lodestar.common.metrics import GRPC_HANDLED, GRPC_HANDLING_SECONDS, GRPC_STARTED

HEALTH_PREFIX = "/grpc.health.v1.Health/"

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Guard = Callable[[Any], AbstractAsyncContextManager[None]]

_log = get_logger(__name__)


def split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` as ``("pkg.Service", "Method")``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return (service or "unknown"), (method or "unknown")


class _HandlerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Runs every call of every RPC kind inside the guard ``_guard`` returns."""

    #: Whether requests that do not decode are refused with INVALID_ARGUMENT inside the guard.
    refuses_undecodable = False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = str(handler_call_details.method)
        return wrap_handler(
            handler,
            lambda context: self._guard(method, context),
            refuse_undecodable=self.refuses_undecodable,
        )

    def _guard(self, method: str, context: Context) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError


class ErrorMappingInterceptor(_HandlerInterceptor):
    """Turns LodestarError into its gRPC status and anything unexpected into INTERNAL.

    A request (or a message of a request stream) that does not decode is INVALID_ARGUMENT. A
    method the servicer does not implement (generated base classes raise NotImplementedError,
    e.g. the stock health servicer's ``List``) is UNIMPLEMENTED, not an internal error.
    """

    refuses_undecodable = True

    @asynccontextmanager
    async def _guard(self, method: str, context: Context) -> AsyncIterator[None]:
        try:
            yield
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except LodestarError as exc:
            await _abort(context, exc)
        except NotImplementedError:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server"
            )
        except Exception as exc:
            _log.error(
                "unhandled error in rpc handler",
                grpc_method=method,
                error_type=type(exc).__name__,
                exc_info=exc,
            )
            await _abort(context, exc)


#: Bounds on the text of a status, which travels in the trailers: clients refuse trailers over
#: 16 KiB (8 KiB may already be refused), and the message is sent twice, once percent-encoded.
MAX_MESSAGE_BYTES = 768
MAX_VIOLATIONS = 8
MAX_VIOLATION_FIELD_BYTES = 100
MAX_VIOLATION_DESCRIPTION_BYTES = 200
TRUNCATED = "… (truncated)"


async def _abort(context: Context, error: Exception) -> None:
    """End the call with ``error``'s status, its ``google.rpc`` details in the trailers."""
    status = rich_status(_bounded(error))
    await context.abort(status.code, status.details, status.trailing_metadata)


def _bounded(error: Exception) -> Exception:
    """``error``, or a copy whose message and violations fit in a status trailer.

    An error that quotes what the caller sent could otherwise exceed the client's metadata limit,
    and the caller would see RESOURCE_EXHAUSTED ("received metadata size exceeds hard limit")
    instead of the error.
    """
    if not isinstance(error, LodestarError) or _fits(error):
        return error
    bounded = copy.copy(error)
    field = error.field
    bounded.field = _clip(field, MAX_VIOLATION_FIELD_BYTES) if field else field
    budget = MAX_MESSAGE_BYTES - len((bounded.field or "").encode()) - 2
    bounded.message = _clip(error.message, budget)
    violations = [
        FieldViolation(
            _clip(v.field, MAX_VIOLATION_FIELD_BYTES),
            _clip(v.description, MAX_VIOLATION_DESCRIPTION_BYTES),
        )
        for v in error.violations[:MAX_VIOLATIONS]
    ]
    hidden = len(error.violations) - len(violations)
    if hidden > 0:
        violations[-1] = FieldViolation("", f"… and {hidden + 1} more violations")
    bounded.violations = tuple(violations)
    return bounded


def _fits(error: LodestarError) -> bool:
    return (
        len(error.details().encode()) <= MAX_MESSAGE_BYTES
        and len(error.violations) <= MAX_VIOLATIONS
        and all(
            len(v.field.encode()) <= MAX_VIOLATION_FIELD_BYTES
            and len(v.description.encode()) <= MAX_VIOLATION_DESCRIPTION_BYTES
            for v in error.violations
        )
    )


def _clip(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, saying so when it was cut."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    keep = max(0, max_bytes - len(TRUNCATED.encode()))
    return encoded[:keep].decode("utf-8", "ignore") + TRUNCATED


class _Outcome:
    """The status code a call finished with, as the outer interceptors see it."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.OK
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


@asynccontextmanager
async def _observe(context: Context, done: Callable[[_Outcome], None]) -> AsyncIterator[None]:
    """Run the call inside, then hand its final status code and duration to ``done``."""
    outcome = _Outcome()
    try:
        yield
    except grpc.aio.AbortError:
        outcome.code = _context_code(context) or grpc.StatusCode.UNKNOWN
        raise
    except (asyncio.CancelledError, GeneratorExit):
        outcome.code = grpc.StatusCode.CANCELLED
        raise
    except Exception as exc:
        outcome.code = status_for(exc)[0]
        raise
    else:
        outcome.code = _context_code(context) or grpc.StatusCode.OK
    finally:
        done(outcome)


def _context_code(context: Context) -> grpc.StatusCode | None:
    try:
        code = context.code()
    except Exception:
        return None
    return code if isinstance(code, grpc.StatusCode) else None


class MetricsInterceptor(_HandlerInterceptor):
    """Counts started and handled calls by final status code, and times them."""

    @asynccontextmanager
    async def _guard(self, method: str, context: Context) -> AsyncIterator[None]:
        service, name = split_method(method)
        GRPC_STARTED.labels(service, name).inc()

        def record(outcome: _Outcome) -> None:
            GRPC_HANDLED.labels(service, name, outcome.code.name).inc()
            GRPC_HANDLING_SECONDS.labels(service, name).observe(outcome.seconds)

        async with _observe(context, record):
            yield


class LoggingInterceptor(_HandlerInterceptor):
    """One log line per finished call: method, code, duration and peer; never payloads."""

    @asynccontextmanager
    async def _guard(self, method: str, context: Context) -> AsyncIterator[None]:
        # Asked now, while the call is alive: grpcio's peer() on a call whose client has vanished
        # (e.g. killed mid-stream) dereferences a freed call and crashes the process.
        peer = _peer(context)

        def record(outcome: _Outcome) -> None:
            _log.log(
                _level_for(method, outcome.code),
                "rpc finished",
                grpc_method=method,
                grpc_code=outcome.code.name,
                duration_ms=round(outcome.seconds * 1000, 3),
                peer=peer,
            )

        async with _observe(context, record):
            yield


#: Calls made every few seconds by every client: logged at DEBUG when they succeed.
ROUTINE_METHOD_SUFFIXES = ("/Heartbeat",)


def _level_for(method: str, code: grpc.StatusCode) -> int:
    routine = method.startswith(HEALTH_PREFIX) or (
        method.endswith(ROUTINE_METHOD_SUFFIXES) and code == grpc.StatusCode.OK
    )
    return logging.DEBUG if routine else logging.INFO


def _peer(context: Context) -> str:
    try:
        return str(context.peer())
    except Exception:
        return "unknown"


def default_server_interceptors() -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """Logging, metrics, error mapping: the outer two see the code the error mapping chose."""
    return [LoggingInterceptor(), MetricsInterceptor(), ErrorMappingInterceptor()]


# --- wrapping handlers of every kind -------------------------------------------------------------

#: Turns what the deserializer produced into the request the behaviour is given (or refuses it).
Admit = Callable[[Any, Context], Awaitable[Any]]


def wrap_handler(handler: Handler, guard: Guard, *, refuse_undecodable: bool = False) -> Handler:
    """A handler that runs ``handler``'s behaviour inside ``guard(context)``.

    With ``refuse_undecodable``, a request that does not decode ends the call with
    INVALID_ARGUMENT inside the guard instead of reaching the behaviour.
    """
    kind = _kind(handler)
    behavior = getattr(handler, kind)
    deserializer = handler.request_deserializer
    admit: Admit | None = None
    if refuse_undecodable and deserializer is not None:
        deserializer = _tolerant(deserializer, _message_name(deserializer))
        admit = _admit_stream if handler.request_streaming else _admit_unary
    if handler.response_streaming and _is_generator(behavior):
        wrapped: Callable[..., Any] = _guarded_stream(behavior, guard, admit)
    else:
        wrapped = _guarded_call(behavior, guard, admit)
    factory = _FACTORIES[kind]
    return factory(
        wrapped,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


_FACTORIES: dict[str, Callable[..., Handler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def _kind(handler: Handler) -> str:
    request = "stream" if handler.request_streaming else "unary"
    response = "stream" if handler.response_streaming else "unary"
    return f"{request}_{response}"


def _is_generator(behavior: Callable[..., Any]) -> bool:
    return inspect.isasyncgenfunction(behavior) or inspect.isgeneratorfunction(behavior)


def _guarded_call(
    behavior: Callable[..., Any], guard: Guard, admit: Admit | None
) -> Callable[..., Awaitable[Any]]:
    """For unary responses and for streaming handlers that ``context.write`` their responses."""

    async def call(request: Any, context: Context) -> Any:
        async with guard(context):
            if admit is not None:
                request = await admit(request, context)
            result = behavior(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result

    return call


def _guarded_stream(
    behavior: Callable[..., Any], guard: Guard, admit: Admit | None
) -> Callable[..., AsyncIterator[Any]]:
    """For streaming handlers that yield their responses."""

    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        async with guard(context):
            if admit is not None:
                request = await admit(request, context)
            responses = behavior(request, context)
            if hasattr(responses, "__aiter__"):
                async for response in responses:
                    yield response
            else:
                for response in responses:
                    yield response

    return stream


# --- requests that do not decode -----------------------------------------------------------------


class _Undecodable:
    """What the tolerant deserializer returns for bytes that are not a valid request message."""

    __slots__ = ("error",)

    def __init__(self, message: str, error: DecodeError) -> None:
        reason = str(error).rpartition("': ")[2] or "the bytes are not a valid encoding"
        self.error = InvalidArgumentError(
            f"the request is not a valid {message}: {reason[:1].lower()}{reason[1:]}"
        )


def _tolerant(deserializer: Callable[[bytes], Any], message: str) -> Callable[[bytes], Any]:
    """``deserializer``, returning an ``_Undecodable`` where it would raise ``DecodeError``.

    grpc.aio answers UNKNOWN for a deserializer that raises on a unary request, before any
    interceptor's behaviour runs; the marker lets the guarded behaviour refuse it instead.
    """

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Undecodable(message, exc)

    return deserialize


def _message_name(deserializer: Callable[[bytes], Any]) -> str:
    """The full protobuf name of the message ``deserializer`` (``Msg.FromString``) decodes."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) else "request message"


async def _admit_unary(request: Any, context: Context) -> Any:
    """``request``, unless it did not decode: then the call ends with INVALID_ARGUMENT."""
    if type(request) is _Undecodable:
        await _abort(context, request.error)
    return request


async def _admit_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    """``requests``, ending the call with INVALID_ARGUMENT at the first one that did not decode."""
    return _decoded(requests, context)


async def _decoded(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    async for request in requests:
        if type(request) is _Undecodable:
            # The status is set, not sent: it ends the call even if the handler swallows the
            # exception (e.g. reads the stream in a task of its own), and nothing is sent from
            # the reading task while the handler may be writing (grpc refuses a status sent
            # during a write: GRPC_CALL_ERROR_TOO_MANY_OPERATIONS).
            _set_status(context, request.error)
            raise request.error
        yield request


def _set_status(context: Context, error: Exception) -> None:
    """Make ``error``'s status (with its details) the one the call ends with."""
    status = rich_status(_bounded(error))
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)
