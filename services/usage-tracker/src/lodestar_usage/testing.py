"""Helpers for tests of usage-tracker.

They give its settings for a test, and start it in the test's event loop with the shared harness
(``lodestar.common.testing``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from lodestar.common.cli import free_port
from lodestar.common.config import DatabaseSettings
from lodestar.common.testing import START_TIMEOUT_SECONDS, RunningService, start_in_process
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


#: A usage-tracker serving in the current event loop.
RunningTracker = RunningService[UsageModule]


def subscribed(module: UsageModule) -> bool:
    """Whether the tracker's subscriber is connected to core."""
    return module.subscriber is not None and module.subscriber.connected.is_set()


async def start_tracker(
    settings: UsageSettings, timeout: float = START_TIMEOUT_SECONDS
) -> RunningTracker:
    """Start a tracker and wait until it is ready and subscribed."""
    module = UsageModule(settings)
    return await start_in_process(module, settings, ready=subscribed, timeout=timeout)
