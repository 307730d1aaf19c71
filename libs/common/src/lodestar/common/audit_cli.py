"""``lodestar audit``: the audit log of administrative changes, from core and usage-tracker.

Each service keeps its own log; ``--service`` picks one, or ``all`` (the default) merges them
newest first. A service's address is ``--target`` (with ``--service``), else
``LODESTAR_CORE_ENDPOINT`` / ``LODESTAR_USAGE_ENDPOINT``, else its entry in
``<state-dir>/endpoints.json`` written by ``lodestar up``; the token and the other connection
options are those of every command (``cli_support``). Reading the log needs the admin role.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lodestar.common.cli_support import (
    CORE,
    Client,
    Endpoint,
    describe_rpc_error,
    fail,
    with_client,
)

if TYPE_CHECKING:
    from google.protobuf import timestamp_pb2

    from lodestar.audit.v1 import audit_pb2

#: Services that keep an audit log, by name.
SERVICES = {
    endpoint.service: endpoint
    for endpoint in (CORE, Endpoint("usage-tracker", "LODESTAR_USAGE_ENDPOINT", "127.0.0.1:50061"))
}
ALL = "all"
MAX_LIMIT = 10_000
PAGE_SIZE = 1000
RELATIVE = re.compile(r"^(\d{1,6})([mhd])$")
UNITS = {"m": "minutes", "h": "hours", "d": "days"}

console = Console(width=None if sys.stdout.isatty() else 200)


@dataclass(frozen=True)
class Sourced:
    """An entry and the service whose log holds it."""

    service: str
    entry: audit_pb2.AuditEntry


def register(app: typer.Typer) -> None:
    """Add ``audit`` to the ``lodestar`` command."""
    app.command("audit")(audit)


@with_client(CORE)
def audit(
    client: Client,
    service: Annotated[
        str, typer.Option(help="whose log: core, usage-tracker, or all (merged)")
    ] = ALL,
    since: Annotated[
        str | None,
        typer.Option(
            help="only entries at or after: an ISO time (UTC if no offset) or 90m, 24h, 7d"
        ),
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="only entries before (same forms as --since)")
    ] = None,
    principal: Annotated[
        str | None, typer.Option(help="only changes made by this principal")
    ] = None,
    action: Annotated[
        str | None,
        typer.Option(
            help="only this action (BudgetService/CreateBudget) or service (BudgetService/)"
        ),
    ] = None,
    on: Annotated[
        str | None,
        typer.Option("--on", help="only changes of this target, e.g. module/usage-tracker"),
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=MAX_LIMIT, help="at most this many entries")
    ] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """Show who changed what and when (budgets, prices, modules, dead-letter replays)."""
    from lodestar.audit.v1 import audit_pb2

    services = _services(service, client.target)
    now = datetime.now(UTC)
    request = audit_pb2.ListAuditEntriesRequest(
        principal=principal or "", action=action or "", target=on or ""
    )
    if since:
        request.since.CopyFrom(parse_time(since, now, "--since"))
    if until:
        request.until.CopyFrom(parse_time(until, now, "--until"))
    entries = client.run(_fetch_all(client, services, request, limit), SERVICES[services[0]])
    if as_json:
        for item in entries:
            print(json.dumps(entry_dict(item), sort_keys=True))
    else:
        console.print(_table(entries, show_service=len(services) > 1))


def _services(service: str, target: str | None) -> list[str]:
    if service == ALL:
        if target:
            raise typer.BadParameter("--target names one service's address; add --service")
        return list(SERVICES)
    if service not in SERVICES:
        raise typer.BadParameter(
            f"{service!r}: use {', '.join(SERVICES)} or {ALL}", param_hint="--service"
        )
    return [service]


def parse_time(text: str, now: datetime, option: str) -> timestamp_pb2.Timestamp:
    """An ISO time (UTC when it has no offset) or a span back from ``now`` (90m, 24h, 7d)."""
    from google.protobuf import timestamp_pb2

    match = RELATIVE.fullmatch(text.strip().lower())
    try:
        if match:
            moment = now - timedelta(**{UNITS[match[2]]: int(match[1])})
        else:
            moment = datetime.fromisoformat(text.strip())
            moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(moment.astimezone(UTC))
    except (ValueError, OverflowError):
        raise typer.BadParameter(
            f"{text!r}: use an ISO time like 2026-01-31T12:00 or a span like 90m, 24h, 7d",
            param_hint=option,
        ) from None
    return stamp


async def _fetch_all(
    client: Client, services: list[str], request: audit_pb2.ListAuditEntriesRequest, limit: int
) -> list[Sourced]:
    import asyncio

    found = await asyncio.gather(*(_fetch(client, name, request, limit) for name in services))
    merged = [item for entries in found for item in entries]
    merged.sort(key=lambda item: item.entry.time.ToNanoseconds(), reverse=True)
    return merged[:limit]


async def _fetch(
    client: Client, service: str, request: audit_pb2.ListAuditEntriesRequest, limit: int
) -> list[Sourced]:
    import grpc

    from lodestar.audit.v1 import audit_pb2, audit_pb2_grpc

    entries: list[Sourced] = []
    page = audit_pb2.ListAuditEntriesRequest()
    page.CopyFrom(request)
    async with client.channel(SERVICES[service]) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        while len(entries) < limit:
            page.page_size = min(PAGE_SIZE, limit - len(entries))
            try:
                reply = await stub.ListAuditEntries(page)
            except grpc.aio.AioRpcError as exc:  # say which of the services failed
                where = client.address(SERVICES[service])
                fail(describe_rpc_error(exc.code().name, exc.details() or "", service, where))
            entries += [Sourced(service, entry) for entry in reply.entries]
            if not reply.next_page_token:
                break
            page.page_token = reply.next_page_token
    return entries


def entry_dict(item: Sourced) -> dict[str, Any]:
    """An entry as a JSON-able dict, with ``before`` and ``after`` parsed (None when absent)."""
    from google.protobuf import json_format

    entry = item.entry
    return {
        "service": item.service,
        "id": entry.id,
        "time": json_format.MessageToDict(entry.time),
        "principal": entry.principal,
        "role": entry.role,
        "action": entry.action,
        "target": entry.target,
        "before": json.loads(entry.before_json) if entry.before_json else None,
        "after": json.loads(entry.after_json) if entry.after_json else None,
        "trace_id": entry.trace_id,
    }


def change_summary(before_json: str, after_json: str) -> str:
    """What changed, in a line: created, removed, or ``key: old → new`` for each changed key."""
    if not before_json:
        return "created" if after_json else ""
    if not after_json:
        return "removed"
    before, after = json.loads(before_json), json.loads(after_json)
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return f"{_short(before)} → {_short(after)}"
    changed = [
        f"{key}: {_short(before.get(key))} → {_short(after.get(key))}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    ]
    return "; ".join(changed) or "no change"


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, sort_keys=True) if value is not None else "∅"
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(entries: list[Sourced], *, show_service: bool) -> Table:
    table = Table(title="audit log (newest first)")
    columns = ["time (UTC)", "principal", "action", "target", "change"]
    for column in ["service", *columns] if show_service else columns:
        table.add_column(column)
    for item in entries:
        entry = item.entry
        row = [
            entry.time.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S"),
            f"{entry.principal} ({entry.role})" if entry.role else entry.principal,
            entry.action,
            entry.target,
            change_summary(entry.before_json, entry.after_json),
        ]
        table.add_row(*([item.service, *row] if show_service else row))
    return table
