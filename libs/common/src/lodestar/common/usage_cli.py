"""``lodestar usage …`` and ``lodestar budgets …``: usage-tracker from the terminal.

Talks to usage-tracker over gRPC with the generated ``lodestar.usage.v1`` stubs only (common never
imports a service package). The address is ``--target``, else ``LODESTAR_USAGE_ENDPOINT``, else
the ``usage-tracker`` entry of ``<state-dir>/endpoints.json`` written by ``lodestar up``; the token
is ``--token`` / ``LODESTAR_TOKEN``, else the local admin token in ``<state-dir>/tokens.yaml``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lodestar.common.cli_support import run_rpc

if TYPE_CHECKING:
    from lodestar.usage.v1 import usage_pb2

SERVICE = "usage-tracker"
DEFAULT_TARGET = "127.0.0.1:50061"
GROUPS = ("model", "provider", "project", "session", "user", "day", "week", "month")
# Names of the CalendarUnit, BudgetScope and BudgetPeriod values the CLI accepts (the stubs are
# imported only when a command runs; the values are looked up by name then).
CALENDAR = ("day", "week", "month")
SCOPES = ("global", "project", "user", "session")
PERIODS = ("daily", "weekly", "monthly", "rolling")
BAR_COLORS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")

usage_app = typer.Typer(help="Usage: summaries, exports, top spenders.", no_args_is_help=True)
budgets_app = typer.Typer(help="Budgets: list, create, delete.", no_args_is_help=True)
console = Console(width=None if sys.stdout.isatty() else 160)

StateDir = Annotated[
    Path, typer.Option("--state-dir", help="where `lodestar up` keeps endpoints and tokens")
]
Target = Annotated[
    str | None,
    typer.Option(
        help="usage-tracker address host:port (default: LODESTAR_USAGE_ENDPOINT, "
        "then `lodestar up`'s endpoints.json)"
    ),
]
Token = Annotated[
    str | None, typer.Option(envvar="LODESTAR_TOKEN", help="bearer token (default: local admin)")
]
WindowOpt = Annotated[
    str,
    typer.Option(
        "--window",
        help="day | week | month (calendar, current), last-day | last-week | last-month, "
        "or rolling: 24h, 7d",
    ),
]
TimezoneOpt = Annotated[str, typer.Option("--timezone", help="IANA timezone of days and windows")]
FilterOpt = Annotated[list[str] | None, typer.Option(help="repeatable filter")]
STATE_DIR = Path(".lodestar")


def register(app: typer.Typer) -> None:
    """Add ``usage`` and ``budgets`` to the ``lodestar`` command."""
    app.add_typer(usage_app, name="usage")
    app.add_typer(budgets_app, name="budgets")


# --- plumbing ------------------------------------------------------------------------------------


def resolve(target: str | None, token: str | None, state_dir: Path) -> tuple[str, str]:
    """The tracker's address and a token, from flags, environment or ``lodestar up``'s state."""
    import yaml

    tokens_file = state_dir / "tokens.yaml"
    tokens = yaml.safe_load(tokens_file.read_text()) if tokens_file.exists() else {}
    secret = token or (tokens or {}).get("admin")
    if not secret:
        raise typer.BadParameter(
            "no token: pass --token, set LODESTAR_TOKEN, or run `lodestar up` first"
        )
    address = target or os.environ.get("LODESTAR_USAGE_ENDPOINT")
    if not address:
        endpoints = state_dir / "endpoints.json"
        if endpoints.exists():
            address = json.loads(endpoints.read_text()).get(SERVICE, {}).get("grpc")
    return address or DEFAULT_TARGET, secret


def _run(coroutine: Any) -> Any:
    return run_rpc(coroutine, console)


def parse_window(text: str, timezone: str = "") -> usage_pb2.Window:
    """``month``, ``last-week``, ``24h``, ``7d`` … as a Window."""
    from lodestar.usage.v1 import usage_pb2

    value = text.strip().lower()
    ago = 0
    if value.startswith("last-"):
        value, ago = value.removeprefix("last-"), 1
    if value in CALENDAR:
        return usage_pb2.Window(
            calendar=usage_pb2.CalendarWindow(
                unit=usage_pb2.CalendarUnit.Value(f"CALENDAR_UNIT_{value.upper()}"),
                timezone=timezone,
                periods_ago=ago,
            )
        )
    match = re.fullmatch(r"(\d+)([hd])", value)
    if match and int(match[1]) > 0:
        n = int(match[1])
        rolling = (
            usage_pb2.RollingWindow(hours=n) if match[2] == "h" else usage_pb2.RollingWindow(days=n)
        )
        return usage_pb2.Window(rolling=rolling)
    raise typer.BadParameter(
        f"{text!r}: use day, week, month, last-day, last-week, last-month, or e.g. 24h, 7d",
        param_hint="--window",
    )


def parse_groups(text: str) -> list[str]:
    groups = [g.strip().lower() for g in text.split(",") if g.strip()]
    for group in groups:
        if group not in GROUPS:
            raise typer.BadParameter(
                f"unknown group {group!r}; use any of {', '.join(GROUPS)}", param_hint="--by"
            )
    return groups


def dollars(micros: int) -> str:
    """Exact micro-dollars as dollars (no float rounding)."""
    amount = Decimal(micros) / Decimal(1_000_000)
    return f"${amount:,.6f}".rstrip("0").rstrip(".") if micros % 10_000 else f"${amount:,.2f}"


def _filters(
    model: list[str] | None,
    project: list[str] | None,
    provider: list[str] | None,
    user: list[str] | None,
    session: list[str] | None,
) -> usage_pb2.Filters:
    from lodestar.usage.v1 import usage_pb2

    return usage_pb2.Filters(
        models=model or [],
        projects=project or [],
        providers=provider or [],
        users=user or [],
        sessions=session or [],
    )


async def _summary(
    address: str, secret: str, request: usage_pb2.SummaryRequest
) -> usage_pb2.SummaryResponse:
    from lodestar.common.sdk import connect
    from lodestar.usage.v1 import usage_pb2_grpc

    async with connect(address, secret) as channel:
        reply: usage_pb2.SummaryResponse = await usage_pb2_grpc.UsageServiceStub(channel).Summary(
            request
        )
        return reply


def _totals_dict(totals: usage_pb2.Totals) -> dict[str, int]:
    return {
        "requests": totals.requests,
        "errors": totals.errors,
        "input_tokens": totals.tokens.input,
        "output_tokens": totals.tokens.output,
        "cached_read_tokens": totals.tokens.cached_read,
        "cache_write_tokens": totals.tokens.cache_write,
        "reasoning_tokens": totals.tokens.reasoning,
        "cost_micros": totals.cost_micros,
        "savings_micros": totals.savings_micros,
        "duration_ms": totals.duration_ms,
    }


def _tokens(totals: usage_pb2.Totals) -> int:
    t = totals.tokens
    return t.input + t.output + t.cached_read + t.cache_write + t.reasoning


# --- usage ---------------------------------------------------------------------------------------


@usage_app.command("summary")
def summary(
    by: Annotated[
        str, typer.Option("--by", help="comma-separated: " + ", ".join(GROUPS))
    ] = "model",
    window: WindowOpt = "month",
    timezone: TimezoneOpt = "",
    model: FilterOpt = None,
    project: FilterOpt = None,
    provider: FilterOpt = None,
    user: FilterOpt = None,
    session: FilterOpt = None,
    chart: Annotated[
        bool | None,
        typer.Option(help="bar chart of daily cost per model (default: when grouping by both)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
    target: Target = None,
    token: Token = None,
    state_dir: StateDir = STATE_DIR,
) -> None:
    """Tokens, cost, requests and savings over a window, grouped."""
    from lodestar.usage.v1 import usage_pb2

    groups = parse_groups(by)
    address, secret = resolve(target, token, state_dir)
    request = usage_pb2.SummaryRequest(
        window=parse_window(window, timezone),
        group_by=groups,
        filters=_filters(model, project, provider, user, session),
        timezone=timezone,
    )
    reply: usage_pb2.SummaryResponse = _run(_summary(address, secret, request))
    if as_json:
        print(
            json.dumps(
                {
                    "start": reply.start.ToJsonString(),
                    "end": reply.end.ToJsonString(),
                    "rows": [
                        {"group": dict(row.group), **_totals_dict(row.totals)} for row in reply.rows
                    ],
                    "totals": _totals_dict(reply.totals),
                }
            )
        )
        return
    start, end = reply.start.ToDatetime(), reply.end.ToDatetime()
    title = f"usage {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
    table = Table(title=title)
    for group in groups:
        table.add_column(group)
    for column in (
        "requests",
        "errors",
        "input tok",
        "output tok",
        "all tokens",
        "cost",
        "savings",
    ):
        table.add_column(column, justify="right")

    def cells(t: usage_pb2.Totals) -> list[str]:
        return [
            f"{t.requests:,}",
            f"{t.errors:,}",
            f"{t.tokens.input:,}",
            f"{t.tokens.output:,}",
            f"{_tokens(t):,}",
            dollars(t.cost_micros),
            dollars(t.savings_micros),
        ]

    for row in reply.rows:
        table.add_row(*(row.group.get(g, "") for g in groups), *cells(row.totals))
    table.add_section()
    table.add_row(*(["total"] + [""] * (len(groups) - 1) if groups else []), *cells(reply.totals))
    console.print(table)
    if chart if chart is not None else ("day" in groups and "model" in groups):
        if not {"day", "model"} <= set(groups):
            request.ClearField("group_by")
            request.group_by.extend(["day", "model"])
            reply = _run(_summary(address, secret, request))
        console.print(cost_chart(reply))


def cost_chart(reply: usage_pb2.SummaryResponse, width: int = 50) -> Table:
    """A terminal bar chart: per day, one bar per model, length proportional to its cost."""
    per_day: dict[str, dict[str, int]] = defaultdict(dict)
    for row in reply.rows:
        per_day[row.group.get("day", "")][row.group.get("model", "")] = row.totals.cost_micros
    models = sorted({m for day in per_day.values() for m in day})
    colors = {m: BAR_COLORS[i % len(BAR_COLORS)] for i, m in enumerate(models)}
    top = max((c for day in per_day.values() for c in day.values()), default=0)
    table = Table(title="daily cost per model", show_edge=False, box=None)
    table.add_column("day")
    table.add_column("model")
    table.add_column("cost", justify="right")
    table.add_column("")
    for day in sorted(per_day):
        for index, m in enumerate(models):
            cost = per_day[day].get(m, 0)
            if not cost:
                continue
            length = max(1, round(width * cost / top)) if top else 0
            table.add_row(
                day if index == 0 or not table.rows else "",
                m,
                dollars(cost),
                Text("█" * length, style=colors[m]),
            )
    if not per_day:
        table.add_row("(no usage in this window)", "", "", "")
    return table


@usage_app.command("top")
def top(
    by: Annotated[
        str, typer.Option("--by", help="what to rank: model, project, user, …")
    ] = "model",
    window: WindowOpt = "month",
    limit: Annotated[int, typer.Option(help="how many rows")] = 10,
    rank: Annotated[str, typer.Option(help="cost | tokens | requests")] = "cost",
    target: Target = None,
    token: Token = None,
    state_dir: StateDir = STATE_DIR,
) -> None:
    """The biggest spenders in a window."""
    from lodestar.usage.v1 import usage_pb2

    groups = parse_groups(by)
    keys: dict[str, Callable[[usage_pb2.Totals], int]] = {
        "cost": lambda t: t.cost_micros,
        "tokens": _tokens,
        "requests": lambda t: t.requests,
    }
    if rank not in keys:
        raise typer.BadParameter("cost, tokens or requests", param_hint="--rank")
    address, secret = resolve(target, token, state_dir)
    reply: usage_pb2.SummaryResponse = _run(
        _summary(
            address,
            secret,
            usage_pb2.SummaryRequest(window=parse_window(window), group_by=groups),
        )
    )
    rows = sorted(reply.rows, key=lambda r: keys[rank](r.totals), reverse=True)[:limit]
    total_cost = reply.totals.cost_micros or 1
    table = Table(title=f"top {limit} by {rank}")
    table.add_column("#", justify="right")
    for group in groups:
        table.add_column(group)
    for column in ("requests", "tokens", "cost", "share"):
        table.add_column(column, justify="right")
    for index, row in enumerate(rows, start=1):
        table.add_row(
            str(index),
            *(row.group.get(g, "") for g in groups),
            f"{row.totals.requests:,}",
            f"{_tokens(row.totals):,}",
            dollars(row.totals.cost_micros),
            f"{100 * row.totals.cost_micros / total_cost:.1f}%",
        )
    console.print(table)


@usage_app.command("export")
def export(
    fmt: Annotated[str, typer.Option("--format", help="csv | jsonl")] = "csv",
    window: WindowOpt = "month",
    output: Annotated[Path | None, typer.Option(help="file to write (default: stdout)")] = None,
    model: FilterOpt = None,
    project: FilterOpt = None,
    provider: FilterOpt = None,
    user: FilterOpt = None,
    session: FilterOpt = None,
    target: Target = None,
    token: Token = None,
    state_dir: StateDir = STATE_DIR,
) -> None:
    """Stream ledger records as CSV or JSON lines, oldest first."""
    from lodestar.common.sdk import connect
    from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc

    formats = {"csv": usage_pb2.EXPORT_FORMAT_CSV, "jsonl": usage_pb2.EXPORT_FORMAT_JSONL}
    if fmt.lower() not in formats:
        raise typer.BadParameter("csv or jsonl", param_hint="--format")
    address, secret = resolve(target, token, state_dir)
    request = usage_pb2.ExportRecordsRequest(
        window=parse_window(window),
        filters=_filters(model, project, provider, user, session),
        format=formats[fmt.lower()],
    )

    async def stream() -> None:
        sink = output.open("wb") if output else sys.stdout.buffer
        try:
            async with connect(address, secret) as channel:
                async for piece in usage_pb2_grpc.UsageServiceStub(channel).ExportRecords(request):
                    sink.write(piece.chunk)
            sink.flush()
        finally:
            if output:
                sink.close()

    _run(stream())


# --- budgets -------------------------------------------------------------------------------------


async def _budgets(address: str, secret: str) -> list[usage_pb2.BudgetStatus]:
    from lodestar.common.sdk import connect
    from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc

    async with connect(address, secret) as channel:
        reply = await usage_pb2_grpc.BudgetServiceStub(channel).ListBudgets(
            usage_pb2.ListBudgetsRequest()
        )
        return list(reply.budgets)


@budgets_app.command("list")
def list_budgets(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    target: Target = None,
    token: Token = None,
    state_dir: StateDir = STATE_DIR,
) -> None:
    """Budgets with what they have spent, hold and have left in their current window."""
    from lodestar.usage.v1 import usage_pb2

    address, secret = resolve(target, token, state_dir)
    statuses: list[usage_pb2.BudgetStatus] = _run(_budgets(address, secret))
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "id": s.budget.id,
                        "name": s.budget.name,
                        "scope": usage_pb2.BudgetScope.Name(s.budget.scope)
                        .removeprefix("BUDGET_SCOPE_")
                        .lower(),
                        "scope_value": s.budget.scope_value,
                        "limit_micros": s.budget.limit_micros
                        if s.budget.HasField("limit_micros")
                        else None,
                        "limit_tokens": s.budget.limit_tokens
                        if s.budget.HasField("limit_tokens")
                        else None,
                        "spent_micros": s.spent_micros,
                        "reserved_micros": s.reserved_micros,
                        "remaining_micros": s.remaining_micros,
                    }
                    for s in statuses
                ]
            )
        )
        return
    table = Table(title="budgets")
    for column in ("id", "name", "scope", "period", "limit", "spent", "held", "left", "used"):
        table.add_column(column, justify="right" if column in ("spent", "held", "left") else "left")
    for s in statuses:
        b = s.budget
        scope = usage_pb2.BudgetScope.Name(b.scope).removeprefix("BUDGET_SCOPE_").lower()
        period = usage_pb2.BudgetPeriod.Name(b.period).removeprefix("BUDGET_PERIOD_").lower()
        if b.HasField("limit_micros"):
            limit, spent, held, left = (
                dollars(b.limit_micros),
                dollars(s.spent_micros),
                dollars(s.reserved_micros),
                dollars(s.remaining_micros),
            )
            used = (s.spent_micros + s.reserved_micros) / b.limit_micros
        elif b.HasField("limit_tokens"):
            limit, spent, held, left = (
                f"{b.limit_tokens:,} tok",
                f"{s.spent_tokens:,}",
                f"{s.reserved_tokens:,}",
                f"{s.remaining_tokens:,}",
            )
            used = (s.spent_tokens + s.reserved_tokens) / b.limit_tokens
        else:
            limit, spent, held, left, used = "session limits", "", "", "", 0.0
        color = "red" if used >= 1 else "yellow" if used >= 0.8 else "green"
        table.add_row(
            b.id,
            b.name,
            f"{scope}:{b.scope_value}" if b.scope_value else scope,
            period,
            limit,
            spent,
            held,
            left,
            Text(f"{100 * used:.0f}%", style=color),
        )
    console.print(table)


@budgets_app.command("create")
def create_budget(
    name: Annotated[str, typer.Option(help="a name for alerts and denials")],
    scope: Annotated[str, typer.Option(help="global | project | user | session")] = "global",
    value: Annotated[str, typer.Option(help="the project, user or session it limits")] = "",
    period: Annotated[str, typer.Option(help="daily | weekly | monthly | rolling")] = "monthly",
    limit_usd: Annotated[
        str | None, typer.Option(help="dollar limit, e.g. 25 or 12.50 (exact)")
    ] = None,
    limit_tokens: Annotated[int | None, typer.Option(help="token limit")] = None,
    rolling_hours: Annotated[int, typer.Option(help="window of a rolling budget")] = 0,
    timezone: Annotated[str, typer.Option(help="IANA timezone of calendar periods")] = "",
    thresholds: Annotated[str, typer.Option(help="alert thresholds in percent")] = "50,80,100",
    target: Target = None,
    token: Token = None,
    state_dir: StateDir = STATE_DIR,
) -> None:
    """Add a budget (admin) and print its id."""
    from google.protobuf import duration_pb2

    from lodestar.common.sdk import connect
    from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc

    if scope not in SCOPES:
        raise typer.BadParameter(", ".join(SCOPES), param_hint="--scope")
    if period not in PERIODS:
        raise typer.BadParameter(", ".join(PERIODS), param_hint="--period")
    budget = usage_pb2.Budget(
        name=name,
        scope=usage_pb2.BudgetScope.Value(f"BUDGET_SCOPE_{scope.upper()}"),
        scope_value=value,
        period=usage_pb2.BudgetPeriod.Value(f"BUDGET_PERIOD_{period.upper()}"),
        timezone=timezone,
    )
    try:
        budget.thresholds_pct.extend(int(t) for t in thresholds.split(",") if t.strip())
    except ValueError:
        raise typer.BadParameter("comma-separated integers", param_hint="--thresholds") from None
    if limit_usd is not None:
        try:
            micros = Decimal(limit_usd) * 1_000_000
        except ArithmeticError:
            raise typer.BadParameter("a dollar amount", param_hint="--limit-usd") from None
        if micros != micros.to_integral_value():
            raise typer.BadParameter("at most 6 decimal places", param_hint="--limit-usd")
        budget.limit_micros = int(micros)
    if limit_tokens is not None:
        budget.limit_tokens = limit_tokens
    if rolling_hours:
        budget.rolling.CopyFrom(duration_pb2.Duration(seconds=rolling_hours * 3600))
    address, secret = resolve(target, token, state_dir)

    async def send() -> usage_pb2.Budget:
        async with connect(address, secret) as channel:
            reply = await usage_pb2_grpc.BudgetServiceStub(channel).CreateBudget(
                usage_pb2.CreateBudgetRequest(budget=budget)
            )
            return reply.budget

    created: usage_pb2.Budget = _run(send())
    print(created.id)


@budgets_app.command("delete")
def delete_budget(
    budget_id: Annotated[str, typer.Argument(help="the id `budgets list` shows")],
    target: Target = None,
    token: Token = None,
    state_dir: StateDir = STATE_DIR,
) -> None:
    """Remove a budget (admin)."""
    from lodestar.common.sdk import connect
    from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc

    address, secret = resolve(target, token, state_dir)

    async def send() -> bool:
        async with connect(address, secret) as channel:
            reply = await usage_pb2_grpc.BudgetServiceStub(channel).DeleteBudget(
                usage_pb2.DeleteBudgetRequest(id=budget_id)
            )
            return reply.deleted

    _run(send())
    console.print(f"deleted {budget_id}")
