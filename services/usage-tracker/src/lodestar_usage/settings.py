"""usage-tracker's configuration: the shared service settings plus its own sections."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, Field, model_validator

from lodestar.common.config import ServiceSettings
from lodestar_usage.bounds import MAX_BUDGET_WINDOW_DAYS


class PricingSettings(BaseModel):
    """How local models are costed and what they are compared with."""

    model_config = {"extra": "forbid"}

    local_providers: list[str] = Field(
        default_factory=lambda: ["ollama", "vllm", "lmstudio", "llamacpp", "local"],
        description="Providers whose models run on your own hardware.",
    )
    local_compute_micros_per_second: int = Field(
        default=100,
        ge=0,
        le=1_000_000,
        description="Compute cost of a local model: micro-dollars per second (at most $1/s).",
    )
    baseline_model: str = Field(
        default="claude-sonnet-4",
        description="Premium model whose price gives the shadow cost of local requests.",
    )
    baseline_provider: str = "anthropic"

    @cached_property
    def local_provider_set(self) -> frozenset[str]:
        """``local_providers``, lower-cased."""
        return frozenset(p.lower() for p in self.local_providers)


class IngestSettings(BaseModel):
    """The subscriber and the micro-batcher writing the ledger."""

    model_config = {"extra": "forbid"}

    concurrency: int = Field(
        default=16,
        ge=1,
        description="Delivery batches (one per stream message, <= 1,024 events) handled at once.",
    )
    max_in_flight: int = Field(default=4096, ge=1)
    batch_max_events: int = Field(default=4096, ge=1)
    batch_linger_seconds: float = Field(default=0.005, ge=0)


class RetentionSettings(BaseModel):
    """Raw ledger rows expire; rollups stay."""

    model_config = {"extra": "forbid"}

    raw_days: int = Field(default=90, ge=1)
    archive_dir: Path = Path(".lodestar/usage-archive")
    partitions_ahead_days: int = Field(default=2, ge=1)
    check_interval_seconds: float = Field(default=3600.0, gt=0)


class AdmissionSettings(BaseModel):
    """Budget admission on the request path."""

    model_config = {"extra": "forbid"}

    fail_open: bool = Field(
        default=False,
        description="While the database is unreachable: True grants Reserve (flagged fail_open), "
        "False answers UNAVAILABLE.",
    )
    default_lease_seconds: float = Field(
        default=60.0, gt=0, le=86_400, description="Lease of a Reserve that sets none."
    )
    max_lease_seconds: float = Field(
        default=3600.0,
        gt=0,
        le=86_400,
        description="Longest lease a Reserve may ask for; a longer one is refused.",
    )

    max_batch: int = Field(
        default=512,
        ge=1,
        le=10_000,
        description="Most calls decided in one round (1: every call in a transaction of its own).",
    )
    max_queued: int = Field(
        default=4096,
        ge=1,
        le=1_000_000,
        description="Calls that may wait for a round; beyond it a call is refused at once with "
        "RESOURCE_EXHAUSTED and a retry delay.",
    )
    max_calls_per_request: int = Field(
        default=512,
        ge=1,
        le=10_000,
        description="Most calls one Admit request may carry; a larger one is refused.",
    )
    stream_requests_in_flight: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description="Requests of one AdmitStream being decided or waiting for their answer to be "
        "written; beyond it the stream is read no further (HTTP/2 flow control holds its sender "
        "back).",
    )
    rounds_in_flight: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Rounds one process runs at once (each holds a database connection).",
    )

    keep_finished_seconds: float = Field(
        default=3600.0,
        ge=60,
        le=30 * 86_400,
        description="How long a finished reservation (settled, released or expired) is kept; "
        "then it is deleted, and a Commit or Release of it answers NOT_FOUND.",
    )
    durable_commit: bool = Field(
        default=False,
        description="Wait for each admission round's WAL flush before answering. False (the "
        "default) commits rounds with synchronous_commit off: a Postgres crash (not a tracker "
        "crash) may lose the holds of its last ~0.6 s (ADR 0009).",
    )

    @model_validator(mode="after")
    def _default_within_max(self) -> AdmissionSettings:
        if self.default_lease_seconds > self.max_lease_seconds:
            raise ValueError("default_lease_seconds must not exceed max_lease_seconds")
        return self


class LimitsSettings(BaseModel):
    """Bounds of requests that depend on the deployment (the fixed ones are in bounds.py)."""

    model_config = {"extra": "forbid"}

    max_lookback_days: int = Field(
        default=3660,
        ge=1,
        le=36_500,
        description="How far back a rolling window or a calendar window's periods_ago may reach.",
    )
    max_budget_window_days: int = Field(
        default=366,
        ge=1,
        le=MAX_BUDGET_WINDOW_DAYS,
        description="Longest rolling budget window and session max_duration.",
    )

    @property
    def max_budget_window_seconds(self) -> int:
        """``max_budget_window_days`` in seconds."""
        return self.max_budget_window_days * 86_400


class AlertSettings(BaseModel):
    """Budget threshold and burn-rate alerts."""

    model_config = {"extra": "forbid"}

    check_interval_seconds: float = Field(default=1.0, gt=0)
    burn_rate: bool = True
    burn_rate_min_elapsed: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Fraction of the window that must pass before burn alerts.",
    )


class UsageSettings(ServiceSettings):
    """Everything usage-tracker reads from its configuration layers."""

    default_schema: ClassVar[str] = "usage_tracker"
    port: int = Field(default=50061, ge=0, le=65535)
    metrics_port: int = Field(default=9465, ge=-1, le=65535)
    migrate_on_start: bool = True
    session_idle_seconds: float = Field(default=1800.0, gt=0)
    pricing: PricingSettings = PricingSettings()
    ingest: IngestSettings = IngestSettings()
    retention: RetentionSettings = RetentionSettings()
    admission: AdmissionSettings = AdmissionSettings()
    alerts: AlertSettings = AlertSettings()
    limits: LimitsSettings = LimitsSettings()
