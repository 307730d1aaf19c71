"""Durable subscription state: cursors, failure counts, dead letters and replays."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from lodestar.common import audit
from lodestar.common.errors import (
    ModuleError,
    NetworkError,
    NotFoundError,
    PermissionDeniedError,
)


@dataclass(frozen=True)
class SubscriptionRow:
    """A subscription as stored."""

    name: str
    module: str
    event_types: list[str]
    acked_seq: int
    #: Whether a live core replica holds it (a stream is open).
    connected: bool = False
    #: Grows on every claim; a replica may move the cursor only with the epoch it claimed.
    epoch: int = 0


class SubscriptionHeld(ModuleError):
    """A live replica streams the subscription already: one consumer at a time."""

    reason = "SUBSCRIPTION_HELD"


class HoldLost(NetworkError):
    """This replica may no longer stream the subscription.

    It was claimed elsewhere, or this replica could not prove it is alive: the stream ends
    UNAVAILABLE and the client reconnects.
    """


@dataclass(frozen=True)
class DeadLetterRow:
    """A dead letter as stored."""

    subscription: str
    seq: int
    attempts: int
    last_error: str
    envelope: bytes


_COLUMNS = "name, module, event_types, acked_seq, epoch"


def _live_holder(takeover_parameter: str) -> str:
    """SQL true when row ``s``'s holder is a replica seen within the takeover time."""
    return (
        "EXISTS (SELECT 1 FROM core_replicas r WHERE r.id = s.holder "  # noqa: S608
        f"AND r.seen_at > now() - {takeover_parameter}::interval)"
    )


