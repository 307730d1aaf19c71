"""Unit tests of core's edge validation and of the UUIDv7 partition bounds."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

import pytest
import uuid6

from lodestar.common.events import new_event, uuid7_millis
from lodestar.core.v1 import bus_pb2
from lodestar.events.v1 import event_pb2
from lodestar.usage.v1 import events_pb2 as usage
from lodestar_core.bus import DELIVERIES_PER_MESSAGE, DELIVERY_MESSAGE_BYTES, _message_chunks
from lodestar_core.store import day_bound
from lodestar_core.validation import describe_rejections, validate_batch, validate_event

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


@pytest.mark.parametrize(
    ("changes", "prefix"),
    [
        ({"id": ""}, "id: required"),
        ({"id": "nope"}, "id:"),
        ({"id": str(uuid.uuid4())}, "id: must be a UUIDv7"),
        ({"id": str(uuid.uuid1())}, "id: must be a UUIDv7"),
        ({"id": str(uuid6.uuid7()).replace("-", "")}, "id:"),
        ({"id": str(uuid6.uuid7()).upper()}, None),
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
