"""An on-disk, ordered spool of publish batches kept while core is unreachable.

Pending batches are ``<n>.batch`` files in the spool folder, replayed oldest first. Events core
refuses for good are moved to ``rejected/<n>.batch`` (quarantine) with the refusal beside them in
``rejected/<n>.reason.json``; they never block the batches behind them, and ``lodestar spool
replay --quarantined`` sends them again after a fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from lodestar.core.v1 import bus_pb2

SUFFIX = ".batch"
REASON_SUFFIX = ".reason.json"
QUARANTINE = "rejected"

QUARANTINED_EVENTS = Counter(
    "lodestar_sdk_quarantined_events_total",
    "Spooled events core refused for good, moved to the spool's rejected/ folder.",
)
QUARANTINED_BATCHES = Gauge(
    "lodestar_sdk_quarantined_batches",
    "Batch files waiting in the rejected/ folders of this process's spools.",
)


@dataclass(frozen=True)
class Refusal:
    """Why core refused a batch for good: the status, its text and the fields it named."""

    code: str
    details: str
    violations: list[dict[str, str]] = field(default_factory=list)
    refused_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def to_json(self, batch: bus_pb2.PublishRequest) -> str:
        """The reason file's content, with the ids of the batch's events."""
        return json.dumps(
            {
                "code": self.code,
                "details": self.details,
                "violations": self.violations,
                "refused_at": self.refused_at,
                "event_ids": [e.id for e in batch.events],
            },
            indent=2,
        )


@dataclass(frozen=True)
class SpooledBatch:
    """A batch file of the spool, pending or quarantined, with its refusal when there is one."""

    path: Path
    request: bus_pb2.PublishRequest
    reason: dict[str, Any] | None = None

    @property
    def quarantined(self) -> bool:
        """Whether the batch waits in ``rejected/``."""
        return self.path.parent.name == QUARANTINE


class Spool:
    """Batches written durably (fsync) in order, read back oldest first, removed once sent."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.quarantine_folder = folder / QUARANTINE
        folder.mkdir(parents=True, exist_ok=True)
        numbers = [self._number(p) for p in self._files()]
        numbers += [self._number(p) for p in self._quarantined_files()]
        self._next = max(numbers, default=0) + 1
        self._counted = 0
        self._recount()

    @staticmethod
    def _number(path: Path) -> int:
        return int(path.name.removesuffix(SUFFIX))

    def _files(self) -> list[Path]:
        return sorted(self.folder.glob(f"*{SUFFIX}"))

    def _quarantined_files(self) -> list[Path]:
        return sorted(self.quarantine_folder.glob(f"*{SUFFIX}"))

    def __len__(self) -> int:
        return len(self._files())

    def append(self, batch: bus_pb2.PublishRequest) -> Path:
        """Write ``batch`` after every batch already spooled; durable when this returns."""
        return self._write(self.folder, batch)

    def replace(self, path: Path, batch: bus_pb2.PublishRequest) -> None:
        """Keep only ``batch`` (what is left of it) under ``path``, durably."""
        _write_durably(path, batch.SerializeToString())

    def quarantine(self, batch: bus_pb2.PublishRequest, refusal: Refusal | None = None) -> Path:
        """Keep a batch core refuses in ``rejected/``, with the refusal beside it; not replayed."""
        self.quarantine_folder.mkdir(exist_ok=True)
        path = self._write(self.quarantine_folder, batch)
        self._write_reason(path, batch, refusal or Refusal("UNKNOWN", "no reason recorded"))
        QUARANTINED_EVENTS.inc(len(batch.events))
        self._recount()
        return path

    def requarantine(self, path: Path, batch: bus_pb2.PublishRequest, refusal: Refusal) -> None:
        """Keep what is still refused of a quarantined batch, with the latest refusal."""
        _write_durably(path, batch.SerializeToString())
        self._write_reason(path, batch, refusal)

    def _write_reason(self, path: Path, batch: bus_pb2.PublishRequest, refusal: Refusal) -> None:
        _write_durably(_reason_path(path), refusal.to_json(batch).encode())

    def _write(self, folder: Path, batch: bus_pb2.PublishRequest) -> Path:
        path = folder / f"{self._next:020d}{SUFFIX}"
        self._next += 1
        _write_durably(path, batch.SerializeToString())
        return path

    def oldest(self) -> tuple[Path, bus_pb2.PublishRequest] | None:
        """The oldest spooled batch, or None when the spool is empty."""
        files = self._files()
        if not files:
            return None
        return files[0], bus_pb2.PublishRequest.FromString(files[0].read_bytes())

    def pending(self) -> list[SpooledBatch]:
        """Every batch waiting to be sent, oldest first."""
        return [SpooledBatch(p, _read(p)) for p in self._files()]

    def quarantined(self) -> list[SpooledBatch]:
        """Every quarantined batch with its refusal, oldest first."""
        return [SpooledBatch(p, _read(p), _read_reason(p)) for p in self._quarantined_files()]

    def remove(self, path: Path) -> None:
        """Forget a batch that core has acknowledged (and its reason file, if quarantined)."""
        path.unlink(missing_ok=True)
        _reason_path(path).unlink(missing_ok=True)
        if path.parent == self.quarantine_folder:
            self._recount()

    def _recount(self) -> None:
        """Move the quarantine gauge by the change in this spool's quarantined files."""
        count = len(self._quarantined_files())
        QUARANTINED_BATCHES.inc(count - self._counted)
        self._counted = count


def _reason_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(SUFFIX) + REASON_SUFFIX)


def _read(path: Path) -> bus_pb2.PublishRequest:
    return bus_pb2.PublishRequest.FromString(path.read_bytes())


def _read_reason(path: Path) -> dict[str, Any] | None:
    try:
        reason: dict[str, Any] = json.loads(_reason_path(path).read_text())
    except (OSError, ValueError):
        return None
    return reason


def _write_durably(path: Path, data: bytes) -> None:
    """Write, fsync and rename into place: a crash leaves the whole batch or none of it."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.rename(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
