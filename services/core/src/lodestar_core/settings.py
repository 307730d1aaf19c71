"""Core's configuration: the shared service settings plus the bus and registry options."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, Field, model_validator

from lodestar.common.config import ServiceSettings


class BusSettings(BaseModel):
    """Event bus limits and behaviour."""

    model_config = {"extra": "forbid"}

    max_batch_events: int = Field(10_000, ge=1, le=100_000)
    max_event_bytes: int = Field(256 * 1024, ge=1024)
    default_in_flight: int = Field(512, ge=1)
    max_in_flight: int = Field(10_000, ge=1)
    max_delivery_attempts: int = Field(5, ge=1)
    retention_days: int = Field(7, ge=1)
    partitions_ahead_days: int = Field(2, ge=1)
    group_commit_max_events: int = Field(20_000, ge=1)
    #: Subscriptions one (non-admin) principal may own, so none can flood ListSubscriptions.
    max_subscriptions_per_owner: int = Field(100, ge=1)
    #: Backfill allowance: how far in the past an event's `time` may lie (imports of old usage).
    max_event_age_days: int = Field(3650, ge=1, le=36_500)
    #: Clock-skew allowance: how far in the future an event's `time` and id may lie.
    max_clock_skew_seconds: float = Field(300.0, ge=0)
    #: How often a replica records that it is alive (several replicas share one database).
    replica_heartbeat_seconds: float = Field(1.0, gt=0, le=60)
    #: A replica unseen this long is dead: its subscriptions may be claimed by another.
    takeover_after_seconds: float = Field(5.0, gt=0, le=600)
    #: While streams are open, how often a replica looks for events other replicas appended.
    head_poll_seconds: float = Field(0.05, gt=0, le=10)

    @model_validator(mode="after")
    def _window_fits(self) -> BusSettings:
        if self.takeover_after_seconds < 2 * self.replica_heartbeat_seconds:
            raise ValueError(
                "takeover_after_seconds must be at least twice replica_heartbeat_seconds, or a "
                "live replica could be taken for dead between two heartbeats"
            )
        if self.default_in_flight > self.max_in_flight:
            raise ValueError("default_in_flight must not exceed max_in_flight")
        if self.max_clock_skew_seconds > self.partitions_ahead_days * 86_400:
            raise ValueError(
                "max_clock_skew_seconds must not exceed partitions_ahead_days days: "
                "an id dated further ahead would land outside the daily partitions"
            )
        return self


class RegistrySettings(BaseModel):
    """Module registry options."""

    model_config = {"extra": "forbid"}

    lease_seconds: float = Field(15.0, gt=0)


class CoreSettings(ServiceSettings):
    """Everything core reads from its configuration layers."""

    default_schema: ClassVar[str] = "core"
    bus: BusSettings = Field(default_factory=BusSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    migrate_on_start: bool = True
