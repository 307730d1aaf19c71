"""The Lodestar error hierarchy and its mapping to gRPC status codes.

Every error carries a message meant for the caller: what was wrong and what to do about it.
``field`` names the offending request or config field when there is one.
"""

from __future__ import annotations

import asyncpg
import grpc

#: Exceptions that mean the database went away, not that the request was wrong.
DATABASE_UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)


class LodestarError(Exception):
    """Base of every error Lodestar raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def details(self) -> str:
        """The text sent to the gRPC caller."""
        return f"{self.field}: {self.message}" if self.field else self.message


class ConfigurationError(LodestarError):
    """Configuration is missing or invalid; the service cannot start or serve."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class InvalidArgumentError(LodestarError):
    """The request is malformed; the caller must change it before retrying."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(LodestarError):
    """The named object does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AuthenticationError(LodestarError):
    """No credential, or a credential that is not valid."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(LodestarError):
    """A valid credential whose role does not allow the call."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(LodestarError):
    """A limit was reached (size, rate, budget); retrying the same request will not help."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ModuleError(LodestarError):
    """A module cannot do what was asked in its current state; per-module errors derive from it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class StorageError(LodestarError):
    """The database is unreachable or failed; the call may be retried."""

    code = grpc.StatusCode.UNAVAILABLE


class NetworkError(LodestarError):
    """A peer service is unreachable; the call may be retried with backoff."""

    code = grpc.StatusCode.UNAVAILABLE


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and details to send for ``error``.

    Unexpected exceptions become INTERNAL with a generic message so that internals never leak.
    """
    if isinstance(error, LodestarError):
        return error.code, error.details()
    if isinstance(error, DATABASE_UNREACHABLE):
        return grpc.StatusCode.UNAVAILABLE, "the database is unreachable; retry with backoff"
    return grpc.StatusCode.INTERNAL, "internal error; the server log has the details"