class SubscriptionStore:
    """Reads and writes subscription state in core's schema."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def open(
        self,
        name: str,
        module: str,
        event_types: Sequence[str],
        start_after: int,
        *,
        owner: str | None,
        replica: str,
        takeover_after: timedelta,
    ) -> SubscriptionRow:
        """Claim the subscription ``name`` for ``replica``, creating it at ``start_after`` if new.

        A subscription belongs to the principal that created it (``owner``); ``owner=None`` is an
        admin, who may open any subscription and creates subscriptions only admins may open.
        The claim succeeds when no live replica holds it (one unseen for ``takeover_after`` is
        dead) and grows its epoch; otherwise SubscriptionHeld, and nothing changes.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """INSERT INTO subscriptions (name, module, event_types, acked_seq, owner)
                   VALUES ($1, $2, $3, $4, coalesce($5, ''))
                   ON CONFLICT (name) DO UPDATE
                     SET module = EXCLUDED.module, event_types = EXCLUDED.event_types,
                         updated_at = now()
                     WHERE $5::text IS NULL OR subscriptions.owner = $5
                   RETURNING name""",
                name,
                module,
                list(event_types),
                start_after,
                owner,
            )
            if row is None:
                holder = await conn.fetchval(
                    "SELECT owner FROM subscriptions WHERE name = $1", name
                )
                raise PermissionDeniedError(
                    f"subscription {name!r} belongs to {holder or 'the admins'!r}; {owner} may "
                    "not open it (choose another subscription name)",
                    field="open.subscription",
                )
            claimed = await conn.fetchrow(
                f"""UPDATE subscriptions s SET holder = $2, epoch = epoch + 1
                    WHERE name = $1 AND (holder IS NULL OR holder = $2 OR NOT {_live_holder("$3")})
                    RETURNING {_COLUMNS}, true AS connected""",  # noqa: S608
                name,
                replica,
                takeover_after,
            )
            if claimed is None:
                holder = await conn.fetchval(
                    "SELECT holder FROM subscriptions WHERE name = $1", name
                )
                raise SubscriptionHeld(
                    f"subscription {name!r} is connected on core replica {holder}; one consumer "
                    "at a time",
                    field="open.subscription",
                )
        return _subscription(claimed)

    async def release(self, name: str, epoch: int) -> None:
        """Give up this replica's hold, if it still has it."""
        await self._pool.execute(
            "UPDATE subscriptions SET holder = NULL WHERE name = $1 AND epoch = $2", name, epoch
        )

    async def list(self, takeover_after: timedelta) -> list[SubscriptionRow]:
        """Every subscription, by name; ``connected`` when a live replica holds it."""
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS}, holder IS NOT NULL AND {_live_holder('$1')} AS connected "  # noqa: S608
            "FROM subscriptions s ORDER BY name",
            takeover_after,
        )
        return [_subscription(r) for r in rows]

    async def advance(self, name: str, acked_seq: int, epoch: int) -> None:
        """Move the cursor forward to ``acked_seq`` (never backwards) under the claim ``epoch``.

        Raises HoldLost when another replica has claimed the subscription since.
        """
        status = await self._pool.execute(
            "UPDATE subscriptions SET acked_seq = greatest(acked_seq, $2), updated_at = now() "
            "WHERE name = $1 AND epoch = $3",
            name,
            acked_seq,
            epoch,
        )
        if status == "UPDATE 0":
            raise HoldLost(f"subscription {name!r} was claimed by another core replica; reconnect")

    async def failure_counts(self, name: str, after: int) -> dict[int, int]:
        """Recorded failed attempts of events after the cursor, by sequence."""
        rows = await self._pool.fetch(
            "SELECT seq, attempts FROM delivery_failures WHERE subscription = $1 AND seq > $2",
            name,
            after,
        )
        return {r["seq"]: r["attempts"] for r in rows}

    async def record_failure(self, name: str, seq: int, error: str) -> int:
        """Count one failed attempt; returns the total so far."""
        attempts: int = await self._pool.fetchval(
            """INSERT INTO delivery_failures (subscription, seq, attempts, last_error)
               VALUES ($1, $2, 1, $3)
               ON CONFLICT (subscription, seq) DO UPDATE
                 SET attempts = delivery_failures.attempts + 1, last_error = EXCLUDED.last_error
               RETURNING attempts""",
            name,
            seq,
            error[:2000],
        )
        return attempts

    async def clear_failures(self, name: str, sequences: builtins.list[int]) -> None:
        """Forget the failed attempts of events that have since been handled."""
        await self._pool.execute(
            "DELETE FROM delivery_failures WHERE subscription = $1 AND seq = ANY($2::bigint[])",
            name,
            sequences,
        )

    async def dead_letter(self, name: str, seq: int, envelope: bytes) -> None:
        """Move an event that failed too often to the dead-letter list."""
        async with self._pool.acquire() as conn, conn.transaction():
            failure = await conn.fetchrow(
                "DELETE FROM delivery_failures WHERE subscription = $1 AND seq = $2 "
                "RETURNING attempts, last_error",
                name,
                seq,
            )
            attempts = failure["attempts"] if failure else 0
            last_error = failure["last_error"] if failure else ""
            await conn.execute(
                """INSERT INTO dead_letters (subscription, seq, attempts, last_error, envelope)
                   VALUES ($1, $2, $3, $4, $5) ON CONFLICT (subscription, seq) DO UPDATE
                   SET attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error,
                       dead_at = now()""",
                name,
                seq,
                attempts,
                last_error,
                envelope,
            )

    async def dead_letters(
        self, name: str, limit: int, owner: str | None = None
    ) -> builtins.list[DeadLetterRow]:
        """Dead letters of ``name`` (all subscriptions when empty), oldest first.

        With ``owner``, only those of subscriptions it owns.
        """
        rows = await self._pool.fetch(
            """SELECT d.subscription, d.seq, d.attempts, d.last_error, d.envelope
               FROM dead_letters d JOIN subscriptions s ON s.name = d.subscription
               WHERE ($1 = '' OR d.subscription = $1) AND ($3::text IS NULL OR s.owner = $3)
               ORDER BY d.subscription, d.seq LIMIT $2""",
            name,
            limit,
            owner,
        )
        return [DeadLetterRow(**dict(r)) for r in rows]

    async def count_owned(self, owner: str) -> int:
        """How many subscriptions ``owner`` owns."""
        count: int = await self._pool.fetchval(
            "SELECT count(*) FROM subscriptions WHERE owner = $1", owner
        )
        return count

    async def owner_of(self, name: str) -> str | None:
        """The owner of subscription ``name`` ('' for the admins'), or None if there is none."""
        owner: str | None = await self._pool.fetchval(
            "SELECT owner FROM subscriptions WHERE name = $1", name
        )
        return owner

    async def dead_letter_counts(self) -> dict[str, int]:
        """Number of dead letters per subscription."""
        rows = await self._pool.fetch(
            "SELECT subscription, count(*) AS n FROM dead_letters GROUP BY subscription"
        )
        return {r["subscription"]: r["n"] for r in rows}

    async def replay(self, name: str, sequences: Sequence[int]) -> int:
        """Queue dead letters (all of ``name``'s when ``sequences`` is empty) for redelivery.

        Audited: the entry lists the dead letters moved (before) and the redeliveries (after).
        """
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT true FROM subscriptions WHERE name = $1", name):
                raise NotFoundError(f"no subscription named {name!r}", field="subscription")
            moved = await conn.fetch(
                """DELETE FROM dead_letters
                   WHERE subscription = $1 AND (cardinality($2::bigint[]) = 0 OR seq = ANY($2))
                   RETURNING seq, envelope, attempts, last_error""",
                name,
                list(sequences),
            )
            await conn.executemany(
                "INSERT INTO redeliveries (subscription, seq, envelope) VALUES ($1, $2, $3) "
                "ON CONFLICT DO NOTHING",
                [(name, r["seq"], r["envelope"]) for r in moved],
            )
            await _audit_replay(conn, name, moved)
        return len(moved)

    async def delete(self, name: str) -> int:
        """Delete ``name`` with its failures, dead letters and redeliveries.

        Returns how many dead letters went with it. Audited: the entry holds the subscription as
        it was.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            dead = await conn.fetchval(
                "SELECT count(*) FROM dead_letters WHERE subscription = $1", name
            )
            row = await conn.fetchrow("DELETE FROM subscriptions WHERE name = $1 RETURNING *", name)
            if row is None:
                raise NotFoundError(f"no subscription named {name[:128]!r}", field="subscription")
            await audit.record(
                conn,
                action="EventBusService/DeleteSubscription",
                target=f"subscription/{name}",
                before={
                    "module": row["module"],
                    "owner": row["owner"],
                    "event_types": list(row["event_types"]),
                    "acked_sequence": row["acked_seq"],
                    "dead_letters": dead,
                },
                after=None,
            )
        return int(dead)

    async def redeliveries(self, name: str, limit: int) -> builtins.list[tuple[int, bytes]]:
        """Replayed dead letters waiting for ``name``."""
        rows = await self._pool.fetch(
            "SELECT seq, envelope FROM redeliveries WHERE subscription = $1 ORDER BY seq LIMIT $2",
            name,
            limit,
        )
        return [(r["seq"], r["envelope"]) for r in rows]

    async def finish_redelivery(self, name: str, seq: int) -> None:
        """Forget a replayed dead letter once it was acked."""
        await self._pool.execute(
            "DELETE FROM redeliveries WHERE subscription = $1 AND seq = $2", name, seq
        )

    async def lag(self, row: SubscriptionRow, head: int) -> int:
        """Matching events stored after the subscription's cursor."""
        if row.event_types:
            count = await self._pool.fetchval(
                "SELECT count(*) FROM events WHERE seq > $1 AND seq <= $2 AND type = ANY($3)",
                row.acked_seq,
                head,
                row.event_types,
            )
        else:
            count = await self._pool.fetchval(
                "SELECT count(*) FROM events WHERE seq > $1 AND seq <= $2", row.acked_seq, head
            )
        return int(count)


#: Dead letters an audit entry of a replay describes one by one; the rest are counted.
AUDITED_DEAD_LETTERS = 100


async def _audit_replay(conn: asyncpg.Connection, name: str, moved: list[asyncpg.Record]) -> None:
    ordered = sorted(moved, key=lambda r: r["seq"])
    before = [
        {"sequence": r["seq"], "attempts": r["attempts"], "last_error": r["last_error"][:200]}
        for r in ordered[:AUDITED_DEAD_LETTERS]
    ]
    await audit.record(
        conn,
        action="EventBusService/ReplayDeadLetters",
        target=f"subscription/{name}",
        before={"count": len(ordered), "dead_letters": before},
        after={"redeliveries": [r["seq"] for r in ordered]},
    )


def _subscription(row: asyncpg.Record) -> SubscriptionRow:
    return SubscriptionRow(
        name=row["name"],
        module=row["module"],
        event_types=list(row["event_types"]),
        acked_seq=row["acked_seq"],
        connected=row["connected"],
        epoch=row["epoch"],
    )
