"""Budget alerts: threshold and burn-rate crossings, recorded once and published by id."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from lodestar.usage.v1 import events_pb2
from lodestar_usage.budgets import SCOPE_NAMES, BudgetDef, Usage
from lodestar_usage.counters import usage_of
from lodestar_usage.reports import (
    stamp,
)


def alert_event_id(
    budget_id: uuid.UUID,
    value: str,
    window_start: datetime,
    kind: int,
    threshold: int,
    detected_at: datetime,
) -> str:
    """A UUIDv7 of the moment the crossing was detected plus a hash of the alert's key.

    The id is stored with the crossing, so every retry publishes the same id (core drops repeats);
    its time is the detection time, which core's event-time bounds accept (a window start can be
    weeks old).
    """
    key = f"{budget_id}|{value}|{window_start.isoformat()}|{kind}|{threshold}".encode()
    digest = int.from_bytes(hashlib.sha256(key).digest()[:10], "big")
    millis = int(detected_at.timestamp() * 1000) & ((1 << 48) - 1)
    rand_a = digest >> 68 & 0xFFF
    rand_b = digest & ((1 << 62) - 1)
    return str(uuid.UUID(int=(millis << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b))


@dataclass
class Crossing:
    """An alert to record."""

    budget: BudgetDef
    value: str
    kind: int
    threshold: int
    payload: events_pb2.BudgetThresholdCrossed


async def detect_crossings(
    conn: asyncpg.Connection | asyncpg.Pool,
    budget: BudgetDef,
    now: datetime,
    *,
    burn_rate: bool,
    min_elapsed: float,
    usage: Usage | None = None,
) -> list[Crossing]:
    """The thresholds (and the burn rate) ``budget`` has crossed in its current window.

    ``usage``: what the budget has used for its own scope value, when the caller has read it.
    """
    if budget.limit_micros is None and budget.limit_tokens is None:
        return []
    wstart, wend = budget.alert_window(now)
    values = [budget.scope_value]
    if budget.per_session:
        values = [
            r["session_id"]
            for r in await conn.fetch(
                "SELECT DISTINCT session_id FROM rollup_session_hourly "
                "WHERE hour >= $1 AND session_id <> '' LIMIT 1000",
                wstart - timedelta(hours=1),
            )
        ]
    out = []
    known = usage
    for value in values:
        read = known if known is not None and value == budget.scope_value else None
        spent = read if read is not None else await usage_of(conn, budget, value, now)
        usage = dataclasses.replace(spent, reserved_micros=0, reserved_tokens=0)

        def payload(
            kind: int, threshold: int, projected: int = 0, value: str = value, usage: Usage = usage
        ) -> events_pb2.BudgetThresholdCrossed:
            return events_pb2.BudgetThresholdCrossed(
                budget_id=str(budget.id),
                budget_name=budget.name,
                scope=SCOPE_NAMES[budget.scope],  # type: ignore[index]
                scope_value=value,
                window_start=stamp(wstart),
                window_end=stamp(wend),
                kind=kind,  # type: ignore[arg-type]
                threshold_pct=threshold,
                limit_micros=budget.limit_micros or 0,
                spent_micros=usage.spent_micros,
                limit_tokens=budget.limit_tokens or 0,
                spent_tokens=usage.spent_tokens,
                projected_micros=projected,
            )

        for threshold in budget.thresholds:
            hit = (
                budget.limit_micros is not None
                and usage.spent_micros * 100 >= threshold * budget.limit_micros
            ) or (
                budget.limit_tokens is not None
                and usage.spent_tokens * 100 >= threshold * budget.limit_tokens
            )
            if hit:
                out.append(
                    Crossing(
                        budget,
                        value,
                        events_pb2.ALERT_KIND_THRESHOLD,
                        threshold,
                        payload(events_pb2.ALERT_KIND_THRESHOLD, threshold),
                    )
                )
        if burn_rate and budget.limit_micros and 0 < usage.spent_micros < budget.limit_micros:
            elapsed = (now - wstart) / (wend - wstart)
            if elapsed >= min_elapsed and elapsed > 0:
                projected = int(usage.spent_micros / elapsed)
                if projected > budget.limit_micros:
                    out.append(
                        Crossing(
                            budget,
                            value,
                            events_pb2.ALERT_KIND_BURN_RATE,
                            0,
                            payload(events_pb2.ALERT_KIND_BURN_RATE, 0, projected),
                        )
                    )
    return out


async def record_crossings(
    conn: asyncpg.Connection | asyncpg.Pool, crossings: list[Crossing]
) -> int:
    """Insert crossings once per key; returns how many were new."""
    new = 0
    detected_at = datetime.now(UTC)
    for c in crossings:
        wstart = c.payload.window_start.ToDatetime(tzinfo=UTC)
        event_id = alert_event_id(c.budget.id, c.value, wstart, c.kind, c.threshold, detected_at)
        inserted = await conn.fetchval(
            "INSERT INTO budget_crossings (budget_id, scope_value, window_start, kind, "
            "threshold_pct, event_id, payload) VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT DO NOTHING RETURNING 1",
            c.budget.id,
            c.value,
            wstart,
            c.kind,
            c.threshold,
            uuid.UUID(event_id),
            c.payload.SerializeToString(),
        )
        new += int(inserted is not None)
    return new
