"""Event ids: UUIDv7s that sort in minting order and never run ahead of the clock."""

from __future__ import annotations

import time
import uuid

from lodestar.common.events import new_event_id, uuid7_millis

FAST_BURST = 200_000


def test_a_fast_burst_of_ids_stays_on_the_clock_and_in_order() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_event_id() for _ in range(FAST_BURST)]
    after = time.time_ns() // 1_000_000
    minted = [uuid.UUID(i) for i in ids]
    assert ids == sorted(ids)
    assert len(set(ids)) == FAST_BURST
    assert {u.version for u in minted} == {7}
    assert {u.variant for u in minted} == {uuid.RFC_4122}
    # many ids share a millisecond: they count up instead of borrowing later milliseconds
    assert all(before <= uuid7_millis(u) <= after for u in minted)
    assert len({uuid7_millis(u) for u in minted}) < FAST_BURST
