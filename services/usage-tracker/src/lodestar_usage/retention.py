"""Retention: raw ledger rows expire after ``raw_days``; rollups (both grains) stay.

Before a daily partition is dropped its rows are archived as gzip-compressed JSON lines next to a
manifest (day, row count, SHA-256 of the archive, columns); ``import_archive`` puts them back.
"""

# SQL here is assembled from constant identifiers only; every value is a bind parameter.
# ruff: noqa: S608

from __future__ import annotations

import gzip
import hashlib
import json
import os
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import asyncpg

from lodestar.common.errors import InvalidArgumentError
from lodestar.common.logging import get_logger
from lodestar_usage import bounds
from lodestar_usage.ingest import LEDGER_COLUMNS, ensure_partitions
from lodestar_usage.reports import EXPORT_FIELDS, RECORD_RANGES

log = get_logger(__name__)
FORMAT_VERSION = 1
PARTITIONS = (
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "JOIN pg_class p ON p.oid = i.inhparent "
    "WHERE p.relname = 'ledger' AND p.relnamespace = current_schema()::regnamespace "
    "AND c.relname ~ '^ledger_p[0-9]{8}$' ORDER BY c.relname"
)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.rename(path)


async def archive_day(
    conn: asyncpg.Connection,
    table: str,
    day: date,
    folder: Path,
    where: str = "true",
    params: tuple[object, ...] = (),
) -> tuple[Path, int]:
    """Write the rows of ``table`` as ``ledger_<day>.jsonl.gz`` plus a manifest."""
    folder.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, local disk)
    lines = []
    async with conn.transaction():
        async for rec in conn.cursor(
            f"SELECT {', '.join(EXPORT_FIELDS)} FROM {table} WHERE {where} "
            "ORDER BY occurred_at, event_id",
            *params,
        ):
            lines.append(
                json.dumps(
                    {
                        k: (
                            v.isoformat()
                            if isinstance(v, datetime)
                            else str(v)
                            if isinstance(v, uuid.UUID)
                            else v
                        )
                        for k, v in rec.items()
                    },
                    separators=(",", ":"),
                )
            )
    data = gzip.compress(("\n".join(lines) + ("\n" if lines else "")).encode(), mtime=0)
    stem = f"ledger_{day:%Y%m%d}" if table != "ledger_default" else f"ledger_default_{day:%Y%m%d}"
    path = folder / f"{stem}.jsonl.gz"
    _write_durably(path, data)
    manifest = {
        "format_version": FORMAT_VERSION,
        "day": day.isoformat(),
        "rows": len(lines),
        "sha256": hashlib.sha256(data).hexdigest(),
        "file": path.name,
        "columns": EXPORT_FIELDS,
        "archived_at": datetime.now(UTC).isoformat(),
    }
    _write_durably(folder / f"{stem}.manifest.json", json.dumps(manifest, indent=2).encode())
    return path, len(lines)


async def expire(
    pool: asyncpg.Pool, raw_days: int, folder: Path, today: date | None = None
) -> list[str]:
    """Archive and drop the daily partitions older than ``raw_days``; returns what was dropped."""
    today = today or datetime.now(UTC).date()
    cutoff = today - timedelta(days=raw_days)
    dropped = []
    async with pool.acquire() as conn:
        for rec in await conn.fetch(PARTITIONS):
            name = rec["relname"]
            day = datetime.strptime(name.removeprefix("ledger_p"), "%Y%m%d").date()
            if day >= cutoff:
                continue
            path, rows = await archive_day(conn, name, day, folder)
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO archives (day, path, rows, sha256) VALUES ($1, $2, $3, $4) "
                    "ON CONFLICT (day) DO UPDATE SET path = EXCLUDED.path, rows = EXCLUDED.rows, "
                    "sha256 = EXCLUDED.sha256, archived_at = now()",
                    day,
                    str(path),
                    rows,
                    hashlib.sha256(path.read_bytes()).hexdigest(),
                )
                await conn.execute(f"DROP TABLE {name}")
            log.info(
                "ledger partition archived and dropped", partition=name, rows=rows, file=str(path)
            )
            dropped.append(name)
        stale = await conn.fetchval(
            "SELECT count(*) FROM ledger_default WHERE occurred_at < $1",
            datetime(cutoff.year, cutoff.month, cutoff.day, tzinfo=UTC),
        )
        if stale:
            bound = datetime(cutoff.year, cutoff.month, cutoff.day, tzinfo=UTC)
            await archive_day(conn, "ledger_default", cutoff, folder, "occurred_at < $1", (bound,))
            await conn.execute("DELETE FROM ledger_default WHERE occurred_at < $1", bound)
            dropped.append(f"ledger_default<{cutoff}")
    return dropped


