"""The budget hook's estimate equals LiteLLM's own price of the same tokens, rounded up."""

from __future__ import annotations

import os
from decimal import ROUND_CEILING

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network
litellm = pytest.importorskip("litellm")

from lodestar_usage.cost_map import scaled  # noqa: E402
from lodestar_usage.litellm_callback import estimate_with_litellm, price_tiers  # noqa: E402

SHORT = [{"role": "user", "content": "What is the capital of France?"}]
#: Over 200k tokens: the second price tier of models priced by prompt length.
LONG = [{"role": "user", "content": "word " * 250_000}]


@pytest.mark.parametrize(
    ("model", "messages"),
    [
        ("openai/gpt-4o-mini", SHORT),
        ("anthropic/claude-haiku-4-5", SHORT),
        ("gemini/gemini-2.5-pro", SHORT),
        ("gemini/gemini-2.5-pro", LONG),
        ("mistral/mistral-small-latest", SHORT),
    ],
)
def test_the_estimate_is_litellms_price_rounded_up(
    model: str, messages: list[dict[str, str]]
) -> None:
    prompt = litellm.token_counter(model=model, messages=messages)
    input_usd, output_usd = litellm.cost_per_token(
        model=model, prompt_tokens=prompt, completion_tokens=400
    )
    expected = scaled(input_usd + output_usd, 1_000_000, ROUND_CEILING)
    micros, tokens = estimate_with_litellm(
        {"model": model, "messages": messages, "max_tokens": 400}
    )
    assert tokens == prompt + 400
    assert abs(micros - expected) <= 1  # LiteLLM adds floats; the estimate adds exact decimals
    assert micros > 0


def test_a_model_litellm_cannot_price_is_estimated_in_tokens_only() -> None:
    assert price_tiers("nobody/unknown-model") == ()
    assert estimate_with_litellm({"model": "nobody/unknown-model", "messages": SHORT}) == (
        0,
        1024 + 14,
    )
