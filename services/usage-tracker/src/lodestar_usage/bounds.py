"""The bounds of every number, time and text usage-tracker accepts, and the checks enforcing them.

A value outside its bound is refused with INVALID_ARGUMENT naming the field and the bound (API.md,
"Bounds"). Per-request maxima are those of an event (``lodestar.common.bounds``, where the reasons
for their size are written down): a Reserve estimate or a Commit is one request. Reads add up in
``numeric`` and report a group whose sum does not fit int64 instead of failing (reports.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from lodestar.common import bounds as common
from lodestar.common.errors import InvalidArgumentError

#: Every time usage-tracker accepts (event times, query windows, price dates) lies in
#: [EARLIEST, LATEST]: inside protobuf Timestamp's range and Postgres' finite timestamps.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
EARLIEST_SECONDS = int(EARLIEST.timestamp())
LATEST_SECONDS = int(LATEST.timestamp())
WINDOW_TEXT = f"{EARLIEST:%Y-%m-%d}T00:00:00Z..{LATEST:%Y-%m-%d}T00:00:00Z"

INT64_MAX = common.INT64_MAX
#: Free text (model, provider, project, user, session, filter values, reservation ids).
MAX_TEXT = common.MAX_LABEL_CHARS
MAX_NAME = 200
MAX_TIMEZONE = 64
MAX_FILTER_VALUES = 100
MAX_GROUPS = 8
#: Page tokens carry a label of up to MAX_TEXT characters (4 bytes each in UTF-8), base64.
MAX_PAGE_TOKEN = 4096
MAX_THRESHOLDS = 20
MAX_THRESHOLD_PCT = common.MAX_THRESHOLD_PCT
#: One request's cost (reported), and a Reserve estimate or Commit actual: $10,000.
MAX_COST_MICROS = common.MAX_COST_MICROS_PER_EVENT
#: One request's tokens of one kind.
MAX_TOKENS_PER_KIND = common.MAX_TOKENS_PER_EVENT
#: A Reserve estimate or Commit actual: all token kinds of one request.
MAX_TOKENS = len(common.TOKEN_KINDS) * common.MAX_TOKENS_PER_EVENT
#: One request's duration.
MAX_DURATION_SECONDS = common.MAX_REQUEST_DURATION_SECONDS
MAX_ATTEMPT = common.MAX_ATTEMPT
#: A budget's limits (micro-dollars or tokens) and session caps: $1,000,000,000.
MAX_LIMIT = 10**15
#: The ceiling of setting limits.max_budget_window_days (rolling budgets, session max_duration).
MAX_BUDGET_WINDOW_DAYS = 3660
#: Largest valid protobuf Duration (10,000 years).
_DURATION_SECONDS = 315_576_000_000
_NANOS = 999_999_999


def timestamp(stamp: timestamp_pb2.Timestamp, field: str) -> datetime:
    """``stamp`` as an aware UTC datetime; INVALID_ARGUMENT unless inside [EARLIEST, LATEST]."""
    if not 0 <= stamp.nanos <= _NANOS:
        raise InvalidArgumentError(f"nanos {stamp.nanos} must be 0..{_NANOS}", field=field)
    return seconds_in_window(stamp.seconds, stamp.nanos // 1000, field)


def seconds_in_window(seconds: int, micros: int, field: str) -> datetime:
    """The UTC time ``seconds`` (+ ``micros``) since 1970; INVALID_ARGUMENT outside the window."""
    if not EARLIEST_SECONDS <= seconds < LATEST_SECONDS and not (
        seconds == LATEST_SECONDS and micros == 0
    ):
        raise InvalidArgumentError(
            f"must be within {WINDOW_TEXT}; got {seconds} seconds since 1970", field=field
        )
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros)


def in_window(value: datetime, field: str) -> datetime:
    """``value`` itself; INVALID_ARGUMENT unless inside [EARLIEST, LATEST]."""
    if not EARLIEST <= value <= LATEST:
        raise InvalidArgumentError(
            f"must be within {WINDOW_TEXT}; got {value.isoformat()}", field=field
        )
    return value


def day_in_window(day: date, field: str) -> date:
    """``day`` itself; INVALID_ARGUMENT unless its midnight (UTC) is inside [EARLIEST, LATEST]."""
    in_window(datetime(day.year, day.month, day.day, tzinfo=UTC), field)
    return day


def duration(
    value: duration_pb2.Duration, field: str, *, max_seconds: float, why: str = ""
) -> timedelta:
    """A valid, non-negative Duration of at most ``max_seconds``; INVALID_ARGUMENT otherwise."""
    seconds, nanos = value.seconds, value.nanos
    if abs(seconds) > _DURATION_SECONDS or abs(nanos) > _NANOS or seconds * nanos < 0:
        raise InvalidArgumentError(
            f"not a valid Duration (seconds {seconds}, nanos {nanos}): seconds within "
            f"±{_DURATION_SECONDS}, nanos within ±{_NANOS} and of the same sign",
            field=field,
        )
    if seconds < 0 or nanos < 0:
        raise InvalidArgumentError("must not be negative", field=field)
    if seconds + nanos / 1e9 > max_seconds:
        where = f" ({why})" if why else ""
        raise InvalidArgumentError(
            f"at most {number(max_seconds)} seconds{where}; got {seconds} seconds", field=field
        )
    return timedelta(seconds=seconds, microseconds=nanos // 1000)


def number(value: float) -> str:
    """``value`` written plainly: whole numbers without a fraction or an exponent."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def integer(value: int, field: str, low: int, high: int, *, why: str = "") -> int:
    """``value`` if ``low <= value <= high``; INVALID_ARGUMENT naming the bound otherwise."""
    if not low <= value <= high:
        where = f" ({why})" if why else ""
        raise InvalidArgumentError(f"must be {low}..{high}{where}; got {value}", field=field)
    return value


