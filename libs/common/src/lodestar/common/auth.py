"""Bearer-token authentication, role checks and rate limits for every RPC but health and reflection.

Accepted credentials live in a YAML file (``credentials_file``)::

    principals:
      - name: usage-tracker
        role: module
        token_sha256: 9f86d081...
      - name: usage-tracker             # a second token of the same principal (rotation)
        role: module
        token_sha256: 60303ae2...
        expires_at: "2026-01-31T12:00:00Z"

Only the SHA-256 of each token is kept, so the file can be read without exposing the tokens. A
principal may hold several tokens, all of one role, each with an optional ``expires_at`` (RFC 3339,
UTC when no offset is given); an expired token is refused with a message that says so. A server
re-reads the file when it changes (checked at most once a second), so a rotation needs no restart.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import inspect
import math
import os
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import grpc
import yaml
from google.protobuf import descriptor_pool

from lodestar.common.errors import (
    AuthenticationError,
    ConfigurationError,
    LodestarError,
    PermissionDeniedError,
    rich_status,
)
from lodestar.common.logging import get_logger

if TYPE_CHECKING:
    from lodestar.common.ratelimit import RateLimiter

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
TOKEN_BYTES = 32
FINGERPRINT_CHARS = 8
RELOAD_CHECK_SECONDS = 1.0
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")

log = get_logger(__name__)


class Role(StrEnum):
    """What a principal may do: admin may do everything."""

    ADMIN = "admin"
    MODULE = "module"
    PUBLISHER = "publisher"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of an RPC."""

    name: str
    role: Role

    @property
    def owner_scope(self) -> str | None:
        """Whose objects this principal may act on: its own (its name), or anyone's (None)."""
        return None if self.role is Role.ADMIN else self.name


current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "lodestar_principal", default=None
)


#: The rate limiter of the current call (set by the AuthInterceptor when rate limits apply).
current_limiter: contextvars.ContextVar[RateLimiter | None] = contextvars.ContextVar(
    "lodestar_limiter", default=None
)


def charge_calls(calls: int) -> None:
    """Count ``calls`` more calls of the current principal, for a request that carries several.

    The request itself was charged one call already. Raises the rate limiter's
    RESOURCE_EXHAUSTED (with its retry delay) when they do not fit.
    """
    limiter = current_limiter.get()
    if limiter is not None and calls > 0:
        refused = limiter.refusal(caller(), calls, request_calls=calls + 1)
        if refused is not None:
            raise refused


def caller() -> Principal:
    """The authenticated principal of the current call (set by the AuthInterceptor)."""
    principal = current_principal.get()
    if principal is None:  # only reachable without the auth interceptor
        raise AuthenticationError("this call carries no authenticated principal")
    return principal


def hash_token(token: str) -> str:
    """The hex SHA-256 under which a token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def format_time(moment: datetime) -> str:
    """``moment`` as RFC 3339 in UTC with a ``Z`` suffix, to the second."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class CredentialEntry:
    """One accepted token of a principal, by its hash, with its optional expiry."""

    principal: Principal
    token_sha256: str
    expires_at: datetime | None = None

    @property
    def fingerprint(self) -> str:
        """The first hex digits of the token's hash: safe to show, enough to tell tokens apart."""
        return self.token_sha256[:FINGERPRINT_CHARS]

    def expired(self, now: datetime) -> bool:
        """Whether the token is no longer accepted at ``now``."""
        return self.expires_at is not None and self.expires_at <= now


class Authenticator(Protocol):
    """Turns a bearer token into its principal, or raises AuthenticationError."""

    def check(self, token: str) -> Principal:
        """The principal holding ``token``; AuthenticationError if unknown or expired."""
        ...


