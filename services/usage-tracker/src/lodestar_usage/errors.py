"""The usage-tracker's own errors, each under ``UsageTrackerError`` and mapped to its gRPC status.

The module base lives in ``lodestar.common.errors`` beside the other modules' (ADR 0008); the
concrete errors live here, where they are raised.
"""

from __future__ import annotations

import grpc

from lodestar.common.errors import NotFoundError, PermissionDeniedError, UsageTrackerError


class ReservationReleasedError(UsageTrackerError):
    """Commit of a reservation that was already released: reserve again (FAILED_PRECONDITION)."""


class ReservationCommittedError(UsageTrackerError):
    """Commit of a committed reservation with other amounts: final (FAILED_PRECONDITION)."""


class ReservationNotFoundError(UsageTrackerError, NotFoundError):
    """Commit or release of a reservation that does not exist (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND


class ReservationNotYoursError(UsageTrackerError, PermissionDeniedError):
    """Commit or release of another principal's reservation by a non-admin (PERMISSION_DENIED)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class BudgetNotFoundError(UsageTrackerError, NotFoundError):
    """Update or delete of a budget that does not exist (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND
