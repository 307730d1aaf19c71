"""A gateway's first admitted call does not pay for LiteLLM's first token count and lookup."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from typing import Any, cast

import pytest

from lodestar.common.sdk import Publisher
from lodestar_usage.client import BudgetGate

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network
gateway = importlib.import_module("lodestar_usage.litellm_callback")

NO_PUBLISHER = cast(Publisher, None)
A_GATE = cast(BudgetGate, object())


@pytest.fixture
def lookups() -> Iterator[Any]:
    """LiteLLM model lookups counted from an empty cache."""
    gateway.price_tiers.cache_clear()
    yield gateway.price_tiers.cache_info
    gateway.price_tiers.cache_clear()


def test_a_logger_with_a_gate_estimates_once_at_start_up(lookups: Any) -> None:
    gateway.LodestarLogger(NO_PUBLISHER, A_GATE)
    assert lookups().misses == 1

    call = {"model": gateway.WARM_MODEL, "messages": [{"role": "user", "content": "Paris?"}]}
    gateway.estimate_with_litellm(call)
    assert (lookups().hits, lookups().misses) == (1, 1)


@pytest.mark.parametrize(
    "options",
    [{}, {"gate": A_GATE, "estimate": lambda kwargs: (0, 1)}],
    ids=["without a gate", "with an estimate of its own"],
)
def test_a_logger_that_does_not_estimate_with_litellm_loads_nothing(
    lookups: Any, options: dict[str, Any]
) -> None:
    gateway.LodestarLogger(NO_PUBLISHER, **options)
    assert lookups().misses == 0
