"""`lodestar up` as a supervisor: a module that exits is restarted; one that keeps failing is
given up on and disabled in core's registry with the reason, while core and the others go on."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import grpc
import pytest
import yaml

from lodestar.common.testing import wait_serving
from lodestar.core.v1 import registry_pb2, registry_pb2_grpc
from tests.e2e.test_suite_up import lodestar_up, wait_for_line, wait_registered


def pid_of(package: str, port: int) -> int:
    """The process running ``python -m <package> serve`` on ``port``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if package.encode() in command and f"LODESTAR_PORT={port}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no {package} process on port {port}")


async def module(core: str, admin_token: str, name: str) -> registry_pb2.Module:
    async with grpc.aio.insecure_channel(core) as channel:
        reply = await registry_pb2_grpc.RegistryServiceStub(channel).GetModule(
            registry_pb2.GetModuleRequest(name=name),
            metadata=(("authorization", f"Bearer {admin_token}"),),
        )
    return reply.module


#: Three exits within the window, a fifth of a second before the first restart.
SUPERVISION = ("--max-restarts", "3", "--restart-delay", "0.2")


@pytest.fixture
def supervised(tmp_path: Path):
    with lodestar_up(tmp_path, *SUPERVISION) as (process, _):
        yield process, tmp_path / "state", tmp_path / "config"


def test_a_killed_module_is_restarted_and_one_that_keeps_failing_is_disabled(supervised):
    process, state, config = supervised
    endpoints = json.loads((state / "endpoints.json").read_text())
    tokens = yaml.safe_load((state / "tokens.yaml").read_text())
    core, learning = endpoints["core"]["grpc"], endpoints["learning"]["grpc"]
    port = int(learning.rsplit(":", 1)[1])
    wait_registered(state, {"learning"})

    os.kill(pid_of("lodestar_learning", port), signal.SIGKILL)
    wait_for_line(process, "learning restarted", timeout=30)
    asyncio.run(wait_serving(learning, "readiness", timeout=60))

    # from now on learning cannot start: its config has a key it does not know
    (config / "modules").mkdir(parents=True, exist_ok=True)
    (config / "modules" / "learning.yaml").write_text("no_such_setting: 1\n")
    os.kill(pid_of("lodestar_learning", port), signal.SIGKILL)  # its second exit
    lines = wait_for_line(process, "given up on", timeout=60)  # the restart fails: the third
    assert "learning exited with 2 3 time(s)" in lines[-1]  # 2: a configuration error

    state_in_core = asyncio.run(module(core, tokens["admin"], "learning"))
    assert not state_in_core.enabled
    assert state_in_core.health.status == registry_pb2.HEALTH_STATUS_DOWN
    assert "lodestar up gave up" in state_in_core.health.last_error
    # core and the other modules go on
    asyncio.run(wait_serving(core, "readiness", timeout=10))
    asyncio.run(wait_serving(endpoints["usage-tracker"]["grpc"], "readiness", timeout=10))
    assert process.poll() is None