class Credentials:
    """The set of accepted tokens, by hash."""

    def __init__(self, entries: Iterable[CredentialEntry]) -> None:
        self.entries = tuple(entries)
        self._by_hash = {
            entry.token_sha256: (
                entry,
                entry.expires_at.timestamp() if entry.expires_at is not None else math.inf,
            )
            for entry in self.entries
        }

    @classmethod
    def load(cls, path: Path) -> Credentials:
        """Read a credentials file; a malformed one is a ConfigurationError naming the entry."""
        return cls(parse_credentials(read_credentials_document(path), path))

    def check(self, token: str) -> Principal:
        """The principal holding ``token``; AuthenticationError if it is unknown or expired."""
        wanted = hash_token(token)
        found = self._by_hash.get(wanted)
        if found is None or not hmac.compare_digest(found[0].token_sha256, wanted):
            raise AuthenticationError(
                "invalid credential: the bearer token is not known to this server"
            )
        entry, expires = found
        if expires <= time.time():
            assert entry.expires_at is not None
            raise AuthenticationError(
                f"expired credential: this bearer token of {entry.principal.name} expired at "
                f"{format_time(entry.expires_at)}; use its current token "
                "(`lodestar tokens rotate` issues one)"
            )
        return entry.principal

    def authenticate(self, token: str) -> Principal | None:
        """The principal holding ``token`` if it is known and current, else None."""
        try:
            return self.check(token)
        except AuthenticationError:
            return None


