"""What each budget has used: running counters, and the ledger for budgets without one.

Reading the usage is O(1): calendar budgets keep a running counter per scope value and window
(``budget_counters``: spent and held micro-dollars and tokens), changed in the same transaction
as the ledger rows (ingest), and as each hold (Reserve, Commit, Release, expiry, settlement).
A missing counter (a new window, session or budget) is initialised from the ledger and the holds
under an exclusive advisory lock that ingest takes shared, so no ledger row is counted twice or
missed. Rolling budgets have no fixed window to count in and add up the ledger.
"""

# SQL here is assembled from constant identifiers only; every value is a bind parameter.
# ruff: noqa: S608

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

import asyncpg
from asyncpg.exceptions import DeadlockDetectedError
from tenacity import retry, retry_if_exception_type, stop_after_attempt

from lodestar_usage import bounds
from lodestar_usage.budgets import BUDGET_ROWS, TOKEN_SUMS, BudgetDef, Usage, usable_budgets
from lodestar_usage.reports import (
    summarize,
)

#: The advisory lock between counter initialisation (exclusive) and ledger ingest (shared).
COUNTER_LOCK = 0x75736167  # "usag"
DEADLOCK_ATTEMPTS = 5
#: A deadlock (a rare lock-order clash with ingest) aborts only that attempt: it is decided again.
again_after_deadlock = retry(
    retry=retry_if_exception_type(DeadlockDetectedError),
    stop=stop_after_attempt(DEADLOCK_ATTEMPTS),
    reraise=True,
)

Key = tuple[uuid.UUID, str, datetime]

HELD_IN_WINDOW = (
    "SELECT coalesce(sum(r.amount_micros), 0)::bigint, coalesce(sum(r.amount_tokens), 0)::bigint "
    "FROM reservation_budgets rb JOIN reservations r ON r.id = rb.reservation_id "
    "WHERE rb.budget_id = $1 AND rb.scope_value = $2 AND rb.window_start = $3 "
    "AND r.state IN ('active', 'committed')"
)


def _add_to_counters(add: Callable[[str, str], str]) -> str:
    """Adds (spent, held) deltas to counters, locking them in key order (every writer's)."""
    sets = ", ".join(
        f"{column} = {add(f'c.{column}', f'd.{delta}')}"
        for column, delta in (
            ("spent_micros", "sm"),
            ("spent_tokens", "st"),
            ("held_micros", "hm"),
            ("held_tokens", "ht"),
        )
    )
    return (
        f"UPDATE budget_counters c SET {sets} "
        "FROM (SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::bigint[], "
        "$5::bigint[], $6::bigint[], $7::bigint[]) AS u(b, v, w, sm, st, hm, ht) "
        "ORDER BY b, v, w) d "
        "WHERE c.budget_id = d.b AND c.scope_value = d.v AND c.window_start = d.w"
    )


ADD_TO_COUNTERS = _add_to_counters(bounds.plain_add)
#: The same with sums that stay at ±(2^63 - 1): for a batch ingest writes again after a stored
#: counter (a bad row) would overflow.
ADD_TO_COUNTERS_SATURATING = _add_to_counters(bounds.saturating_add)


def in_lock_order(keys: Iterable[Key]) -> list[Key]:
    """Counter keys in the order every writer locks them."""
    return sorted(keys, key=lambda k: (k[0].bytes, k[1], k[2]))


async def add_to_counters(
    conn: asyncpg.Connection, deltas: dict[Key, list[int]], *, saturate: bool = False
) -> None:
    """Add ``[spent_micros, spent_tokens, held_micros, held_tokens]`` per counter key."""
    deltas = {k: d for k, d in deltas.items() if any(d)}
    if not deltas:
        return
    keys = in_lock_order(deltas)
    await conn.execute(
        ADD_TO_COUNTERS_SATURATING if saturate else ADD_TO_COUNTERS,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        *([deltas[k][i] for k in keys] for i in range(4)),
    )


