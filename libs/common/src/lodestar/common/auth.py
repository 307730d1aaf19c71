"""Bearer-token authentication and role checks for every RPC except health and reflection.

Accepted credentials live in a YAML file (``credentials_file``)::

    principals:
      - name: usage-tracker
        role: module
        token_sha256: 9f86d081...

Only the SHA-256 of each token is kept, so the file can be read without exposing the tokens.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import yaml

from lodestar.common.errors import ConfigurationError

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
TOKEN_BYTES = 32


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


current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "lodestar_principal", default=None
)


def hash_token(token: str) -> str:
    """The hex SHA-256 under which a token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token."""
    return secrets.token_urlsafe(TOKEN_BYTES)


class Credentials:
    """The set of accepted tokens, by hash."""

    def __init__(self, principals: Mapping[str, Principal]) -> None:
        self._by_hash = dict(principals)

    @classmethod
    def load(cls, path: Path) -> Credentials:
        """Read a credentials file; a malformed one is a ConfigurationError naming the entry."""
        try:
            document = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"cannot read credentials file {path}: {exc}") from exc
        entries = document.get("principals") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ConfigurationError(f"credentials file {path} needs a list under 'principals'")
        by_hash: dict[str, Principal] = {}
        for index, entry in enumerate(entries):
            by_hash[_entry_hash(path, index, entry)] = _entry_principal(path, index, entry)
        return cls(by_hash)

    def authenticate(self, token: str) -> Principal | None:
        """The principal holding ``token``, or None."""
        wanted = hash_token(token)
        for stored, principal in self._by_hash.items():
            if hmac.compare_digest(stored, wanted):
                return principal
        return None


def _entry_hash(path: Path, index: int, entry: Any) -> str:
    digest = entry.get("token_sha256") if isinstance(entry, dict) else None
    if not isinstance(digest, str) or len(digest) != 64:
        raise ConfigurationError(
            f"credentials file {path}: principals[{index}].token_sha256 must be a 64-hex SHA-256"
        )
    return digest.lower()


def _entry_principal(path: Path, index: int, entry: dict[str, Any]) -> Principal:
    name, role = entry.get("name"), entry.get("role")
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"credentials file {path}: principals[{index}].name is required")
    if role not in {r.value for r in Role}:
        raise ConfigurationError(
            f"credentials file {path}: principals[{index}].role must be one of "
            f"{', '.join(r.value for r in Role)}, not {role!r}"
        )
    return Principal(name=name, role=Role(role))


def write_credentials(path: Path, principals: Mapping[str, tuple[Role, str]]) -> None:
    """Write a credentials file for ``{name: (role, token)}``, readable by the owner only."""
    document = {
        "principals": [
            {"name": name, "role": role.value, "token_sha256": hash_token(token)}
            for name, (role, token) in principals.items()
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    path.chmod(0o600)


def bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Rejects calls without a valid token, or whose role the method does not allow.

    ``method_roles`` maps full method names (``/pkg.Service/Method``) to the roles allowed; a
    method missing from it is open to admin only. Admin is allowed everywhere.
    """

    def __init__(
        self, credentials: Credentials, method_roles: Mapping[str, frozenset[Role]]
    ) -> None:
        self._credentials = credentials
        self._method_roles = method_roles

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            return _refusal(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credential: send metadata 'authorization: Bearer <token>'",
            )
        principal = self._credentials.authenticate(token)
        if principal is None:
            return _refusal(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid credential: the bearer token is not known to this server",
            )
        allowed = self._method_roles.get(method, frozenset())
        if principal.role is not Role.ADMIN and principal.role not in allowed:
            needed = ", ".join(sorted(r.value for r in allowed | {Role.ADMIN}))
            return _refusal(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{principal.name} has role {principal.role.value}; {method} needs {needed}",
            )
        current_principal.set(principal)
        return handler


def _refusal(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same RPC kind as ``handler`` that fails with ``code``."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, details)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, details)
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
        callback((("authorization", f"Bearer {self._token}"),), None)


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying ``token`` (for plaintext channels, where call credentials
    cannot be used)."""
    return (("authorization", f"Bearer {token}"),) if token else ()
