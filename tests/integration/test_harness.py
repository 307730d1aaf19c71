"""The shared test harness (lodestar.common.testing) runs any service in-process or as a process."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lodestar.common.auth import Role
from lodestar.common.cli import free_port
from lodestar.common.server import READINESS
from lodestar.common.testing import (
    reachable,
    service_env,
    service_package,
    service_process,
    start_in_process,
    wait_serving,
)
from lodestar_core.service import SPEC as CORE_SPEC
from lodestar_core.service import CoreModule
from lodestar_core.settings import CoreSettings
from lodestar_usage.service import SPEC as USAGE_SPEC


async def readiness(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=READINESS), timeout=2
        )
        return reply.status


async def test_a_spec_runs_its_module_in_process_until_stopped(core_settings: CoreSettings):
    running = await start_in_process(CORE_SPEC, core_settings)
    try:
        assert isinstance(running.module, CoreModule)
        assert await readiness(running.target) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await running.stop()
    assert running.task.done()
    assert not reachable("127.0.0.1", running.server.port)


async def test_a_service_that_never_gets_ready_is_stopped_and_times_out(
    core_settings: CoreSettings,
):
    port = free_port()
    settings = core_settings.model_copy(update={"port": port})
    checked: list[CoreModule] = []

    def never(module: CoreModule) -> bool:
        checked.append(module)
        return False

    with pytest.raises(TimeoutError, match="CoreModule started but not ready"):
        await start_in_process(CoreModule(settings), settings, ready=never, timeout=1)
    assert checked, "the ready check was never asked"
    assert not reachable("127.0.0.1", port)


def test_a_spec_names_the_package_python_runs():
    assert service_package(CORE_SPEC) == "lodestar_core"
    assert service_package(USAGE_SPEC) == "lodestar_usage"
    assert service_package("lodestar_core") == "lodestar_core"


async def test_a_spec_runs_as_a_process_killed_afterwards(
    tmp_path: Path, database_url: str, schema: str, tokens: dict[Role | str, str]
):
    env = service_env(database_url, tmp_path / "credentials.yaml", schema=schema)
    log = tmp_path / "core.log"
    with service_process(CORE_SPEC, env, log) as (process, port):
        await wait_serving(f"127.0.0.1:{port}", READINESS, timeout=60)
        assert process.poll() is None
    assert process.poll() is not None
    assert not reachable("127.0.0.1", port)
    assert log.stat().st_size > 0
