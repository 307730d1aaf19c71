"""ImportPrices and LiteLLM's model cost map: imported prices cost a request exactly as LiteLLM's
own cost calculation does, for a sample of models across providers."""

from __future__ import annotations

import importlib
import json
import os
from datetime import date
from decimal import ROUND_HALF_UP, Decimal

import grpc
import pytest

from lodestar.common.auth import Role
from lodestar.common.sdk import connect
from lodestar.usage.v1 import events_pb2 as ev
from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug
from lodestar_usage.cost_map import TIERED, bundled_cost_map, prices_from_cost_map
from lodestar_usage.pricing import PriceTable, cost_request
from lodestar_usage.settings import PricingSettings

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network
litellm = importlib.import_module("litellm")

DAY = date(2026, 12, 1)
#: Models per provider in the sample (the first, by name, of each provider).
PROVIDERS = 12


def price(pattern: str, micros: int = 1_000_000) -> u.Price:
    return u.Price(
        model_pattern=pattern,
        valid_from="2026-12-01",
        input_micros_per_mtok=micros,
        output_micros_per_mtok=2 * micros,
    )


async def test_imported_prices_are_stored_with_their_source_and_audited_once(admin, tracker_db):
    stub = ug.UsageServiceStub(admin)
    await stub.SetPrice(u.SetPriceRequest(price=price("model-a", 5)))
    reply = await stub.ImportPrices(
        u.ImportPricesRequest(
            prices=[price("model-a", 5), price("model-b"), price("model-c", 7)], source="test map"
        )
    )
    assert (reply.added, reply.replaced, reply.unchanged) == (2, 0, 1)
    again = await stub.ImportPrices(
        u.ImportPricesRequest(prices=[price("model-b", 9)], source="test map v2")
    )
    assert (again.added, again.replaced, again.unchanged) == (0, 1, 0)
    listed = {p.model_pattern: p for p in (await stub.ListPrices(u.ListPricesRequest())).prices}
    assert {m: p.source for m, p in listed.items()} == {
        "model-a": "test map",
        "model-b": "test map v2",
        "model-c": "test map",
    }
    assert listed["model-b"].input_micros_per_mtok == 9
    entries = await tracker_db.fetch(
        "SELECT target, after FROM audit_log WHERE action = 'UsageService/ImportPrices' ORDER BY id"
    )
    assert [e["target"] for e in entries] == ["prices/test map", "prices/test map v2"]
    assert json.loads(entries[0]["after"]) == {"added": 2, "replaced": 0, "unchanged": 1}


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (u.ImportPricesRequest(prices=[price("m")]), "source"),
        (u.ImportPricesRequest(source="s"), "prices"),
        (
            u.ImportPricesRequest(prices=[price("m"), price("bad pattern")], source="s"),
            "prices[1].model_pattern",
        ),
        (u.ImportPricesRequest(prices=[price("m"), price("m")], source="s"), "prices[1]"),
        (
            u.ImportPricesRequest(prices=[price("m", -1)], source="s"),
            "prices[0].input_micros_per_mtok",
        ),
    ],
)
async def test_a_bad_import_names_the_field_and_stores_nothing(admin, tracker_db, request_, field):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ug.UsageServiceStub(admin).ImportPrices(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(f"{field}:")
    assert await tracker_db.fetchval("SELECT count(*) FROM prices") == 0


async def test_only_an_admin_imports_prices(tracker, tokens):
    async with connect(tracker.target, tokens[Role.MODULE]) as module:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ug.UsageServiceStub(module).ImportPrices(
                u.ImportPricesRequest(prices=[price("m")], source="s")
            )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


#: Providers the sample covers first; others fill it up to PROVIDERS.
KNOWN_PROVIDERS = (
    "openai",
    "anthropic",
    "azure",
    "bedrock",
    "gemini",
    "vertex_ai-language-models",
    "mistral",
    "deepseek",
    "groq",
    "xai",
    "cohere_chat",
    "together_ai",
)


def sample_models(cost_map: dict) -> list[str]:
    """One chat model with a plain token price (the first by name) per provider, PROVIDERS of them,
    the well-known providers first."""
    first: dict[str, str] = {}
    for model, entry in sorted(cost_map.items()):
        if not isinstance(entry, dict) or entry.get("mode") != "chat":
            continue
        provider = entry.get("litellm_provider")
        if not provider or provider in first or any(TIERED.search(k) for k in entry):
            continue
        if entry.get("input_cost_per_token") and entry.get("output_cost_per_token"):
            first[provider] = model
    order = [p for p in KNOWN_PROVIDERS if p in first] + sorted(set(first) - set(KNOWN_PROVIDERS))
    return [first[p] for p in order[:PROVIDERS]]


async def test_imported_prices_cost_a_request_as_litellm_does(admin, tracker):
    cost_map, source = bundled_cost_map()
    found = prices_from_cost_map(cost_map, DAY)
    reply = await ug.UsageServiceStub(admin).ImportPrices(
        u.ImportPricesRequest(prices=found.prices, source=source)
    )
    assert reply.added == len(found.prices) > 1_000
    table = await PriceTable.load(tracker.module.pool)
    models = sample_models(cost_map)
    assert len(models) == PROVIDERS
    for model in models:
        provider = cost_map[model]["litellm_provider"]
        for prompt, completion in ((1, 1), (1_234, 567), (200_000, 30_000)):
            event = ev.RequestCompleted(
                model=model,
                provider=provider,
                tokens=ev.TokenUsage(input=prompt, output=completion),
            )
            ours = cost_request(event, DAY, 1_000, table, PricingSettings()).cost_micros
            in_usd, out_usd = litellm.cost_per_token(
                model=model,
                custom_llm_provider=provider,
                prompt_tokens=prompt,
                completion_tokens=completion,
            )
            theirs = (Decimal(repr(in_usd + out_usd)) * 1_000_000).quantize(
                Decimal(1), rounding=ROUND_HALF_UP
            )
            assert ours == int(theirs), (model, prompt, completion, ours, in_usd + out_usd)
