"""``lodestar spool …``: look at and replay the SDK's on-disk publish spools.

A spool folder (``Publisher(spool_dir=…)``) holds pending batches, written while core was away,
and a ``rejected/`` folder of events core refused for good, each with its refusal beside it.
``--spool-dir`` (default ``LODESTAR_SPOOL_DIR``, else ``<state-dir>/spool``) may be one spool or
a folder of them (``lodestar up`` gives each service ``<spool-dir>/<service>``).

Replays publish with ``--token`` / ``LODESTAR_TOKEN``, else the local token named like the spool's
folder (a service's own, so that event ownership holds), else the local publisher token.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from lodestar.common.cli_support import (
    CORE,
    DEFAULT_STATE_DIR,
    Client,
    StateDirOption,
    fail,
    local_tokens,
    with_client,
)

if TYPE_CHECKING:
    from lodestar.common.sdk.publisher import DrainResult
    from lodestar.common.sdk.spool import Spool, SpooledBatch

STATE_DIR = DEFAULT_STATE_DIR
IDS_SHOWN = 3

spool_app = typer.Typer(help="The SDK's publish spools: pending and quarantined batches.")
console = Console(width=None if sys.stdout.isatty() else 200)

SpoolDir = Annotated[
    Path | None,
    typer.Option(
        "--spool-dir",
        envvar="LODESTAR_SPOOL_DIR",
        help="a spool folder, or a folder of spools (default: <state-dir>/spool)",
    ),
]


def register(app: typer.Typer) -> None:
    """Add ``spool`` to the ``lodestar`` command."""
    app.add_typer(spool_app, name="spool")


def find_spools(root: Path) -> list[Path]:
    """Every spool folder at or under ``root``: folders with batch files or a rejected/ folder."""
    from lodestar.common.sdk.spool import QUARANTINE, SUFFIX

    if not root.exists():
        return []
    folders = {path.parent for path in root.rglob(f"*{SUFFIX}")}
    folders |= {path.parent for path in root.rglob(QUARANTINE) if path.is_dir()}
    spools = {folder.parent if folder.name == QUARANTINE else folder for folder in folders}
    return sorted(spools)


@spool_app.command("list")
def list_batches(spool_dir: SpoolDir = None, state_dir: StateDirOption = STATE_DIR) -> None:
    """Pending and quarantined batches: events, ids and, for quarantined ones, the reason."""
    from lodestar.common.sdk.spool import Spool

    root = spool_dir or state_dir / "spool"
    spools = find_spools(root)
    if not spools:
        console.print(f"no spool under {root}")
        return
    table = Table(title=f"spools under {root}")
    for column in ("spool", "state", "file", "events", "ids", "reason"):
        table.add_column(column, overflow="fold")
    totals = {"pending": 0, "quarantined": 0}
    for folder in spools:
        spool = Spool(folder)
        for batch in [*spool.pending(), *spool.quarantined()]:
            state = "quarantined" if batch.quarantined else "pending"
            totals[state] += len(batch.request.events)
            table.add_row(
                _spool_name(folder, root),
                state,
                batch.path.name,
                str(len(batch.request.events)),
                _ids(batch),
                _reason(batch),
            )
    console.print(table)
    console.print(
        f"{totals['pending']} events pending, {totals['quarantined']} quarantined "
        "(`lodestar spool replay [--quarantined]` sends them)"
    )


@spool_app.command("replay")
@with_client(CORE)
def replay(
    client: Client,
    quarantined: Annotated[
        bool,
        typer.Option(
            "--quarantined", help="re-publish quarantined events (after a fix) instead of pending"
        ),
    ] = False,
    spool_dir: SpoolDir = None,
) -> None:
    """Publish spooled batches now; events still refused stay quarantined with the new reason.

    Each spool is replayed with --token / LODESTAR_TOKEN, else the local token named like the
    spool's folder (a service's own), else the local publisher token.
    """
    from lodestar.common.sdk.spool import Spool

    root = spool_dir or client.state_dir / "spool"
    spools = find_spools(root)
    if not spools:
        console.print(f"no spool under {root}")
        return
    failed = False
    for folder in spools:
        secret = _token_for(folder, client)
        result = client.run(_replay_one(client, secret, Spool(folder), quarantined))
        failed |= _report(_spool_name(folder, root), result)
    if failed:
        raise typer.Exit(1)


async def _replay_one(client: Client, token: str, spool: Spool, quarantined: bool) -> DrainResult:
    from lodestar.common.sdk.publisher import drain_spool, replay_quarantined
    from lodestar.core.v1 import bus_pb2_grpc

    async with client.channel(token=token) as channel:
        stub = bus_pb2_grpc.EventBusServiceStub(channel)
        if quarantined:
            return await replay_quarantined(stub, spool)
        return await drain_spool(stub, spool)


def _report(name: str, result: DrainResult) -> bool:
    """Print what a replay did; True when something is left undone."""
    line = f"{name}: {result.sent_events} events published"
    if result.quarantined_events:
        line += f", {result.quarantined_events} refused and quarantined"
    if result.still_refused_events:
        line += f", {result.still_refused_events} still refused (kept quarantined)"
    console.print(line)
    if result.stopped:
        console.print(f"[red]{name}: stopped, the rest stays spooled: {result.stopped}[/red]")
    return bool(result.stopped or result.still_refused_events)


def _spool_name(folder: Path, root: Path) -> str:
    return str(folder.relative_to(root)) if folder != root else "."


def _ids(batch: SpooledBatch) -> str:
    ids = [e.id for e in batch.request.events]
    more = f" (+{len(ids) - IDS_SHOWN})" if len(ids) > IDS_SHOWN else ""
    return ", ".join(ids[:IDS_SHOWN]) + more


def _reason(batch: SpooledBatch) -> str:
    if not batch.quarantined:
        return ""
    if batch.reason is None:
        return "(no reason recorded)"
    fields = [v.get("field", "") for v in batch.reason.get("violations", [])]
    where = f" [{', '.join(fields)}]" if fields else ""
    return f"{batch.reason.get('code', '?')}: {batch.reason.get('details', '')}{where}"


def _token_for(folder: Path, client: Client) -> str:
    """The token to replay ``folder`` with: explicit, the spool owner's, then the publisher's."""
    if client.token:
        return client.token
    tokens = local_tokens(client.state_dir)
    secret = tokens.get(folder.name) or tokens.get("publisher")
    if not secret:
        fail(
            f"no token to replay {folder}: pass --token or set LODESTAR_TOKEN, or point "
            "--state-dir at `lodestar up`'s folder"
        )
    return secret
