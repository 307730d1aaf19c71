"""Validation of published events at the edge: every problem named by its field."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf import message

from lodestar.common.events import EVENT_TYPES, TYPE_URL_PREFIX
from lodestar.core.v1 import bus_pb2
from lodestar.events.v1 import event_pb2

CANONICAL_UUID7 = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", re.IGNORECASE
)
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
MAX_SOURCE_CHARS = 512
MAX_SUBJECT_CHARS = 512


@dataclass(frozen=True)
class ValidEvent:
    """An event that passed validation, with what the store needs."""

    id: str
    type: str
    source: str
    envelope: bytes


def validate_event(event: event_pb2.Event, max_bytes: int) -> ValidEvent:
    """The storable form of ``event``; raises ValueError naming the field and the fix."""
    event_id = _event_id(event.id)
    source = event.source
    if not source or len(source) > MAX_SOURCE_CHARS:
        raise ValueError(
            f"source: required, a URI-reference naming the producer, at most {MAX_SOURCE_CHARS} "
            "characters"
        )
    if len(event.subject) > MAX_SUBJECT_CHARS:
        raise ValueError(f"subject: at most {MAX_SUBJECT_CHARS} characters")
    event_type = event.type
    _check_payload(event_type, event)
    traceparent = event.traceparent
    if traceparent and not _valid_traceparent(traceparent):
        raise ValueError("traceparent: must be a W3C traceparent like 00-<32 hex>-<16 hex>-01")
    envelope = event.SerializeToString()
    if len(envelope) > max_bytes:
        raise ValueError(
            f"event is {len(envelope)} bytes, the limit is {max_bytes}; "
            "store large content elsewhere and reference it"
        )
    return ValidEvent(event_id, event_type, source, envelope)


def _event_id(raw: str) -> str:
    """The canonical (lower-case) form of a valid UUIDv7 id."""
    if CANONICAL_UUID7.fullmatch(raw):
        return raw.lower()
    if not raw:
        raise ValueError("id: required, a UUIDv7 minted by the publisher")
    try:
        event_id = uuid.UUID(raw)
    except ValueError:
        raise ValueError(f"id: {raw[:64]!r} is not a UUID; mint a UUIDv7") from None
    if str(event_id) != raw.lower():
        raise ValueError(
            f"id: {raw[:64]!r} is not in canonical form; send 8-4-4-4-12 hex digits like {event_id}"
        )
    if event_id.version != 7:
        raise ValueError(f"id: must be a UUIDv7 (time-ordered), got version {event_id.version}")
    raise ValueError(f"id: {raw[:64]!r} does not have the RFC 9562 variant bits (10xx)")


def _valid_traceparent(value: str) -> bool:
    """W3C trace-context: the version ff and all-zero trace or parent ids are invalid."""
    if not TRACEPARENT.match(value):
        return False
    version, trace_id, parent_id, _flags = value.split("-")
    return version != "ff" and trace_id != "0" * 32 and parent_id != "0" * 16


def _check_payload(event_type: str, event: event_pb2.Event) -> None:
    if not event_type:
        raise ValueError("type: required, the full name of the payload message")
    payload_cls = EVENT_TYPES.get(event_type)
    if payload_cls is None:
        known = ", ".join(sorted(EVENT_TYPES))
        raise ValueError(f"type: unknown event type {event_type[:128]!r}; known types: {known}")
    if not event.HasField("data"):
        raise ValueError(f"data: required, a packed {event_type}")
    data = event.data
    if data.type_url != TYPE_URL_PREFIX + event_type:
        raise ValueError(
            f"data: type_url {data.type_url[:128]!r} does not match type {event_type!r}"
        )
    try:
        payload_cls.FromString(data.value)
    except message.DecodeError:
        raise ValueError(f"data: the bytes are not a valid {event_type}") from None


def validate_batch(
    events: Sequence[event_pb2.Event], max_events: int, max_bytes: int
) -> tuple[list[ValidEvent], list[bus_pb2.Rejection]]:
    """Validated events, or the rejections that refuse the batch as a whole."""
    if not events:
        return [], [bus_pb2.Rejection(index=-1, reason="events: at least one event is required")]
    if len(events) > max_events:
        reason = f"events: {len(events)} in one batch, the limit is {max_events}; split it"
        return [], [bus_pb2.Rejection(index=-1, reason=reason)]
    valid: list[ValidEvent] = []
    rejections: list[bus_pb2.Rejection] = []
    for index, event in enumerate(events):
        try:
            valid.append(validate_event(event, max_bytes))
        except ValueError as exc:
            rejections.append(
                bus_pb2.Rejection(
                    index=index, event_id=event.id[:64], reason=f"events[{index}].{exc}"
                )
            )
    return valid, rejections


def describe_rejections(rejections: Sequence[bus_pb2.Rejection], total: int) -> str:
    """One message for a refused batch: how many, the first reasons, and that nothing was stored."""
    shown = "; ".join(r.reason for r in rejections[:5])
    more = f" (and {len(rejections) - 5} more)" if len(rejections) > 5 else ""
    if len(rejections) == 1 and rejections[0].index < 0:
        return f"{shown}; nothing was stored"
    return f"{len(rejections)} of {total} events rejected, nothing was stored: {shown}{more}"
