"""Reservations: what Reserve, Commit and Release accept, answer and refuse; lease expiry.

The decisions themselves are made in rounds by :mod:`lodestar_usage.admission`.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

import asyncpg

from lodestar.common.errors import InvalidArgumentError
from lodestar.usage.v1 import usage_pb2
from lodestar_usage import bounds, metrics
from lodestar_usage.budgets import BudgetDef, Usage
from lodestar_usage.counters import Key, add_to_counters, again_after_deadlock
from lodestar_usage.errors import (
    ReservationCommittedError,
    ReservationNotFoundError,
    ReservationNotYoursError,
    ReservationReleasedError,
)

T = TypeVar("T")


@dataclass
class Admission:
    """The outcome of Reserve."""

    granted: bool
    reservation_id: str = ""
    lease_expires_at: datetime | None = None
    denial: usage_pb2.Denial | None = None
    budget_ids: list[str] = field(default_factory=list)


def validate_reserve(request: usage_pb2.ReserveRequest) -> None:
    """INVALID_ARGUMENT naming the first field of ``request`` out of bounds.

    The lease's maximum is a setting: the API checks it.
    """
    bounds.integer(
        request.estimated_cost_micros, "estimated_cost_micros", 0, bounds.MAX_COST_MICROS
    )
    bounds.integer(request.estimated_tokens, "estimated_tokens", 0, bounds.MAX_TOKENS)
    if request.lease.seconds < 0 or request.lease.nanos < 0:
        raise InvalidArgumentError("must not be negative", field="lease")
    for fname in ("project", "user", "session_id", "model"):
        bounds.text(getattr(request, fname), fname)


def denial_for(budget: BudgetDef, reason: str, usage: Usage | None) -> usage_pb2.Denial:
    """Why ``budget`` refuses a Reserve: ``reason``, its limits and what remains of them.

    With when its window resets, except for rolling windows and session limits (``usage`` None).
    """
    denial = usage_pb2.Denial(
        budget_id=str(budget.id),
        budget_name=budget.name,
        reason=reason,
        limit_micros=budget.limit_micros or 0,
        limit_tokens=budget.limit_tokens or 0,
        remaining_micros=max(usage.remaining(budget.limit_micros, "micros"), 0) if usage else 0,
        remaining_tokens=max(usage.remaining(budget.limit_tokens, "tokens"), 0) if usage else 0,
    )
    if usage is not None and budget.period != usage_pb2.BUDGET_PERIOD_ROLLING:
        denial.resets_at.FromDatetime(usage.end)
    return denial


def reservation_key(value: str) -> uuid.UUID:
    """The reservation id in ``value``; INVALID_ARGUMENT naming ``reservation_id`` otherwise."""
    if not value:
        raise InvalidArgumentError("required: the id Reserve returned", field="reservation_id")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgumentError(
            f"{value[:64]!r} is not a reservation id; pass the id Reserve returned (a UUID)",
            field="reservation_id",
        ) from None


@again_after_deadlock
async def _retrying(pool: asyncpg.Pool, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run ``work`` in a transaction, again after a (rare) deadlock."""
    async with pool.acquire() as conn, conn.transaction():
        return await work(conn)


def validate_commit(request: usage_pb2.CommitRequest) -> uuid.UUID:
    """The reservation id of ``request``; INVALID_ARGUMENT names a field out of bounds."""
    key = reservation_key(request.reservation_id)
    bounds.integer(request.actual_cost_micros, "actual_cost_micros", 0, bounds.MAX_COST_MICROS)
    bounds.integer(request.actual_tokens, "actual_tokens", 0, bounds.MAX_TOKENS)
    return key


@dataclass(frozen=True)
class Finished:
    """A reservation as a Commit or Release found it.

    Its state, and its amounts: the hold, or what was committed.
    """

    state: str
    micros: int = 0
    tokens: int = 0
    #: Active, but its lease had run out (not yet marked expired).
    lapsed: bool = False

    @property
    def lease_ran_out(self) -> bool:
        """Whether the hold had stopped counting before this call."""
        return self.state == "expired" or (self.state == "active" and self.lapsed)


#: States of a reservation whose Commit has happened (settled: the ledger has its usage).
COMMITTED = ("committed", "settled")


