"""The Lodestar error hierarchy and its mapping to gRPC status codes.

Every error carries a message meant for the caller: what was wrong and what to do about it.
``field`` names the offending request or config field when there is one; ``violations`` name
several. On the wire they become ``google.rpc.BadRequest`` field violations in the status details
(and ``retry_after`` a ``google.rpc.RetryInfo``), so typed clients read fields instead of text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import cast

import asyncpg
import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

#: The ``google.rpc.ErrorInfo`` domain of Lodestar's errors.
DOMAIN = "lodestar"
#: Exceptions that mean the database went away, not that the request was wrong.
DATABASE_UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)


@dataclass(frozen=True)
class FieldViolation:
    """One refused request field and what is wrong with it."""

    field: str
    description: str


#: Exceptions that mean a text the caller sent cannot be stored (a NUL, say), not a server fault.
UNSTORABLE_TEXT: tuple[type[BaseException], ...] = (
    asyncpg.CharacterNotInRepertoireError,
    asyncpg.UntranslatableCharacterError,
)


class LodestarError(Exception):
    """Base of every error Lodestar raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    #: A machine-readable cause (``google.rpc.ErrorInfo.reason``, UPPER_SNAKE_CASE) for clients
    #: that act on it, e.g. a standby consumer waiting for a held subscription.
    reason: str | None = None
    #: The ``google.rpc.ErrorInfo`` domain and metadata of an error a client received
    #: (``client_error_from``); a server's own errors send ``DOMAIN``.
    domain: str | None = None
    metadata: Mapping[str, str] = MappingProxyType({})

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        violations: Sequence[FieldViolation] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.violations = tuple(violations)
        self.retry_after = retry_after

    def details(self) -> str:
        """The text sent to the gRPC caller."""
        return f"{self.field}: {self.message}" if self.field else self.message

    def field_violations(self) -> tuple[FieldViolation, ...]:
        """The violations carried as ``google.rpc.BadRequest``: explicit ones, else ``field``."""
        if self.violations:
            return self.violations
        return (FieldViolation(self.field, self.message),) if self.field else ()


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
    """A module cannot do what was asked in its current state; per-module errors derive from it.

    A module's own errors derive from its base below (ADR 0008). A state error keeps
    FAILED_PRECONDITION; one that is also a category above (not found, permission denied …)
    derives from that class as well and sets ``code`` itself.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION


class UsageTrackerError(ModuleError):
    """An error of the usage-tracker's own logic (reservations, budgets, the ledger)."""


class LearningError(ModuleError):
    """An error of the learning module's own logic."""


class HealthMonitorError(ModuleError):
    """An error of the health-monitor module's own logic."""


class StorageError(LodestarError):
    """The database is unreachable or failed; the call may be retried."""

    code = grpc.StatusCode.UNAVAILABLE


class NetworkError(LodestarError):
    """A peer service is unreachable; the call may be retried with backoff."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(NetworkError):
    """The call did not finish before its deadline; it may or may not have taken effect."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class AlreadyExistsError(LodestarError):
    """The object to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class AbortedError(LodestarError):
    """The call lost to a concurrent change; retry the whole read-modify-write."""

    code = grpc.StatusCode.ABORTED


class OutOfRangeError(InvalidArgumentError):
    """A value, page or position past the valid range."""

    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(LodestarError):
    """The server has no such method: an older server, or a target serving another service."""

    code = grpc.StatusCode.UNIMPLEMENTED


class CancelledCallError(LodestarError):
    """The call was cancelled before it finished (by the caller, or the server shutting down)."""

    code = grpc.StatusCode.CANCELLED


class InternalError(LodestarError):
    """The server failed (INTERNAL, UNKNOWN or DATA_LOSS); its log has the details."""

    code = grpc.StatusCode.INTERNAL


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and details to send for ``error``.

    Unexpected exceptions become INTERNAL with a generic message so that internals never leak.
    """
    if isinstance(error, LodestarError):
        return error.code, error.details()
    if isinstance(error, DATABASE_UNREACHABLE):
        return grpc.StatusCode.UNAVAILABLE, "the database is unreachable; retry with backoff"
    if isinstance(error, UNSTORABLE_TEXT):  # a safety net: text fields are checked at the edge
        return (
            grpc.StatusCode.INVALID_ARGUMENT,
            "a text field holds a NUL character or text the database cannot store; remove it",
        )
    return grpc.StatusCode.INTERNAL, "internal error; the server log has the details"


