"""An on-disk, ordered spool of publish batches kept while core is unreachable."""

from __future__ import annotations

import os
from pathlib import Path

from lodestar.core.v1 import bus_pb2

SUFFIX = ".batch"


class Spool:
    """Batches written durably (fsync) in order, read back oldest first, removed once sent."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._next = max((self._number(p) for p in self._files()), default=0) + 1

    @staticmethod
    def _number(path: Path) -> int:
        return int(path.name.removesuffix(SUFFIX))

    def _files(self) -> list[Path]:
        return sorted(self.folder.glob(f"*{SUFFIX}"))

    def __len__(self) -> int:
        return len(self._files())

    def append(self, batch: bus_pb2.PublishRequest) -> Path:
        """Write ``batch`` after every batch already spooled; durable when this returns."""
        return self._write(self.folder, batch)

    def quarantine(self, batch: bus_pb2.PublishRequest) -> Path:
        """Keep a batch core refuses in ``rejected/`` for a person to look at; never replayed."""
        folder = self.folder / "rejected"
        folder.mkdir(exist_ok=True)
        return self._write(folder, batch)

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

    def remove(self, path: Path) -> None:
        """Forget a batch that core has acknowledged."""
        path.unlink(missing_ok=True)


def _write_durably(path: Path, data: bytes) -> None:
    """Write, fsync and rename into place: a crash leaves the whole batch or none of it."""
    temporary = path.with_suffix(".tmp")
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