def text(value: str, field: str, max_length: int = MAX_TEXT) -> str:
    """``value`` if at most ``max_length`` characters without NUL; INVALID_ARGUMENT otherwise."""
    if len(value) > max_length:
        raise InvalidArgumentError(
            f"at most {max_length} characters; got {len(value)}", field=field
        )
    if "\x00" in value:
        raise InvalidArgumentError("must not contain NUL (U+0000)", field=field)
    return value


def texts(
    values: Sequence[str],
    field: str,
    *,
    max_values: int = MAX_FILTER_VALUES,
    max_length: int = MAX_TEXT,
) -> list[str]:
    """``values`` if at most ``max_values`` texts each passing ``text``.

    Otherwise INVALID_ARGUMENT names the list or the first bad entry (``field[i]``).
    """
    if len(values) > max_values:
        raise InvalidArgumentError(f"at most {max_values} values; got {len(values)}", field=field)
    return [text(value, f"{field}[{i}]", max_length) for i, value in enumerate(values)]


# --- SQL sums -----------------------------------------------------------------------------------


def plain_add(stored: str, added: str) -> str:
    """SQL for ``stored + added`` (fails the statement beyond int64)."""
    return f"{stored} + {added}"


def saturating_add(stored: str, added: str) -> str:
    """SQL for ``stored + added`` that stays at ±(2^63 - 1) instead of failing the statement.

    Bounded events never get a sum there, but one bad stored row (a restore, a hand edit) must
    not fail every later batch of its group, and the good events batched with them. The nested
    CASE fixes the evaluation order, so no subtraction below can overflow either.
    """
    return (
        f"CASE WHEN {stored} > 0 THEN CASE WHEN {added} > {INT64_MAX} - {stored} THEN {INT64_MAX} "
        f"ELSE {stored} + {added} END "
        f"WHEN {stored} < 0 THEN CASE WHEN {added} < -{INT64_MAX} - {stored} THEN -{INT64_MAX} "
        f"ELSE {stored} + {added} END ELSE {added} END"
    )
