"""LiteLLM's cost map as prices: dollars per token to whole micro-dollars per million tokens."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from lodestar.common.errors import ConfigurationError
from lodestar_usage.cost_map import cost_map_file, micros_per_mtok, prices_from_cost_map

DAY = date(2026, 12, 1)


@pytest.mark.parametrize(
    ("per_token", "per_mtok"),
    [
        (2.5e-06, 2_500_000),
        (1e-05, 10_000_000),
        (3.75e-08, 37_500),
        (0, 0),
        (1.5e-13, 0),
        (5e-13, 1),
        ("0.000003", 3_000_000),
    ],
)
def test_dollars_per_token_become_exact_micro_dollars_per_million(per_token, per_mtok):
    assert micros_per_mtok(per_token) == per_mtok


def test_every_token_kind_is_taken_and_other_models_are_skipped_with_the_reason():
    found = prices_from_cost_map(
        {
            "sample_spec": "documentation, not a model",
            "gpt-x": {
                "mode": "chat",
                "input_cost_per_token": 2.5e-06,
                "output_cost_per_token": 1e-05,
                "cache_read_input_token_cost": 1.25e-06,
                "cache_creation_input_token_cost": 3.125e-06,
                "output_cost_per_reasoning_token": 2e-05,
                "input_cost_per_token_above_200k_tokens": 5e-06,
            },
            "embed-y": {"mode": "embedding", "input_cost_per_token": 2e-08},
            "image-z": {"mode": "image_generation", "output_cost_per_image": 0.04},
            "bad name with spaces": {"mode": "chat", "input_cost_per_token": 1e-06},
            "glob/*": {"mode": "chat", "input_cost_per_token": 1e-06},
            "dear": {"mode": "chat", "input_cost_per_token": 0.01, "output_cost_per_token": 0},
        },
        DAY,
    )
    by_model = {p.model_pattern: p for p in found.prices}
    assert set(by_model) == {"gpt-x", "embed-y"}
    gpt = by_model["gpt-x"]
    assert gpt.valid_from == "2026-12-01"
    assert (gpt.input_micros_per_mtok, gpt.output_micros_per_mtok) == (2_500_000, 10_000_000)
    assert gpt.cached_read_micros_per_mtok == 1_250_000
    assert gpt.cache_write_micros_per_mtok == 3_125_000
    assert gpt.reasoning_micros_per_mtok == 20_000_000
    embed = by_model["embed-y"]
    assert (embed.input_micros_per_mtok, embed.output_micros_per_mtok) == (20_000, 0)
    assert not embed.HasField("cached_read_micros_per_mtok")  # falls back to the input price
    assert found.tiered == 1
    assert found.skipped == {
        "not a model entry": 1,
        "priced per image_generation call, not per token": 1,
        "a name that is not a plain model pattern": 2,
        "a price beyond $1,000 per million tokens": 1,
    }


def test_a_file_that_is_not_a_cost_map_says_so(tmp_path: Path):
    path = tmp_path / "prices.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigurationError, match="not a cost map"):
        cost_map_file(path)
    with pytest.raises(ConfigurationError, match="cannot read"):
        cost_map_file(tmp_path / "absent.json")
