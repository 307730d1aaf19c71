"""Server interceptors against a real grpc.aio server, for all four RPC kinds."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from lodestar.common import interceptors
from lodestar.common.errors import (
    FieldViolation,
    InvalidArgumentError,
    StorageError,
    bad_request_violations,
)
from lodestar.common.interceptors import (
    ErrorMappingInterceptor,
    LoggingInterceptor,
    MetricsInterceptor,
    default_server_interceptors,
    split_method,
)
from lodestar.common.logging import configure_logging

SERVICE = "lodestar.test.v1.Probe"
TYPED = "lodestar.test.v1.Typed"
GENERIC = "internal error; the server log has the details"


async def _act(request: bytes, context: grpc.aio.ServicerContext) -> None:
    """Fail the way ``request`` asks."""
    if request == b"invalid":
        raise InvalidArgumentError("must be positive", field="amount")
    if request == b"storage":
        raise StorageError("database unreachable; retry later")
    if request == b"boom":
        raise ValueError("kaput")
    if request == b"notfound":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such probe")
    if request == b"unimplemented":
        raise NotImplementedError("Method not implemented!")
    if request.startswith(b"echo-long:"):
        quoted = request.removeprefix(b"echo-long:").decode()
        raise InvalidArgumentError(
            f"{quoted!r} is not a known name",
            field="name",
            violations=[
                FieldViolation(f"names[{i}]", f"{quoted!r} is unknown") for i in range(100)
            ],
        )


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await _act(request, context)
    if request == b"setcode":
        context.set_code(grpc.StatusCode.ALREADY_EXISTS)
        context.set_details("probe exists")
    return b"echo:" + request


async def server_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    await _act(request, context)
    yield b"second"


async def write_stream(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.write(b"written")
    await _act(request, context)


async def client_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    received = [r async for r in requests]
    for request in received:
        await _act(request, context)
    return b"+".join(received)


async def bidi(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for request in requests:
        await _act(request, context)
        yield b"echo:" + request


async def health_check(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b""


def _identity(data: bytes) -> bytes:
    return data


def _handlers() -> list[grpc.GenericRpcHandler]:
    kw = {"request_deserializer": _identity, "response_serializer": _identity}
    probe = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, **kw),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, **kw),
            "WriteStream": grpc.unary_stream_rpc_method_handler(write_stream, **kw),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, **kw),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi, **kw),
        },
    )
    health = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(health_check, **kw)}
    )
    return [probe, health, _typed_handlers()]


@pytest.fixture(autouse=True)
def _logs_to_stderr() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure_logging("test", level="DEBUG")
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


async def _serve(interceptors: list[grpc.aio.ServerInterceptor]) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers(_handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    async for ch in _serve(default_server_interceptors()):
        yield ch


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for ``condition``: the server counts a call just after the client saw its status."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.01)


def handled(method: str, code: str) -> float:
    labels = {"grpc_service": SERVICE, "grpc_method": method, "grpc_code": code}
    return REGISTRY.get_sample_value("lodestar_grpc_server_handled_total", labels) or 0.0


def started(method: str) -> float:
    labels = {"grpc_service": SERVICE, "grpc_method": method}
    return REGISTRY.get_sample_value("lodestar_grpc_server_started_total", labels) or 0.0


def timed(method: str) -> float:
    labels = {"grpc_service": SERVICE, "grpc_method": method}
    return REGISTRY.get_sample_value("lodestar_grpc_server_handling_seconds_count", labels) or 0.0


async def call_unary(channel: grpc.aio.Channel, request: bytes) -> bytes:
    return await channel.unary_unary(f"/{SERVICE}/Unary")(request, timeout=5)


async def call_server_stream(channel: grpc.aio.Channel, method: str, request: bytes) -> list[bytes]:
    return [r async for r in channel.unary_stream(f"/{SERVICE}/{method}")(request, timeout=5)]


async def call_client_stream(channel: grpc.aio.Channel, requests: list[bytes]) -> bytes:
    return await channel.stream_unary(f"/{SERVICE}/ClientStream")(iter(requests), timeout=5)


async def call_bidi(channel: grpc.aio.Channel, requests: list[bytes]) -> list[bytes]:
    call = channel.stream_stream(f"/{SERVICE}/Bidi")(iter(requests), timeout=5)
    return [r async for r in call]


async def expect_status(awaitable: object, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    return str(info.value.details())


def log_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    err = capsys.readouterr().err
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


async def finished_lines(
    capsys: pytest.CaptureFixture[str], timeout: float = 5.0
) -> list[dict[str, object]]:
    """The server's "rpc finished" lines: it may log just after the client saw the status."""
    deadline = asyncio.get_running_loop().time() + timeout
    lines: list[dict[str, object]] = []
    while not lines and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
        lines = [line for line in log_lines(capsys) if line["event"] == "rpc finished"]
    await asyncio.sleep(0.05)  # a second line for the same call would show up by now
    return lines + [line for line in log_lines(capsys) if line["event"] == "rpc finished"]


