"""Recost and ListUnpriced without a database: which groups a price covers, what a listing shows,
and which requests are refused (naming the field)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from lodestar.common.errors import InvalidArgumentError
from lodestar.usage.v1 import usage_pb2 as u
from lodestar_usage import recost
from lodestar_usage.pricing import PriceRow, PriceTable

DAY = date(2026, 11, 20)
AT = datetime(2026, 11, 20, 10, tzinfo=UTC)


def group(model: str, day: date = DAY, requests: int = 1, provider: str = "acme") -> recost.Group:
    at = datetime(day.year, day.month, day.day, 10, tzinfo=UTC)
    return recost.Group(model, provider, day, requests, (requests, 0, 0, 0, 0), at, at)


TABLE = PriceTable(
    [
        PriceRow("new-*", DAY, 1, 2),
        PriceRow("acme/exact-model", DAY + timedelta(days=2), 3, 4),
    ]
)


def test_a_group_is_priced_from_the_first_day_its_price_applies():
    groups = [
        group("new-a", requests=2),
        group("new-a", DAY - timedelta(days=1), requests=5),
        group("exact-model", DAY + timedelta(days=1)),
        group("exact-model", DAY + timedelta(days=2), requests=3),
        group("unknown", requests=7),
    ]
    plan = recost.plan(groups, TABLE, "")
    assert [(g.model, g.day, p.pattern) for g, p in plan.priced] == [
        ("new-a", DAY, "new-*"),
        ("exact-model", DAY + timedelta(days=2), "acme/exact-model"),
    ]
    assert plan.still_unpriced == 5 + 1 + 7


def test_a_model_pattern_keeps_only_the_groups_it_matches():
    groups = [group("new-a"), group("new-b", provider="other"), group("unknown")]
    assert [g.model for g, _ in recost.plan(groups, TABLE, "acme/new-*").priced] == ["new-a"]
    assert [g.model for g, _ in recost.plan(groups, TABLE, "NEW-B").priced] == ["new-b"]
    only_unknown = recost.plan(groups, TABLE, "unk*")
    assert (only_unknown.priced, only_unknown.still_unpriced) == ([], 1)


def test_the_bind_arrays_carry_the_effective_price_of_every_kind():
    price = PriceRow("new-*", DAY, 10, 20, cached_read=1)
    arrays = recost.Plan([(group("new-a"), price)], 0).arrays()
    assert arrays == [
        ["new-a"],
        ["acme"],
        [datetime(2026, 11, 20, tzinfo=UTC)],
        [10],
        [20],
        [1],  # cached read as given
        [10],  # cache write defaults to input
        [20],  # reasoning defaults to output
        ["new-*"],
    ]


def test_a_listing_adds_up_days_and_puts_most_requests_first():
    groups = [
        group("new-a", DAY - timedelta(days=1), requests=5),
        group("new-a", DAY, requests=2),
        group("unknown", requests=6),
    ]
    listed = recost.list_unpriced(groups, TABLE, by_day=False, limit=10)
    assert [(r.model, r.requests, r.priceable_requests, r.price_pattern) for r in listed.rows] == [
        ("new-a", 7, 2, "new-*"),
        ("unknown", 6, 0, ""),
    ]
    assert (listed.unpriced_requests, listed.priceable_requests, listed.more_rows) == (13, 2, 0)
    by_day = recost.list_unpriced(groups, TABLE, by_day=True, limit=2)
    assert [(r.model, r.day, r.requests) for r in by_day.rows] == [
        ("unknown", DAY.isoformat(), 6),
        ("new-a", (DAY - timedelta(days=1)).isoformat(), 5),
    ]
    assert by_day.more_rows == 1


def window(days: int) -> tuple[datetime, datetime]:
    return AT - timedelta(days=days), AT


@pytest.mark.parametrize(
    ("request_", "days", "field"),
    [
        (u.RecostRequest(), recost.MAX_RECOST_DAYS + 1, "window"),
        (u.RecostRequest(model_pattern="no spaces"), 1, "model_pattern"),
        (u.RecostRequest(model_pattern="**"), 1, "model_pattern"),
        (u.RecostRequest(max_rows=-1), 1, "max_rows"),
        (u.RecostRequest(max_rows=recost.MAX_ROWS + 1), 1, "max_rows"),
    ],
)
def test_a_bad_recost_request_names_the_field(request_, days, field):
    with pytest.raises(InvalidArgumentError) as info:
        recost.recost_query(request_, *window(days))
    assert info.value.field == field


def test_a_recost_request_gets_its_defaults():
    query = recost.recost_query(u.RecostRequest(dry_run=True), *window(recost.MAX_RECOST_DAYS))
    assert (query.max_rows, query.dry_run, query.model_pattern) == (
        recost.DEFAULT_MAX_ROWS,
        True,
        "",
    )
    assert query.target == f"ledger/{query.start.isoformat()}..{query.end.isoformat()}"
    assert recost.list_limit(0) == recost.DEFAULT_LIMIT
    with pytest.raises(InvalidArgumentError):
        recost.list_limit(recost.MAX_LIMIT + 1)
