"""``lodestar tokens …``: rotate and list the tokens of a credentials file.

The file is ``--credentials-file``, else ``LODESTAR_CREDENTIALS_FILE``, else the
``credentials.yaml`` that ``lodestar up`` keeps in the state directory. Servers re-read the file
when it changes, so a rotation needs no restart: the new token works at once, the old ones until
the grace period ends. The file is replaced atomically and stays readable by its owner only.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lodestar.common.cli_support import DEFAULT_STATE_DIR, StateDirOption

if TYPE_CHECKING:
    from lodestar.common.auth import CredentialEntry

STATE_DIR = DEFAULT_STATE_DIR
DEFAULT_GRACE = "1h"
MAX_DURATION = timedelta(days=3650)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

tokens_app = typer.Typer(help="Credentials: rotate and list tokens.", no_args_is_help=True)
console = Console(width=None if sys.stdout.isatty() else 160)
notes = Console(stderr=True, soft_wrap=True)

CredentialsFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--credentials-file",
        envvar="LODESTAR_CREDENTIALS_FILE",
        help="the credentials file (default: <state-dir>/credentials.yaml)",
    ),
]


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``7d``, ``2w``, ``1h30m`` or plain seconds, as a timedelta."""
    cleaned = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", cleaned):
        seconds = float(cleaned)
    else:
        parts = _DURATION_PART.findall(cleaned)
        if not parts or "".join(n + u for n, u in parts) != cleaned:
            raise ValueError(f"{text!r} is not a duration such as 90s, 15m, 1h, 7d or 1h30m")
        seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    duration = timedelta(seconds=seconds)
    if duration > MAX_DURATION:
        raise ValueError(f"{text!r} is longer than the maximum of {MAX_DURATION.days} days")
    return duration


def rotate_principal(
    path: Path,
    name: str,
    *,
    old_grace: timedelta,
    new_lifetime: timedelta | None,
    now: datetime,
) -> tuple[str, CredentialEntry, list[CredentialEntry]]:
    """Add a new token for ``name`` to the file at ``path`` and let its other tokens expire.

    The old tokens expire ``old_grace`` after ``now`` (or earlier, if they already would); the
    ones already expired are dropped. Returns the new token, its entry and the old entries kept.
    ConfigurationError if the file is invalid or has no principal ``name``.
    """
    from lodestar.common.auth import (
        CredentialEntry,
        entry_document,
        hash_token,
        new_token,
        parse_credentials,
        read_credentials_document,
        write_credentials_document,
    )
    from lodestar.common.errors import ConfigurationError

    document = read_credentials_document(path)
    entries = parse_credentials(document, path)
    mine = [entry for entry in entries if entry.principal.name == name]
    if not mine:
        known = sorted({entry.principal.name for entry in entries})
        raise ConfigurationError(
            f"credentials file {path} has no principal {name!r}; it has: {', '.join(known)}"
        )
    token = new_token()
    # The file keeps whole seconds: a grace is rounded up, never cut short; 0 revokes at once.
    cutoff = _whole_second_after(now + old_grace) if old_grace else now.replace(microsecond=0)
    fresh = CredentialEntry(
        mine[0].principal,
        hash_token(token),
        now + new_lifetime if new_lifetime is not None else None,
    )
    kept: list[CredentialEntry] = []
    rewritten: list[dict[str, Any]] = []
    for raw, entry in zip(document["principals"], entries, strict=True):
        if entry.principal.name != name:
            rewritten.append(raw)
            continue
        if entry.expired(now):
            continue
        expires = min(entry.expires_at, cutoff) if entry.expires_at is not None else cutoff
        old = CredentialEntry(entry.principal, entry.token_sha256, expires)
        kept.append(old)
        rewritten.append(entry_document(old))
    rewritten.append(entry_document(fresh))
    write_credentials_document(path, {**document, "principals": rewritten})
    return token, fresh, kept


def _whole_second_after(moment: datetime) -> datetime:
    """``moment`` rounded up to a whole second, so that a grace is never cut short."""
    whole = moment.replace(microsecond=0)
    return whole if whole == moment else whole + timedelta(seconds=1)


