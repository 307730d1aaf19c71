"""How a Summary window is split into rollups and ledger reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from lodestar_usage.reports import segments

H = timedelta(hours=1)
T0 = datetime(2025, 6, 1, 10, 0, tzinfo=UTC)


def test_whole_hours_and_days_come_from_rollups():
    start, end = T0 - 30 * H, T0 + 20 * H
    assert segments(start, end, daily=True, now=end) == [
        ("hourly", start, datetime(2025, 6, 1, tzinfo=UTC)),
        ("daily", datetime(2025, 6, 1, tzinfo=UTC), datetime(2025, 6, 2, tzinfo=UTC)),
        ("hourly", datetime(2025, 6, 2, tzinfo=UTC), end),
    ]


def test_a_window_ending_now_reads_its_last_hour_as_rollup_minus_the_future():
    now = T0 + timedelta(minutes=41)
    assert segments(T0 - 2 * H, now, daily=False, now=now) == [
        ("hourly", T0 - 2 * H, T0),
        ("hourly", T0, T0 + H),
        ("unledger", now, T0 + H),
    ]


def test_an_edge_reads_whichever_part_of_its_hour_is_shorter():
    early = T0 + timedelta(minutes=10)
    late = T0 + timedelta(minutes=50)
    now = T0 + 5 * H
    # [10:10, 11:00) is 50 minutes; the other 10 minutes are cheaper to subtract.
    assert segments(early, T0 + 2 * H, daily=False, now=now)[:2] == [
        ("hourly", T0, T0 + H),
        ("unledger", T0, early),
    ]
    # [10:50, 11:00) is 10 minutes: read directly.
    assert segments(late, T0 + 2 * H, daily=False, now=now)[0] == ("ledger", late, T0 + H)


def test_a_window_inside_one_hour():
    a, b = T0 + timedelta(minutes=1), T0 + timedelta(minutes=59)
    assert segments(a, b, daily=True, now=T0 + 3 * H) == [
        ("hourly", T0, T0 + H),
        ("unledger", T0, a),
        ("unledger", b, T0 + H),
    ]
    c = T0 + timedelta(minutes=20)
    assert segments(a, c, daily=True, now=T0 + 3 * H) == [("ledger", a, c)]
    assert segments(a, a, daily=True, now=T0) == []