# --- error mapping ------------------------------------------------------------------------------


async def test_unary_ok(channel: grpc.aio.Channel) -> None:
    before = handled("Unary", "OK"), started("Unary"), timed("Unary")
    assert await call_unary(channel, b"hi") == b"echo:hi"
    await eventually(lambda: handled("Unary", "OK") == before[0] + 1)
    assert started("Unary") == before[1] + 1
    assert timed("Unary") == before[2] + 1


async def test_lodestar_error_becomes_its_status(channel: grpc.aio.Channel) -> None:
    before = handled("Unary", "INVALID_ARGUMENT")
    details = await expect_status(call_unary(channel, b"invalid"), grpc.StatusCode.INVALID_ARGUMENT)
    assert details == "amount: must be positive"
    await eventually(lambda: handled("Unary", "INVALID_ARGUMENT") == before + 1)


async def test_storage_error_is_unavailable(channel: grpc.aio.Channel) -> None:
    details = await expect_status(call_unary(channel, b"storage"), grpc.StatusCode.UNAVAILABLE)
    assert details == "database unreachable; retry later"


async def test_unexpected_error_is_internal_and_logged(
    channel: grpc.aio.Channel, capsys: pytest.CaptureFixture[str]
) -> None:
    before = handled("Unary", "INTERNAL")
    details = await expect_status(call_unary(channel, b"boom"), grpc.StatusCode.INTERNAL)
    assert details == GENERIC
    assert "kaput" not in details
    await eventually(lambda: handled("Unary", "INTERNAL") == before + 1)
    lines = log_lines(capsys)
    error = next(line for line in lines if line["event"] == "unhandled error in rpc handler")
    assert error["level"] == "error"
    assert error["grpc_method"] == f"/{SERVICE}/Unary"
    assert "ValueError: kaput" in str(error["exception"])
    assert "boom" not in json.dumps(lines)  # request payloads never logged


