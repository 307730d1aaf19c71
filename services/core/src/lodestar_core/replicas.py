"""This core replica's presence in the database, which lets several replicas share one log.

Every replica refreshes its row in ``core_replicas`` each ``replica_heartbeat_seconds``. A
replica unseen for ``takeover_after_seconds`` counts as dead: another may claim the subscriptions
it held. A replica streams only while its own last refresh is recent enough that nobody could
have declared it dead yet (``may_deliver``), so two replicas never deliver one subscription at
once, even when one of them is paused rather than dead.
"""

from __future__ import annotations

import time
from datetime import timedelta

import asyncpg

from lodestar.common.leases import replica_id
from lodestar.common.logging import get_logger

log = get_logger(__name__)

#: Rows of replicas unseen for this long are removed.
FORGET_AFTER = timedelta(hours=1)


class ReplicaPresence:
    """Heartbeats this replica and tells whether it may still deliver."""

    def __init__(self, pool: asyncpg.Pool, heartbeat_seconds: float, takeover_after: float) -> None:
        self.id = replica_id()
        self.takeover_after = timedelta(seconds=takeover_after)
        self._pool = pool
        # What a heartbeat proves: nobody declares us dead within takeover_after of it. Stop
        # delivering a heartbeat interval earlier, as a margin for the refresh in flight.
        self._valid_for = max(takeover_after - heartbeat_seconds, heartbeat_seconds)
        self._valid_until = 0.0
        #: Other replicas alive at the last heartbeat: with none, nobody else appends events.
        self.peers = 0
        #: Grows whenever this replica could have been taken for dead (a heartbeat that ended
        #: after the previous one's validity): holds claimed before then are void.
        self.generation = 0

    async def heartbeat(self) -> None:
        """Record that this replica is alive (and forget replicas long gone)."""
        started = time.monotonic()
        async with self._pool.acquire() as conn:
            await conn.execute(
                """INSERT INTO core_replicas (id) VALUES ($1)
                   ON CONFLICT (id) DO UPDATE SET seen_at = now()""",
                self.id,
            )
            await conn.execute(
                "DELETE FROM core_replicas WHERE seen_at < now() - $1::interval", FORGET_AFTER
            )
            self.peers = await conn.fetchval(
                "SELECT count(*) FROM core_replicas "
                "WHERE id <> $1 AND seen_at > now() - $2::interval",
                self.id,
                self.takeover_after,
            )
        if time.monotonic() >= self._valid_until:
            self.generation += 1
            log.info("replica (re)joined", replica=self.id, generation=self.generation)
        self._valid_until = started + self._valid_for

    def may_deliver(self, generation: int) -> bool:
        """Whether a hold claimed in ``generation`` is still guaranteed by the heartbeats."""
        return generation == self.generation and time.monotonic() < self._valid_until

    async def leave(self) -> None:
        """Drop this replica's row and holds: its subscriptions may be claimed at once."""
        async with self._pool.acquire() as conn:
            await conn.execute("UPDATE subscriptions SET holder = NULL WHERE holder = $1", self.id)
            await conn.execute("DELETE FROM core_replicas WHERE id = $1", self.id)
