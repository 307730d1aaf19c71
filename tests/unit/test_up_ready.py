"""What `lodestar up` takes for a module's first healthy report before it prints `ready`."""

from __future__ import annotations

import pytest

from lodestar.common.cli import _not_yet_healthy
from lodestar.core.v1 import registry_pb2 as r

HEALTHY = r.HEALTH_STATUS_HEALTHY


def module(
    status: int = HEALTHY,
    *,
    uptime: float = 2.0,
    alive: bool = True,
    enabled: bool = True,
    error: str = "",
) -> r.Module:
    health = r.ModuleHealth(status=status, uptime_seconds=uptime, last_error=error)  # type: ignore[arg-type]
    return r.Module(name="m", enabled=enabled, alive=alive, health=health)


@pytest.mark.parametrize(
    ("listed", "why"),
    [
        (module(), None),
        (module(enabled=False, status=r.HEALTH_STATUS_DOWN), None),
        (None, "not registered with core"),
        (module(uptime=600.0), "no report from this run yet"),  # the last run's, kept by core
        (module(alive=False), "no report from this run yet"),
        (
            module(r.HEALTH_STATUS_DEGRADED, error="not connected to core"),
            "degraded, not connected to core",
        ),
        (module(r.HEALTH_STATUS_DOWN), "down, no error"),
        (module(42), "status 42, no error"),  # a newer core's status
    ],
)
def test_only_a_healthy_report_of_this_run_counts(listed: r.Module | None, why: str | None) -> None:
    assert _not_yet_healthy(listed, since=5.0) == why