async def init_counters(
    conn: asyncpg.Connection, missing: list[tuple[BudgetDef, str, datetime, datetime]]
) -> None:
    """Create counters from the ledger and the holds, with ingest held off meanwhile."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", COUNTER_LOCK)
    for budget, value, start, end in missing:
        rows = await summarize(conn, start, end, [], budget.filters(value))
        spent_micros = spent_tokens = 0
        if rows:
            sums = rows[0].sums
            spent_micros = sums["cost_micros"]
            spent_tokens = sum(sums[k] for k in TOKEN_SUMS)
        held = await conn.fetchrow(HELD_IN_WINDOW, budget.id, value, start)
        assert held is not None
        await conn.execute(
            "INSERT INTO budget_counters (budget_id, scope_value, window_start, spent_micros, "
            "spent_tokens, held_micros, held_tokens) VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT DO NOTHING",
            budget.id,
            value,
            start,
            spent_micros,
            spent_tokens,
            int(held[0]),
            int(held[1]),
        )


HELD = (
    "SELECT coalesce(sum(r.amount_micros), 0)::bigint, coalesce(sum(r.amount_tokens), 0)::bigint "
    "FROM reservation_budgets rb JOIN reservations r ON r.id = rb.reservation_id "
    "WHERE rb.budget_id = $1 AND rb.scope_value = $2 "
    "AND ((r.state = 'active' AND r.lease_expires_at > now()) "
    "OR (r.state = 'committed' AND r.created_at >= $3))"
)


#: Calendar budgets' counters, one per (budget, value, window) of the arrays, with the holds
#: whose lease ran out (``lapsed_holds``, migration 0012) left out; each row numbered by its
#: place in the arrays.
COUNTED_USAGES = (
    "WITH lapsed AS MATERIALIZED (SELECT * FROM lapsed_holds()) "
    "SELECT k.i, c.spent_micros, c.spent_tokens, c.held_micros - coalesce(x.micros, 0), "
    "c.held_tokens - coalesce(x.tokens, 0) "
    "FROM unnest($1::uuid[], $2::text[], $3::timestamptz[]) WITH ORDINALITY AS k(b, v, w, i) "
    "JOIN budget_counters c "
    "ON c.budget_id = k.b AND c.scope_value = k.v AND c.window_start = k.w "
    "LEFT JOIN lapsed x ON x.budget_id = c.budget_id AND x.scope_value = c.scope_value "
    "AND x.window_start = c.window_start"
)


async def usage_of(
    conn: asyncpg.Connection | asyncpg.Pool, budget: BudgetDef, value: str, now: datetime
) -> Usage:
    """What ``budget`` has spent and holds for ``value`` in its current window.

    A calendar budget's counter answers in one row; without one (no limit, rolling, or not yet
    created) the ledger and the holds are added up.
    """
    return (await usages_of(conn, [(budget, value)], now))[0]


async def usages_of(
    conn: asyncpg.Connection | asyncpg.Pool, wanted: list[tuple[BudgetDef, str]], now: datetime
) -> list[Usage]:
    """``usage_of`` for each (budget, value) of ``wanted``, the counters read in one query."""
    windows = [budget.window(now) for budget, _ in wanted]
    counted = [i for i, (budget, _) in enumerate(wanted) if budget.counted]
    rows = []
    if counted:
        rows = await conn.fetch(
            COUNTED_USAGES,
            [wanted[i][0].id for i in counted],
            [wanted[i][1] for i in counted],
            [windows[i][0] for i in counted],
        )
    found = {counted[row[0] - 1]: row for row in rows}
    usages = []
    for i, (budget, value) in enumerate(wanted):
        row = found.get(i)
        if row is None:
            usages.append(await usage_from_ledger(conn, budget, value, now))
        else:
            usages.append(Usage(*windows[i], row[1], row[2], int(row[3]), int(row[4])))
    return usages


async def usage_from_ledger(
    conn: asyncpg.Connection | asyncpg.Pool, budget: BudgetDef, value: str, now: datetime
) -> Usage:
    """What ``budget`` has spent (the ledger) and holds (the reservations) for ``value``."""
    start, end = budget.window(now)
    usage = Usage(start, end)
    spent_end = max(end, now + timedelta(seconds=1))
    rows = await summarize(conn, start, spent_end, [], budget.filters(value))
    if rows:
        sums = rows[0].sums
        usage.spent_micros = sums["cost_micros"]
        usage.spent_tokens = sum(
            sums[k]
            for k in (
                "input_tokens",
                "output_tokens",
                "cached_read_tokens",
                "cache_write_tokens",
                "reasoning_tokens",
            )
        )
    held = await conn.fetchrow(HELD, budget.id, value, start)
    assert held is not None
    usage.reserved_micros, usage.reserved_tokens = int(held[0]), int(held[1])
    return usage


async def ingest_budgets(conn: asyncpg.Connection) -> list[BudgetDef]:
    """The counted budgets, with ingest's (shared) side of the counter lock taken."""
    await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", COUNTER_LOCK)
    return [b for b in usable_budgets(await conn.fetch(f"{BUDGET_ROWS} FROM budgets")) if b.counted]
