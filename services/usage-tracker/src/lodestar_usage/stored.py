"""Budgets read defensively: a bad stored budget is named and left out, never fails a read.

Rows reach the database by other ways than the API (an older build, a restore, a hand edit), so a
read checks what it needs before it computes with it.
"""

# SQL here is assembled from constant identifiers only; every value is a bind parameter.
# ruff: noqa: S608

from __future__ import annotations

import asyncpg

from lodestar.common.errors import InvalidArgumentError
from lodestar.usage.v1 import usage_pb2
from lodestar_usage import bounds
from lodestar_usage.budgets import CALENDAR_UNIT, SCOPE_NAMES, BudgetDef
from lodestar_usage.reports import sane_time, skipped, zone

MAX_WINDOW_SECONDS = bounds.MAX_BUDGET_WINDOW_DAYS * 86_400
BUDGET_SELECT = (
    "SELECT id, name, scope, scope_value, period, timezone, rolling_seconds, limit_micros, "
    "limit_tokens, thresholds_pct, session_max_duration_seconds, session_max_tokens, "
    f"session_max_cost_micros, {sane_time('created_at')}, {sane_time('updated_at')} "
    "FROM budgets ORDER BY name, id"
)


def _range_problem(name: str, value: int | None, low: int, high: int) -> str:
    if value is not None and not low <= value <= high:
        return f"{name} {value} is outside {low}..{high}"
    return ""


def budget_problem(budget: BudgetDef) -> str:
    """Why a stored budget cannot be evaluated or shown (a bad stored row), or ""."""
    if budget.scope not in SCOPE_NAMES:
        return f"scope {budget.scope} is not a BudgetScope"
    rolling = budget.period == usage_pb2.BUDGET_PERIOD_ROLLING
    if budget.period not in CALENDAR_UNIT and not rolling:
        return f"period {budget.period} is not a BudgetPeriod"
    if len(budget.name) > bounds.MAX_NAME or len(budget.scope_value) > bounds.MAX_TEXT:
        return "name or scope_value is too long"
    try:
        zone(budget.timezone, "timezone")
    except InvalidArgumentError:
        return f"timezone {budget.timezone[:64]!r} is not an IANA timezone"
    checks = [
        ("rolling_seconds", budget.rolling_seconds, 1 if rolling else 0, MAX_WINDOW_SECONDS),
        ("limit_micros", budget.limit_micros, 1, bounds.MAX_LIMIT),
        ("limit_tokens", budget.limit_tokens, 1, bounds.MAX_LIMIT),
        (
            "session_max_duration_seconds",
            budget.session_max_duration_seconds,
            0,
            MAX_WINDOW_SECONDS,
        ),
        ("session_max_tokens", budget.session_max_tokens, 0, bounds.MAX_LIMIT),
        ("session_max_cost_micros", budget.session_max_cost_micros, 0, bounds.MAX_LIMIT),
        *(("thresholds_pct", t, 1, bounds.MAX_THRESHOLD_PCT) for t in budget.thresholds),
    ]
    for name, value, low, high in checks:
        problem = _range_problem(name, value, low, high)
        if problem:
            return problem
    return ""


async def read_budgets(
    conn: asyncpg.Connection | asyncpg.Pool,
) -> tuple[list[BudgetDef], list[usage_pb2.SkippedRecord]]:
    """Every stored budget that can be evaluated, and the bad ones, named and left out."""
    good, bad = [], []
    for rec in await conn.fetch(BUDGET_SELECT):
        budget = BudgetDef.from_record(rec)
        problem = budget_problem(budget)
        if problem:
            bad.append(skipped("budget", str(budget.id), problem, "list_budgets"))
        else:
            good.append(budget)
    return good, bad