def check_commit(
    request: usage_pb2.CommitRequest, key: uuid.UUID, owner: str | None, found: Finished
) -> usage_pb2.CommitResponse:
    """The answer to a Commit that found the reservation ``found``.

    Refuses a missing reservation, another principal's, a released one, and other amounts for
    one already committed (a commit is final); a repeat with the same amounts is answered.
    """
    _refuse_missing_or_foreign(found.state, key, owner)
    if found.state == "released":
        raise ReservationReleasedError(
            "the reservation was released; reserve again", field="reservation_id"
        )
    asked = (request.actual_cost_micros, request.actual_tokens)
    if found.state in COMMITTED and (found.micros, found.tokens) != asked:
        raise ReservationCommittedError(
            f"reservation {key} was committed with {found.micros} micro-dollars and "
            f"{found.tokens} tokens; a commit is final, so {asked[0]} and {asked[1]} were not "
            "recorded",
            field="reservation_id",
        )
    if found.state in COMMITTED:
        metrics.COMMITS.labels("repeated").inc()
        return usage_pb2.CommitResponse(committed=True, repeated=True)
    over = (max(asked[0] - found.micros, 0), max(asked[1] - found.tokens, 0))
    if any(over):
        metrics.OVER_ESTIMATE.inc()
    metrics.COMMITS.labels("after_lease_expiry" if found.lease_ran_out else "committed").inc()
    return usage_pb2.CommitResponse(
        committed=True,
        lease_expired=found.lease_ran_out,
        over_estimate_micros=over[0],
        over_estimate_tokens=over[1],
    )


def check_release_state(state: str, key: uuid.UUID, owner: str | None) -> bool:
    """Whether a Release of a reservation in ``state`` gave a hold back.

    Refuses a missing reservation or another principal's.
    """
    _refuse_missing_or_foreign(state, key, owner)
    return state in ("active", "expired")


def _refuse_missing_or_foreign(state: str, key: uuid.UUID, owner: str | None) -> None:
    if state == "missing":
        raise ReservationNotFoundError(f"no reservation {key}", field="reservation_id")
    if state == "foreign":
        raise ReservationNotYoursError(
            f"reservation {key} was made by another principal; only it (or an admin) may commit "
            f"or release it, not {owner}",
            field="reservation_id",
        )


async def expire_reservations(pool: asyncpg.Pool) -> int:
    """Mark holds whose lease ran out as expired (they already stopped counting)."""

    async def work(conn: asyncpg.Connection) -> int:
        recs = await conn.fetch(
            "WITH e AS (UPDATE reservations SET state = 'expired', finished_at = now() "
            "WHERE state = 'active' AND lease_expires_at <= now() "
            "RETURNING id, amount_micros, amount_tokens) "
            "SELECT e.id, e.amount_micros, e.amount_tokens, rb.budget_id, rb.scope_value, "
            "rb.window_start FROM e LEFT JOIN reservation_budgets rb "
            "ON rb.reservation_id = e.id AND rb.window_start IS NOT NULL"
        )
        deltas: dict[Key, list[int]] = {}
        for r in recs:
            if r["budget_id"] is not None:
                acc = deltas.setdefault(
                    (r["budget_id"], r["scope_value"], r["window_start"]), [0] * 4
                )
                acc[2] -= r["amount_micros"]
                acc[3] -= r["amount_tokens"]
        await add_to_counters(conn, deltas)
        return len({r["id"] for r in recs})

    return await _retrying(pool, work)


#: Deletes the oldest finished reservations past their keep time (their budget rows cascade).
PRUNE_FINISHED = (
    "DELETE FROM reservations WHERE id IN (SELECT id FROM reservations "
    "WHERE state IN ('settled', 'released', 'expired') AND finished_at < now() - $1::interval "
    "ORDER BY finished_at LIMIT $2)"
)


async def prune_finished(pool: asyncpg.Pool, keep: timedelta, batch: int = 5000) -> int:
    """Delete up to ``batch`` reservations finished more than ``keep`` ago; how many."""
    status: str = await pool.execute(PRUNE_FINISHED, keep, batch)
    return int(status.rsplit(" ", 1)[-1])
