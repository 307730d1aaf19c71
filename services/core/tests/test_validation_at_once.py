"""The whole-batch fast path of publish validation agrees with the event-by-event check.

``_validate_at_once`` may give up on a valid batch (then each event is looked at), but it must
never accept a batch that ``validate_event`` would refuse, and what it returns must be exactly
what ``validate_event`` returns.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from google.protobuf import duration_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from lodestar.common.bounds import BoundViolation
from lodestar.common.events import new_event
from lodestar.events.v1 import event_pb2
from lodestar.health.v1 import events_pb2 as health
from lodestar.usage.v1 import events_pb2 as usage
from lodestar_core.validation import (
    DEFAULT_WINDOW,
    _validate_at_once,
    validate_batch,
    validate_event,
)

MAX_BYTES = 64 * 1024
STAMP = event_pb2.Event(authid="test-publisher", authtype="app_user").SerializeToString()
INT64 = st.integers(-(2**63), 2**63 - 1)
EDGE_INTS = st.sampled_from([-1, 0, 1, 10**8, 10**8 + 1, 10**10, 10**10 + 1, 7 * 86400, 2**31 - 1])
TEXT = st.one_of(
    st.sampled_from(["", "m", "a b", "x\x00y", "lodestar://usage-tracker", "é" * 300, "z" * 513]),
    st.text(max_size=40),
)


def realistic(index: int = 0) -> event_pb2.Event:
    """A RequestCompleted as a gateway would publish it."""
    return new_event(
        usage.RequestCompleted(
            model="claude-sonnet-4",
            provider="anthropic",
            project=f"project-{index % 20}",
            session_id=f"session-{index}",
            user="dev",
            attempt=1,
            status=usage.REQUEST_STATUS_OK,
            duration=duration_pb2.Duration(seconds=2, nanos=500_000_000),
            tokens=usage.TokenUsage(input=1200, output=300, cached_read=800),
            reported_cost=usage.Money(currency="USD", micros=4200),
        ),
        source="litellm://gateway",
    )


def apply(message: Any, changes: list[tuple[str, Any]]) -> None:
    """Set each dotted ``path`` of ``message``; a value the field cannot hold is skipped."""
    for path, value in changes:
        target: Any = message
        *parents, name = path.split(".")
        for parent in parents:
            target = getattr(target, parent)
        try:
            setattr(target, name, value)
        except (ValueError, TypeError):
            continue


def mutate_payload(event: event_pb2.Event, changes: list[tuple[str, Any]]) -> None:
    payload = usage.RequestCompleted.FromString(event.data.value)
    apply(payload, changes)
    event.data.value = payload.SerializeToString()


NUMBERS = st.one_of(EDGE_INTS, INT64)
NOW = int(time.time())
SKEW = DEFAULT_WINDOW.max_skew_ms // 1000
OLDEST = DEFAULT_WINDOW.max_event_age_ms // 1000
#: Event times around the window's edges (now + skew, now - maximum age).
NEAR_THE_EDGES = st.sampled_from([-90, -2, 0, 2, 90]).flatmap(
    lambda delta: st.sampled_from(
        [NOW + SKEW + delta, NOW + 2 * SKEW + delta, NOW - OLDEST + delta]
    )
)
NANOS = st.sampled_from([-1, 0, 999_999_999, 1_000_000_000, 2**31 - 1])
OLDEST_ID = DEFAULT_WINDOW.max_id_age_ms // 1000


def id_at(seconds: int) -> str:
    """A UUIDv7 minted at ``seconds`` since 1970."""
    return str(uuid.UUID(int=(seconds * 1000) << 80 | 0x7 << 76 | 0b10 << 62 | 0x1234_5678))


#: Ids minted around the id window's edges.
IDS_NEAR_THE_EDGES = st.sampled_from([-90, -2, 0, 2, 90]).flatmap(
    lambda delta: st.sampled_from(
        [id_at(NOW + SKEW + delta), id_at(NOW + SKEW // 2 + delta), id_at(NOW - OLDEST_ID + delta)]
    )
)
PAYLOAD_CHANGES = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["model", "project", "error_message"]), TEXT),
        st.tuples(
            st.sampled_from(["reported_cost.currency"]),
            st.sampled_from(["EUR", "usd", "XXX", "\x00"]),
        ),
        st.tuples(
            st.sampled_from(
                [
                    "attempt",
                    "status",
                    "tokens.input",
                    "tokens.reasoning",
                    "duration.seconds",
                    "duration.nanos",
                    "reported_cost.micros",
                ]
            ),
            NUMBERS,
        ),
    ),
    max_size=3,
)
ENVELOPE_CHANGES = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["source", "subject", "tracestate"]), TEXT),
        st.tuples(st.just("id"), IDS_NEAR_THE_EDGES),
        st.tuples(
            st.sampled_from(["id", "type", "traceparent", "data.type_url"]),
            st.one_of(
                TEXT,
                st.sampled_from(
                    [
                        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                        "0190a0b4-3c4d-7e8f-9a0b-1c2d3e4f5a6b",
                        "lodestar.health.v1.TargetHealthChanged",
                        "type.googleapis.com/lodestar.health.v1.TargetHealthChanged",
                    ]
                ),
            ),
        ),
        st.tuples(
            st.sampled_from(["time.seconds"]),
            st.one_of(NUMBERS, st.integers(NOW - 4 * 10**8, NOW + 10**4), NEAR_THE_EDGES),
        ),
        st.tuples(st.just("time.nanos"), st.one_of(NUMBERS, NANOS)),
    ),
    max_size=3,
)


def one_by_one(events: list[event_pb2.Event], now_ms: int) -> list[Any] | None:
    try:
        return [validate_event(e, MAX_BYTES, DEFAULT_WINDOW, now_ms, STAMP) for e in events]
    except BoundViolation:
        return None


@settings(max_examples=500, deadline=None)
@given(
    size=st.integers(1, 6),
    bad_index=st.integers(0, 5),
    payload_change=PAYLOAD_CHANGES,
    envelope_change=ENVELOPE_CHANGES,
    upper_case_id=st.booleans(),
)
def test_at_once_never_accepts_what_one_by_one_refuses(
    size: int,
    bad_index: int,
    payload_change: list[tuple[str, Any]],
    envelope_change: list[tuple[str, Any]],
    upper_case_id: bool,
) -> None:
    events = [realistic(i) for i in range(size)]
    victim = events[bad_index % size]
    mutate_payload(victim, payload_change)
    apply(victim, envelope_change)
    if upper_case_id:
        victim.id = victim.id.upper()
    agrees(events)


def agrees(events: list[event_pb2.Event]) -> None:
    """The fast path accepts only what the exact check accepts, with the same result."""
    now_ms = time.time_ns() // 1_000_000
    at_once = _validate_at_once(events, MAX_BYTES, DEFAULT_WINDOW, now_ms, STAMP)
    if at_once is not None:
        assert at_once == one_by_one(events, now_ms)


#: Offsets from now, in seconds, on both sides of each edge of the windows.
ID_OFFSETS = [-OLDEST_ID - 90, -OLDEST_ID + 90, -2 * SKEW, 0, SKEW - 90, SKEW + 90, 3 * SKEW]
TIME_OFFSETS = [-OLDEST - 90, -OLDEST + 90, -SKEW - 90, 0, SKEW - 90, SKEW + 90, 3 * SKEW]


@settings(max_examples=600, deadline=None)
@given(
    size=st.sampled_from([1, 3]),
    id_offset=st.sampled_from(ID_OFFSETS),
    time_offset=st.none() | st.sampled_from(TIME_OFFSETS),
    nanos=NANOS,
)
def test_ids_and_times_at_the_window_edges(
    size: int, id_offset: int, time_offset: int | None, nanos: int
) -> None:
    events = [realistic(i) for i in range(size)]
    victim = events[-1]
    now = int(time.time())
    victim.id = id_at(now + id_offset)
    if time_offset is None:
        victim.ClearField("time")
    else:
        victim.time.seconds = now + time_offset
        victim.time.nanos = nanos
    agrees(events)


def test_a_realistic_batch_takes_the_fast_path() -> None:
    events = [realistic(i) for i in range(500)]
    now_ms = time.time_ns() // 1_000_000
    at_once = _validate_at_once(events, MAX_BYTES, DEFAULT_WINDOW, now_ms, STAMP)
    assert at_once is not None
    assert at_once == one_by_one(events, now_ms)


def test_events_with_zero_bytes_or_long_texts_get_the_exact_check_alone() -> None:
    alert = new_event(  # a double's bytes hold zeros
        health.TargetHealthChanged(target="openai/gpt-4o", latency_ms=12.5, error_rate=0.01),
        source="lodestar://health-monitor",
    )
    failed = realistic(1)
    mutate_payload(failed, [("error_message", "upstream timed out " * 40)])
    events = [realistic(0), alert, failed]
    now_ms = time.time_ns() // 1_000_000
    at_once = _validate_at_once(events, MAX_BYTES, DEFAULT_WINDOW, now_ms, STAMP)
    assert at_once is not None
    assert at_once == one_by_one(events, now_ms)
    mutate_payload(failed, [("error_message", "x" * 5000)])  # over MAX_MESSAGE_CHARS
    assert _validate_at_once(events, MAX_BYTES, DEFAULT_WINDOW, now_ms, STAMP) is None
    _, rejections = validate_batch(events, 10, MAX_BYTES, DEFAULT_WINDOW, STAMP)
    assert [r.reason.split(":")[0] for r in rejections] == ["events[2].data.error_message"]


def test_an_event_without_a_time_is_left_to_the_exact_check() -> None:
    event = realistic()
    event.ClearField("time")
    now_ms = time.time_ns() // 1_000_000
    assert _validate_at_once([event], MAX_BYTES, DEFAULT_WINDOW, now_ms, STAMP) is None
    assert one_by_one([event], now_ms) is not None


@pytest.mark.parametrize("field", ["model", "project", "user", "error_message"])
def test_a_nul_in_any_payload_text_is_refused_by_the_fast_path(field: str) -> None:
    events = [realistic(0), realistic(1)]
    mutate_payload(events[1], [(field, "a\x00b")])
    now_ms = time.time_ns() // 1_000_000
    assert _validate_at_once(events, MAX_BYTES, DEFAULT_WINDOW, now_ms, STAMP) is None
    assert one_by_one(events, now_ms) is None