@pytest.mark.parametrize("quoted", ["x" * 70_000, "é" * 30_000, "\U0001f600" * 10_000])
async def test_errors_quoting_huge_input_fit_in_the_trailers(
    channel: grpc.aio.Channel, quoted: str
) -> None:
    """Clients refuse trailers over 16 KiB: the status would be lost (RESOURCE_EXHAUSTED,
    "received metadata size exceeds hard limit"). The text is cut, the code kept."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call_unary(channel, b"echo-long:" + quoted.encode())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = str(info.value.details())
    assert details.startswith("name: '" + quoted[:10])
    assert details.endswith("… (truncated)")
    assert len(details.encode()) <= 768
    violations = bad_request_violations(rpc_status.from_call(info.value))
    assert len(violations) == 8
    assert violations[0].field == "names[0]"
    assert violations[0].description.endswith("… (truncated)")
    assert all(len(v.description.encode()) <= 200 for v in violations)
    assert violations[-1].description == "… and 93 more violations"


async def test_a_short_message_is_sent_whole_with_at_most_8_violations(
    channel: grpc.aio.Channel,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call_unary(channel, b"echo-long:ab")
    assert info.value.details() == "name: 'ab' is not a known name"
    assert len(bad_request_violations(rpc_status.from_call(info.value))) == 8  # 100 given


async def test_not_implemented_is_unimplemented_and_not_logged_as_an_error(
    channel: grpc.aio.Channel, capsys: pytest.CaptureFixture[str]
) -> None:
    """Generated servicer bases raise NotImplementedError (the stock health servicer's List)."""
    before = handled("Unary", "UNIMPLEMENTED"), handled("Unary", "INTERNAL")
    details = await expect_status(
        call_unary(channel, b"unimplemented"), grpc.StatusCode.UNIMPLEMENTED
    )
    assert details == f"/{SERVICE}/Unary is not implemented by this server"
    await eventually(lambda: handled("Unary", "UNIMPLEMENTED") == before[0] + 1)
    assert handled("Unary", "INTERNAL") == before[1]
    events = [line["event"] for line in log_lines(capsys)]
    assert "unhandled error in rpc handler" not in events


async def test_abort_passes_through(
    channel: grpc.aio.Channel, capsys: pytest.CaptureFixture[str]
) -> None:
    before = handled("Unary", "NOT_FOUND")
    details = await expect_status(call_unary(channel, b"notfound"), grpc.StatusCode.NOT_FOUND)
    assert details == "no such probe"
    await eventually(lambda: handled("Unary", "NOT_FOUND") == before + 1)
    events = [line["event"] for line in log_lines(capsys)]
    assert "unhandled error in rpc handler" not in events


async def test_set_code_without_abort_is_counted(channel: grpc.aio.Channel) -> None:
    before = handled("Unary", "ALREADY_EXISTS")
    details = await expect_status(call_unary(channel, b"setcode"), grpc.StatusCode.ALREADY_EXISTS)
    assert details == "probe exists"
    await eventually(lambda: handled("Unary", "ALREADY_EXISTS") == before + 1)


@pytest.mark.parametrize("method", ["ServerStream", "WriteStream"])
async def test_server_streaming_ok(channel: grpc.aio.Channel, method: str) -> None:
    before = handled(method, "OK")
    responses = await call_server_stream(channel, method, b"fine")
    assert responses[0] in (b"first", b"written")
    await eventually(lambda: handled(method, "OK") == before + 1)


@pytest.mark.parametrize("method", ["ServerStream", "WriteStream"])
@pytest.mark.parametrize(
    ("request_", "code", "details"),
    [
        (b"invalid", grpc.StatusCode.INVALID_ARGUMENT, "amount: must be positive"),
        (b"boom", grpc.StatusCode.INTERNAL, GENERIC),
        (b"notfound", grpc.StatusCode.NOT_FOUND, "no such probe"),
    ],
)
async def test_server_streaming_errors(
    channel: grpc.aio.Channel, method: str, request_: bytes, code: grpc.StatusCode, details: str
) -> None:
    before = handled(method, code.name)
    got = await expect_status(call_server_stream(channel, method, request_), code)
    assert got == details
    await eventually(lambda: handled(method, code.name) == before + 1)


async def test_client_streaming(channel: grpc.aio.Channel) -> None:
    before_ok, before_bad = (
        handled("ClientStream", "OK"),
        handled("ClientStream", "INVALID_ARGUMENT"),
    )
    assert await call_client_stream(channel, [b"a", b"b"]) == b"a+b"
    details = await expect_status(
        call_client_stream(channel, [b"a", b"invalid"]), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details == "amount: must be positive"
    await eventually(lambda: handled("ClientStream", "OK") == before_ok + 1)
    await eventually(lambda: handled("ClientStream", "INVALID_ARGUMENT") == before_bad + 1)


async def test_bidi_streaming(channel: grpc.aio.Channel) -> None:
    before_ok, before_internal = handled("Bidi", "OK"), handled("Bidi", "INTERNAL")
    assert await call_bidi(channel, [b"a", b"b"]) == [b"echo:a", b"echo:b"]
    details = await expect_status(call_bidi(channel, [b"a", b"boom"]), grpc.StatusCode.INTERNAL)
    assert details == GENERIC
    await eventually(lambda: handled("Bidi", "OK") == before_ok + 1)
    await eventually(lambda: handled("Bidi", "INTERNAL") == before_internal + 1)


async def test_unknown_method_is_unimplemented_and_not_counted(channel: grpc.aio.Channel) -> None:
    call = channel.unary_unary(f"/{SERVICE}/Nope")(b"", timeout=5)
    await expect_status(call, grpc.StatusCode.UNIMPLEMENTED)
    assert started("Nope") == 0


# --- logging ------------------------------------------------------------------------------------


async def test_one_log_line_per_rpc_with_mapped_code(
    channel: grpc.aio.Channel, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    await expect_status(call_unary(channel, b"invalid"), grpc.StatusCode.INVALID_ARGUMENT)
    finished = await finished_lines(capsys)
    assert len(finished) == 1
    line = finished[0]
    assert line["level"] == "info"
    assert line["grpc_method"] == f"/{SERVICE}/Unary"
    assert line["grpc_code"] == "INVALID_ARGUMENT"
    assert isinstance(line["duration_ms"], float)
    assert "127.0.0.1" in str(line["peer"])
    assert "invalid" not in json.dumps(line).replace("INVALID", "")


async def test_health_checks_are_counted_but_logged_at_debug(
    channel: grpc.aio.Channel, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Check", "grpc_code": "OK"}
    before = REGISTRY.get_sample_value("lodestar_grpc_server_handled_total", labels) or 0.0
    capsys.readouterr()
    await channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5)
    finished = await finished_lines(capsys)
    assert [line["level"] for line in finished] == ["debug"]
    assert REGISTRY.get_sample_value("lodestar_grpc_server_handled_total", labels) == before + 1

    logging.getLogger().setLevel(logging.INFO)
    await channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5)
    assert not [line for line in log_lines(capsys) if line["event"] == "rpc finished"]


# --- composition --------------------------------------------------------------------------------


def test_default_order() -> None:
    kinds = [type(i) for i in default_server_interceptors()]
    assert kinds == [LoggingInterceptor, MetricsInterceptor, ErrorMappingInterceptor]


async def test_metrics_without_error_mapping_maps_exception_code() -> None:
    before = handled("Unary", "INTERNAL")
    async for ch in _serve([MetricsInterceptor()]):
        await expect_status(call_unary(ch, b"boom"), grpc.StatusCode.UNKNOWN)
    await eventually(lambda: handled("Unary", "INTERNAL") == before + 1)


async def test_metrics_inside_error_mapping_maps_the_raw_exception() -> None:
    """Inside the error mapping, metrics sees the exception itself and maps it via status_for."""
    before = handled("Unary", "INTERNAL")
    async for ch in _serve([ErrorMappingInterceptor(), MetricsInterceptor()]):
        await expect_status(call_unary(ch, b"invalid"), grpc.StatusCode.INVALID_ARGUMENT)
    await eventually(lambda: handled("Unary", "INTERNAL") == before)
    assert handled("Unary", "INVALID_ARGUMENT") > 0


@pytest.mark.parametrize(
    ("full", "expected"),
    [
        ("/pkg.Service/Method", ("pkg.Service", "Method")),
        ("/grpc.health.v1.Health/Check", ("grpc.health.v1.Health", "Check")),
        ("garbage", ("unknown", "garbage")),
        ("", ("unknown", "unknown")),
    ],
)
def test_split_method(full: str, expected: tuple[str, str]) -> None:
    assert split_method(full) == expected


# --- requests that do not decode ----------------------------------------------------------------

GARBAGE = b"\xff\xff\xff"  # a field tag whose varint never ends
NOT_A_DURATION = "the request is not a valid google.protobuf.Duration: wire format was corrupt"
seen_by_typed: list[duration_pb2.Duration] = []


def _seen(request: duration_pb2.Duration) -> duration_pb2.Duration:
    assert type(request) is duration_pb2.Duration  # never the marker of an undecodable request
    seen_by_typed.append(request)
    return request


async def typed_unary(request: duration_pb2.Duration, context) -> duration_pb2.Duration:
    return _seen(request)


async def typed_server_stream(request: duration_pb2.Duration, context) -> AsyncIterator:
    yield _seen(request)


async def typed_client_stream(requests: AsyncIterator, context) -> duration_pb2.Duration:
    total = duration_pb2.Duration()
    async for request in requests:
        total.seconds += _seen(request).seconds
    return total


async def typed_bidi(requests: AsyncIterator, context) -> AsyncIterator:
    async for request in requests:
        yield _seen(request)


async def typed_bidi_swallowing(requests: AsyncIterator, context) -> AsyncIterator:
    """Reads its requests in a task of its own and ignores how that task ended."""

    async def read() -> None:
        async for request in requests:
            _seen(request)

    reader = asyncio.create_task(read())
    await asyncio.gather(reader, return_exceptions=True)
    yield duration_pb2.Duration(seconds=len(seen_by_typed))


def _typed_handlers() -> grpc.GenericRpcHandler:
    kw = {
        "request_deserializer": duration_pb2.Duration.FromString,
        "response_serializer": duration_pb2.Duration.SerializeToString,
    }
    return grpc.method_handlers_generic_handler(
        TYPED,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(typed_unary, **kw),
            "ServerStream": grpc.unary_stream_rpc_method_handler(typed_server_stream, **kw),
            "ClientStream": grpc.stream_unary_rpc_method_handler(typed_client_stream, **kw),
            "Bidi": grpc.stream_stream_rpc_method_handler(typed_bidi, **kw),
            "BidiSwallowing": grpc.stream_stream_rpc_method_handler(typed_bidi_swallowing, **kw),
        },
    )


def typed_handled(method: str, code: str) -> float:
    labels = {"grpc_service": TYPED, "grpc_method": method, "grpc_code": code}
    return REGISTRY.get_sample_value("lodestar_grpc_server_handled_total", labels) or 0.0


def duration(seconds: int) -> bytes:
    return duration_pb2.Duration(seconds=seconds).SerializeToString()


async def typed_call(channel: grpc.aio.Channel, method: str, requests: list[bytes]) -> list[bytes]:
    """Call ``method`` of the typed service with raw request bytes; the raw responses."""
    path = f"/{TYPED}/{method}"
    if method == "Unary":
        return [await channel.unary_unary(path)(requests[0], timeout=5)]
    if method == "ServerStream":
        return [r async for r in channel.unary_stream(path)(requests[0], timeout=5)]
    if method == "ClientStream":
        return [await channel.stream_unary(path)(iter(requests), timeout=5)]
    return [r async for r in channel.stream_stream(path)(iter(requests), timeout=5)]


KINDS = ["Unary", "ServerStream", "ClientStream", "Bidi"]


@pytest.mark.parametrize("method", KINDS)
async def test_undecodable_request_is_invalid_argument(
    channel: grpc.aio.Channel, method: str
) -> None:
    before = typed_handled(method, "INVALID_ARGUMENT")
    seen_by_typed.clear()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await typed_call(channel, method, [GARBAGE])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == NOT_A_DURATION
    assert rpc_status.from_call(info.value).message == NOT_A_DURATION
    assert seen_by_typed == []
    await eventually(lambda: typed_handled(method, "INVALID_ARGUMENT") == before + 1)


@pytest.mark.parametrize("method", ["ClientStream", "Bidi", "BidiSwallowing"])
async def test_undecodable_message_later_in_a_stream(
    channel: grpc.aio.Channel, method: str
) -> None:
    """The messages before it reach the handler; the call ends at the bad one, whatever the
    handler does with the exception.

    Nothing follows the bad message: a grpc.aio client that writes after the server ended the
    call reports INTERNAL "Internal error from Core" instead of the server's status
    (grpc/grpc#36066), which would make this test flaky.
    """
    seen_by_typed.clear()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await typed_call(channel, method, [duration(1), duration(2), GARBAGE])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == NOT_A_DURATION
    assert [d.seconds for d in seen_by_typed] == [1, 2]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x08",  # a tag without its value
        b"\x0a\x05ab",  # a length-delimited field shorter than its length
        b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # a varint of 11 bytes
    ],
)
async def test_truncated_and_corrupt_requests(channel: grpc.aio.Channel, garbage: bytes) -> None:
    details = await expect_status(
        typed_call(channel, "Unary", [garbage]), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details == NOT_A_DURATION


async def test_invalid_utf8_in_a_string_field_is_named() -> None:
    """The reason protobuf gives is kept, after the message's full name."""
    from google.protobuf import wrappers_pb2

    from lodestar.common.interceptors import wrap_handler

    handler = grpc.unary_unary_rpc_method_handler(
        typed_unary, request_deserializer=wrappers_pb2.StringValue.FromString
    )
    wrapped = wrap_handler(handler, lambda context: _no_guard(), refuse_undecodable=True)
    marker = wrapped.request_deserializer(b"\x0a\x01\xff")
    assert str(marker.error) == (
        "the request is not a valid google.protobuf.StringValue: string field had bad UTF-8"
    )
    assert wrapped.request_deserializer(b"\x0a\x01a") == wrappers_pb2.StringValue(value="a")


@asynccontextmanager
async def _no_guard() -> AsyncIterator[None]:
    yield


@pytest.mark.parametrize("method", [*KINDS, "BidiSwallowing"])
async def test_decodable_requests_pass_unchanged(channel: grpc.aio.Channel, method: str) -> None:
    seen_by_typed.clear()
    replies = await typed_call(channel, method, [duration(5), duration(7)])
    sent = [5] if method in ("Unary", "ServerStream") else [5, 7]
    assert [d.seconds for d in seen_by_typed] == sent
    assert replies


async def test_undecodable_request_without_error_mapping_is_grpc_default() -> None:
    """The refusal is the error mapping's doing: without it grpc.aio says UNKNOWN."""
    async for ch in _serve([MetricsInterceptor(), LoggingInterceptor()]):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await typed_call(ch, "Unary", [GARBAGE])
        assert info.value.code() == grpc.StatusCode.UNKNOWN


async def test_decoding_comes_before_authorization_for_unary_requests() -> None:
    """grpc.aio decodes a unary request before any interceptor's behaviour runs, so a malformed
    one is INVALID_ARGUMENT with or without a credential; a decodable one needs the credential.
    (A stream is refused before its first message is read, so there it is UNAUTHENTICATED.)"""
    from lodestar.common.auth import AuthInterceptor, Credentials

    auth = AuthInterceptor(Credentials({}), {})
    async for ch in _serve([*default_server_interceptors(), auth]):
        details = await expect_status(
            typed_call(ch, "Unary", [GARBAGE]), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert details == NOT_A_DURATION
        await expect_status(typed_call(ch, "Unary", [duration(1)]), grpc.StatusCode.UNAUTHENTICATED)


@pytest.mark.parametrize(
    ("method", "code", "level"),
    [
        ("/lodestar.core.v1.RegistryService/Heartbeat", grpc.StatusCode.OK, logging.DEBUG),
        ("/lodestar.core.v1.RegistryService/Heartbeat", grpc.StatusCode.NOT_FOUND, logging.INFO),
        ("/grpc.health.v1.Health/Check", grpc.StatusCode.OK, logging.DEBUG),
        ("/lodestar.core.v1.RegistryService/Register", grpc.StatusCode.OK, logging.INFO),
    ],
)
def test_routine_calls_that_succeed_are_logged_at_debug(
    method: str, code: grpc.StatusCode, level: int
) -> None:
    assert interceptors._level_for(method, code) == level
