"""Validation of published events at the edge: every problem named by its field and bound.

Envelope rules live here; payload bounds (token counts, money, durations, text) are defined once in
``lodestar.common.bounds`` and applied to the decoded payload. Times are checked against a window
around now: an event's ``time`` may lie ``max_event_age_days`` in the past (backfill) and
``max_clock_skew_seconds`` in the future; its id's time, which places it in a daily partition of
the log, may lie at most ``retention_days`` in the past (an older id would land in a partition
retention has dropped, i.e. in the default partition, for ever) and the same skew in the future,
and is never earlier than the event's ``time`` minus the skew (an id is minted when, or after,
the event happened).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from typing import NamedTuple

from google.protobuf import message, timestamp_pb2

from lodestar.common.bounds import (
    MAX_LABEL_CHARS,
    MAX_NANOS,
    MAX_TRACESTATE_CHARS,
    BoundViolation,
    check_payload,
    check_request_completed,
    check_text,
    check_timestamp,
    request_completed_all_ok,
)
from lodestar.common.errors import FieldViolation, InvalidArgumentError
from lodestar.common.events import EVENT_TYPES, TYPE_URL_PREFIX
from lodestar.core.v1 import bus_pb2
from lodestar.events.v1 import event_pb2
from lodestar.usage.v1.events_pb2 import RequestCompleted
from lodestar_core.settings import BusSettings

UUID7_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
#: The form publishers send (lower case), matched without the cost of IGNORECASE.
LOWER_UUID7 = re.compile(UUID7_PATTERN)
CANONICAL_UUID7 = re.compile(UUID7_PATTERN, re.IGNORECASE)
#: W3C traceparent; version ff and all-zero trace or parent ids are invalid.
TRACEPARENT = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
)
#: W3C tracestate: printable ASCII (list members separated by commas).
TRACESTATE = re.compile(r"^[\x20-\x7e]*$")
MAX_SOURCE_CHARS = MAX_LABEL_CHARS
MAX_SUBJECT_CHARS = MAX_LABEL_CHARS
DAY_MILLIS = 86_400_000
#: The ``data.type_url`` each known event type must carry.
TYPE_URLS = {name: TYPE_URL_PREFIX + name for name in EVENT_TYPES}
TYPE_URL_PAIRS = frozenset(TYPE_URLS.items())
REQUEST_COMPLETED = RequestCompleted.DESCRIPTOR.full_name
#: Canonical UUIDv7s joined by commas.
UUID7_LIST = re.compile(f"{UUID7_PATTERN}(?:,{UUID7_PATTERN})*")


@dataclass(frozen=True)
class TimeWindow:
    """How far from now an event's time and its id's time may lie, in milliseconds."""

    max_event_age_ms: int
    max_id_age_ms: int
    max_skew_ms: int

    @classmethod
    def from_settings(cls, settings: BusSettings) -> TimeWindow:
        """The window the bus settings configure."""
        return cls(
            max_event_age_ms=settings.max_event_age_days * DAY_MILLIS,
            max_id_age_ms=settings.retention_days * DAY_MILLIS,
            max_skew_ms=round(settings.max_clock_skew_seconds * 1000),
        )


DEFAULT_WINDOW = TimeWindow.from_settings(BusSettings())


class ValidEvent(NamedTuple):
    """An event that passed validation, with what the store needs (a tuple: cheap to build)."""

    id: str
    type: str
    source: str
    envelope: bytes


def validate_event(
    event: event_pb2.Event,
    max_bytes: int,
    window: TimeWindow = DEFAULT_WINDOW,
    now_ms: int | None = None,
    stamp: bytes = b"",
) -> ValidEvent:
    """The storable form of ``event``; raises BoundViolation naming the field and the bound.

    ``stamp``, a serialized ``Event`` holding only the attributes core sets (the publishing
    principal), is appended to the envelope: protobuf parses concatenated messages as one, the
    later value of a field winning, so it replaces whatever the publisher claimed there.
    """
    event_id = _event_id(event.id)
    source = event.source
    if not source or len(source) > MAX_SOURCE_CHARS:
        raise BoundViolation(
            "source",
            f"required, a URI-reference naming the producer, at most {MAX_SOURCE_CHARS} characters",
        )
    if "\x00" in source:
        check_text(source, "source")
    if " " in source or not source.isprintable():
        raise BoundViolation(
            "source", "a URI-reference: no spaces or control characters (percent-encode them)"
        )
    subject = event.subject
    if subject and (len(subject) > MAX_SUBJECT_CHARS or "\x00" in subject):
        check_text(subject, "subject", MAX_SUBJECT_CHARS)
    _check_times(event, event_id, time.time_ns() // 1_000_000 if now_ms is None else now_ms, window)
    envelope = event.SerializeToString() + stamp
    if len(envelope) > max_bytes:
        raise BoundViolation(
            "",
            f"event is {len(envelope)} bytes, the limit is {max_bytes}; "
            "store large content elsewhere and reference it",
        )
    event_type = event.type
    _check_payload(event_type, event)
    traceparent = event.traceparent
    if traceparent and not _valid_traceparent(traceparent):
        raise BoundViolation(
            "traceparent", "must be a W3C traceparent like 00-<32 hex>-<16 hex>-01"
        )
    tracestate = event.tracestate
    if tracestate:
        _check_tracestate(tracestate)
    return ValidEvent(event_id, event_type, source, envelope)


def _event_id(raw: str) -> str:
    """The canonical (lower-case) form of a valid UUIDv7 id."""
    if LOWER_UUID7.fullmatch(raw):
        return raw
    if CANONICAL_UUID7.fullmatch(raw):
        return raw.lower()
    if not raw:
        raise BoundViolation("id", "required, a UUIDv7 minted by the publisher")
    try:
        event_id = uuid.UUID(raw)
    except ValueError:
        raise BoundViolation("id", f"{raw[:64]!r} is not a UUID; mint a UUIDv7") from None
    if str(event_id) != raw.lower():
        raise BoundViolation(
            "id",
            f"{raw[:64]!r} is not in canonical form; send 8-4-4-4-12 hex digits like {event_id}",
        )
    if event_id.version != 7:
        raise BoundViolation(
            "id", f"must be a UUIDv7 (time-ordered), got version {event_id.version}"
        )
    raise BoundViolation("id", f"{raw[:64]!r} does not have the RFC 9562 variant bits (10xx)")


def _id_millis(event_id: str) -> int:
    """The Unix milliseconds a canonical UUIDv7 was minted at (its first 48 bits)."""
    return int(event_id[:8] + event_id[9:13], 16)


def _check_times(event: event_pb2.Event, event_id: str, now_ms: int, window: TimeWindow) -> None:
    """The id's time and the event's ``time`` inside the window, and the id not before ``time``.

    A ``time`` of exactly zero (1970-01-01T00:00:00Z, the unset default) counts as absent:
    consumers then date the event by its id.
    """
    id_ms = _id_millis(event_id)
    latest = now_ms + window.max_skew_ms
    stamp = event.time
    seconds, nanos = stamp.seconds, stamp.nanos
    if now_ms - window.max_id_age_ms <= id_ms <= latest and (
        not (seconds or nanos)
        or (
            0 <= nanos <= MAX_NANOS
            and now_ms - window.max_event_age_ms
            <= (time_ms := seconds * 1000 + nanos // 1_000_000)
            <= latest
            and id_ms >= time_ms - window.max_skew_ms
        )
    ):
        return
    _explain_times(stamp, id_ms, seconds * 1000 + nanos // 1_000_000, now_ms, window)


def _explain_times(
    stamp: timestamp_pb2.Timestamp, id_ms: int, time_ms: int, now_ms: int, window: TimeWindow
) -> None:
    """Raise BoundViolation for the id or time that is out of the window."""
    skew_ms = window.max_skew_ms
    if not now_ms - window.max_id_age_ms <= id_ms <= now_ms + skew_ms:
        raise BoundViolation(
            "id",
            f"minted at {_iso(id_ms)}, outside [now - {window.max_id_age_ms // DAY_MILLIS} days "
            f"(bus.retention_days), now + {skew_ms / 1000:g} s (bus.max_clock_skew_seconds)]; "
            "mint a fresh UUIDv7",
        )
    check_timestamp(stamp, "time")
    if not now_ms - window.max_event_age_ms <= time_ms <= now_ms + skew_ms:
        raise BoundViolation(
            "time",
            f"{_iso(time_ms)} is outside [now - {window.max_event_age_ms // DAY_MILLIS} days "
            f"(bus.max_event_age_days), now + {skew_ms / 1000:g} s "
            "(bus.max_clock_skew_seconds)]",
        )
    raise BoundViolation(
        "id",
        f"minted at {_iso(id_ms)}, before the event's time {_iso(time_ms)} minus "
        f"{skew_ms / 1000:g} s (bus.max_clock_skew_seconds); mint the id when publishing",
    )


def _iso(millis: int) -> str:
    """``millis`` as an ISO 8601 UTC time, or the raw number when no datetime can hold it."""
    try:
        return datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return f"{millis} ms since 1970"


def _check_tracestate(value: str) -> None:
    if len(value) > MAX_TRACESTATE_CHARS or not TRACESTATE.fullmatch(value):
        raise BoundViolation(
            "tracestate",
            f"must be a W3C tracestate: printable ASCII, at most {MAX_TRACESTATE_CHARS} characters",
        )


def _valid_traceparent(value: str) -> bool:
    """W3C trace-context: the version ff and all-zero trace or parent ids are invalid."""
    return TRACEPARENT.fullmatch(value) is not None


def _check_payload(event_type: str, event: event_pb2.Event) -> None:
    if not event_type:
        raise BoundViolation("type", "required, the full name of the payload message")
    payload_cls = EVENT_TYPES.get(event_type)
    if payload_cls is None:
        known = ", ".join(sorted(EVENT_TYPES))
        raise BoundViolation(
            "type", f"unknown event type {event_type[:128]!r}; known types: {known}"
        )
    data = event.data
    if data.type_url != TYPE_URLS[event_type]:
        if not event.HasField("data"):
            raise BoundViolation("data", f"required, a packed {event_type}")
        raise BoundViolation(
            "data", f"type_url {data.type_url[:128]!r} does not match type {event_type!r}"
        )
    raw = data.value
    try:
        payload = payload_cls.FromString(raw)
    except message.DecodeError:
        raise BoundViolation("data", f"the bytes are not a valid {event_type}") from None
    if payload_cls is RequestCompleted:
        check_request_completed(payload, "data.", raw)  # type: ignore[arg-type]
    else:
        check_payload(payload, "data.")


def validate_batch(
    events: Sequence[event_pb2.Event],
    max_events: int,
    max_bytes: int,
    window: TimeWindow = DEFAULT_WINDOW,
    stamp: bytes = b"",
) -> tuple[list[ValidEvent], list[bus_pb2.Rejection]]:
    """Validated events, or the rejections that refuse the batch as a whole.

    Pass ``TimeWindow.from_settings(bus_settings)`` as ``window`` to apply configured allowances,
    and the publishing principal's ``stamp`` (see ``validate_event``).
    """
    if not events:
        return [], [bus_pb2.Rejection(index=-1, reason="events: at least one event is required")]
    if len(events) > max_events:
        reason = f"events: {len(events)} in one batch, the limit is {max_events}; split it"
        return [], [bus_pb2.Rejection(index=-1, reason=reason)]
    now_ms = time.time_ns() // 1_000_000
    at_once = _validate_at_once(events, max_bytes, window, now_ms, stamp)
    if at_once is not None:
        return at_once, []
    valid: list[ValidEvent] = []
    rejections: list[bus_pb2.Rejection] = []
    for index, event in enumerate(events):
        try:
            valid.append(validate_event(event, max_bytes, window, now_ms, stamp))
        except BoundViolation as exc:
            field = f"events[{index}].{exc.field}" if exc.field else f"events[{index}]"
            rejections.append(
                bus_pb2.Rejection(
                    index=index, event_id=event.id[:64], reason=f"{field}: {exc.description}"
                )
            )
    return valid, rejections


def _validate_at_once(
    events: Sequence[event_pb2.Event],
    max_bytes: int,
    window: TimeWindow,
    now_ms: int,
    stamp: bytes,
) -> list[ValidEvent] | None:
    """The batch validated with whole-batch checks, or None to look at each event in turn.

    The publish hot path: the same bounds as ``validate_event``, but tested over lists in a few
    C-level operations instead of field by field. It answers only "all valid" and gives up
    (None) on anything unusual, such as text longer than MAX_LABEL_CHARS or a zero byte anywhere
    in an event; the event-by-event check then decides, and names the culprit.
    """
    ids = [e.id for e in events]
    earliest_id, latest_id = _id_range(now_ms, window)
    if not (
        UUID7_LIST.fullmatch(",".join(ids)) and earliest_id <= min(ids) and max(ids) <= latest_id
    ):
        return None
    envelopes = [e.SerializeToString() + stamp for e in events]
    if max(map(len, envelopes)) > max_bytes or not _texts_ok(
        events, envelopes, lambda event: validate_event(event, max_bytes, window, now_ms, stamp)
    ):
        return None
    sources = [e.source for e in events]
    types = [e.type for e in events]
    if not (
        all(map(_plain_source, set(sources)))
        and _times_ok(events, min(ids), now_ms, window)
        and _traces_ok(events)
        and _payloads_ok(events, types)
    ):
        return None
    # tuple.__new__ builds the named tuples in C, at half the cost of calling ValidEvent
    return list(
        map(tuple.__new__, repeat(ValidEvent), zip(ids, types, sources, envelopes, strict=True))
    )


def _texts_ok(
    events: Sequence[event_pb2.Event],
    envelopes: list[bytes],
    exact_check: Callable[[event_pb2.Event], object],
) -> bool:
    """No text of any event holds NUL or exceeds its limit.

    Certain at once for an event without a zero byte and of at most MAX_LABEL_CHARS bytes, since
    its texts are inside it as bytes; any other event gets ``exact_check``.
    """
    if max(map(len, envelopes)) <= MAX_LABEL_CHARS and b"\x00" not in b"".join(envelopes):
        return True
    try:
        for event, envelope in zip(events, envelopes, strict=True):
            if len(envelope) > MAX_LABEL_CHARS or b"\x00" in envelope:
                exact_check(event)
    except BoundViolation:
        return False
    return True


def _id_range(now_ms: int, window: TimeWindow) -> tuple[str, str]:
    """The smallest and largest canonical UUIDv7 the id window admits (they compare as text)."""
    earliest = f"{now_ms - window.max_id_age_ms:012x}"
    latest = f"{now_ms + window.max_skew_ms:012x}"
    return (
        f"{earliest[:8]}-{earliest[8:]}-0000-0000-000000000000",
        f"{latest[:8]}-{latest[8:]}-ffff-ffff-ffffffffffff",
    )


def _plain_source(source: str) -> bool:
    return bool(source) and " " not in source and source.isprintable()


def _times_ok(
    events: Sequence[event_pb2.Event], earliest_id: str, now_ms: int, window: TimeWindow
) -> bool:
    """Every ``time`` set, inside the window, and no later than the earliest id plus the skew.

    Checked to the second, with a second's margin: an event this refuses is looked at exactly.
    """
    stamps = [e.time for e in events]
    seconds = [t.seconds for t in stamps]
    nanos = [t.nanos for t in stamps]
    earliest_id_ms = _id_millis(earliest_id)
    first, last = min(seconds), max(seconds)
    return (
        min(nanos) >= 0
        and max(nanos) <= MAX_NANOS
        and (now_ms - window.max_event_age_ms) // 1000 < first
        and (last + 1) * 1000 <= now_ms + window.max_skew_ms
        and (last + 1) * 1000 <= earliest_id_ms + window.max_skew_ms
    )


def _traces_ok(events: Sequence[event_pb2.Event]) -> bool:
    parents = {e.traceparent for e in events}
    parents.discard("")
    return not any(e.tracestate for e in events) and all(map(_valid_traceparent, parents))


def _payloads_ok(events: Sequence[event_pb2.Event], types: list[str]) -> bool:
    """Every payload packed under its type's URL, decodable, and within its bounds."""
    datas = [e.data for e in events]
    if not set(zip(types, [d.type_url for d in datas], strict=True)) <= TYPE_URL_PAIRS:
        return False
    values = [d.value for d in datas]
    try:
        if set(types) == {REQUEST_COMPLETED}:
            return request_completed_all_ok(list(map(RequestCompleted.FromString, values)))
        for event_type, value in zip(types, values, strict=True):
            check_payload(EVENT_TYPES[event_type].FromString(value), "data.")
    except (message.DecodeError, BoundViolation):
        return False
    return True


