"""Helpers for tests of usage-tracker: run it in the test's event loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from lodestar.common.cli import free_port
from lodestar.common.config import DatabaseSettings
from lodestar.common.server import READINESS, RunningServer, ServiceRunner
from lodestar_usage.service import UsageModule
from lodestar_usage.settings import AlertSettings, UsageSettings


def tracker_settings(
    *,
    database_url: str,
    schema: str,
    core_target: str,
    token: str,
    credentials: Path,
    spool: Path,
    **overrides: object,
) -> UsageSettings:
    """Settings of a tracker on a free port, in its own schema, talking to ``core_target``."""
    values: dict[str, object] = {
        "port": free_port(),
        "metrics_port": -1,
        "credentials_file": credentials,
        "shutdown_grace_seconds": 2.0,
        "core_endpoint": core_target,
        "token": SecretStr(token),
        "spool_dir": spool,
        "database": DatabaseSettings(url=SecretStr(database_url), schema_name=schema),
        "alerts": AlertSettings(check_interval_seconds=0.2),
    }
    values.update(overrides)
    return UsageSettings.model_validate(values)


@dataclass
class RunningTracker:
    """A usage-tracker serving in the current event loop."""

    runner: ServiceRunner
    module: UsageModule
    server: RunningServer
    task: asyncio.Task[None]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def stop(self) -> None:
        self.runner.request_stop()
        await self.task


async def start_tracker(settings: UsageSettings, timeout: float = 30.0) -> RunningTracker:
    """Start a tracker and wait until it is ready and subscribed."""
    module = UsageModule(settings)
    runner = ServiceRunner(module, settings)
    started: asyncio.Future[RunningServer] = asyncio.get_running_loop().create_future()

    async def on_started(server: RunningServer) -> None:
        started.set_result(server)

    task = asyncio.create_task(runner.run(on_started, handle_signals=False))
    waiting: set[asyncio.Future[Any]] = {started, task}
    done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    server = started.result()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=READINESS), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("usage-tracker not ready")
            await asyncio.sleep(0.05)
    while module.subscriber is None or not module.subscriber.connected.is_set():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("usage-tracker not subscribed")
        await asyncio.sleep(0.05)
    return RunningTracker(runner, module, server, task)
