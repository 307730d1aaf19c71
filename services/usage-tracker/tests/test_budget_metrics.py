"""Budget gauges: a series per budget id, gone with the budget, a used ratio for alerts."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from prometheus_client import REGISTRY

from lodestar_usage import metrics
from lodestar_usage.budgets import BudgetDef, Usage
from lodestar_usage.service import budget_reading

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def budget(name: str, *, micros: int | None = None, tokens: int | None = None) -> BudgetDef:
    return BudgetDef(
        id=uuid.uuid4(),
        name=name,
        scope=1,
        scope_value="",
        period=1,
        timezone="UTC",
        rolling_seconds=0,
        limit_micros=micros,
        limit_tokens=tokens,
        thresholds=[80],
    )


def sample(metric: str, definition: BudgetDef) -> float | None:
    labels = {"budget_id": str(definition.id), "budget": definition.name}
    return REGISTRY.get_sample_value(metric, labels)


def test_two_budgets_of_one_name_are_two_series_and_a_deleted_one_disappears() -> None:
    money = budget("team a", micros=10_000_000)
    tokens = budget("team a", tokens=1_000)
    used = Usage(NOW, NOW, spent_micros=2_500_000, reserved_micros=500_000, spent_tokens=1_500)
    metrics.export_budgets([budget_reading(money, used), budget_reading(tokens, used)])
    assert sample("lodestar_usage_budget_remaining_usd", money) == 7.0
    assert sample("lodestar_usage_budget_used_ratio", money) == 0.3
    assert sample("lodestar_usage_budget_remaining_usd", tokens) is None  # no money limit
    assert sample("lodestar_usage_budget_remaining_tokens", tokens) == -500  # overspent
    assert sample("lodestar_usage_budget_used_ratio", tokens) == 1.5

    metrics.export_budgets([budget_reading(money, used)])  # `tokens` was deleted
    assert sample("lodestar_usage_budget_used_ratio", tokens) is None
    assert sample("lodestar_usage_budget_remaining_tokens", tokens) is None
    assert sample("lodestar_usage_budget_used_ratio", money) == 0.3


def test_the_used_ratio_is_the_larger_of_money_and_tokens() -> None:
    both = budget("both", micros=1_000_000, tokens=100)
    used = Usage(NOW, NOW, spent_micros=250_000, spent_tokens=90)
    assert budget_reading(both, used).used_ratio == 0.9
    assert budget_reading(budget("zero", micros=0), used).used_ratio == 0.0
