"""Unit tests of core's edge validation and of the UUIDv7 partition bounds."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, date, datetime, timedelta

import grpc
import pytest
import uuid6
from google.protobuf import message, timestamp_pb2
from pydantic import ValidationError

from lodestar.common.bounds import (
    INT64_MAX,
    MAX_COST_MICROS_PER_EVENT,
    MAX_PRICE_MICROS_PER_MILLION_TOKENS,
    MAX_TOKENS_PER_EVENT,
    BoundViolation,
)
from lodestar.common.events import new_event, uuid7_millis
from lodestar.core.v1 import bus_pb2
from lodestar.events.v1 import event_pb2
from lodestar.health.v1 import events_pb2 as health
from lodestar.learning.v1 import events_pb2 as learning
from lodestar.usage.v1 import events_pb2 as usage
from lodestar_core.bus import DELIVERIES_PER_MESSAGE, DELIVERY_MESSAGE_BYTES, _message_chunks
from lodestar_core.settings import BusSettings
from lodestar_core.store import day_bound
from lodestar_core.validation import (
    TimeWindow,
    describe_rejections,
    refusal,
    rejection_violations,
    validate_batch,
    validate_event,
)

MAX = 4096


def event(**changes: str) -> event_pb2.Event:
    e = new_event(usage.RequestCompleted(model="m", provider="p"), source="test://unit")
    for key, value in changes.items():
        setattr(e, key, value)
    return e


def test_valid_event_keeps_id_type_source_and_bytes():
    e = event()
    valid = validate_event(e, MAX)
    assert valid.id == e.id.lower()
    assert (valid.type, valid.source) == (e.type, e.source)
    assert event_pb2.Event.FromString(valid.envelope) == e


#: Stands for a UUIDv7 in upper case minted when the test runs: one minted at collection is
#: refused for its age once the suite has run for longer than the allowed clock skew.
FRESH_UPPER_CASE_ID = "fresh UUIDv7 in upper case"


@pytest.mark.parametrize(
    ("changes", "prefix"),
    [
        ({"id": ""}, "id: required"),
        ({"id": "nope"}, "id:"),
        ({"id": str(uuid.uuid4())}, "id: must be a UUIDv7"),
        ({"id": str(uuid.uuid1())}, "id: must be a UUIDv7"),
        ({"id": str(uuid6.uuid7()).replace("-", "")}, "id:"),
        ({"id": FRESH_UPPER_CASE_ID}, None),
        ({"source": ""}, "source: required"),
        ({"source": "s" * 513}, "source:"),
        ({"subject": "s" * 513}, "subject:"),
        ({"type": ""}, "type: required"),
        ({"type": "acme.v1.Nope"}, "type: unknown"),
        ({"traceparent": "garbage"}, "traceparent:"),
        ({"traceparent": "00-" + "a" * 32 + "-" + "b" * 15 + "-01"}, "traceparent:"),
        ({"traceparent": "ff-" + "a" * 32 + "-" + "b" * 16 + "-01"}, "traceparent:"),
        ({"traceparent": "00-" + "a" * 32 + "-" + "0" * 16 + "-01"}, "traceparent:"),
        ({"traceparent": "00-" + "A" * 32 + "-" + "b" * 16 + "-01"}, "traceparent:"),
        ({"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}, None),
    ],
)
def test_each_field_is_checked(changes: dict[str, str], prefix: str | None):
    if changes.get("id") == FRESH_UPPER_CASE_ID:  # minted now, not when the tests were collected
        changes = {"id": str(uuid6.uuid7()).upper()}
    e = event(**changes)
    if prefix is None:
        validate_event(e, MAX)
        return
    with pytest.raises(ValueError, match=rf"^{prefix}"):
        validate_event(e, MAX)


def test_data_must_match_type_and_parse():
    e = event()
    e.ClearField("data")
    with pytest.raises(ValueError, match=r"^data: required"):
        validate_event(e, MAX)
    e = event()
    e.data.type_url = "type.googleapis.com/lodestar.learning.v1.OutcomeRecorded"
    with pytest.raises(ValueError, match=r"^data: type_url"):
        validate_event(e, MAX)
    e = event()
    e.data.value = b"\x0a\xff\xff\xff\x0f"
    with pytest.raises(ValueError, match=r"^data: the bytes"):
        validate_event(e, MAX)


def test_size_limit_counts_the_whole_envelope():
    e = event(subject="x" * 500)
    size = len(e.SerializeToString())
    assert validate_event(e, size)
    with pytest.raises(ValueError, match=f"limit is {size - 1}"):
        validate_event(e, size - 1)


def test_batch_is_all_or_nothing_with_indexed_reasons():
    good, bad = event(), event(source="")
    _, rejections = validate_batch([good, bad, event(type="x.Y")], 10, MAX)
    assert [r.index for r in rejections] == [1, 2]
    assert rejections[0].reason.startswith("events[1].source")
    assert rejections[1].event_id
    text = describe_rejections(rejections, 3)
    assert text.startswith("2 of 3 events rejected, nothing was stored")
    assert "events[1].source" in text
    assert "events[2].type" in text


def test_empty_and_oversized_batches():
    _, rejections = validate_batch([], 10, MAX)
    assert rejections[0].index == -1
    assert describe_rejections(rejections, 0).endswith("nothing was stored")
    _, rejections = validate_batch([event() for _ in range(3)], 2, MAX)
    assert "limit is 2" in rejections[0].reason


def test_many_rejections_are_summarised():
    _, rejections = validate_batch([event(source="") for _ in range(8)], 10, MAX)
    text = describe_rejections(rejections, 8)
    assert "(and 3 more)" in text


def test_day_bound_is_midnight_utc_with_zero_random_bits():
    bound = day_bound(date(2024, 3, 10))
    assert uuid7_millis(bound) == int(datetime(2024, 3, 10, tzinfo=UTC).timestamp() * 1000)
    assert bound.int & ((1 << 80) - 1) == 0


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2024, 3, 10, 0, 0, 0, tzinfo=UTC),
        datetime(2024, 3, 10, 12, 30, tzinfo=UTC),
        datetime(2024, 3, 10, 23, 59, 59, 999000, tzinfo=UTC),
        datetime(2024, 2, 29, 6, 0, tzinfo=UTC),
    ],
)
def test_uuid7_minted_in_a_day_sorts_between_its_bounds(moment: datetime):
    day = moment.date()
    millis = int(moment.timestamp() * 1000)
    minted = uuid7_at(millis)
    assert minted.version == 7
    lower, upper = day_bound(day), day_bound(day + timedelta(days=1))
    assert lower <= minted < upper
    # Postgres compares uuids bytewise, like Python compares their bytes
    assert lower.bytes <= minted.bytes < upper.bytes
    assert not (day_bound(day - timedelta(days=1)) <= minted < lower)


def test_uuid7_from_the_library_falls_in_today():
    minted = uuid.UUID(str(uuid6.uuid7()))
    today = datetime.now(UTC).date()
    assert day_bound(today) <= minted < day_bound(today + timedelta(days=1)) or (
        # minted a moment before midnight, checked just after
        day_bound(today - timedelta(days=1)) <= minted < day_bound(today)
    )


def uuid7_at(millis: int) -> uuid.UUID:
    """A UUIDv7 with the given timestamp and maximal random bits (the worst case for bounds)."""
    value = (millis << 80) | (0x7 << 76) | (0xFFF << 64) | (0b10 << 62) | ((1 << 62) - 1)
    return uuid.UUID(int=value)


def test_delivery_messages_are_bounded_in_count_and_bytes():
    def delivery(seq: int, size: int) -> bus_pb2.Delivery:
        event = event_pb2.Event(id=f"{seq}", source="s://x", type="t", subject="x" * size)
        return bus_pb2.Delivery(sequence=seq, attempt=1, event=event)

    small = [delivery(i, 10) for i in range(2 * DELIVERIES_PER_MESSAGE + 5)]
    chunks = list(_message_chunks(small))
    assert [len(c) for c in chunks] == [DELIVERIES_PER_MESSAGE, DELIVERIES_PER_MESSAGE, 5]
    large = [delivery(i, 250_000) for i in range(40)]
    chunks = list(_message_chunks(large))
    assert [d.sequence for c in chunks for d in c] == list(range(40))
    assert all(sum(d.event.ByteSize() for d in c) <= DELIVERY_MESSAGE_BYTES for c in chunks)
    assert len(chunks) == 3


# --- bounds (issue 8) ----------------------------------------------------------------------------

NOW_MS = 1_780_000_000_000  # 2026-05-28T20:26:40Z
DAY_MS = 86_400_000
WINDOW = TimeWindow.from_settings(BusSettings())


def at(millis: int, payload: message.Message | None = None, time_ms: int | None = None):
    """An event minted (id and time) at ``millis``, or with its time at ``time_ms``."""
    e = new_event(
        payload or usage.RequestCompleted(model="m", provider="p"),
        source="test://unit",
        event_id=str(uuid7_at(millis)),
        time=datetime.fromtimestamp((millis if time_ms is None else time_ms) / 1000, UTC),
    )
    return e


def refusal_of(e: event_pb2.Event, window: TimeWindow = WINDOW) -> BoundViolation:
    with pytest.raises(BoundViolation) as caught:
        validate_event(e, 64 * 1024, window, NOW_MS)
    return caught.value


def test_defaults_of_the_time_window():
    assert WINDOW.max_event_age_ms == 3650 * DAY_MS
    assert WINDOW.max_id_age_ms == 7 * DAY_MS  # retention_days
    assert WINDOW.max_skew_ms == 300_000


def test_an_event_minted_now_passes():
    validate_event(at(NOW_MS), MAX, WINDOW, NOW_MS)
    validate_event(at(NOW_MS + WINDOW.max_skew_ms), MAX, WINDOW, NOW_MS)
    validate_event(at(NOW_MS - WINDOW.max_id_age_ms), MAX, WINDOW, NOW_MS)


@pytest.mark.parametrize(
    ("id_ms", "reason"),
    [
        (0, "1970-01-01"),
        (NOW_MS - 7 * DAY_MS - 1, "bus.retention_days"),
        (NOW_MS + 300_001, "bus.max_clock_skew_seconds"),
        ((1 << 48) - 1, "281474976710655 ms since 1970"),  # year 10889
    ],
)
def test_id_time_must_lie_between_retention_and_skew(id_ms: int, reason: str):
    error = refusal_of(at(id_ms, time_ms=NOW_MS))
    assert error.field == "id"
    assert reason in error.description


def test_an_id_minted_later_than_the_time_is_a_backfill_and_passes():
    validate_event(at(NOW_MS, time_ms=NOW_MS - 400 * DAY_MS), MAX, WINDOW, NOW_MS)


def test_an_id_minted_before_the_event_happened_is_refused():
    ok = at(NOW_MS - 300_000, time_ms=NOW_MS)
    validate_event(ok, MAX, WINDOW, NOW_MS)
    error = refusal_of(at(NOW_MS - 300_001, time_ms=NOW_MS))
    assert error.field == "id"
    assert "before the event's time" in error.description


@pytest.mark.parametrize(
    ("seconds", "nanos", "reason"),
    [
        (-62_135_596_800, 0, "bus.max_event_age_days"),  # year 1
        (-62_135_596_801, 0, "Timestamp range"),
        (253_402_300_799, 0, "bus.max_clock_skew_seconds"),  # year 9999
        (253_402_300_800, 0, "Timestamp range"),
        (NOW_MS // 1000, -1, "nanos -1"),
        (NOW_MS // 1000, 1_000_000_000, "nanos 1000000000"),
        (NOW_MS // 1000 - 3650 * 86_400 - 1, 0, "bus.max_event_age_days"),
        (NOW_MS // 1000 + 301, 0, "bus.max_clock_skew_seconds"),
    ],
)
def test_time_must_be_a_valid_timestamp_inside_the_window(seconds: int, nanos: int, reason: str):
    e = at(NOW_MS)
    e.time.seconds, e.time.nanos = seconds, nanos
    error = refusal_of(e)
    assert error.field == "time"
    assert reason in error.description


def test_time_at_the_edges_of_the_window_passes_and_unset_time_passes():
    for seconds in (NOW_MS // 1000 - 3650 * 86_400, NOW_MS // 1000 + 300):
        e = at(NOW_MS)
        e.time.seconds, e.time.nanos = seconds, 0
        validate_event(e, MAX, WINDOW, NOW_MS)
    e = at(NOW_MS)
    e.ClearField("time")
    validate_event(e, MAX, WINDOW, NOW_MS)


def test_the_window_follows_the_settings():
    window = TimeWindow.from_settings(
        BusSettings(max_event_age_days=1, retention_days=2, max_clock_skew_seconds=1)
    )
    assert refusal_of(at(NOW_MS, time_ms=NOW_MS - DAY_MS - 1), window).field == "time"
    assert refusal_of(at(NOW_MS - 2 * DAY_MS - 1), window).field == "id"
    assert refusal_of(at(NOW_MS + 1001), window).field == "id"
    validate_event(at(NOW_MS + 1000, time_ms=NOW_MS - DAY_MS), MAX, window, NOW_MS)


def test_clock_skew_may_not_reach_beyond_the_partitions_made_ahead():
    BusSettings(partitions_ahead_days=1, max_clock_skew_seconds=86_400)
    with pytest.raises(ValidationError, match="partitions_ahead_days"):
        BusSettings(partitions_ahead_days=1, max_clock_skew_seconds=86_401)
    with pytest.raises(ValidationError):
        BusSettings(max_event_age_days=36_501)


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ({"source": "lodestar://\x00x"}, "source", "NUL"),
        ({"subject": "a\x00"}, "subject", "NUL"),
        ({"tracestate": "k=v\x00"}, "tracestate", "W3C tracestate"),
        ({"tracestate": "k=" + "v" * 511}, "tracestate", "at most 512"),
        ({"tracestate": "k=vé"}, "tracestate", "printable ASCII"),
    ],
)
def test_envelope_text_bounds(changes: dict[str, str], field: str, reason: str):
    e = at(NOW_MS)
    for key, value in changes.items():
        setattr(e, key, value)
    error = refusal_of(e)
    assert (error.field, reason in error.description) == (field, True)


def test_envelope_text_at_its_limits_passes():
    e = at(NOW_MS)
    e.tracestate = "k=" + "v" * 510
    e.subject = "é" * 512
    validate_event(e, MAX, WINDOW, NOW_MS)


def completed(**fields: object) -> usage.RequestCompleted:
    payload = usage.RequestCompleted(model="m", provider="p")
    for key, value in fields.items():
        target = payload
        *path, last = key.split("__")
        for part in path:
            target = getattr(target, part)
        if isinstance(value, message.Message):
            getattr(target, last).CopyFrom(value)
        else:
            setattr(target, last, value)
    return payload


MAX_T = MAX_TOKENS_PER_EVENT
MAX_C = MAX_COST_MICROS_PER_EVENT


@pytest.mark.parametrize("kind", ["input", "output", "cached_read", "cache_write", "reasoning"])
@pytest.mark.parametrize("count", [-1, MAX_T + 1, 2**63 - 1])
def test_token_counts_are_bounded(kind: str, count: int):
    validate_event(at(NOW_MS, completed(**{f"tokens__{kind}": MAX_T})), MAX, WINDOW, NOW_MS)
    error = refusal_of(at(NOW_MS, completed(**{f"tokens__{kind}": count})))
    assert error.field == f"data.tokens.{kind}"
    assert f"[0, {MAX_T}]" in error.description


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"reported_cost__micros": 2**63 - 1}, "data.reported_cost.micros", f"[0, {MAX_C}]"),
        ({"reported_cost__micros": MAX_C + 1}, "data.reported_cost.micros", f"[0, {MAX_C}]"),
        ({"reported_cost__micros": -1}, "data.reported_cost.micros", f"[0, {MAX_C}]"),
        ({"reported_cost__currency": "usd"}, "data.reported_cost.currency", "ISO 4217"),
        ({"reported_cost__currency": "US\x00"}, "data.reported_cost.currency", "ISO 4217"),
        ({"duration__seconds": -1}, "data.duration", "non-negative"),
        ({"duration__nanos": -5}, "data.duration", "non-negative"),
        ({"duration__seconds": 7 * 86_400 + 1}, "data.duration", "at most 604800"),
        ({"duration__seconds": 7 * 86_400, "duration__nanos": 1}, "data.duration", "at most"),
        ({"attempt": -1}, "data.attempt", "[0, 1000]"),
        ({"attempt": 1001}, "data.attempt", "[0, 1000]"),
        ({"status": 7}, "data.status", "RequestStatus"),
        ({"model": ""}, "data.model", "required"),
        ({"model": "m" * 513}, "data.model", "at most 512"),
        ({"provider": "p\x00"}, "data.provider", "NUL"),
        ({"project": "p" * 513}, "data.project", "at most 512"),
        ({"session_id": "\x00"}, "data.session_id", "NUL"),
        ({"user": "u" * 513}, "data.user", "at most 512"),
        ({"task_id": "\x00"}, "data.task_id", "NUL"),
        ({"reservation_id": "r" * 513}, "data.reservation_id", "at most 512"),
        ({"error_message": "e" * 4097}, "data.error_message", "at most 4096"),
        ({"error_message": "boom\x00"}, "data.error_message", "NUL"),
    ],
)
def test_request_completed_bounds(fields: dict[str, object], field: str, reason: str):
    error = refusal_of(at(NOW_MS, completed(**fields)))
    assert error.field == field
    assert reason in error.description


def test_request_completed_at_its_limits_passes():
    payload = completed(
        model="m" * 512,
        provider="é" * 512,
        error_message="e" * 4096,
        attempt=1000,
        status=usage.REQUEST_STATUS_ERROR,
        duration__seconds=7 * 86_400,
        reported_cost__micros=MAX_C,
        reported_cost__currency="EUR",
    )
    for kind in ("input", "output", "cached_read", "cache_write", "reasoning"):
        setattr(payload.tokens, kind, MAX_T)
    validate_event(at(NOW_MS, payload), 64 * 1024, WINDOW, NOW_MS)


@pytest.mark.parametrize(
    ("payload", "field", "reason"),
    [
        (usage.BudgetThresholdCrossed(budget_name="b\x00"), "data.budget_name", "NUL"),
        (usage.BudgetThresholdCrossed(scope="s" * 513), "data.scope", "at most 512"),
        (usage.BudgetThresholdCrossed(limit_micros=-1), "data.limit_micros", "outside"),
        (usage.BudgetThresholdCrossed(threshold_pct=1001), "data.threshold_pct", "[0, 1000]"),
        (usage.BudgetThresholdCrossed(kind=9), "data.kind", "AlertKind"),
        (
            usage.BudgetThresholdCrossed(window_start=timestamp_pb2.Timestamp(nanos=-1)),
            "data.window_start",
            "nanos -1",
        ),
        (
            usage.BudgetThresholdCrossed(
                window_end=timestamp_pb2.Timestamp(seconds=253_402_300_800)
            ),
            "data.window_end",
            "Timestamp range",
        ),
        (learning.ResponseCollected(prompt="a\x00b"), "data.prompt", "NUL"),
        (learning.ResponseCollected(model="m" * 513), "data.model", "at most 512"),
        (learning.OutcomeRecorded(score=1.5), "data.score", "[0.0, 1.0]"),
        (learning.OutcomeRecorded(score=math.nan), "data.score", "not a finite"),
        (health.TargetHealthChanged(latency_ms=-1.0), "data.latency_ms", "outside"),
        (health.TargetHealthChanged(error_rate=math.inf), "data.error_rate", "not a finite"),
        (health.TargetHealthChanged(reason="r" * 4097), "data.reason", "at most 4096"),
        (health.TargetHealthChanged(current=42), "data.current", "TargetState"),
    ],
)
def test_other_event_types_are_checked_by_their_descriptor(
    payload: message.Message, field: str, reason: str
):
    error = refusal_of(at(NOW_MS, payload))
    assert error.field == field
    assert reason in error.description


def test_other_event_types_within_bounds_pass():
    fine = [
        usage.BudgetThresholdCrossed(
            budget_name="b", threshold_pct=100, limit_micros=2**63 - 1, kind=1
        ),
        learning.ResponseCollected(prompt="p" * 10_000, response="r" * 10_000),
        learning.OutcomeRecorded(score=1.0, outcome=learning.OUTCOME_ACCEPTED),
        health.TargetHealthChanged(latency_ms=12.5, error_rate=0.5, reason="r" * 4096),
    ]
    for payload in fine:
        validate_event(at(NOW_MS, payload), 64 * 1024, WINDOW, NOW_MS)


def test_a_refused_batch_names_each_field_as_a_violation():
    good = [event() for _ in range(6)]
    bad = event(source="bad\x00source")
    huge = new_event(completed(reported_cost__micros=2**63 - 1), source="test://unit")
    batch = [*good[:3], bad, *good[3:], huge]
    _, rejections = validate_batch(batch, 100, MAX)
    assert [r.index for r in rejections] == [3, 7]
    error = refusal(rejections, len(batch))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.violations] == [
        "events[3].source",
        "events[7].data.reported_cost.micros",
    ]
    assert "NUL" in error.violations[0].description
    assert str(MAX_C) in error.violations[1].description
    assert error.message.startswith("2 of 8 events rejected, nothing was stored")


def test_an_oversized_event_is_named_by_its_index():
    _, rejections = validate_batch([event(subject="x" * 500)], 10, 100)
    assert rejection_violations(rejections)[0].field == "events[0]"
    assert "the limit is 100" in rejections[0].reason


def test_batch_level_refusals_name_the_events_field():
    _, rejections = validate_batch([], 10, MAX)
    assert rejection_violations(rejections)[0].field == "events"


def test_sums_of_maximal_values_of_one_event_fit_int64():
    # The argument of lodestar.common.bounds: one event priced at the maximum never overflows.
    assert 5 * MAX_T * MAX_PRICE_MICROS_PER_MILLION_TOKENS < INT64_MAX
    assert INT64_MAX // MAX_C > 9 * 10**8
