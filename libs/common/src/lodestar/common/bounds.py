"""Bounds on what an event may carry: every number, time and text a producer sends.

Defined once here, applied by core when an event is published (so a bad event is refused at the
edge with INVALID_ARGUMENT, never stored) and importable by consumers for their own checks.
A violated bound raises :class:`BoundViolation`, whose text is ``<field>: <what is wrong>``.

Why these maxima (int64 sums)
-----------------------------
Consumers add these numbers up per window in int64 (``bigint``) columns and proto fields, whose
largest value is ``INT64_MAX`` ≈ 9.22 x 10^18. At an absurd 10^9 events/s for 100 years
(3.16 x 10^9 s) a window holds 3.16 x 10^18 events, so *no* useful per-event maximum can keep every
sum inside int64 by itself: it would have to be 2. The maxima below are therefore chosen from what
one LLM request can plausibly be, with a wide margin, and they guarantee:

- one event never overflows anything, nor does any product a consumer forms with it: all token
  kinds of one event at the largest price, 5 x 10^8 tokens x 10^9 micros per million tokens, is
  5 x 10^17 before dividing by 10^6 (below INT64_MAX);
- a sum overflows only once its real total passes INT64_MAX: $9.2 trillion of spend, 9.2 x 10^18
  tokens, 292 million years of request time. No honest window gets there;
- a flood of events at the maximum needs INT64_MAX / 10^10 = 9.2 x 10^8 events to overflow a cost
  sum and INT64_MAX / (5 x 10^8) = 1.8 x 10^10 to overflow a token sum: at core's measured
  31,000 events/s that is 8 hours and 7 days of uninterrupted maximal events from one credential
  (per-principal rate limits and budgets stop it far earlier).

Consumers still sum in arbitrary precision (Postgres ``numeric``, Python ``int``) and saturate at
INT64_MAX when answering: the bounds keep every stored row sane, the sums are defence in depth.
"""

from __future__ import annotations

import math
from typing import Final

from google.protobuf import descriptor, duration_pb2, message, timestamp_pb2

from lodestar.usage.v1 import events_pb2 as usage_events

INT64_MAX: Final = 2**63 - 1
INT32_MAX: Final = 2**31 - 1

#: The range of ``google.protobuf.Timestamp``: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
TIMESTAMP_MIN_SECONDS: Final = -62_135_596_800
TIMESTAMP_MAX_SECONDS: Final = 253_402_300_799
#: Nanos of a Timestamp, or of a non-negative Duration, lie in [0, MAX_NANOS].
MAX_NANOS: Final = 999_999_999
#: The range of ``google.protobuf.Duration``: ±10,000 years.
DURATION_MAX_SECONDS: Final = 315_576_000_000

#: Names, ids and labels (model, provider, project, session, user, task, budget name …).
MAX_LABEL_CHARS: Final = 512
#: Free text meant for people: error messages, reasons.
MAX_MESSAGE_CHARS: Final = 4096
#: W3C trace-context: a tracestate header is at most 512 characters.
MAX_TRACESTATE_CHARS: Final = 512

#: Tokens of one kind in one request: 10^8, 10 x the largest context window offered today.
MAX_TOKENS_PER_EVENT: Final = 100_000_000
#: Cost of one request in micro-dollars: 10^10 = $10,000, far above any single LLM call.
MAX_COST_MICROS_PER_EVENT: Final = 10_000_000_000
#: A price-table price in micro-dollars per million tokens: 10^9 = $1,000 per million tokens.
MAX_PRICE_MICROS_PER_MILLION_TOKENS: Final = 1_000_000_000
#: How long one request may have taken: 7 days (batch APIs answer within 24 hours).
MAX_REQUEST_DURATION_SECONDS: Final = 7 * 24 * 3600
#: Attempts of one task.
MAX_ATTEMPT: Final = 1000
#: A budget alert's threshold in percent of the limit.
MAX_THRESHOLD_PCT: Final = 1000
#: Latency a health probe may report, in milliseconds (one day).
MAX_LATENCY_MS: Final = 86_400_000.0

