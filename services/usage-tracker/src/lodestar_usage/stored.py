"""Budgets read defensively: a bad stored budget is named and left out, never fails a read.

Rows reach the database by other ways than the API (an older build, a restore, a hand edit), so a
read checks what it needs before it computes with it.
"""

from __future__ import annotations

import asyncpg

from lodestar.usage.v1 import usage_pb2
from lodestar_usage.budgets import BUDGET_ROWS, BudgetDef, budget_problem
from lodestar_usage.reports import skipped

BUDGET_SELECT = f"{BUDGET_ROWS} FROM budgets ORDER BY name, id"


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
