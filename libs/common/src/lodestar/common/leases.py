"""Single-active replica: a named lease in the service's own schema, held by one replica at a time.

For work that one replica of a service must do alone (the health-monitor's prober, say) while the
others stand by and take over when it dies. The lease lives in a ``leases`` table of the
service's schema (the service ships ``LEASES_MIGRATION`` as one of its migrations). Taking it
grows its ``epoch``, a fencing token the work can attach to its writes (``WHERE epoch = …``), so a
replica that lost the lease can no longer change anything. A holder works only while its last
renewal is younger than the lease's time to live minus one renewal interval, so two replicas
never work at once, even if one of them was paused rather than dead. Transaction-scoped
statements only: it works behind a transaction-pooling PgBouncer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg

from lodestar.common.logging import get_logger

log = get_logger(__name__)

#: The table a service adds to its migrations to use leases.
LEASES_MIGRATION = """
CREATE TABLE leases (
    name       text PRIMARY KEY,
    holder     text NOT NULL,
    epoch      bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
"""

ACQUIRE = """
INSERT INTO leases AS l (name, holder, epoch, expires_at) VALUES ($1, $2, 1, now() + $3::interval)
ON CONFLICT (name) DO UPDATE SET holder = $2, epoch = l.epoch + 1, expires_at = now() + $3::interval
    WHERE l.expires_at < now()
RETURNING epoch
"""
RENEW = """
UPDATE leases SET expires_at = now() + $4::interval
WHERE name = $1 AND holder = $2 AND epoch = $3
RETURNING epoch
"""
RELEASE = (
    "UPDATE leases SET expires_at = '-infinity' WHERE name = $1 AND holder = $2 AND epoch = $3"
)


@dataclass(frozen=True)
class Held:
    """A held lease: its name and the epoch to fence writes with."""

    name: str
    epoch: int


def replica_id() -> str:
    """A name for this process among the service's replicas."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Lease:
    """One named lease, taken and renewed by this replica."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        name: str,
        *,
        ttl_seconds: float = 10.0,
        renew_seconds: float = 2.0,
        holder: str | None = None,
    ) -> None:
        if ttl_seconds < 2 * renew_seconds:
            raise ValueError("ttl_seconds must be at least twice renew_seconds")
        self.name = name
        self.holder = holder or replica_id()
        self._pool = pool
        self._ttl = timedelta(seconds=ttl_seconds)
        self._renew_seconds = renew_seconds
        self._valid_for = ttl_seconds - renew_seconds
        self._valid_until = 0.0
        self.held: Held | None = None

    async def try_acquire(self) -> Held | None:
        """Take the lease if it is free or expired; None while another replica holds it."""
        started = time.monotonic()
        epoch = await self._pool.fetchval(ACQUIRE, self.name, self.holder, self._ttl)
        if epoch is None:
            return None
        self._valid_until = started + self._valid_for
        self.held = Held(self.name, epoch)
        return self.held

    async def renew(self) -> bool:
        """Extend the lease; False when it was lost (expired and taken, or never held)."""
        if self.held is None:
            return False
        started = time.monotonic()
        renewed = await self._pool.fetchval(
            RENEW, self.name, self.holder, self.held.epoch, self._ttl
        )
        if renewed is None or time.monotonic() >= self._valid_until:
            self.held = None  # we may have been taken for dead: never work on this epoch again
            return False
        self._valid_until = started + self._valid_for
        return True

    def is_valid(self) -> bool:
        """Whether this replica may still act as the holder (its renewals are recent enough)."""
        return self.held is not None and time.monotonic() < self._valid_until

    async def release(self) -> None:
        """Give the lease up so another replica may take it at once."""
        if self.held is not None:
            await self._pool.execute(RELEASE, self.name, self.holder, self.held.epoch)
            self.held = None

    async def run_while_held(
        self, work: Callable[[Held], Coroutine[Any, Any, None]], stop: asyncio.Event
    ) -> None:
        """Until ``stop``, run ``work`` whenever this replica holds the lease.

        It stands by for the lease, runs ``work`` while holding it, cancels ``work`` as soon as
        the lease is lost, and stands by again. Releases the lease on stop.
        """
        try:
            while not stop.is_set():
                held = await self._stand_by(stop)
                if held is not None:
                    await self._work_while_valid(work, held, stop)
        finally:
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await self.release()

    async def _stand_by(self, stop: asyncio.Event) -> Held | None:
        while not stop.is_set():
            try:
                held = await self.try_acquire()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("cannot reach the lease", lease=self.name, error=str(exc))
                held = None
            if held is not None:
                log.info("lease taken", lease=self.name, epoch=held.epoch, holder=self.holder)
                return held
            await _wait(stop, self._renew_seconds)
        return None

    async def _work_while_valid(
        self, work: Callable[[Held], Coroutine[Any, Any, None]], held: Held, stop: asyncio.Event
    ) -> None:
        task = asyncio.create_task(work(held), name=f"lease-{self.name}")
        try:
            while not stop.is_set() and not task.done():
                await _wait(stop, self._renew_seconds, task)
                if stop.is_set() or task.done():
                    break
                try:
                    still_held = await self.renew()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("cannot renew the lease", lease=self.name, error=str(exc))
                    still_held = self.is_valid()
                if not still_held:
                    log.warning("lease lost; standing by", lease=self.name, epoch=held.epoch)
                    break
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _wait(
    stop: asyncio.Event, seconds: float, task: asyncio.Task[None] | None = None
) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set or ``task`` ends."""
    waiters: set[asyncio.Future[object]] = {asyncio.ensure_future(stop.wait())}
    if task is not None:
        waiters.add(task)  # type: ignore[arg-type]
    done, pending = await asyncio.wait(
        waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
    )
    for waiter in pending:
        if waiter is not task:
            waiter.cancel()
    del done
