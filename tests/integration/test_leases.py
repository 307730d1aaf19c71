"""lodestar.common.leases on the real Postgres: one holder at a time, fenced epochs, takeover."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from lodestar.common.db import create_pool
from lodestar.common.leases import LEASES_MIGRATION, Held, Lease

TTL, RENEW = 1.0, 0.2


@pytest.fixture
async def pool(database_url: str, schema: str) -> AsyncIterator[asyncpg.Pool]:
    admin = await asyncpg.connect(database_url)
    await admin.execute(f"CREATE SCHEMA {schema}")
    await admin.close()
    pool = await create_pool(database_url, schema)
    await pool.execute(LEASES_MIGRATION)
    try:
        yield pool
    finally:
        await pool.close()


def lease(pool: asyncpg.Pool, holder: str) -> Lease:
    return Lease(pool, "prober", ttl_seconds=TTL, renew_seconds=RENEW, holder=holder)


async def test_one_holder_at_a_time_and_a_takeover_after_the_ttl_with_a_new_epoch(pool):
    first, second = lease(pool, "first"), lease(pool, "second")
    held = await first.try_acquire()
    assert held == Held("prober", 1)
    assert await second.try_acquire() is None
    assert await first.renew()
    await asyncio.sleep(TTL + 0.2)  # first stops renewing, as if it died
    taken = await second.try_acquire()
    assert taken == Held("prober", 2)
    assert not await first.renew()  # fenced: its epoch is gone
    assert not first.is_valid()
    await second.release()
    assert await first.try_acquire() == Held("prober", 3)  # a release frees it at once


async def test_a_holder_paused_past_its_validity_never_works_on_that_epoch_again(pool):
    first = lease(pool, "first")
    assert await first.try_acquire() is not None
    time.sleep(TTL - RENEW + 0.05)  # blocks the loop: a pause, not a death
    assert not first.is_valid()
    assert not await first.renew()  # the row was still ours, but someone may have taken us for dead
    assert first.held is None


async def test_run_while_held_runs_the_work_on_one_replica_and_hands_it_over(pool):
    running: list[str] = []
    overlaps: list[tuple[str, ...]] = []
    stops = {name: asyncio.Event() for name in ("first", "second")}

    def work_for(name: str):  # type: ignore[no-untyped-def]
        async def work(held: Held) -> None:
            running.append(name)
            try:
                while True:
                    if len(running) > 1:
                        overlaps.append(tuple(running))
                    await asyncio.sleep(0.02)
            finally:
                running.remove(name)

        return work

    leases = {name: lease(pool, name) for name in stops}
    tasks = {
        name: asyncio.create_task(leases[name].run_while_held(work_for(name), stops[name]))
        for name in stops
    }
    await asyncio.sleep(0.5)
    assert len(running) == 1
    active = running[0]
    standby = "second" if active == "first" else "first"
    stops[active].set()  # a clean stop releases the lease: the standby takes over promptly
    await asyncio.wait_for(tasks[active], 5)
    deadline = time.monotonic() + 5
    while running != [standby]:
        assert time.monotonic() < deadline, "the standby did not take over"
        await asyncio.sleep(0.05)
    stops[standby].set()
    await asyncio.wait_for(tasks[standby], 5)
    assert overlaps == []
    assert running == []
