"""Starting Lodestar services as real processes for end-to-end tests (the shared harness)."""

from __future__ import annotations

from lodestar.common.testing import kill9, service_process
from lodestar.common.testing import start_process as start_service

__all__ = ["kill9", "service_process", "start_service"]