def _credentials_path(credentials_file: Path | None, state_dir: Path) -> Path:
    path = credentials_file or state_dir / "credentials.yaml"
    if not path.is_file():
        raise typer.BadParameter(
            f"{path} does not exist; pass --credentials-file or run `lodestar up` once",
            param_hint="--credentials-file",
        )
    return path


def _duration_option(text: str, option: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _update_local_tokens(state_dir: Path, path: Path, name: str, token: str) -> bool:
    """Keep ``lodestar up``'s token list in step with its credentials file; whether it changed."""
    import yaml

    from lodestar.common.auth import write_private_file

    tokens_file = state_dir / "tokens.yaml"
    if path.resolve() != (state_dir / "credentials.yaml").resolve() or not tokens_file.is_file():
        return False
    tokens = yaml.safe_load(tokens_file.read_text()) or {}
    if not isinstance(tokens, dict) or name not in tokens:
        return False
    tokens[name] = token
    write_private_file(tokens_file, yaml.safe_dump(tokens))
    return True


def _when(moment: datetime | None) -> str:
    from lodestar.common.auth import format_time

    return format_time(moment) if moment is not None else "never"


@tokens_app.command("rotate")
def rotate(
    principal: Annotated[str, typer.Argument(help="the principal name, e.g. usage-tracker")],
    expire_old_in: Annotated[
        str,
        typer.Option(
            "--expire-old-in",
            help="grace period after which the principal's current tokens stop working "
            "(90s, 15m, 1h, 7d; 0: at once)",
        ),
    ] = DEFAULT_GRACE,
    expires_in: Annotated[
        str | None,
        typer.Option("--expires-in", help="lifetime of the new token (default: no expiry)"),
    ] = None,
    credentials_file: CredentialsFileOpt = None,
    state_dir: StateDirOption = STATE_DIR,
) -> None:
    """Issue a new token for PRINCIPAL and let its current tokens expire after a grace period.

    The new token is printed once, alone on standard output; the file keeps only its hash.
    """
    from lodestar.common.errors import ConfigurationError

    path = _credentials_path(credentials_file, state_dir)
    grace = _duration_option(expire_old_in, "--expire-old-in")
    lifetime = _duration_option(expires_in, "--expires-in") if expires_in is not None else None
    if lifetime is not None and lifetime.total_seconds() <= 0:
        raise typer.BadParameter("the new token must live longer than 0", param_hint="--expires-in")
    try:
        token, fresh, kept = rotate_principal(
            path, principal, old_grace=grace, new_lifetime=lifetime, now=datetime.now(UTC)
        )
    except ConfigurationError as exc:
        notes.print(f"[red]{exc.message}[/red]", highlight=False)
        raise typer.Exit(1) from None
    notes.print(
        f"new token for {principal} ({fresh.principal.role.value}), fingerprint "
        f"{fresh.fingerprint}, expires {_when(fresh.expires_at)}; shown only this once",
        highlight=False,
    )
    for old in kept:
        notes.print(f"old token {old.fingerprint} expires {_when(old.expires_at)}", highlight=False)
    if _update_local_tokens(state_dir, path, principal, token):
        notes.print(f"updated {state_dir / 'tokens.yaml'} for `lodestar up`", highlight=False)
    print(token, flush=True)


@tokens_app.command("list")
def list_tokens(
    credentials_file: CredentialsFileOpt = None, state_dir: StateDirOption = STATE_DIR
) -> None:
    """Show principals, roles, token fingerprints and expiry (never the tokens)."""
    from lodestar.common.auth import parse_credentials, read_credentials_document
    from lodestar.common.errors import ConfigurationError

    path = _credentials_path(credentials_file, state_dir)
    try:
        entries = parse_credentials(read_credentials_document(path), path)
    except ConfigurationError as exc:
        notes.print(f"[red]{exc.message}[/red]", highlight=False)
        raise typer.Exit(1) from None
    now = datetime.now(UTC)
    table = Table(title=f"tokens in {path}")
    for column in ("principal", "role", "fingerprint", "expires (UTC)", "state"):
        table.add_column(column)
    for entry in entries:
        table.add_row(
            entry.principal.name,
            entry.principal.role.value,
            entry.fingerprint,
            _when(entry.expires_at),
            "expired" if entry.expired(now) else "valid",
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``lodestar tokens …`` to the ``lodestar`` CLI."""
    app.add_typer(tokens_app, name="tokens")
