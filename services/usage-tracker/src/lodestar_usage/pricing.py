"""Effective-dated prices and the cost of one request, in integer micro-dollars.

Token kinds are disjoint: ``input`` excludes cached-read and cache-write tokens, ``output``
excludes reasoning tokens. A price is micro-dollars per million tokens; the cost of a request is
the exact sum over kinds, rounded half up to a whole micro-dollar once.
"""

# SQL here is assembled from constant identifiers only; every value is a bind parameter.
# ruff: noqa: S608

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from typing import NamedTuple

import asyncpg

from lodestar.common.bounds import MAX_PRICE_MICROS_PER_MILLION_TOKENS
from lodestar.common.errors import InvalidArgumentError
from lodestar.usage.v1 import events_pb2, usage_pb2
from lodestar_usage.settings import PricingSettings

PATTERN = re.compile(r"^[A-Za-z0-9._:/@*?-]{1,200}$")
MICROS_PER_MTOK = 1_000_000
#: $1,000 per million tokens: a maximal event priced at it still fits (lodestar.common.bounds)
MAX_PRICE = MAX_PRICE_MICROS_PER_MILLION_TOKENS


@dataclass(frozen=True)
class PriceRow:
    """One row of the price table."""

    pattern: str
    valid_from: date
    input: int
    output: int
    cached_read: int | None = None
    cache_write: int | None = None
    reasoning: int | None = None
    #: Where the price came from ("SetPrice", or an import's source).
    source: str = ""

    @property
    def specificity(self) -> int:
        """Literal characters in the pattern: the most specific match wins."""
        return sum(1 for ch in self.pattern if ch not in "*?")

    def matches(self, model: str, provider: str) -> bool:
        """Whether the pattern matches ``model`` or ``provider/model`` (case-insensitive)."""
        pattern = self.pattern.lower()
        return fnmatch.fnmatchcase(model.lower(), pattern) or fnmatch.fnmatchcase(
            f"{provider}/{model}".lower(), pattern
        )

    def cost_micros(self, tokens: events_pb2.TokenUsage) -> int:
        """The exact cost of ``tokens`` at this price, rounded half up to a micro-dollar."""
        cached = self.input if self.cached_read is None else self.cached_read
        write = self.input if self.cache_write is None else self.cache_write
        reasoning = self.output if self.reasoning is None else self.reasoning
        total = (
            tokens.input * self.input
            + tokens.output * self.output
            + tokens.cached_read * cached
            + tokens.cache_write * write
            + tokens.reasoning * reasoning
        )
        return (total + MICROS_PER_MTOK // 2) // MICROS_PER_MTOK

    def to_proto(self) -> usage_pb2.Price:
        """The API form."""
        price = usage_pb2.Price(
            model_pattern=self.pattern,
            valid_from=self.valid_from.isoformat(),
            input_micros_per_mtok=self.input,
            output_micros_per_mtok=self.output,
        )
        if self.cached_read is not None:
            price.cached_read_micros_per_mtok = self.cached_read
        if self.cache_write is not None:
            price.cache_write_micros_per_mtok = self.cache_write
        if self.reasoning is not None:
            price.reasoning_micros_per_mtok = self.reasoning
        price.source = self.source
        return price

    def same_price(self, other: PriceRow) -> bool:
        """Whether ``other`` charges the same for every token kind (wherever it came from)."""
        return dataclasses.replace(other, source=self.source) == self


def validate_pattern(pattern: str, field: str) -> str:
    """A safe glob, or INVALID_ARGUMENT naming ``field``."""
    if not PATTERN.fullmatch(pattern) or (pattern.strip("*?") == "" and pattern != "*"):
        raise InvalidArgumentError(
            f"{pattern[:80]!r} is not a model pattern; use 1-200 of letters, digits, . _ - : / @ "
            "and the wildcards * ?, e.g. 'claude-sonnet-4*' or 'openai/gpt-4o*'",
            field=field,
        )
    return pattern


def parse_day(value: str, field: str) -> date:
    """A YYYY-MM-DD date, or INVALID_ARGUMENT naming ``field``."""
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidArgumentError(
            f"{value[:40]!r} is not a date; use YYYY-MM-DD", field=field
        ) from None


def price_from_proto(price: usage_pb2.Price, field_prefix: str = "price") -> PriceRow:
    """Validate an API price; INVALID_ARGUMENT names the first bad field (under the prefix)."""
    pattern = validate_pattern(price.model_pattern, f"{field_prefix}.model_pattern")
    if not price.valid_from:
        raise InvalidArgumentError(
            "required, a date YYYY-MM-DD", field=f"{field_prefix}.valid_from"
        )
    day = parse_day(price.valid_from, f"{field_prefix}.valid_from")
    values: dict[str, int | None] = {}
    for name in ("input", "output", "cached_read", "cache_write", "reasoning"):
        field = f"{name}_micros_per_mtok"
        optional = name not in ("input", "output")
        if optional and not price.HasField(field):  # type: ignore[arg-type]
            values[name] = None
            continue
        value = int(getattr(price, field))
        if not 0 <= value <= MAX_PRICE:
            raise InvalidArgumentError(
                f"{value} is out of range; give micro-dollars per million tokens, 0..{MAX_PRICE}",
                field=f"{field_prefix}.{field}",
            )
        values[name] = value
    return PriceRow(
        pattern,
        day,
        int(values["input"] or 0),
        int(values["output"] or 0),
        values["cached_read"],
        values["cache_write"],
        values["reasoning"],
    )


#: The columns of a price row, in PriceRow's field order.
PRICE_COLUMNS = (
    "model_pattern, valid_from, input_micros_per_mtok, output_micros_per_mtok, "
    "cached_read_micros_per_mtok, cache_write_micros_per_mtok, reasoning_micros_per_mtok, source"
)


class PriceTable:
    """The price table held in memory; ``load`` refreshes it from the database."""

    def __init__(self, rows: Iterable[PriceRow] = ()) -> None:
        self.rows = sorted(rows, key=lambda r: (r.specificity, r.valid_from), reverse=True)
        self._cache: dict[tuple[str, str, date], PriceRow | None] = {}

    @classmethod
    async def load(cls, conn: asyncpg.Connection | asyncpg.Pool) -> PriceTable:
        """Read every price row."""
        records = await conn.fetch(f"SELECT {PRICE_COLUMNS} FROM prices")
        return cls(PriceRow(*r.values()) for r in records)

    def lookup(self, model: str, provider: str, day: date) -> PriceRow | None:
        """The price for ``model`` on ``day``: most specific pattern, then latest valid_from."""
        key = (model, provider, day)
        if key in self._cache:
            return self._cache[key]
        found = next(
            (r for r in self.rows if r.valid_from <= day and r.matches(model, provider)), None
        )
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = found
        return found


class Costing(NamedTuple):
    """What one request cost, and what it saved."""

    cost_micros: int
    source: int
    compute_cost_micros: int = 0
    shadow_cost_micros: int = 0
    savings_micros: int = 0


def cost_request(
    event: events_pb2.RequestCompleted,
    day: date,
    duration_ms: int,
    table: PriceTable,
    settings: PricingSettings,
) -> Costing:
    """Cost ``event``: a reported cost wins, local models cost compute time, else the table."""
    reported = event.HasField("reported_cost") and event.reported_cost.currency in ("", "USD")
    if event.provider and event.provider.lower() in settings.local_provider_set:
        compute = (settings.local_compute_micros_per_second * duration_ms + 500) // 1000
        baseline = table.lookup(settings.baseline_model, settings.baseline_provider, day)
        shadow = baseline.cost_micros(event.tokens) if baseline is not None else 0
        cost = event.reported_cost.micros if reported else compute
        source = usage_pb2.COST_SOURCE_REPORTED if reported else usage_pb2.COST_SOURCE_LOCAL_COMPUTE
        return Costing(cost, source, compute, shadow, shadow - cost)
    if reported:
        return Costing(event.reported_cost.micros, usage_pb2.COST_SOURCE_REPORTED)
    price = table.lookup(event.model, event.provider, day)
    if price is None:
        return Costing(0, usage_pb2.COST_SOURCE_UNPRICED)
    return Costing(price.cost_micros(event.tokens), usage_pb2.COST_SOURCE_PRICE_TABLE)