#: The free-text fields of RequestCompleted, in ledger order, with their limits.
REQUEST_LABEL_FIELDS: Final = (
    "model",
    "provider",
    "project",
    "session_id",
    "user",
    "task_id",
    "reservation_id",
)
TOKEN_KINDS: Final = ("input", "output", "cached_read", "cache_write", "reasoning")
#: Text fields allowed beyond MAX_LABEL_CHARS, with their own limit (None: only the event size).
LONG_TEXT_FIELDS: Final[dict[str, int | None]] = {
    "error_message": MAX_MESSAGE_CHARS,
    "reason": MAX_MESSAGE_CHARS,
    "prompt": None,
    "response": None,
}
#: Ranges of numeric payload fields by ``Message.field``; integers default to [0, INT64_MAX].
NUMBER_RANGES: Final[dict[str, tuple[float, float]]] = {
    "RequestCompleted.attempt": (0, MAX_ATTEMPT),
    "TokenUsage.input": (0, MAX_TOKENS_PER_EVENT),
    "TokenUsage.output": (0, MAX_TOKENS_PER_EVENT),
    "TokenUsage.cached_read": (0, MAX_TOKENS_PER_EVENT),
    "TokenUsage.cache_write": (0, MAX_TOKENS_PER_EVENT),
    "TokenUsage.reasoning": (0, MAX_TOKENS_PER_EVENT),
    "Money.micros": (0, MAX_COST_MICROS_PER_EVENT),
    "BudgetThresholdCrossed.threshold_pct": (0, MAX_THRESHOLD_PCT),
    "OutcomeRecorded.score": (0.0, 1.0),
    "TargetHealthChanged.latency_ms": (0.0, MAX_LATENCY_MS),
    "TargetHealthChanged.error_rate": (0.0, 1.0),
}


class BoundViolation(ValueError):
    """A field outside its bound; ``str()`` is ``<field>: <description>``."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


def check_text(value: str, field: str, max_chars: int | None = MAX_LABEL_CHARS) -> None:
    """Refuse NUL characters (Postgres text cannot hold them) and text over ``max_chars``.

    Python strings from protobuf are valid UTF-8 already: the parser refuses anything else.
    """
    if max_chars is not None and len(value) > max_chars:
        raise BoundViolation(field, f"{len(value)} characters, at most {max_chars}")
    if "\x00" in value:
        raise BoundViolation(field, "contains a NUL character (\\x00), which text may not hold")


def check_timestamp(stamp: timestamp_pb2.Timestamp, field: str) -> None:
    """Refuse a Timestamp outside protobuf's range (years 1 to 9999) or nanos outside [0, 1e9)."""
    if not TIMESTAMP_MIN_SECONDS <= stamp.seconds <= TIMESTAMP_MAX_SECONDS:
        raise BoundViolation(
            field,
            f"seconds {stamp.seconds} outside the Timestamp range "
            f"[{TIMESTAMP_MIN_SECONDS}, {TIMESTAMP_MAX_SECONDS}] (years 1 to 9999)",
        )
    if not 0 <= stamp.nanos <= MAX_NANOS:
        raise BoundViolation(field, f"nanos {stamp.nanos} outside [0, {MAX_NANOS}]")


def check_duration(value: duration_pb2.Duration, field: str, max_seconds: int) -> None:
    """Refuse a negative Duration, nanos outside [0, 1e9) and more than ``max_seconds``."""
    seconds, nanos = value.seconds, value.nanos
    if seconds < 0 or not 0 <= nanos <= MAX_NANOS:
        raise BoundViolation(
            field, f"must be a non-negative duration (seconds ≥ 0, nanos in [0, {MAX_NANOS}])"
        )
    if seconds > max_seconds or (seconds == max_seconds and nanos):
        raise BoundViolation(field, f"{seconds} s, at most {max_seconds} s")


def check_request_completed(
    payload: usage_events.RequestCompleted, prefix: str = "", raw: bytes | None = None
) -> None:
    """Every bound of a RequestCompleted; ``raw``, its serialized form when at hand, is a shortcut.

    On the hot path of publish: one cheap test of everything, and only when it fails the field by
    field search that names the culprit. A payload of at most MAX_LABEL_CHARS bytes without a zero
    byte cannot hold an over-long text or a NUL character, so its texts need no look.
    """
    if raw is not None and len(raw) <= MAX_LABEL_CHARS and b"\x00" not in raw:
        texts_ok = True
    else:
        labels = (
            payload.model,
            payload.provider,
            payload.project,
            payload.session_id,
            payload.user,
            payload.task_id,
            payload.reservation_id,
        )
        text = "".join(labels)
        texts_ok = (
            len(text) <= MAX_LABEL_CHARS or max(map(len, labels)) <= MAX_LABEL_CHARS
        ) and "\x00" not in text
        texts_ok = texts_ok and _text_ok(payload.error_message, MAX_MESSAGE_CHARS)
    tokens = payload.tokens
    duration = payload.duration
    cost = payload.reported_cost
    if (
        texts_ok
        and payload.model
        and 0 <= tokens.input <= MAX_TOKENS_PER_EVENT
        and 0 <= tokens.output <= MAX_TOKENS_PER_EVENT
        and 0 <= tokens.cached_read <= MAX_TOKENS_PER_EVENT
        and 0 <= tokens.cache_write <= MAX_TOKENS_PER_EVENT
        and 0 <= tokens.reasoning <= MAX_TOKENS_PER_EVENT
        and 0 <= payload.attempt <= MAX_ATTEMPT
        and payload.status in _REQUEST_STATUSES
        and 0 <= duration.seconds < MAX_REQUEST_DURATION_SECONDS
        and 0 <= duration.nanos <= MAX_NANOS
        and 0 <= cost.micros <= MAX_COST_MICROS_PER_EVENT
        and cost.currency in _COMMON_CURRENCIES
        and _first_token_ok(payload)
    ):
        return
    _explain_request_completed(payload, prefix)