def archived_row_problem(row: object) -> str:
    """Why an archived row must not enter the ledger (bounds as at ingest), or ""."""
    if not isinstance(row, dict) or set(row) != set(EXPORT_FIELDS):
        return "not an object with exactly the ledger's columns"
    try:
        when = datetime.fromisoformat(row["occurred_at"])
        uuid.UUID(row["event_id"])
    except (TypeError, ValueError):
        return "occurred_at or event_id unreadable"
    if when.tzinfo is None or not bounds.EARLIEST <= when < bounds.LATEST:
        return f"occurred_at outside {bounds.WINDOW_TEXT}"
    for name, kind in LEDGER_COLUMNS:
        value = row[name]
        if kind == "text" and not (
            isinstance(value, str) and len(value) <= bounds.MAX_TEXT and "\x00" not in value
        ):
            return f"{name} is not text of at most {bounds.MAX_TEXT} characters without NUL"
        if kind in ("integer", "smallint", "bigint") and type(value) is not int:
            return f"{name} is not an integer"
    ranges = {**RECORD_RANGES, "status": (0, 32767), "cost_source": (0, 32767)}
    for name, (low, high) in ranges.items():
        if not low <= row[name] <= high:
            return f"{name} {row[name]} is outside {low}..{high}"
    return ""


async def import_archive(pool: asyncpg.Pool, manifest_path: Path) -> int:
    """Put archived rows back into the ledger (rollups are untouched: they never expired)."""
    try:
        manifest = json.loads(manifest_path.read_text())  # noqa: ASYNC240 (a small file)
        data = (manifest_path.parent / manifest["file"]).read_bytes()
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidArgumentError(f"cannot read archive: {exc}", field="manifest") from None
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise InvalidArgumentError("archive does not match its manifest checksum", field="manifest")
    rows = [json.loads(line) for line in gzip.decompress(data).decode().splitlines() if line]
    if not rows:
        return 0
    for index, row in enumerate(rows):
        problem = archived_row_problem(row)
        if problem:
            raise InvalidArgumentError(
                f"row {index + 1} is not a ledger row this service writes ({problem}); "
                "nothing was imported",
                field="manifest",
            )
    day = datetime.fromisoformat(manifest["day"]).replace(tzinfo=UTC)
    if "default" not in manifest["file"]:
        await ensure_partitions(pool, day, day)
    names = [c for c, _ in LEDGER_COLUMNS]
    types = dict(LEDGER_COLUMNS)
    columns: list[list[object]] = [[] for _ in names]
    for row in rows:
        for i, name in enumerate(names):
            value = row[name]
            if types[name] == "timestamptz":
                value = datetime.fromisoformat(value)
            elif types[name] == "uuid":
                value = uuid.UUID(value)
            columns[i].append(value)
    arrays = ", ".join(f"${i}::{types[n]}[]" for i, n in enumerate(names, start=1))
    result: str = await pool.execute(
        f"INSERT INTO ledger ({', '.join(names)}) SELECT * FROM unnest({arrays}) "
        "ON CONFLICT DO NOTHING",
        *columns,
    )
    return int(result.split()[-1])
