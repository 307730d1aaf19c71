"""Per-principal rate limits: a token bucket for every authenticated principal.

A bucket holds up to ``burst`` calls and refills at ``rate_per_second``; a call takes one. Limits
are set per role and may be overridden per principal name (``rate_limits.principals``); ``null``
means unlimited. The defaults are far above what normal use needs and only stop a runaway client:

==========  ==================  ======
role        calls per second    burst
==========  ==================  ======
publisher   10,000              20,000
module      5,000               10,000
admin       2,000               10,000
==========  ==================  ======

A call counts once when it starts, whatever its kind (a stream counts once, not per message).
Buckets live in each server process: with several replicas, each applies the limit on its own.
Health and reflection are never limited (they are not authenticated either).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lodestar.common.auth import Principal, Role
from lodestar.common.errors import ResourceExhaustedError

RATE_LIMITED = Counter(
    "lodestar_rate_limited_total",
    "Calls refused because their principal exceeded its rate limit.",
    ["principal", "role"],
)


class TokenBucketLimit(BaseModel):
    """A token bucket: ``burst`` calls at once, refilled at ``rate_per_second``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_per_second: float = Field(gt=0, le=1e9, description="Sustained calls per second.")
    burst: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000_000,
        description="Calls allowed at once; default: one second's worth (at least 1).",
    )

    @property
    def capacity(self) -> float:
        """The most calls the bucket holds."""
        return float(
            self.burst if self.burst is not None else max(1, math.ceil(self.rate_per_second))
        )

    def describe(self) -> str:
        """The limit in words, for refusal messages."""
        return f"{self.rate_per_second:g} calls per second with bursts of {self.capacity:g}"


class RoleRateLimits(BaseModel):
    """The limit of every principal of a role (``null``: unlimited)."""

    model_config = ConfigDict(extra="forbid")

    admin: TokenBucketLimit | None = TokenBucketLimit(rate_per_second=2_000, burst=10_000)
    module: TokenBucketLimit | None = TokenBucketLimit(rate_per_second=5_000, burst=10_000)
    publisher: TokenBucketLimit | None = TokenBucketLimit(rate_per_second=10_000, burst=20_000)


class RateLimitSettings(BaseModel):
    """Per-principal rate limits (``rate_limits`` in the settings)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="False turns every limit off.")
    roles: RoleRateLimits = Field(default_factory=RoleRateLimits)
    principals: dict[str, TokenBucketLimit | None] = Field(
        default_factory=dict,
        description="Limits by principal name; they win over the role's (null: unlimited).",
    )

    @field_validator("principals")
    @classmethod
    def _named(
        cls, value: dict[str, TokenBucketLimit | None]
    ) -> dict[str, TokenBucketLimit | None]:
        if any(not name.strip() for name in value):
            raise ValueError("principal names must not be empty")
        return value

    def limit_for(self, principal: Principal) -> TokenBucketLimit | None:
        """The limit that applies to ``principal``, or None when it is unlimited."""
        if not self.enabled:
            return None
        if principal.name in self.principals:
            return self.principals[principal.name]
        limit: TokenBucketLimit | None = getattr(self.roles, principal.role.value)
        return limit


class _Bucket:
    """The state of one principal's bucket."""

    __slots__ = ("capacity", "limit", "rate", "role", "tokens", "updated")

    def __init__(self, limit: TokenBucketLimit | None, role: Role, now: float) -> None:
        self.limit = limit
        self.role = role
        self.capacity = limit.capacity if limit is not None else math.inf
        self.rate = limit.rate_per_second if limit is not None else math.inf
        self.tokens = self.capacity
        self.updated = now


class RateLimiter:
    """Decides whether a principal may make one more call now."""

    def __init__(
        self, settings: RateLimitSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def wait_seconds(
        self, principal: Principal, calls: int = 1, *, request_calls: int | None = None
    ) -> float:
        """0 if ``principal`` may make ``calls`` calls now (they are counted), else the wait.

        The wait is ``math.inf`` when the request's calls (``request_calls``, default ``calls``)
        exceed the principal's burst: they can never be admitted.
        """
        now = self._clock()
        bucket = self._buckets.get(principal.name)
        if bucket is None or bucket.role is not principal.role:
            bucket = _Bucket(self.settings.limit_for(principal), principal.role, now)
            self._buckets[principal.name] = bucket
        if bucket.limit is None:
            return 0.0
        tokens = min(bucket.capacity, bucket.tokens + (now - bucket.updated) * bucket.rate)
        bucket.updated = now
        if tokens >= calls:
            bucket.tokens = tokens - calls
            return 0.0
        bucket.tokens = tokens
        if (request_calls or calls) > bucket.capacity:
            return math.inf
        return (calls - tokens) / bucket.rate

    def refusal(
        self, principal: Principal, calls: int = 1, *, request_calls: int | None = None
    ) -> ResourceExhaustedError | None:
        """None if ``principal`` may make ``calls`` calls now, else the error to answer with.

        A refusal is counted in ``lodestar_rate_limited_total``.
        """
        wait = self.wait_seconds(principal, calls, request_calls=request_calls)
        if wait == 0.0:
            return None
        limit = self._buckets[principal.name].limit
        assert limit is not None
        RATE_LIMITED.labels(principal.name, principal.role.value).inc()
        if math.isinf(wait):
            return ResourceExhaustedError(
                f"rate limit: {principal.name} ({principal.role.value}) may make "
                f"{limit.describe()}; one request of {request_calls or calls} calls can never "
                "fit: send fewer calls per request or raise the burst"
            )
        return ResourceExhaustedError(
            f"rate limit: {principal.name} ({principal.role.value}) may make {limit.describe()}; "
            f"retry in {wait:.3f} s",
            retry_after=wait,
        )
