"""Benchmarks of core: a real core process on a real Postgres."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

from google.protobuf import duration_pb2

from lodestar.common.auth import Role
from lodestar.common.cli import free_port, wait_until_serving
from lodestar.common.events import new_event
from lodestar.common.sdk import ReceivedEvent, Subscriber, connect
from lodestar.common.testing import dev_credentials, start_process
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc
from lodestar.events.v1 import event_pb2
from lodestar.usage.v1 import events_pb2 as usage

STREAM_BATCH = 500
READY_TIMEOUT_SECONDS = 60.0
STREAM_WINDOW = 8


class CoreUnderTest:
    """``python -m lodestar_core serve`` on a free port, with its own schema."""

    def __init__(self, dsn: str, workdir: Path) -> None:
        self.tokens = dev_credentials(workdir / "credentials.yaml", ["usage-tracker"])
        self.port = free_port()
        self._env = {
            "LODESTAR_DATABASE__URL": dsn,
            "LODESTAR_CREDENTIALS_FILE": str(workdir / "credentials.yaml"),
            "LODESTAR_LOG_LEVEL": "WARNING",
        }
        self._log = workdir / "core.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        """The address to dial: ``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> CoreUnderTest:
        self._process = start_process("lodestar_core", self._env, self._log, self.port)
        if await wait_until_serving(self.port, self._process, READY_TIMEOUT_SECONDS):
            return self
        raise RuntimeError("core did not become ready")

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=30)


def sample_events(count: int) -> list[event_pb2.Event]:
    """RequestCompleted envelopes as a LiteLLM gateway publishes them (about 250 bytes each)."""
    return [
        new_event(
            usage.RequestCompleted(
                model="claude-sonnet-4",
                provider="anthropic",
                project=f"project-{i % 20}",
                session_id=f"session-{i % 500}",
                user="dev",
                task_id=f"task-{i}",
                attempt=1,
                status=usage.REQUEST_STATUS_OK,
                duration=duration_pb2.Duration(seconds=1, nanos=(i % 1000) * 1_000_000),
                tokens=usage.TokenUsage(input=1200 + i % 100, output=300, cached_read=800),
                reported_cost=usage.Money(currency="USD", micros=2_100 + i % 100),
            ),
            source="litellm://gateway",
        )
        for i in range(count)
    ]


async def bench_stream_publish(core: CoreUnderTest, events: list[event_pb2.Event]) -> float:
    """Events per second acked by PublishStream, STREAM_WINDOW batches in flight."""
    return await publish_rate(core.target, core.tokens[Role.PUBLISHER], events)


async def publish_rate(target: str, token: str, events: list[event_pb2.Event]) -> float:
    """Events per second acked by ``target``'s PublishStream, STREAM_WINDOW batches in flight."""
    batches = [events[i : i + STREAM_BATCH] for i in range(0, len(events), STREAM_BATCH)]
    window = asyncio.Semaphore(STREAM_WINDOW)
    acked = 0

    async def requests() -> AsyncIterator[bus_pb2.PublishStreamRequest]:
        for number, batch in enumerate(batches):
            await window.acquire()
            yield bus_pb2.PublishStreamRequest(batch_id=number, events=batch)

    async with connect(target, token) as channel:
        stub = bus_pb2_grpc.EventBusServiceStub(channel)
        started = time.perf_counter()
        async for response in stub.PublishStream(requests()):
            if response.error:
                raise RuntimeError(response.error)
            acked += response.accepted
            window.release()
        elapsed = time.perf_counter() - started
    assert acked == len(events), f"{acked} of {len(events)} acked"
    return acked / elapsed


async def bench_delivery(core: CoreUnderTest, expected: int) -> float:
    """Events per second through the SDK subscriber runtime, from the start of the log."""
    return await delivery_rate(core.target, core.tokens[Role.MODULE], expected, "bench-delivery")


async def delivery_rate(target: str, token: str, expected: int, subscription: str) -> float:
    """Events per second ``subscription`` receives through the SDK subscriber runtime."""
    done = asyncio.Event()
    count = 0

    async def handle(received: ReceivedEvent) -> None:
        nonlocal count
        count += 1
        if count >= expected:
            done.set()

    async with connect(target, token) as channel:
        subscriber = Subscriber(
            channel,
            subscription=subscription,
            handler=handle,
            concurrency=64,
            max_in_flight=4096,
        )
        started = time.perf_counter()
        task = asyncio.create_task(subscriber.run())
        await asyncio.wait_for(done.wait(), 600)
        elapsed = time.perf_counter() - started
        subscriber.stop()
        await task
    return count / elapsed


async def bench_unary_latency(
    core: CoreUnderTest, rate: int, seconds: float
) -> tuple[float, float, float]:
    """p50 and p99 milliseconds of single-event Publish calls sent at a fixed rate."""
    latencies: list[float] = []
    events = sample_events(int(rate * seconds))

    async with connect(core.target, core.tokens[Role.PUBLISHER]) as channel:
        stub = bus_pb2_grpc.EventBusServiceStub(channel)

        async def one(event: event_pb2.Event) -> None:
            started = time.perf_counter()
            await stub.Publish(bus_pb2.PublishRequest(events=[event]))
            latencies.append((time.perf_counter() - started) * 1000)

        tasks = []
        began = time.perf_counter()
        for index, event in enumerate(events):
            delay = began + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(event)))
        await asyncio.gather(*tasks)
        achieved = len(events) / (time.perf_counter() - began)
    quantiles = statistics.quantiles(latencies, n=100)
    return quantiles[49], quantiles[98], achieved