def rejection_violations(rejections: Sequence[bus_pb2.Rejection]) -> list[FieldViolation]:
    """The rejections as ``google.rpc.BadRequest`` field violations (field, then the bound)."""
    violations = []
    for rejection in rejections:
        field, _, description = rejection.reason.partition(": ")
        violations.append(FieldViolation(field, description))
    return violations


def refusal(rejections: Sequence[bus_pb2.Rejection], total: int) -> InvalidArgumentError:
    """The INVALID_ARGUMENT error refusing a batch: the summary text plus one violation each."""
    return InvalidArgumentError(
        describe_rejections(rejections, total), violations=rejection_violations(rejections)
    )


def describe_rejections(rejections: Sequence[bus_pb2.Rejection], total: int) -> str:
    """One message for a refused batch: how many, the first reasons, and that nothing was stored."""
    shown = "; ".join(r.reason for r in rejections[:5])
    more = f" (and {len(rejections) - 5} more)" if len(rejections) > 5 else ""
    if len(rejections) == 1 and rejections[0].index < 0:
        return f"{shown}; nothing was stored"
    return f"{len(rejections)} of {total} events rejected, nothing was stored: {shown}{more}"


def check_event_types(event_types: Sequence[str], field: str) -> None:
    """Refuse unknown or repeated event types (so a list is never longer than the known types)."""
    unknown = [t for t in event_types if t not in EVENT_TYPES]
    if unknown:
        raise InvalidArgumentError(
            f"unknown event types {[t[:128] for t in unknown[:5]]}; "
            f"known: {', '.join(sorted(EVENT_TYPES))}",
            field=field,
        )
    if len(set(event_types)) != len(event_types):
        raise InvalidArgumentError("each event type may be named once", field=field)
