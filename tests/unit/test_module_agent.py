"""The module agent reports often while a module starts, then at its interval."""

from __future__ import annotations

import asyncio
import time

import grpc

from lodestar.common.module import HealthReport, HealthState
from lodestar.common.sdk.registration import STARTING_INTERVAL_SECONDS, ModuleAgent
from lodestar.core.v1 import registry_pb2, registry_pb2_grpc

INTERVAL = 30.0


class Registry(registry_pb2_grpc.RegistryServiceServicer):
    """Accepts every registration and records when each heartbeat came, with its status."""

    def __init__(self) -> None:
        self.heartbeats: list[tuple[float, int]] = []

    async def Register(
        self, request: registry_pb2.RegisterRequest, context: object
    ) -> registry_pb2.RegisterResponse:
        return registry_pb2.RegisterResponse()

    async def Heartbeat(
        self, request: registry_pb2.HeartbeatRequest, context: object
    ) -> registry_pb2.HeartbeatResponse:
        self.heartbeats.append((time.monotonic(), request.health.status))
        return registry_pb2.HeartbeatResponse()


async def test_a_starting_module_reports_until_healthy_then_at_its_interval() -> None:
    registry = Registry()
    server = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(registry, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    reports = iter([HealthState.DEGRADED, HealthState.DEGRADED])

    async def health() -> HealthReport:
        return HealthReport(next(reports, HealthState.HEALTHY), 0.0, "", 0.0)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        agent = ModuleAgent(
            channel,
            name="m",
            version="1",
            endpoint="e",
            event_types=[],
            health=health,
            interval_seconds=INTERVAL,
        )
        running = asyncio.create_task(agent.run())
        try:
            async with asyncio.timeout(INTERVAL / 2):
                while len(registry.heartbeats) < 3:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(3 * STARTING_INTERVAL_SECONDS)  # room for a wrong fourth
        finally:
            agent.stop()
            await running
            await server.stop(None)
    assert [status for _, status in registry.heartbeats] == [
        registry_pb2.HEALTH_STATUS_DEGRADED,
        registry_pb2.HEALTH_STATUS_DEGRADED,
        registry_pb2.HEALTH_STATUS_HEALTHY,
    ]
