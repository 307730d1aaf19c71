"""Prices from LiteLLM's model cost map, for ``ImportPrices`` (``lodestar prices import``).

The map (``model_prices_and_context_window.json``) gives US dollars per token as floats for each
model name; a price here is whole micro-dollars per million tokens, so each figure is read as the
decimal it was written as and multiplied by 10^12 (rounded half up in the rare case it has more
digits). Only token prices are taken: a model priced per second, per image or per character is
skipped, and so is any model whose name is not a plain model pattern (it would be read as a glob).
A tiered price (``…_above_200k_tokens``) is taken at its base tier. ``litellm`` itself is needed
only for its bundled copy of the map; a file can be read without it.
"""

from __future__ import annotations

import collections
import importlib.metadata
import importlib.util
import json
import re
from dataclasses import dataclass, field
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from lodestar.common.errors import ConfigurationError
from lodestar.usage.v1 import usage_pb2
from lodestar_usage.pricing import MAX_PRICE, PATTERN

#: The copy of the map a ``litellm`` package carries.
BUNDLED_FILE = "model_prices_and_context_window_backup.json"
#: Micro-dollars per million tokens in one dollar per token.
SCALE = Decimal(10**12)
#: The map's keys for each optional token kind of a Price.
OPTIONAL_KINDS = {
    "cached_read_micros_per_mtok": "cache_read_input_token_cost",
    "cache_write_micros_per_mtok": "cache_creation_input_token_cost",
    "reasoning_micros_per_mtok": "output_cost_per_reasoning_token",
}
#: A key of a price that applies above a number of tokens (a tiered price).
TIERED = re.compile(r"_above_\d+k_tokens")
#: A token price of a tier, base or above a number of thousand prompt tokens:
#: ``input_cost_per_token``, ``output_cost_per_token_above_200k_tokens``.
TOKEN_PRICE_TIER = re.compile(r"(input|output)_cost_per_token(?:_above_(\d+)k_tokens)?")
#: Modes whose models are priced per token.
TOKEN_MODES = frozenset({"chat", "completion", "responses", "embedding", "moderation", None})


@dataclass
class CostMapPrices:
    """The prices read from a cost map, and how many models were skipped and why."""

    prices: list[usage_pb2.Price] = field(default_factory=list)
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Models with a tiered price, taken at the base tier.
    tiered: int = 0


def bundled_cost_map() -> tuple[dict[str, Any], str]:
    """The map bundled with the installed ``litellm``, and a source naming its version."""
    try:
        version = importlib.metadata.version("litellm")
        # Found without importing litellm, whose import fetches the map over the network.
        spec = importlib.util.find_spec("litellm")
        folders = list(spec.submodule_search_locations or []) if spec else []
        text = (Path(folders[0]) / BUNDLED_FILE).read_text("utf-8") if folders else ""
        if not text:
            raise FileNotFoundError(BUNDLED_FILE)
    except (importlib.metadata.PackageNotFoundError, ModuleNotFoundError, FileNotFoundError):
        raise ConfigurationError(
            "litellm is not installed here: install it (pip install 'lodestar-usage-tracker"
            "[litellm]') or name a cost map file with --file"
        ) from None
    return json.loads(text), f"litellm {version} model cost map"


def cost_map_file(path: Path) -> tuple[dict[str, Any], str]:
    """The map in ``path`` (LiteLLM's JSON format), and a source naming the file."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the cost map {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} is not a cost map: a JSON object of models expected")
    return data, f"cost map file {path.name}"


def prices_from_cost_map(cost_map: dict[str, Any], valid_from: date) -> CostMapPrices:
    """Every token-priced model of ``cost_map`` as a Price from ``valid_from``."""
    found = CostMapPrices()
    for model, entry in sorted(cost_map.items()):
        why = _unusable(model, entry)
        if why:
            found.skipped[why] += 1
            continue
        price = usage_pb2.Price(model_pattern=model, valid_from=valid_from.isoformat())
        price.input_micros_per_mtok = micros_per_mtok(entry["input_cost_per_token"])
        price.output_micros_per_mtok = micros_per_mtok(entry.get("output_cost_per_token", 0))
        for name, key in OPTIONAL_KINDS.items():
            if entry.get(key) is not None:
                setattr(price, name, micros_per_mtok(entry[key]))
        if any(_out_of_range(getattr(price, f.name)) for f in _amount_fields(price)):
            found.skipped["a price beyond $1,000 per million tokens"] += 1
            continue
        found.tiered += any(TIERED.search(key) for key in entry)
        found.prices.append(price)
    return found


def micros_per_mtok(dollars_per_token: float | int | str) -> int:
    """US dollars per token as whole micro-dollars per million tokens (half up)."""
    return scaled(dollars_per_token, SCALE)


def scaled(amount: float | int | str, factor: Decimal | int, rounding: str = ROUND_HALF_UP) -> int:
    """``amount`` times ``factor`` as a whole number, a float read as the decimal it prints as.

    LiteLLM's dollar figures are floats; ``1e-05 * 10**12`` in floats is not 10,000,000 exactly.
    """
    return int((Decimal(str(amount)) * factor).quantize(Decimal(1), rounding=rounding))


def _unusable(model: str, entry: object) -> str:
    """Why ``entry`` cannot become a price, or ""."""
    if not isinstance(entry, dict):
        return "not a model entry"
    if entry.get("mode") not in TOKEN_MODES:
        return f"priced per {entry.get('mode')} call, not per token"
    if not isinstance(entry.get("input_cost_per_token"), int | float):
        return "no price per input token"
    if not PATTERN.fullmatch(model) or "*" in model or "?" in model:
        return "a name that is not a plain model pattern"
    return ""


def _amount_fields(price: usage_pb2.Price) -> list[Any]:
    return [f for f, _ in price.ListFields() if f.name.endswith("_micros_per_mtok")]


def _out_of_range(value: int) -> bool:
    return not 0 <= value <= MAX_PRICE
