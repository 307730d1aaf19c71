"""usage-tracker's mapping of one RequestCompleted event to one ledger row (no database)."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime

import pytest
from google.protobuf import duration_pb2

from lodestar.common.events import new_event, uuid7_millis
from lodestar.usage.v1 import events_pb2 as ev
from lodestar.usage.v1 import usage_pb2 as u
from lodestar_usage.ingest import MAX_TEXT, InvalidEvent, LedgerRow, row_from_event
from lodestar_usage.pricing import PriceRow, PriceTable
from lodestar_usage.settings import PricingSettings

PRICES = PriceTable(
    [
        PriceRow("m-*", date(2024, 1, 1), input=2_000_000, output=8_000_000),
        PriceRow("claude-sonnet-4", date(2024, 1, 1), input=3_000_000, output=15_000_000),
    ]
)
WHEN = datetime(2025, 3, 4, 5, 6, 7, 891_234, tzinfo=UTC)


def request(**fields: object) -> ev.RequestCompleted:
    base: dict[str, object] = {
        "model": "m-large",
        "provider": "openai",
        "project": "proj",
        "session_id": "sess",
        "user": "ada",
        "task_id": "task-1",
        "attempt": 2,
        "status": ev.REQUEST_STATUS_OK,
        "duration": duration_pb2.Duration(seconds=1, nanos=250_000_000),
        "tokens": ev.TokenUsage(input=1000, output=100, cached_read=10, cache_write=5, reasoning=3),
    }
    return ev.RequestCompleted(**(base | fields))  # type: ignore[arg-type]


def row(payload: ev.RequestCompleted, **envelope: object) -> LedgerRow:
    event = new_event(payload, source="test://rows", **envelope)  # type: ignore[arg-type]
    return row_from_event(event, payload, PRICES, PricingSettings())


def test_every_column_comes_from_the_event():
    got = row(request(reservation_id="r-1"), time=WHEN)
    assert got.occurred_at == WHEN
    assert (got.model, got.provider, got.project, got.session_id, got.user_id, got.task_id) == (
        "m-large",
        "openai",
        "proj",
        "sess",
        "ada",
        "task-1",
    )
    assert (got.attempt, got.status, got.duration_ms) == (2, ev.REQUEST_STATUS_OK, 1250)
    assert (got.input, got.output, got.cached_read, got.cache_write, got.reasoning) == (
        1000,
        100,
        10,
        5,
        3,
    )
    assert got.tokens == 1118
    assert got.reservation_id == "r-1"
    # Priced by the table: cached and write tokens at the input price, reasoning at output's.
    assert got.cost_source == u.COST_SOURCE_PRICE_TABLE
    assert got.cost_micros == (1015 * 2_000_000 + 103 * 8_000_000 + 500_000) // 1_000_000


def test_without_a_time_the_event_id_places_the_event():
    payload = request()
    event = new_event(payload, source="test://rows")
    event.ClearField("time")
    got = row_from_event(event, payload, PRICES, PricingSettings())
    millis = uuid7_millis(uuid.UUID(event.id))
    assert got.occurred_at == datetime.fromtimestamp(millis / 1000, UTC)


def test_a_reported_cost_wins_and_local_models_get_compute_and_shadow_costs():
    reported = row(request(reported_cost=ev.Money(micros=42)))
    assert (reported.cost_micros, reported.cost_source) == (42, u.COST_SOURCE_REPORTED)
    local = row(request(provider="Ollama", model="llama3"))
    assert local.cost_source == u.COST_SOURCE_LOCAL_COMPUTE
    assert local.compute_cost_micros == local.cost_micros == 125  # 1.25 s at 100 µ$/s
    shadow = (1015 * 3_000_000 + 103 * 15_000_000 + 500_000) // 1_000_000
    assert local.shadow_cost_micros == shadow
    assert local.savings_micros == shadow - 125


def test_unpriced_models_cost_nothing_and_say_so():
    got = row(request(model="unknown-model"))
    assert (got.cost_micros, got.cost_source) == (0, u.COST_SOURCE_UNPRICED)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tokens": ev.TokenUsage(input=-1)}, "tokens.input"),
        ({"tokens": ev.TokenUsage(reasoning=-7)}, "tokens.reasoning"),
        ({"reported_cost": ev.Money(micros=-1)}, "reported_cost.micros"),
        ({"model": ""}, "model"),
        ({"duration": duration_pb2.Duration(seconds=-2)}, "duration"),
        ({"model": "m" * (MAX_TEXT + 1)}, "model"),
        ({"project": "p" * (MAX_TEXT + 1)}, "project"),
        ({"user": "u" * (MAX_TEXT + 1)}, "user"),
        ({"task_id": "t" * (MAX_TEXT + 1)}, "task_id"),
        ({"reservation_id": "r" * (MAX_TEXT + 1)}, "reservation_id"),
    ],
)
def test_invalid_events_name_the_field(fields: dict[str, object], field: str):
    with pytest.raises(InvalidEvent) as info:
        row(request(**fields))
    assert info.value.field == field


def test_text_of_exactly_the_limit_is_accepted():
    assert row(request(session_id="s" * MAX_TEXT)).session_id == "s" * MAX_TEXT


def test_an_envelope_id_that_is_not_a_uuid_is_invalid():
    payload = request()
    event = new_event(payload, source="test://rows", event_id="not-a-uuid")
    with pytest.raises(InvalidEvent) as info:
        row_from_event(event, payload, PRICES, PricingSettings())
    assert info.value.field == "id"