def _text_ok(value: str, max_chars: int) -> bool:
    return len(value) <= max_chars and "\x00" not in value


def _explain_request_completed(payload: usage_events.RequestCompleted, prefix: str) -> None:
    """Raise BoundViolation for the first field of ``payload`` out of bounds."""
    for name in REQUEST_LABEL_FIELDS:
        check_text(getattr(payload, name), prefix + name)
    if not payload.model:
        raise BoundViolation(prefix + "model", "required, the model that answered")
    check_text(payload.error_message, prefix + "error_message", MAX_MESSAGE_CHARS)
    if not 0 <= payload.attempt <= MAX_ATTEMPT:
        raise BoundViolation(prefix + "attempt", f"{payload.attempt} outside [0, {MAX_ATTEMPT}]")
    if payload.status not in _REQUEST_STATUSES:
        raise BoundViolation(
            prefix + "status",
            f"{payload.status} is not a RequestStatus {sorted(_REQUEST_STATUSES)}",
        )
    check_duration(payload.duration, prefix + "duration", MAX_REQUEST_DURATION_SECONDS)
    _check_time_to_first_token(payload, prefix)
    tokens = payload.tokens
    for kind in TOKEN_KINDS:
        count = getattr(tokens, kind)
        if not 0 <= count <= MAX_TOKENS_PER_EVENT:
            raise BoundViolation(
                f"{prefix}tokens.{kind}", f"{count} outside [0, {MAX_TOKENS_PER_EVENT}]"
            )
    _check_money(payload.reported_cost, prefix + "reported_cost")


def _check_time_to_first_token(payload: usage_events.RequestCompleted, prefix: str) -> None:
    first_token = payload.time_to_first_token
    field = prefix + "time_to_first_token"
    check_duration(first_token, field, MAX_REQUEST_DURATION_SECONDS)
    if _ttft_exceeds_duration(payload):
        raise BoundViolation(
            field,
            f"{_seconds(first_token)} is longer than duration ({_seconds(payload.duration)}, "
            "0 when unset): the first token cannot come after the whole answer",
        )


def _ttft_exceeds_duration(payload: usage_events.RequestCompleted) -> bool:
    """True when the time to the first token is longer than the call (unset duration: 0)."""
    first, whole = payload.time_to_first_token, payload.duration
    return (first.seconds, first.nanos) > (whole.seconds, whole.nanos)


def _seconds(value: duration_pb2.Duration) -> str:
    """A Duration in seconds, to the nanosecond: ``2.000000001 s``."""
    return f"{value.seconds}.{value.nanos:09d} s"


def _check_money(money: usage_events.Money, field: str) -> None:
    if not 0 <= money.micros <= MAX_COST_MICROS_PER_EVENT:
        raise BoundViolation(
            field + ".micros", f"{money.micros} outside [0, {MAX_COST_MICROS_PER_EVENT}]"
        )
    currency = money.currency
    if currency and not (
        len(currency) == 3 and currency.isascii() and currency.isalpha() and currency.isupper()
    ):
        raise BoundViolation(field + ".currency", f"{currency[:16]!r} is not an ISO 4217 code")


_REQUEST_STATUSES: Final = frozenset(usage_events.RequestStatus.values())
#: Currencies the fast path accepts without a closer look (others go through the ISO 4217 check).
_COMMON_CURRENCIES: Final = frozenset({"", "USD"})


def _first_token_ok(payload: usage_events.RequestCompleted) -> bool:
    """The fast test of time_to_first_token: unset, or within bounds and the duration."""
    if not payload.HasField("time_to_first_token"):
        return True
    first = payload.time_to_first_token
    return (
        0 <= first.seconds < MAX_REQUEST_DURATION_SECONDS
        and 0 <= first.nanos <= MAX_NANOS
        and not _ttft_exceeds_duration(payload)
    )


