"""The audit log of administrative changes: who, what, when, before and after.

Every service that accepts administrative changes keeps an ``audit_log`` table in its own schema,
created by its own migration, with triggers that refuse UPDATE, DELETE and TRUNCATE, so the log
is append-only whoever connects. ``record`` appends one entry on the connection of the transaction
that makes the change: the entry is committed if and only if the change is. The principal and
role come from the authenticated call (``current_principal``); ``AuditService`` serves the log
read-only through ``lodestar.audit.v1.AuditService/ListAuditEntries`` (admin only).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeAlias

import asyncpg
import grpc
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from opentelemetry import trace

from lodestar.audit.v1 import audit_pb2, audit_pb2_grpc
from lodestar.common.auth import Role, current_principal
from lodestar.common.deferred import DeferredServicer
from lodestar.common.errors import InvalidArgumentError

SERVICE_NAME = "lodestar.audit.v1.AuditService"
#: Reading the audit log is admin only: it names principals and shows every admin change.
METHOD_ROLES: Mapping[str, frozenset[Role]] = {
    f"/{SERVICE_NAME}/ListAuditEntries": frozenset({Role.ADMIN}),
}
#: Recorded as the principal of a change made by the service itself rather than through an RPC.
INTERNAL_PRINCIPAL = "internal"
DEFAULT_PAGE_SIZE = 100
#: A before or after state larger than this is stored as its size and digest only.
MAX_SNAPSHOT_BYTES = 256 * 1024
#: A page stops before this many bytes of entries (well under gRPC's 4 MiB message limit).
PAGE_BYTES = 2 * 1024 * 1024
MAX_PAGE_SIZE = 1000
MAX_FILTER_CHARS = 256
MAX_PAGE_TOKEN_DIGITS = 19
MAX_ENTRY_ID = 2**63 - 1  # bigint
TIMESTAMP_MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
TIMESTAMP_MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z

#: What a change looked like before or after: a message, a JSON-able mapping, or nothing.
Snapshot: TypeAlias = Message | Mapping[str, Any] | None

INSERT = """INSERT INTO audit_log (principal, role, action, target, before, after, trace_id)
            VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7) RETURNING id"""
SELECT = """SELECT id, changed_at, principal, role, action, target, before::text AS before,
                   after::text AS after, trace_id
            FROM audit_log
            WHERE ($1::timestamptz IS NULL OR changed_at >= $1)
              AND ($2::timestamptz IS NULL OR changed_at < $2)
              AND ($3 = '' OR principal = $3)
              AND ($4 = '' OR action = $4 OR (right($4, 1) = '/' AND starts_with(action, $4)))
              AND ($5 = '' OR target = $5)
              AND ($6::bigint IS NULL OR id < $6)
            ORDER BY id DESC
            LIMIT $7"""


def snapshot_json(value: Snapshot) -> str | None:
    """``value`` as compact JSON with sorted keys (every field of a message, defaults included)."""
    if value is None:
        return None
    if isinstance(value, Message):
        value = json_format.MessageToDict(
            value, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    size = len(text.encode())
    if size <= MAX_SNAPSHOT_BYTES:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()
    return json.dumps({"truncated": True, "bytes": size, "sha256": digest}, sort_keys=True)


def _trace_id() -> str:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


async def record(
    conn: asyncpg.Connection, *, action: str, target: str, before: Snapshot, after: Snapshot
) -> int:
    """Append one entry for a change made in ``conn``'s open transaction; returns its id.

    ``action`` is ``Service/Method``; ``target`` is ``kind/key``; ``before`` is None for a
    creation, ``after`` None for a removal.
    """
    principal = current_principal.get()
    name, role = (principal.name, principal.role.value) if principal else (INTERNAL_PRINCIPAL, "")
    entry_id: int = await conn.fetchval(
        INSERT, name, role, action, target, snapshot_json(before), snapshot_json(after), _trace_id()
    )
    return entry_id


@dataclass(frozen=True)
class AuditQuery:
    """Which entries to list: filters (empty matches all), a page size and where the page starts."""

    since: datetime | None = None
    until: datetime | None = None
    principal: str = ""
    action: str = ""
    target: str = ""
    page_size: int = DEFAULT_PAGE_SIZE
    before_id: int | None = None

    @classmethod
    def from_request(cls, request: audit_pb2.ListAuditEntriesRequest) -> AuditQuery:
        """The query of a request; INVALID_ARGUMENT names the field and its bound."""
        since = _time(request, "since")
        until = _time(request, "until")
        if since is not None and until is not None and since > until:
            raise InvalidArgumentError(
                f"{until.isoformat()} is before since ({since.isoformat()})", field="until"
            )
        return cls(
            since=since,
            until=until,
            principal=_filter_text(request.principal, "principal"),
            action=_filter_text(request.action, "action"),
            target=_filter_text(request.target, "target"),
            page_size=_page_size(request.page_size),
            before_id=_page_token(request.page_token),
        )


def _time(request: audit_pb2.ListAuditEntriesRequest, field: str) -> datetime | None:
    if not request.HasField(field):  # type: ignore[arg-type]
        return None
    stamp: timestamp_pb2.Timestamp = getattr(request, field)
    if not TIMESTAMP_MIN_SECONDS <= stamp.seconds <= TIMESTAMP_MAX_SECONDS:
        raise InvalidArgumentError(
            f"seconds {stamp.seconds} is outside 0001-01-01..9999-12-31 "
            f"({TIMESTAMP_MIN_SECONDS}..{TIMESTAMP_MAX_SECONDS})",
            field=f"{field}.seconds",
        )
    if not 0 <= stamp.nanos <= 999_999_999:
        raise InvalidArgumentError(
            f"nanos {stamp.nanos} is outside 0..999999999", field=f"{field}.nanos"
        )
    return stamp.ToDatetime(tzinfo=UTC)


def _filter_text(value: str, field: str) -> str:
    if len(value) > MAX_FILTER_CHARS:
        raise InvalidArgumentError(
            f"{len(value)} characters; at most {MAX_FILTER_CHARS}", field=field
        )
    if "\x00" in value:
        raise InvalidArgumentError("holds a NUL character", field=field)
    return value


def _page_size(value: int) -> int:
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise InvalidArgumentError(
            f"{value} is outside 1..{MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE})",
            field="page_size",
        )
    return value


def _page_token(value: str) -> int | None:
    if not value:
        return None
    if not (
        value.isascii()
        and value.isdigit()
        and len(value) <= MAX_PAGE_TOKEN_DIGITS
        and 0 < int(value) <= MAX_ENTRY_ID
    ):
        raise InvalidArgumentError(
            f"{value[:40]!r} is not a token returned by ListAuditEntries; pass next_page_token "
            "unchanged, or nothing for the first page",
            field="page_token",
        )
    return int(value)


async def list_entries(
    conn: asyncpg.Connection | asyncpg.Pool, query: AuditQuery
) -> tuple[list[audit_pb2.AuditEntry], str]:
    """One page of matching entries, newest first, and the token of the next page ("" if last)."""
    rows = await conn.fetch(
        SELECT,
        query.since,
        query.until,
        query.principal,
        query.action,
        query.target,
        query.before_id,
        query.page_size + 1,
    )
    page: list[audit_pb2.AuditEntry] = []
    size = 0
    for row in rows[: query.page_size]:
        entry = _entry(row)
        size += entry.ByteSize()
        if page and size > PAGE_BYTES:  # the rest comes with the next page
            break
        page.append(entry)
    next_token = str(page[-1].id) if len(rows) > len(page) else ""
    return page, next_token


def _entry(row: asyncpg.Record) -> audit_pb2.AuditEntry:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(row["changed_at"].astimezone(UTC))
    return audit_pb2.AuditEntry(
        id=row["id"],
        time=stamp,
        principal=row["principal"],
        role=row["role"],
        action=row["action"],
        target=row["target"],
        before_json=row["before"] or "",
        after_json=row["after"] or "",
        trace_id=row["trace_id"],
    )


class AuditService(audit_pb2_grpc.AuditServiceServicer):
    """The read-only gRPC face of a service's audit log."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def ListAuditEntries(
        self,
        request: audit_pb2.ListAuditEntriesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> audit_pb2.ListAuditEntriesResponse:
        """Matching entries, newest first, a page at a time."""
        entries, next_token = await list_entries(self._pool, AuditQuery.from_request(request))
        return audit_pb2.ListAuditEntriesResponse(entries=entries, next_page_token=next_token)


def deferred_servicer(owner: str) -> DeferredServicer:
    """An AuditService servicer answering UNAVAILABLE until its ``target`` is set."""
    return DeferredServicer(audit_pb2.DESCRIPTOR.services_by_name["AuditService"], owner)


def add_to_server(servicer: object, server: grpc.aio.Server) -> str:
    """Serve ``servicer`` as the AuditService; returns the full service name (for reflection)."""
    audit_pb2_grpc.add_AuditServiceServicer_to_server(servicer, server)  # type: ignore[arg-type]
    return SERVICE_NAME
