"""What ``lodestar events tail`` prints and when it stops (``lodestar_core.cli.TailPlan``)."""

from __future__ import annotations

from lodestar_core.cli import TailPlan


def test_without_from_start_only_events_after_the_head_at_start_are_printed():
    plan = TailPlan(limit=0, from_start=False, head=10)
    assert [seq for seq in (9, 10, 11, 12) if plan.wants(seq)] == [11, 12]


def test_from_start_prints_everything_it_is_given():
    plan = TailPlan(limit=0, from_start=True, head=10, backlog=10)
    assert all(plan.wants(seq) for seq in (1, 10, 11))


def test_limit_stops_after_n_events():
    plan = TailPlan(limit=2, from_start=False, head=0)
    plan.printed = 1
    assert not plan.done()
    plan.printed = 2
    assert plan.done()


def test_from_start_with_a_limit_stops_when_the_stored_events_are_shown():
    plan = TailPlan(limit=5, from_start=True, head=3, backlog=1)
    assert not plan.done()
    plan.printed = 1
    assert plan.done()
    assert TailPlan(limit=5, from_start=True, head=0, backlog=0).done()


def test_without_a_limit_a_tail_never_ends_by_itself():
    plan = TailPlan(limit=0, from_start=True, head=3, backlog=1)
    plan.printed = 1000
    assert not plan.done()
