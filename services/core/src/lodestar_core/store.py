"""Core's event log in Postgres: group-committed appends, ordered reads, partitions, cursors."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import chain
from operator import itemgetter

import asyncpg

from lodestar.common.errors import StorageError
from lodestar.common.logging import get_logger
from lodestar_core.validation import ValidEvent

log = get_logger(__name__)

APPEND_LOCK = "lodestar:core:append"
PARTITION_PREFIX = "events_p"

#: A validated event's fields, then its sequence: the order of a COPY record.
COLUMNS = ["id", "type", "source", "envelope", "seq"]
# From this many rows on, COPY beats one INSERT despite its extra round trips.
COPY_THRESHOLD = 64
INSERT_NEW = """
INSERT INTO events (id, seq, type, source, envelope)
SELECT t.id, nextval('event_seq'), t.type, t.source, t.envelope
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[])
     WITH ORDINALITY AS t(id, type, source, envelope, ord)
ORDER BY t.ord
ON CONFLICT (id) DO NOTHING
RETURNING id, seq
"""
# The bounds ($2, $3: the smallest and largest id) let Postgres skip, at executor start, every
# partition outside them; an array parameter alone does not, and each partition kept costs an
# index descent per id (the log keeps retention_days of partitions behind today).
EXISTING_IDS = (
    "SELECT id FROM events WHERE id = ANY($1::uuid[]) AND id BETWEEN $2::uuid AND $3::uuid"
)
# Draws $1 positions at once; only appends (which hold APPEND_LOCK) use the sequence.
RESERVE_SEQUENCES = "SELECT setval('event_seq', nextval('event_seq') + $1 - 1)"

FETCH_ALL = """
SELECT seq, envelope FROM events
WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3
"""

FETCH_TYPES = """
SELECT seq, envelope FROM events
WHERE seq > $1 AND seq <= $2 AND type = ANY($4::text[]) ORDER BY seq LIMIT $3
"""


@dataclass(frozen=True)
class AppendResult:
    """What one publish batch achieved."""

    accepted: int
    duplicates: int
    last_sequence: int


@dataclass
class _PendingBatch:
    events: Sequence[ValidEvent]
    done: asyncio.Future[AppendResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(frozen=True)
class StoredEvent:
    """An event read back from the log."""

    seq: int
    envelope: bytes


def day_bound(day: date) -> uuid.UUID:
    """The smallest UUIDv7 whose timestamp falls on ``day`` (UTC)."""
    millis = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
    return uuid.UUID(int=millis << 80)


class EventStore:
    """Appends events in group commits and reads them back in log order.

    All publish calls of this process share one writer task: batches that arrive while a commit
    is running are committed together in the next one, which keeps throughput high under many
    small publishes. The returned future resolves only after COMMIT.
    """

    def __init__(self, pool: asyncpg.Pool, *, group_commit_max_events: int) -> None:
        self._pool = pool
        self._max_group = group_commit_max_events
        self._queue: asyncio.Queue[_PendingBatch] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._appended = asyncio.Event()
        self.head = 0

    async def start(self) -> None:
        """Read the current head and start the writer."""
        async with self._pool.acquire() as conn:
            self.head = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM events")
        self._writer = asyncio.create_task(self._write_loop(), name="event-writer")

    async def stop(self) -> None:
        """Stop the writer; batches still queued fail with StorageError."""
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.done.done():
                pending.done.set_exception(StorageError("core is shutting down; retry"))

    async def append(self, events: Sequence[ValidEvent]) -> AppendResult:
        """Store ``events``; returns once they are committed."""
        pending = _PendingBatch(events)
        await self._queue.put(pending)
        return await pending.done

    async def wait_for_append(self, after_head: int, timeout: float) -> None:
        """Wait until the head moves past ``after_head``, or ``timeout`` seconds."""
        if self.head > after_head:
            return
        appended = self._appended
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(appended.wait(), timeout)

    async def refresh_head(self) -> int:
        """The head of the log as stored, which other replicas' appends also move.

        Wakes the waiters when it moved. Safe to read: appends commit in sequence order
        (APPEND_LOCK).
        """
        stored = await self._pool.fetchval("SELECT coalesce(max(seq), 0) FROM events")
        if stored > self.head:
            self.head = stored
            self._signal_append()
        return self.head

    def _signal_append(self) -> None:
        self._appended.set()
        self._appended = asyncio.Event()

    async def _write_loop(self) -> None:
        while True:
            group = [await self._queue.get()]
            size = len(group[0].events)
            while size < self._max_group and not self._queue.empty():
                group.append(self._queue.get_nowait())
                size += len(group[-1].events)
            try:
                results = await self._commit(group)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("append failed", error=str(exc), batches=len(group))
                for pending in group:
                    if not pending.done.done():
                        pending.done.set_exception(
                            StorageError(f"events not stored, the database failed: {exc}; retry")
                        )
                continue
            for pending, result in zip(group, results, strict=True):
                if not pending.done.done():
                    pending.done.set_result(result)
            self._signal_append()

    async def _commit(self, group: list[_PendingBatch]) -> list[AppendResult]:
        """Store the group in one transaction; returns each batch's outcome.

        Appends are serialised by an advisory lock, so sequence numbers commit in order and,
        for large groups, checking which ids exist before a COPY is race-free.
        """
        events = list(chain.from_iterable(pending.events for pending in group))
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", APPEND_LOCK)
            if len(events) >= COPY_THRESHOLD:
                fresh, first = await _copy_new(conn, events)
                stored = None if fresh is events else _sequences(fresh, first)
            else:
                rows = await conn.fetch(
                    INSERT_NEW,
                    [e.id for e in events],
                    [e.type for e in events],
                    [e.source for e in events],
                    [e.envelope for e in events],
                )
                stored = {str(row["id"]): row["seq"] for row in rows}
        if stored is None:  # every event was new and stored in order from ``first``
            self.head = max(self.head, first + len(events) - 1)
            return _results_in_order(group, first)
        if stored:
            self.head = max(self.head, max(stored.values()))
        return [_result_of(pending.events, stored) for pending in group]

    async def fetch(
        self, after: int, up_to: int, limit: int, event_types: Sequence[str]
    ) -> list[StoredEvent]:
        """Events with ``after < seq <= up_to`` (of ``event_types``, or all), in log order."""
        async with self._pool.acquire() as conn:
            if event_types:
                rows = await conn.fetch(FETCH_TYPES, after, up_to, limit, list(event_types))
            else:
                rows = await conn.fetch(FETCH_ALL, after, up_to, limit)
        return [StoredEvent(row["seq"], row["envelope"]) for row in rows]

    async def ensure_partitions(
        self, today: date, ahead_days: int, behind_days: int = 1
    ) -> list[str]:
        """Create the daily partitions from ``behind_days`` before to ``ahead_days`` after today.

        Publish accepts ids dated back to the retention, so the partitions reach back that far
        and such an event never lands in the default partition, which retention does not drop.
        """
        created = []
        async with self._pool.acquire() as conn:
            for offset in range(-behind_days, ahead_days + 1):
                day = today + timedelta(days=offset)
                name = f"{PARTITION_PREFIX}{day:%Y%m%d}"
                exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
                if exists:
                    continue
                lower, upper = day_bound(day), day_bound(day + timedelta(days=1))
                try:
                    await conn.execute(
                        f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF events "
                        f"FOR VALUES FROM ('{lower}') TO ('{upper}')"
                    )
                except asyncpg.PostgresError as exc:
                    log.warning("cannot create partition", partition=name, error=str(exc))
                    continue
                created.append(name)
        return created

    async def drop_expired_partitions(self, today: date, retention_days: int) -> list[str]:
        """Drop whole daily partitions older than the retention; returns their names."""
        cutoff = today - timedelta(days=retention_days)
        dropped = []
        async with self._pool.acquire() as conn:
            names = await conn.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'events'::regclass AND c.relname LIKE $1",
                f"{PARTITION_PREFIX}%",
            )
            for row in names:
                name = row["relname"]
                day = datetime.strptime(name.removeprefix(PARTITION_PREFIX), "%Y%m%d").date()
                if day < cutoff:
                    await conn.execute(f"DROP TABLE IF EXISTS {name}")
                    dropped.append(name)
        return dropped


async def _copy_new(
    conn: asyncpg.Connection, events: list[ValidEvent]
) -> tuple[list[ValidEvent], int]:
    """COPY the events whose ids are not stored yet; returns them and the first one's sequence.

    The usual batch, all new and without repeats, is returned as the very list it came in.
    """
    ids = list(map(itemgetter(0), events))
    # In arrival order (usually minting order), which Postgres sorts fastest.
    unique = list(dict.fromkeys(ids))
    # Canonical UUID texts compare as the UUIDs do.
    rows = await conn.fetch(EXISTING_IDS, unique, min(unique), max(unique))
    existing = {str(row["id"]) for row in rows}
    if existing or len(unique) < len(ids):
        fresh = _first_occurrences(e for e in events if e.id not in existing)
    else:
        fresh = events
    if not fresh:
        return fresh, 0
    last = await conn.fetchval(RESERVE_SEQUENCES, len(fresh))
    first = last - len(fresh) + 1
    records = list(map(tuple.__add__, fresh, zip(range(first, last + 1))))
    await conn.copy_records_to_table("events", records=records, columns=COLUMNS)
    return fresh, first


def _sequences(events: Sequence[ValidEvent], first: int) -> dict[str, int]:
    """The sequence of each event by id, numbered from ``first`` in order."""
    return dict(zip(map(itemgetter(0), events), range(first, first + len(events)), strict=True))


def _results_in_order(group: Sequence[_PendingBatch], first: int) -> list[AppendResult]:
    """Each batch's outcome when the whole group was stored, in order, from ``first``."""
    results = []
    last = first - 1
    for pending in group:
        last += len(pending.events)
        results.append(AppendResult(len(pending.events), 0, last))
    return results


def _first_occurrences(events: Iterable[ValidEvent]) -> list[ValidEvent]:
    """``events`` without repeats of an id already seen, in order."""
    seen: set[str] = set()
    unique = []
    for event in events:
        if event.id not in seen:
            seen.add(event.id)
            unique.append(event)
    return unique


def _result_of(events: Sequence[ValidEvent], stored: dict[str, int]) -> AppendResult:
    """Counts for one batch; takes its ids out of ``stored``.

    A repeat of those ids in a later batch of the same group then counts as a duplicate there.
    """
    sequences = [stored.pop(e.id) for e in events if e.id in stored]
    accepted = len(sequences)
    return AppendResult(
        accepted=accepted,
        duplicates=len(events) - accepted,
        last_sequence=max(sequences, default=0),
    )
