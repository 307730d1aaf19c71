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
        path = self.folder / f"{self._next:020d}{SUFFIX}"
        self._next += 1
        temporary = path.with_suffix(".tmp")
        with temporary.open("wb") as handle:
            handle.write(batch.SerializeToString())
            handle.flush()
            os.fsync(handle.fileno())
        temporary.rename(path)
        directory = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
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
