"""learning's configuration: the shared service settings (its own sections come later)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from lodestar.common.config import ServiceSettings


class LearningSettings(ServiceSettings):
    """Everything learning reads from its configuration layers."""

    default_schema: ClassVar[str] = "learning"
    port: int = Field(default=50071, ge=0, le=65535)
    metrics_port: int = Field(default=9466, ge=-1, le=65535)
