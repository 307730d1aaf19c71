"""Bounds of RequestCompleted.time_to_first_token, on the fast path and the field-naming one."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2

from lodestar.common import bounds
from lodestar.usage.v1 import events_pb2 as ev


def _completed(
    duration: tuple[int, int] | None, first_token: tuple[int, int] | None
) -> ev.RequestCompleted:
    payload = ev.RequestCompleted(model="gpt-4o")
    if duration is not None:
        payload.duration.CopyFrom(duration_pb2.Duration(seconds=duration[0], nanos=duration[1]))
    if first_token is not None:
        payload.time_to_first_token.CopyFrom(
            duration_pb2.Duration(seconds=first_token[0], nanos=first_token[1])
        )
    return payload


@pytest.mark.parametrize(
    ("duration", "first_token"),
    [(None, None), ((2, 0), None), ((2, 0), (0, 350_000_000)), ((2, 0), (2, 0)), (None, (0, 0))],
)
def test_a_first_token_within_the_call_is_accepted(
    duration: tuple[int, int] | None, first_token: tuple[int, int] | None
) -> None:
    payload = _completed(duration, first_token)
    bounds.check_request_completed(payload)
    assert bounds.request_completed_all_ok([payload])


@pytest.mark.parametrize(
    ("duration", "first_token", "says"),
    [
        ((2, 0), (2, 1), "2.000000001 s is longer than duration (2.000000000 s"),
        (None, (1, 0), "0 when unset"),
        ((0, 0), (0, 1), "longer than duration"),
        (None, (-1, 0), "non-negative"),
        (None, (0, -1), "non-negative"),
        (None, (bounds.MAX_REQUEST_DURATION_SECONDS + 1, 0), "at most"),
    ],
)
def test_an_impossible_first_token_is_refused_by_name(
    duration: tuple[int, int] | None, first_token: tuple[int, int], says: str
) -> None:
    payload = _completed(duration, first_token)
    assert not bounds.request_completed_all_ok([payload, _completed(None, None)])
    with pytest.raises(bounds.BoundViolation) as refused:
        bounds.check_request_completed(payload, prefix="events[0].")
    assert refused.value.field == "events[0].time_to_first_token"
    assert says in refused.value.description
