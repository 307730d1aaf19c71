"""The learning and health-monitor skeletons, built on the shared lifecycle: each migrates its own
schema, registers with core under its name and package version, reports HEALTHY in its heartbeat,
and turns DEGRADED (still ready) while core is away."""

from __future__ import annotations

import asyncio
import sys
from importlib.metadata import version
from pathlib import Path

import asyncpg
import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from lodestar.common.auth import Role
from lodestar.common.cli import free_port
from lodestar.common.config import DatabaseSettings
from lodestar.common.db import load_migrations
from lodestar.common.lifecycle import ServiceModule
from lodestar.common.module import HealthState
from lodestar.common.sdk import connect
from lodestar.common.service_cli import ServiceSpec
from lodestar.common.testing import RunningService, dev_credentials, start_in_process
from lodestar.core.v1 import registry_pb2, registry_pb2_grpc
from lodestar_health.service import SPEC as HEALTH_MONITOR
from lodestar_learning.service import SPEC as LEARNING
from tests.conftest import TEST_MODULES, RunningCore

GOLDEN = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "tests" / "golden"
WAIT = 30.0  # a deadline for the heartbeat to arrive, not a speed requirement


@pytest.fixture
def tokens(tmp_path: Path) -> dict[Role | str, str]:
    """The shared test principals plus the skeletons' own."""
    return dev_credentials(
        tmp_path / "credentials.yaml", (*TEST_MODULES, LEARNING.name, HEALTH_MONITOR.name)
    )


async def start_skeleton(
    spec: ServiceSpec, core: RunningCore, tmp_path: Path, database_url: str, schema: str, token: str
) -> RunningService[ServiceModule]:
    settings = spec.settings_cls.model_validate(
        {
            "port": free_port(),
            "metrics_port": -1,
            "credentials_file": tmp_path / "credentials.yaml",
            "shutdown_grace_seconds": 1.0,
            "core_endpoint": core.target,
            "token": SecretStr(token),
            "database": DatabaseSettings(url=SecretStr(database_url), schema_name=schema),
        }
    )
    return await start_in_process(
        spec, settings, ready=lambda module: module.core_problem() is None
    )


async def registered_module(admin: grpc.aio.Channel, name: str) -> registry_pb2.Module:
    """The module as core lists it, once its first heartbeat said HEALTHY."""
    stub = registry_pb2_grpc.RegistryServiceStub(admin)
    async with asyncio.timeout(WAIT):
        while True:
            reply = await stub.GetModule(registry_pb2.GetModuleRequest(name=name))
            if reply.module.health.status == registry_pb2.HEALTH_STATUS_HEALTHY:
                return reply.module
            await asyncio.sleep(0.1)


async def helm_test(*checks: str) -> tuple[int, str]:
    """The chart's `helm test` pod script, as rendered, run against ``checks`` (target=names):
    its exit code and output."""
    rendered = yaml.safe_load_all((GOLDEN / "default.yaml").read_text())
    pod = next(o for o in rendered if o and o["metadata"]["name"] == "lodestar-test-health")
    script = pod["spec"]["containers"][0]["args"][0]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *checks, stdout=asyncio.subprocess.PIPE
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    return await process.wait(), output.decode()


async def health(target: str, service: str) -> str:
    """The status name grpc.health.v1.Health/Check gives for ``service``."""
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def until_health(target: str, service: str, status: str) -> None:
    async with asyncio.timeout(WAIT):
        while await health(target, service) != status:
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("spec", [LEARNING, HEALTH_MONITOR], ids=lambda spec: spec.name)
async def test_a_skeleton_migrates_registers_and_degrades_without_core(
    spec: ServiceSpec,
    core: RunningCore,
    tokens: dict[Role | str, str],
    tmp_path: Path,
    database_url: str,
    schema: str,
) -> None:
    own_schema = f"{schema}_{spec.name.replace('-', '_')}"
    running = await start_skeleton(
        spec, core, tmp_path, database_url, own_schema, tokens[spec.name]
    )
    try:
        async with connect(core.target, tokens[Role.ADMIN]) as admin:
            module = await registered_module(admin, spec.name)
        assert module.version == version(f"lodestar-{spec.name}") == spec.info.version
        assert module.enabled
        assert module.alive

        conn = await asyncpg.connect(database_url)
        try:
            applied = await conn.fetch(
                f"SELECT name FROM {own_schema}.schema_migrations ORDER BY version"
            )
        finally:
            await conn.close()
        assert spec.migrations is not None
        shipped = [m.name for m in load_migrations(spec.migrations)]
        assert [row["name"] for row in applied] == shipped
        assert shipped[0] == "0001_init.sql"

        report = await running.module.health_check()
        assert (report.status, report.last_error) == (HealthState.HEALTHY, "")
        await until_health(running.target, "core", "SERVING")
        with pytest.raises(grpc.aio.AioRpcError) as unknown:  # core has no link to itself
            await health(core.target, "core")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert (await helm_test(f"{running.target}=readiness,core"))[0] == 0

        await core.stop()
        async with asyncio.timeout(WAIT):
            while (report := await running.module.health_check()).status is HealthState.HEALTHY:
                await asyncio.sleep(0.05)
        assert report.status is HealthState.DEGRADED, "core away: degraded, not down"
        assert "core unreachable" in report.last_error
        await until_health(running.target, "core", "NOT_SERVING")  # what `helm test` asks
        assert await health(running.target, "readiness") == "SERVING"  # still takes traffic
        code, output = await helm_test(f"{running.target}=readiness,core")
        assert code == 1
        assert f"{running.target} core: NOT_SERVING" in output
    finally:
        await running.stop()
