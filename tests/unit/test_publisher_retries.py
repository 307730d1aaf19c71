"""The publisher tries a batch ``attempts`` times in all, backing off between tries."""

from __future__ import annotations

import time

import grpc
import pytest

from lodestar.common.sdk.publisher import Publisher
from lodestar.core.v1 import bus_pb2


class FlakyBus:
    """A Publish that fails with ``code`` ``failures`` times, then succeeds."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.failures, self.code, self.calls = failures, code, []

    async def Publish(
        self, request: bus_pb2.PublishRequest, timeout: float
    ) -> bus_pb2.PublishResponse:
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
        return bus_pb2.PublishResponse()


def publisher(bus: FlakyBus, attempts: int) -> Publisher:
    sender = Publisher(
        grpc.aio.insecure_channel("127.0.0.1:9"), source="test://retries", attempts=attempts
    )
    sender._stub = bus  # type: ignore[assignment]
    return sender


@pytest.mark.parametrize(("failures", "attempts"), [(0, 4), (1, 4), (3, 4)])
async def test_transient_failures_are_retried_until_one_succeeds(
    failures: int, attempts: int
) -> None:
    bus = FlakyBus(failures)
    await publisher(bus, attempts)._send_with_retries(bus_pb2.PublishRequest())
    assert len(bus.calls) == failures + 1
    gaps = [b - a for a, b in zip(bus.calls, bus.calls[1:], strict=False)]
    assert all(gap > 0.0 for gap in gaps)  # a backoff after every failure, the first included


@pytest.mark.parametrize("attempts", [1, 2, 4])
async def test_a_batch_is_tried_attempts_times_in_all(attempts: int) -> None:
    bus = FlakyBus(failures=10)
    with pytest.raises(grpc.aio.AioRpcError):
        await publisher(bus, attempts)._send_with_retries(bus_pb2.PublishRequest())
    assert len(bus.calls) == attempts


async def test_a_permanent_refusal_is_not_retried() -> None:
    bus = FlakyBus(failures=10, code=grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(grpc.aio.AioRpcError):
        await publisher(bus, 4)._send_with_retries(bus_pb2.PublishRequest())
    assert len(bus.calls) == 1