def rich_status(error: BaseException) -> grpc.Status:
    """The status for ``error`` with ``google.rpc`` details: BadRequest and RetryInfo."""
    return rpc_status.to_status(status_message(error))


def status_message(error: BaseException) -> status_pb2.Status:
    """``error`` as a ``google.rpc.Status``: code, message and details (see ``rich_status``)."""
    code, message = status_for(error)
    details: list[any_pb2.Any] = []
    if isinstance(error, LodestarError):
        violations = error.field_violations()
        if violations:
            details.append(_packed(_bad_request(violations)))
        if error.retry_after is not None:
            details.append(_packed(_retry_info(error.retry_after)))
        if error.reason is not None:
            details.append(_packed(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN)))
    return status_pb2.Status(code=_code_number(code), message=message, details=details)


def error_reason(status: status_pb2.Status) -> str | None:
    """The ``google.rpc.ErrorInfo`` reason a ``google.rpc.Status`` carries, if any."""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return None


def bad_request_violations(status: status_pb2.Status) -> list[FieldViolation]:
    """The field violations a ``google.rpc.Status`` carries (for clients and tests)."""
    found = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
    return found


def _bad_request(violations: Sequence[FieldViolation]) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations
        ]
    )


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(0, round(seconds * 1e9)))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def _packed(
    message: error_details_pb2.BadRequest
    | error_details_pb2.RetryInfo
    | error_details_pb2.ErrorInfo,
) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _code_number(code: grpc.StatusCode) -> int:
    number: int = code.value[0]
    assert number in code_pb2.Code.values()
    return number


#: The error a client raises for each status code it receives (``client_error_from``).
CLIENT_ERRORS: Mapping[grpc.StatusCode, type[LodestarError]] = MappingProxyType(
    {
        grpc.StatusCode.OK: InternalError,  # a failed call never carries OK; a broken peer might
        grpc.StatusCode.CANCELLED: CancelledCallError,
        grpc.StatusCode.UNKNOWN: InternalError,
        grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
        grpc.StatusCode.NOT_FOUND: NotFoundError,
        grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
        grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
        grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
        grpc.StatusCode.FAILED_PRECONDITION: ModuleError,
        grpc.StatusCode.ABORTED: AbortedError,
        grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
        grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
        grpc.StatusCode.INTERNAL: InternalError,
        grpc.StatusCode.UNAVAILABLE: NetworkError,
        grpc.StatusCode.DATA_LOSS: InternalError,
        grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    }
)


def client_error_from(error: grpc.RpcError) -> LodestarError:
    """The LodestarError for a failed call, its rich status details read into fields.

    The class follows the status code (``CLIENT_ERRORS``) and ``code`` is the code received;
    ``message`` is the status message, ``violations`` the ``google.rpc.BadRequest`` field
    violations, ``retry_after`` the ``google.rpc.RetryInfo`` delay in seconds, and ``reason``,
    ``domain`` and ``metadata`` the ``google.rpc.ErrorInfo``. ``error`` becomes ``__cause__``.
    Works for the errors of ``grpc`` and ``grpc.aio`` calls alike (both are calls).
    """
    call = cast(grpc.Call, error)
    code = call.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = call.details() if callable(getattr(error, "details", None)) else str(error)
    status = _received_status(call)
    converted = CLIENT_ERRORS[code](
        details or code.name,
        violations=bad_request_violations(status) if status is not None else (),
        retry_after=retry_info_delay(status) if status is not None else None,
    )
    converted.code = code
    info = error_info(status) if status is not None else None
    if info is not None:
        converted.reason = str(info.reason) or None
        converted.domain = str(info.domain) or None
        converted.metadata = MappingProxyType(dict(info.metadata))
    converted.__cause__ = error
    return converted


def error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    """The ``google.rpc.ErrorInfo`` a ``google.rpc.Status`` carries, if any."""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def retry_info_delay(status: status_pb2.Status) -> float | None:
    """The ``google.rpc.RetryInfo`` delay a ``google.rpc.Status`` carries, in seconds, if any."""
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


def _received_status(call: grpc.Call) -> status_pb2.Status | None:
    """The rich status in a failed call's ``grpc-status-details-bin`` trailer, if it has one."""
    if not callable(getattr(call, "trailing_metadata", None)):
        return None
    try:
        status: status_pb2.Status | None = rpc_status.from_call(call)
    except ValueError:  # details that contradict the call's own code or message
        return None
    return status