class CredentialsFile:
    """The credentials of a file, re-read when the file changes.

    The file's modification time, size and inode are compared at most once per
    ``check_interval`` seconds, on the calls that authenticate. A changed file that cannot be
    read or is invalid is reported in the log once; the credentials read before stay in force.
    """

    def __init__(
        self,
        path: Path,
        *,
        check_interval: float = RELOAD_CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._check_interval = check_interval
        self._clock = clock
        self._signature: tuple[int, int, int] | None = _file_signature(path)
        self.credentials = Credentials.load(path)
        self._next_check = clock() + check_interval

    def check(self, token: str) -> Principal:
        """The principal holding ``token`` in the current file; AuthenticationError if none."""
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._check_interval
            self.reload_if_changed()
        return self.credentials.check(token)

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed since it was last read; whether new credentials apply."""
        try:
            signature = _file_signature(self.path)
        except ConfigurationError as exc:
            if self._signature is not None:
                log.error(
                    "credentials file unreadable; keeping the previous credentials",
                    path=str(self.path),
                    error=exc.message,
                )
            self._signature = None
            return False
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            self.credentials = Credentials.load(self.path)
        except ConfigurationError as exc:
            log.error(
                "credentials file changed but is invalid; keeping the previous credentials",
                path=str(self.path),
                error=exc.message,
            )
            return False
        principals = {entry.principal.name for entry in self.credentials.entries}
        log.info(
            "credentials reloaded",
            path=str(self.path),
            principals=len(principals),
            tokens=len(self.credentials.entries),
        )
        return True


def _file_signature(path: Path) -> tuple[int, int, int]:
    try:
        status = path.stat()
    except OSError as exc:
        raise ConfigurationError(f"cannot read credentials file {path}: {exc}") from exc
    return status.st_mtime_ns, status.st_size, status.st_ino


# --- the file -----------------------------------------------------------------------------------


def read_credentials_document(path: Path) -> dict[str, Any]:
    """The YAML document of a credentials file, as read (ConfigurationError if unreadable)."""
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"cannot read credentials file {path}: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("principals"), list):
        raise ConfigurationError(f"credentials file {path} needs a list under 'principals'")
    return document


def parse_credentials(document: Mapping[str, Any], path: Path) -> list[CredentialEntry]:
    """The entries of a credentials document; ConfigurationError naming the first bad entry.

    Every entry needs a name, a role and a 64-hex ``token_sha256``; ``expires_at`` is optional.
    A token may appear once, and all entries of one name must have the same role.
    """
    entries: list[CredentialEntry] = []
    roles: dict[str, Role] = {}
    seen: set[str] = set()
    for index, raw in enumerate(document.get("principals") or []):
        where = f"credentials file {path}: principals[{index}]"
        if not isinstance(raw, dict):
            raise ConfigurationError(f"{where} must be a mapping with name, role, token_sha256")
        entry = CredentialEntry(
            principal=_entry_principal(where, raw),
            token_sha256=_entry_hash(where, raw),
            expires_at=_entry_expiry(where, raw),
        )
        name, role = entry.principal.name, entry.principal.role
        if roles.setdefault(name, role) is not role:
            raise ConfigurationError(
                f"{where}: principal {name!r} has role {role.value} here but "
                f"{roles[name].value} in an earlier entry; all tokens of a principal share a role"
            )
        if entry.token_sha256 in seen:
            raise ConfigurationError(f"{where}: token_sha256 {entry.fingerprint}… is listed twice")
        seen.add(entry.token_sha256)
        entries.append(entry)
    return entries


def _entry_hash(where: str, entry: Mapping[str, Any]) -> str:
    digest = entry.get("token_sha256")
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
        raise ConfigurationError(f"{where}.token_sha256 must be a 64-hex SHA-256")
    return digest.lower()


def _entry_principal(where: str, entry: Mapping[str, Any]) -> Principal:
    name, role = entry.get("name"), entry.get("role")
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{where}.name is required")
    if role not in {r.value for r in Role}:
        raise ConfigurationError(
            f"{where}.role must be one of {', '.join(r.value for r in Role)}, not {role!r}"
        )
    return Principal(name=name, role=Role(role))


def _entry_expiry(where: str, entry: Mapping[str, Any]) -> datetime | None:
    value = entry.get("expires_at")
    if value is None:
        return None
    moment = value
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            moment = None
    if not isinstance(moment, datetime):
        raise ConfigurationError(
            f"{where}.expires_at must be an RFC 3339 time such as 2026-01-31T12:00:00Z, "
            f"not {value!r}"
        )
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def entry_document(entry: CredentialEntry) -> dict[str, str]:
    """One entry as it is written to a credentials file."""
    document = {
        "name": entry.principal.name,
        "role": entry.principal.role.value,
        "token_sha256": entry.token_sha256,
    }
    if entry.expires_at is not None:
        document["expires_at"] = format_time(entry.expires_at)
    return document


def write_credentials_document(path: Path, document: Mapping[str, Any]) -> None:
    """Replace ``path`` by ``document`` atomically (temporary file, then rename), mode 0600."""
    write_private_file(path, yaml.safe_dump(dict(document), sort_keys=False))


def write_private_file(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically: readers see the old or the new file, never a part.

    The file is readable by its owner only.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_credentials(path: Path, principals: Mapping[str, tuple[Role, str]]) -> None:
    """Write a credentials file for ``{name: (role, token)}``, readable by the owner only."""
    entries = [
        CredentialEntry(Principal(name, role), hash_token(token))
        for name, (role, token) in principals.items()
    ]
    write_credentials_document(path, {"principals": [entry_document(e) for e in entries]})


# --- the role table -----------------------------------------------------------------------------


def check_method_roles(
    method_roles: Mapping[str, frozenset[Role]],
    service_names: Iterable[str],
    pool: descriptor_pool.DescriptorPool | None = None,
) -> None:
    """Refuse a role table naming a method that the given services do not have.

    Every key must be a full method name ``/pkg.Service/Method`` of one of ``service_names``, as
    the protobuf descriptors define it; otherwise ConfigurationError names each unknown key and
    the methods its service has.
    """
    pool = pool or descriptor_pool.Default()
    methods = {name: _service_methods(pool, name) for name in service_names}
    problems = [
        problem
        for full_name in method_roles
        if (problem := _method_problem(full_name, methods)) is not None
    ]
    if problems:
        raise ConfigurationError("role table: " + "; ".join(problems), field="method_roles")


def _service_methods(pool: descriptor_pool.DescriptorPool, service: str) -> list[str]:
    try:
        descriptor = pool.FindServiceByName(service)
    except KeyError:
        raise ConfigurationError(
            f"role table: service {service!r} has no protobuf descriptor; import its _pb2 module",
            field="method_roles",
        ) from None
    return [method.name for method in descriptor.methods]


def _method_problem(full_name: str, methods: Mapping[str, list[str]]) -> str | None:
    service, _, method = full_name.removeprefix("/").partition("/")
    if not full_name.startswith("/") or not service or not method or "/" in method:
        return f"{full_name!r} is not a full method name of the form /pkg.Service/Method"
    if service not in methods:
        return (
            f"{full_name!r} names service {service!r}, which this module does not serve "
            f"(it serves {', '.join(sorted(methods)) or 'none'})"
        )
    if method not in methods[service]:
        return (
            f"{full_name!r}: {service} has no method {method!r}; "
            f"its methods are {', '.join(methods[service])}"
        )
    return None


# --- the interceptor ----------------------------------------------------------------------------


def bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Rejects calls without a valid token, over their principal's rate, or barred to their role.

    ``method_roles`` maps full method names (``/pkg.Service/Method``) to the roles allowed; a
    method missing from it is open to admin only. Admin is allowed everywhere. Every
    authenticated call counts against its principal's rate limit, when ``rate_limiter`` is set.
    """

    def __init__(
        self,
        credentials: Authenticator,
        method_roles: Mapping[str, frozenset[Role]],
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self._credentials = credentials
        self._method_roles = method_roles
        self._rate_limiter = rate_limiter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The method's handler, or one that refuses the call with the reason."""
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            return _refusal(
                handler,
                AuthenticationError(
                    "missing credential: send metadata 'authorization: Bearer <token>'"
                ),
            )
        try:
            principal = self._credentials.check(token)
        except AuthenticationError as exc:
            return _refusal(handler, exc)
        if self._rate_limiter is not None:
            refused = self._rate_limiter.refusal(principal)
            if refused is not None:
                return _refusal(handler, refused)
        allowed = self._method_roles.get(method, frozenset())
        if principal.role is not Role.ADMIN and principal.role not in allowed:
            needed = ", ".join(sorted(r.value for r in allowed | {Role.ADMIN}))
            return _refusal(
                handler,
                PermissionDeniedError(
                    f"{principal.name} has role {principal.role.value}; {method} needs {needed}"
                ),
            )
        current_principal.set(principal)
        if self._rate_limiter is not None:
            limiter = self._rate_limiter
            current_limiter.set(limiter)
            if handler.request_streaming:
                return _metered(handler, lambda: limiter.refusal(principal))
        return handler


def _metered(
    handler: grpc.RpcMethodHandler[Any, Any],
    refusal: Callable[[], LodestarError | None],
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with every client-stream message after the first charged like a call.

    The first message was charged when the call was authenticated; an excess one ends the call
    with the limiter's RESOURCE_EXHAUSTED (and its retry delay).
    """
    behavior: Callable[..., Any] | None = (
        handler.stream_stream if handler.response_streaming else handler.stream_unary
    )
    assert behavior is not None

    async def charged(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        first = True
        async for request in requests:
            if not first and (refused := refusal()) is not None:
                raise refused
            first = False
            yield request

    if handler.response_streaming and inspect.isasyncgenfunction(behavior):

        async def stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for response in behavior(charged(requests), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )

    async def call(requests: AsyncIterator[Any], context: Any) -> Any:
        result = behavior(charged(requests), context)
        return await result if inspect.isawaitable(result) else result

    factory = (
        grpc.stream_stream_rpc_method_handler
        if handler.response_streaming
        else grpc.stream_unary_rpc_method_handler
    )
    return factory(call, handler.request_deserializer, handler.response_serializer)


def _refusal(
    handler: grpc.RpcMethodHandler[Any, Any], error: LodestarError
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same RPC kind as ``handler`` that fails with ``error``'s status.

    The status carries ``error``'s ``google.rpc`` details.
    """
    status = rich_status(error)

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)
        yield  # pragma: no cover - makes this an async generator

    kind = (handler.request_streaming, handler.response_streaming)
    deserializer, serializer = handler.request_deserializer, handler.response_serializer
    if kind == (False, False):
        return grpc.unary_unary_rpc_method_handler(refuse, deserializer, serializer)
    if kind == (False, True):
        return grpc.unary_stream_rpc_method_handler(refuse_stream, deserializer, serializer)
    if kind == (True, False):
        return grpc.stream_unary_rpc_method_handler(refuse, deserializer, serializer)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, deserializer, serializer)


class BearerToken(grpc.AuthMetadataPlugin):
    """Client-side call credentials sending ``authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        """Hand the ``authorization`` metadata of every call to ``callback``."""
        callback((("authorization", f"Bearer {self._token}"),), None)


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying ``token``; none without a token.

    It is for plaintext channels, where call credentials cannot be used.
    """
    return (("authorization", f"Bearer {token}"),) if token else ()
