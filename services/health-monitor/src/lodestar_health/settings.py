"""health-monitor's configuration: the shared service settings (its own sections come later)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from lodestar.common.config import ServiceSettings


class HealthMonitorSettings(ServiceSettings):
    """Everything health-monitor reads from its configuration layers."""

    default_schema: ClassVar[str] = "health_monitor"
    port: int = Field(default=50081, ge=0, le=65535)
    metrics_port: int = Field(default=9467, ge=-1, le=65535)
