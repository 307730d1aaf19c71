"""Probe semantics, checked as the kubelet's gRPC probe does: Health/Check by service name."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lodestar.common.cli import free_port
from lodestar.common.embedded import EmbeddedPostgres
from lodestar.common.testing import dev_credentials, service_env, start_process

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GRACE_SECONDS = 3


async def probe(target: str, service: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return reply.status


async def until(target: str, service: str, status: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = await probe(target, service)
            if last == status:
                return
        except grpc.aio.AioRpcError as exc:
            last = exc.code()
        await asyncio.sleep(0.1)
    raise AssertionError(f"{service} stayed {last}, wanted {status}")


@pytest.mark.parametrize(
    ("package", "module", "service_name"),
    [
        ("lodestar_core", "core", "lodestar.core.v1.EventBusService"),
        ("lodestar_usage", "usage-tracker", "lodestar.usage.v1.UsageService"),
        # the skeletons serve no gRPC service of their own yet: health and reflection only
        ("lodestar_learning", "learning", None),
        ("lodestar_health", "health-monitor", None),
    ],
)
async def test_readiness_follows_the_database_liveness_does_not_and_sigterm_drains(
    tmp_path: Path, package: str, module: str, service_name: str | None
):
    pg = EmbeddedPostgres(tmp_path / "pg")
    pg.initialise()  # not started: the service comes up before its database
    tokens = dev_credentials(tmp_path / "credentials.yaml", [module])
    port = free_port()
    env = service_env(
        pg.dsn(),
        tmp_path / "credentials.yaml",
        # modules only: no core answers here, which makes a module degraded, not unready
        core=f"127.0.0.1:{free_port()}",
        token=tokens[module],
        shutdown_grace_seconds=GRACE_SECONDS,
    )
    service = start_process(package, env, tmp_path / "service.log", port)
    target = f"127.0.0.1:{port}"
    try:
        await until(target, "liveness", SERVING)
        assert await probe(target, "readiness") == NOT_SERVING
        assert await probe(target, "") == NOT_SERVING

        pg.start()
        await until(target, "readiness", SERVING)
        assert await probe(target, "") == SERVING
        if service_name is not None:
            assert await probe(target, service_name) == SERVING

        pg.stop("immediate")
        await until(target, "readiness", NOT_SERVING)
        # a lost database must not get the pod restarted
        assert await probe(target, "liveness") == SERVING

        pg.start()
        await until(target, "readiness", SERVING)

        async with grpc.aio.insecure_channel(target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="readiness")
            )
            assert (await watch.read()).status == SERVING
            service.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert (await asyncio.wait_for(watch.read(), 10)).status == NOT_SERVING
        while service.poll() is None:
            waited = time.monotonic() - started
            assert waited < GRACE_SECONDS + 5, "the service did not exit within its grace period"
            await asyncio.sleep(0.05)
        assert service.returncode == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
        pg.discard()  # stops it (immediate) and deletes the cluster