def request_completed_all_ok(payloads: list[usage_events.RequestCompleted]) -> bool:
    """True when every payload's numbers, enums, currency and model are within bounds.

    The whole-batch form of ``check_request_completed`` for a publisher's batch, leaving the texts
    to the caller (core checks them once over the serialized events). False means: look at each
    payload with ``check_request_completed`` to name the culprit.
    """
    tokens = [p.tokens for p in payloads]
    counts = [
        count
        for t in tokens
        for count in (t.input, t.output, t.cached_read, t.cache_write, t.reasoning)
    ]
    durations = [p.duration for p in payloads]
    seconds = [d.seconds for d in durations]
    nanos = [d.nanos for d in durations]
    costs = [p.reported_cost for p in payloads]
    micros = [c.micros for c in costs]
    attempts = [p.attempt for p in payloads]
    return bool(
        all([p.model for p in payloads])
        and min(counts) >= 0
        and max(counts) <= MAX_TOKENS_PER_EVENT
        and min(attempts) >= 0
        and max(attempts) <= MAX_ATTEMPT
        and {p.status for p in payloads} <= _REQUEST_STATUSES
        and min(seconds) >= 0
        and max(seconds) < MAX_REQUEST_DURATION_SECONDS
        and min(nanos) >= 0
        and max(nanos) <= MAX_NANOS
        and min(micros) >= 0
        and max(micros) <= MAX_COST_MICROS_PER_EVENT
        and {c.currency for c in costs} <= _COMMON_CURRENCIES
        and all(map(_first_token_ok, payloads))
    )


def check_payload(payload: message.Message, prefix: str = "") -> None:
    """Every bound of a payload message; field names are prefixed with ``prefix``."""
    if isinstance(payload, usage_events.RequestCompleted):
        check_request_completed(payload, prefix)
        return
    _check_generic(payload, prefix)


def _check_generic(payload: message.Message, prefix: str) -> None:
    """Bounds derived from the descriptor: text, enums, finite numbers in range, times."""
    message_name = payload.DESCRIPTOR.name
    for field, value in payload.ListFields():
        name = prefix + field.name
        if field.is_repeated:
            for index, item in enumerate(value):
                _check_value(field, message_name, item, f"{name}[{index}]")
        else:
            _check_value(field, message_name, value, name)


def _check_value(field: descriptor.FieldDescriptor, owner: str, value: object, name: str) -> None:
    kind = field.type
    if kind == descriptor.FieldDescriptor.TYPE_STRING:
        assert isinstance(value, str)
        check_text(value, name, LONG_TEXT_FIELDS.get(field.name, MAX_LABEL_CHARS))
    elif kind == descriptor.FieldDescriptor.TYPE_MESSAGE:
        assert isinstance(value, message.Message)
        _check_message_value(value, name)
    elif kind == descriptor.FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type
        if enum is not None and value not in enum.values_by_number:
            raise BoundViolation(name, f"{value} is not a {enum.name} value")
    elif kind in _NUMBER_TYPES:
        assert isinstance(value, int | float)
        _check_number(value, name, NUMBER_RANGES.get(f"{owner}.{field.name}"))


def _check_message_value(value: message.Message, name: str) -> None:
    if isinstance(value, timestamp_pb2.Timestamp):
        check_timestamp(value, name)
    elif isinstance(value, duration_pb2.Duration):
        check_duration(value, name, DURATION_MAX_SECONDS)
    else:
        _check_generic(value, name + ".")


def _check_number(value: float, name: str, bounds: tuple[float, float] | None) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise BoundViolation(name, f"{value} is not a finite number")
    low, high = bounds if bounds is not None else (0, INT64_MAX)
    if not low <= value <= high:
        raise BoundViolation(name, f"{value} outside [{low}, {high}]")


_NUMBER_TYPES: Final = frozenset(
    {
        descriptor.FieldDescriptor.TYPE_INT32,
        descriptor.FieldDescriptor.TYPE_INT64,
        descriptor.FieldDescriptor.TYPE_SINT32,
        descriptor.FieldDescriptor.TYPE_SINT64,
        descriptor.FieldDescriptor.TYPE_SFIXED32,
        descriptor.FieldDescriptor.TYPE_SFIXED64,
        descriptor.FieldDescriptor.TYPE_DOUBLE,
        descriptor.FieldDescriptor.TYPE_FLOAT,
    }
)
