"""Event types known to the bus and helpers to build envelopes."""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from datetime import UTC, datetime

from google.protobuf import any_pb2, message, timestamp_pb2

from lodestar.events.v1 import event_pb2
from lodestar.health.v1 import events_pb2 as health_events
from lodestar.learning.v1 import events_pb2 as learning_events
from lodestar.usage.v1 import events_pb2 as usage_events

TYPE_URL_PREFIX = "type.googleapis.com/"

#: Payload messages that may travel on the bus, by full protobuf name.
EVENT_TYPES: dict[str, type[message.Message]] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        usage_events.RequestCompleted,
        usage_events.BudgetThresholdCrossed,
        learning_events.ResponseCollected,
        learning_events.OutcomeRecorded,
        health_events.TargetHealthChanged,
    )
}


#: Event types a module emits, by full name, and the module whose principal alone may publish them.
#: Every other known type is a producer event, published by publishers (and admins).
EVENT_OWNERS: dict[str, str] = {
    usage_events.BudgetThresholdCrossed.DESCRIPTOR.full_name: "usage-tracker",
    health_events.TargetHealthChanged.DESCRIPTOR.full_name: "health-monitor",
}

#: ``source`` URIs under this scheme name a Lodestar module: ``lodestar://<module>``.
MODULE_SOURCE_PREFIX = "lodestar://"


def event_type(payload: message.Message) -> str:
    """The bus type name of a payload message."""
    return str(payload.DESCRIPTOR.full_name)


def new_event_id() -> str:
    """A fresh UUIDv7: time-ordered, so ids also place events in time partitions."""
    return str(_MINT.uuid7())


class _Uuid7Mint:
    """UUIDv7s that sort in minting order and carry the real clock time.

    RFC 9562 section 6.2, method 1: after the 48-bit millisecond time, a 42-bit counter seeded at
    random each millisecond (its top bit clear, so it has room to count), then 32 random bits.
    Ids minted within one millisecond count up instead of borrowing the next millisecond, which
    would move a fast publisher's ids ahead of the clock (``uuid6.uuid7`` does that: 100,000 ids
    a second run 100 s ahead per second, and core refuses ids beyond its clock-skew allowance).
    """

    COUNTER_BITS = 42

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._millis = 0
        self._counter = 0

    def uuid7(self) -> uuid.UUID:
        """The next id."""
        with self._lock:
            millis, counter = self._next()
        return uuid.UUID(
            int=millis << 80
            | 0x7 << 76
            | (counter >> 30) << 64
            | 0b10 << 62
            | (counter & 0x3FFF_FFFF) << 32
            | secrets.randbits(32)
        )

    def _next(self) -> tuple[int, int]:
        now = time.time_ns() // 1_000_000
        if now > self._millis:
            self._millis, self._counter = now, secrets.randbits(self.COUNTER_BITS - 1)
        else:  # the same millisecond, or the clock stepped back: count on
            self._counter += 1
            if self._counter >> self.COUNTER_BITS:
                self._millis, self._counter = self._millis + 1, 0
        return self._millis, self._counter


_MINT = _Uuid7Mint()


def uuid7_millis(event_id: uuid.UUID) -> int:
    """Unix milliseconds embedded in a UUIDv7."""
    return event_id.int >> 80


def new_event(
    payload: message.Message,
    *,
    source: str,
    subject: str = "",
    event_id: str | None = None,
    time: datetime | None = None,
) -> event_pb2.Event:
    """An envelope around ``payload`` with a publisher-minted id."""
    data = any_pb2.Any()
    data.Pack(payload)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(time or datetime.now(UTC))
    return event_pb2.Event(
        id=event_id or new_event_id(),
        source=source,
        type=event_type(payload),
        time=stamp,
        data=data,
        subject=subject,
    )


def unpack(event: event_pb2.Event) -> message.Message:
    """The typed payload of a known event type; TypeError if the data holds another type."""
    cls = EVENT_TYPES[event.type]
    data = event.data
    if data.type_url.rpartition("/")[2] != event.type:
        raise TypeError(f"event of type {event.type} carries data of type {data.type_url!r}")
    return cls.FromString(data.value)
