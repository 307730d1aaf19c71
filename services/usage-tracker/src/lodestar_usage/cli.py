"""The usage-tracker's ``lodestar`` commands: ``usage …``, ``budgets …``, ``prices …``.

Registered under the ``lodestar.cli`` entry-point group in this package's pyproject.toml, so they
come and go with lodestar-usage-tracker. They talk to the tracker over gRPC with the generated
``lodestar.usage.v1`` stubs, which load when a command runs (importing this module loads only
typer, rich and ``lodestar.common.cli_support``). The address is ``--target``, else
``LODESTAR_USAGE_ENDPOINT``, else the ``usage-tracker`` entry of ``lodestar up``'s endpoints.json;
the token and the other connection options are those of every command (``cli_support``).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from lodestar.common.cli_support import Client, Endpoint, fail, stdout_console, with_client

if TYPE_CHECKING:
    from lodestar.usage.v1 import usage_pb2

USAGE = Endpoint("usage-tracker", "LODESTAR_USAGE_ENDPOINT", "127.0.0.1:50061")
GROUPS = ("model", "provider", "project", "session", "user", "day", "week", "month")
# Names of the CalendarUnit, BudgetScope and BudgetPeriod values the CLI accepts (the stubs are
# imported only when a command runs; the values are looked up by name then).
CALENDAR = ("day", "week", "month")
SCOPES = ("global", "project", "user", "session")
PERIODS = ("daily", "weekly", "monthly", "rolling")
BAR_COLORS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")
#: Request fields of the window and filters, as the flags that set them.
WINDOW_FLAGS = {
    "window.calendar.timezone": "--timezone",
    "window.calendar": "--window",
    "window.rolling": "--window",
    "window": "--window",
    "timezone": "--timezone",
    "filters.models": "--model",
    "filters.projects": "--project",
    "filters.providers": "--provider",
    "filters.users": "--user",
    "filters.sessions": "--session",
    "group_by": "--by",
}
#: Budget fields, as the flags of ``budgets create`` that set them.
BUDGET_FLAGS = {
    "budget.name": "--name",
    "budget.scope_value": "--value",
    "budget.scope": "--scope",
    "budget.period": "--period",
    "budget.limit_micros": "--limit-usd",
    "budget.limit_tokens": "--limit-tokens",
    "budget.rolling": "--rolling-hours",
    "budget.timezone": "--timezone",
    "budget.thresholds_pct": "--thresholds",
}
#: Price fields, as the flags of ``prices set`` and ``prices delete``.
PRICE_FLAGS = {
    "price.model_pattern": "MODEL_PATTERN",
    "price.valid_from": "--valid-from",
    "price.input_micros_per_mtok": "--input",
    "price.output_micros_per_mtok": "--output",
    "price.cached_read_micros_per_mtok": "--cached-read",
    "price.cache_write_micros_per_mtok": "--cache-write",
    "price.reasoning_micros_per_mtok": "--reasoning",
    "model_pattern": "MODEL_PATTERN",
    "valid_from": "--valid-from",
}

usage_app = typer.Typer(help="Usage: summaries, exports, top spenders.", no_args_is_help=True)
budgets_app = typer.Typer(help="Budgets: list, create, delete.", no_args_is_help=True)
prices_app = typer.Typer(
    help="Prices per million tokens, by model pattern and start day: list, history, set, "
    "import, delete.",
    no_args_is_help=True,
)
console = stdout_console()

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


# --- plumbing ------------------------------------------------------------------------------------


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
    """The comma-separated groups of ``--by``, lower-cased; a usage error names an unknown one."""
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


async def _summary(client: Client, request: usage_pb2.SummaryRequest) -> usage_pb2.SummaryResponse:
    from lodestar.usage.v1 import usage_pb2_grpc

    async with client.channel() as channel:
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
@with_client(USAGE, flags=WINDOW_FLAGS)
def summary(
    client: Client,
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
) -> None:
    """Tokens, cost, requests and savings over a window, grouped."""
    from lodestar.usage.v1 import usage_pb2

    groups = parse_groups(by)
    request = usage_pb2.SummaryRequest(
        window=parse_window(window, timezone),
        group_by=groups,
        filters=_filters(model, project, provider, user, session),
        timezone=timezone,
    )
    reply: usage_pb2.SummaryResponse = client.run(_summary(client, request))
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
            reply = client.run(_summary(client, request))
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
@with_client(USAGE, flags=WINDOW_FLAGS)
def top(
    client: Client,
    by: Annotated[
        str, typer.Option("--by", help="what to rank: model, project, user, …")
    ] = "model",
    window: WindowOpt = "month",
    limit: Annotated[int, typer.Option(help="how many rows")] = 10,
    rank: Annotated[str, typer.Option(help="cost | tokens | requests")] = "cost",
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
    reply: usage_pb2.SummaryResponse = client.run(
        _summary(client, usage_pb2.SummaryRequest(window=parse_window(window), group_by=groups))
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
@with_client(USAGE, flags={**WINDOW_FLAGS, "format": "--format"})
def export(
    client: Client,
    fmt: Annotated[str, typer.Option("--format", help="csv | jsonl")] = "csv",
    window: WindowOpt = "month",
    output: Annotated[Path | None, typer.Option(help="file to write (default: stdout)")] = None,
    model: FilterOpt = None,
    project: FilterOpt = None,
    provider: FilterOpt = None,
    user: FilterOpt = None,
    session: FilterOpt = None,
) -> None:
    """Stream ledger records as CSV or JSON lines, oldest first."""
    from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc

    formats = {"csv": usage_pb2.EXPORT_FORMAT_CSV, "jsonl": usage_pb2.EXPORT_FORMAT_JSONL}
    if fmt.lower() not in formats:
        raise typer.BadParameter("csv or jsonl", param_hint="--format")
    request = usage_pb2.ExportRecordsRequest(
        window=parse_window(window),
        filters=_filters(model, project, provider, user, session),
        format=formats[fmt.lower()],
    )

    async def stream() -> None:
        sink = output.open("wb") if output else sys.stdout.buffer
        try:
            async with client.channel() as channel:
                async for piece in usage_pb2_grpc.UsageServiceStub(channel).ExportRecords(request):
                    sink.write(piece.chunk)
            sink.flush()
        finally:
            if output:
                sink.close()

    client.run(stream())


# --- budgets -------------------------------------------------------------------------------------


async def _budgets(client: Client) -> list[usage_pb2.BudgetStatus]:
    from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc

    async with client.channel() as channel:
        reply = await usage_pb2_grpc.BudgetServiceStub(channel).ListBudgets(
            usage_pb2.ListBudgetsRequest()
        )
        return list(reply.budgets)


@budgets_app.command("list")
@with_client(USAGE)
def list_budgets(
    client: Client,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Budgets with what they have spent, hold and have left in their current window."""
    from lodestar.usage.v1 import usage_pb2

    statuses: list[usage_pb2.BudgetStatus] = client.run(_budgets(client))
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
@with_client(USAGE, flags=BUDGET_FLAGS)
def create_budget(
    client: Client,
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
) -> None:
    """Add a budget (admin) and print its id."""
    from google.protobuf import duration_pb2

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
        budget.limit_micros = micros(limit_usd, "--limit-usd")
    if limit_tokens is not None:
        budget.limit_tokens = limit_tokens
    if rolling_hours:
        budget.rolling.CopyFrom(duration_pb2.Duration(seconds=rolling_hours * 3600))

    async def send() -> usage_pb2.Budget:
        async with client.channel() as channel:
            reply = await usage_pb2_grpc.BudgetServiceStub(channel).CreateBudget(
                usage_pb2.CreateBudgetRequest(budget=budget)
            )
            return reply.budget

    created: usage_pb2.Budget = client.run(send())
    print(created.id)


@budgets_app.command("delete")
@with_client(USAGE, flags={"id": "BUDGET_ID"})
def delete_budget(
    client: Client,
    budget_id: Annotated[str, typer.Argument(help="the id `budgets list` shows")],
) -> None:
    """Remove a budget (admin)."""
    from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc

    async def send() -> bool:
        async with client.channel() as channel:
            reply = await usage_pb2_grpc.BudgetServiceStub(channel).DeleteBudget(
                usage_pb2.DeleteBudgetRequest(id=budget_id)
            )
            return reply.deleted

    client.run(send())
    console.print(f"deleted {budget_id}")


# --- prices --------------------------------------------------------------------------------------

PRICE_KINDS = ("input", "output", "cached_read", "cache_write", "reasoning")


def micros(text: str, flag: str) -> int:
    """Exact dollars (``3``, ``0.15``) as micro-dollars; at most 6 decimal places."""
    try:
        amount = Decimal(text) * 1_000_000
    except InvalidOperation:
        raise typer.BadParameter(f"{text!r} is not a dollar amount", param_hint=flag) from None
    if not amount.is_finite() or amount != amount.to_integral_value():
        raise typer.BadParameter("a dollar amount with at most 6 decimal places", param_hint=flag)
    return int(amount)


@prices_app.command("list")
@with_client(USAGE, flags={"model": "--model"})
def list_prices(
    client: Client,
    model: Annotated[str, typer.Option(help="only the prices that apply to this model")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Prices in dollars per million tokens, by model pattern and first day."""
    from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc

    async def fetch() -> list[usage_pb2.Price]:
        async with client.channel() as channel:
            reply = await usage_pb2_grpc.UsageServiceStub(channel).ListPrices(
                usage_pb2.ListPricesRequest(model=model)
            )
            return list(reply.prices)

    prices = client.run(fetch())
    if as_json:
        print(json.dumps([price_dict(p) for p in prices]))
        return
    table = Table(title="prices, $ per million tokens")
    table.add_column("model pattern")
    table.add_column("from (UTC day)")
    for kind in PRICE_KINDS:
        table.add_column(kind.replace("_", " "), justify="right")
    for price in prices:
        row = price_dict(price)
        table.add_row(
            price.model_pattern,
            price.valid_from,
            *(dollars(int(row[f"{kind}_micros_per_mtok"])) for kind in PRICE_KINDS),
        )
    console.print(table)


def price_dict(price: usage_pb2.Price) -> dict[str, str | int]:
    """A price as JSON: every kind's effective micro-dollars per million tokens."""
    return {
        "model_pattern": price.model_pattern,
        "valid_from": price.valid_from,
        "input_micros_per_mtok": price.input_micros_per_mtok,
        "output_micros_per_mtok": price.output_micros_per_mtok,
        "cached_read_micros_per_mtok": price.cached_read_micros_per_mtok
        if price.HasField("cached_read_micros_per_mtok")
        else price.input_micros_per_mtok,
        "cache_write_micros_per_mtok": price.cache_write_micros_per_mtok
        if price.HasField("cache_write_micros_per_mtok")
        else price.input_micros_per_mtok,
        "reasoning_micros_per_mtok": price.reasoning_micros_per_mtok
        if price.HasField("reasoning_micros_per_mtok")
        else price.output_micros_per_mtok,
        "source": price.source,
    }


DollarsOpt = Annotated[str | None, typer.Option(help="$ per million tokens")]


@prices_app.command("set")
@with_client(USAGE, flags=PRICE_FLAGS)
def set_price(
    client: Client,
    model_pattern: Annotated[
        str, typer.Argument(help="glob over the model or provider/model, e.g. 'claude-sonnet-4*'")
    ],
    input_usd: Annotated[str, typer.Option("--input", help="$ per million input tokens")],
    output_usd: Annotated[str, typer.Option("--output", help="$ per million output tokens")],
    valid_from: Annotated[
        str, typer.Option(help="first UTC day it applies to, YYYY-MM-DD (default: today)")
    ] = "",
    cached_read: Annotated[
        str | None, typer.Option(help="$ per million cached-read tokens (default: input)")
    ] = None,
    cache_write: Annotated[
        str | None, typer.Option(help="$ per million cache-write tokens (default: input)")
    ] = None,
    reasoning: Annotated[
        str | None, typer.Option(help="$ per million reasoning tokens (default: output)")
    ] = None,
) -> None:
    """Set the price of a model pattern from a day on (admin)."""
    from datetime import UTC, datetime

    from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc

    price = usage_pb2.Price(
        model_pattern=model_pattern,
        valid_from=valid_from or datetime.now(UTC).date().isoformat(),
        input_micros_per_mtok=micros(input_usd, "--input"),
        output_micros_per_mtok=micros(output_usd, "--output"),
    )
    for value, name, flag in (
        (cached_read, "cached_read_micros_per_mtok", "--cached-read"),
        (cache_write, "cache_write_micros_per_mtok", "--cache-write"),
        (reasoning, "reasoning_micros_per_mtok", "--reasoning"),
    ):
        if value is not None:
            setattr(price, name, micros(value, flag))

    async def send() -> usage_pb2.Price:
        async with client.channel() as channel:
            reply = await usage_pb2_grpc.UsageServiceStub(channel).SetPrice(
                usage_pb2.SetPriceRequest(price=price)
            )
            return reply.price

    stored = client.run(send())
    console.print(f"{stored.model_pattern} from {stored.valid_from} set", highlight=False)


@prices_app.command("history")
@with_client(USAGE, flags={"model": "MODEL"})
def price_history(
    client: Client,
    model: Annotated[str, typer.Argument(help="a model name, e.g. 'gpt-4o'")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Every price that has applied or will apply to a model, oldest first, with its source."""
    from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc

    async def fetch() -> list[usage_pb2.Price]:
        async with client.channel() as channel:
            reply = await usage_pb2_grpc.UsageServiceStub(channel).ListPrices(
                usage_pb2.ListPricesRequest(model=model)
            )
            return sorted(reply.prices, key=lambda p: (p.valid_from, p.model_pattern))

    prices = client.run(fetch())
    if as_json:
        print(json.dumps([price_dict(p) for p in prices]))
        return
    if not prices:
        fail(f"no price applies to {model}; set one with `lodestar prices set` or import some")
    table = Table(title=f"prices of {model}, $ per million tokens")
    table.add_column("from (UTC day)")
    table.add_column("model pattern")
    table.add_column("input", justify="right")
    table.add_column("output", justify="right")
    table.add_column("source")
    for price in prices:
        table.add_row(
            price.valid_from,
            price.model_pattern,
            dollars(price.input_micros_per_mtok),
            dollars(price.output_micros_per_mtok),
            price.source,
        )
    console.print(table)


@prices_app.command("import")
@with_client(USAGE, flags={"file": "--file", "valid_from": "--valid-from"})
def import_prices(
    client: Client,
    file: Annotated[
        Path | None,
        typer.Option(help="a cost map in LiteLLM's JSON format (default: the installed litellm's)"),
    ] = None,
    valid_from: Annotated[
        str, typer.Option(help="first UTC day the prices apply to, YYYY-MM-DD (default: today)")
    ] = "",
) -> None:
    """Import every per-token price of LiteLLM's model cost map (admin)."""
    from datetime import UTC, datetime

    from lodestar.common.errors import LodestarError
    from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc
    from lodestar_usage.cost_map import bundled_cost_map, cost_map_file, prices_from_cost_map
    from lodestar_usage.pricing import parse_day

    try:
        day = parse_day(valid_from, "--valid-from") if valid_from else datetime.now(UTC).date()
        cost_map, source = cost_map_file(file) if file is not None else bundled_cost_map()
    except LodestarError as exc:
        fail(str(exc.details()))
    found = prices_from_cost_map(cost_map, day)
    if not found.prices:
        fail(f"no per-token price in {source}")

    async def send() -> usage_pb2.ImportPricesResponse:
        async with client.channel() as channel:
            reply: usage_pb2.ImportPricesResponse = await usage_pb2_grpc.UsageServiceStub(
                channel
            ).ImportPrices(usage_pb2.ImportPricesRequest(prices=found.prices, source=source))
            return reply

    counts = client.run(send())
    console.print(
        f"imported {len(found.prices)} prices from {source}, from {day}: {counts.added} added, "
        f"{counts.replaced} replaced, {counts.unchanged} unchanged",
        highlight=False,
    )
    if found.tiered:
        console.print(f"{found.tiered} models have tiered prices: imported at their base tier")
    for why, count in sorted(found.skipped.items()):
        console.print(f"skipped {count}: {why}", highlight=False)


@prices_app.command("delete")
@with_client(USAGE, flags=PRICE_FLAGS)
def delete_price(
    client: Client,
    model_pattern: Annotated[str, typer.Argument(help="the pattern `prices list` shows")],
    valid_from: Annotated[str, typer.Option(help="its first day, YYYY-MM-DD")],
) -> None:
    """Remove one price (admin)."""
    from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc

    async def send() -> bool:
        async with client.channel() as channel:
            reply = await usage_pb2_grpc.UsageServiceStub(channel).DeletePrice(
                usage_pb2.DeletePriceRequest(model_pattern=model_pattern, valid_from=valid_from)
            )
            return reply.deleted

    if not client.run(send()):
        fail(f"no price for {model_pattern} from {valid_from}")
    console.print(f"deleted {model_pattern} from {valid_from}", highlight=False)


# --- unpriced usage and re-costing ---------------------------------------------------------------


@usage_app.command("unpriced")
@with_client(USAGE, flags={**WINDOW_FLAGS, "limit": "--limit"})
def unpriced(
    client: Client,
    window: WindowOpt = "month",
    by_day: Annotated[bool, typer.Option("--by-day", help="one row per UTC day too")] = False,
    limit: Annotated[int, typer.Option(help="at most this many rows, most requests first")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Usage recorded while no price covered its model (cost 0), per model and provider."""
    from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc

    async def fetch() -> usage_pb2.ListUnpricedResponse:
        async with client.channel() as channel:
            reply: usage_pb2.ListUnpricedResponse = await usage_pb2_grpc.UsageServiceStub(
                channel
            ).ListUnpriced(
                usage_pb2.ListUnpricedRequest(
                    window=parse_window(window), by_day=by_day, limit=limit
                )
            )
            return reply

    reply = client.run(fetch())
    if as_json:
        print(json.dumps(_unpriced_dict(reply)))
        return
    start, end = reply.start.ToDatetime(), reply.end.ToDatetime()
    table = Table(title=f"unpriced usage {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC")
    for column in ("model", "provider", *(("day",) if by_day else ())):
        table.add_column(column)
    for column in ("requests", "all tokens", "first seen", "last seen", "priced now"):
        table.add_column(column, justify="right")
    for row in reply.rows:
        t = row.tokens
        table.add_row(
            row.model,
            row.provider,
            *((row.day,) if by_day else ()),
            str(row.requests),
            str(t.input + t.output + t.cached_read + t.cache_write + t.reasoning),
            f"{row.first_seen.ToDatetime():%Y-%m-%d %H:%M}",
            f"{row.last_seen.ToDatetime():%Y-%m-%d %H:%M}",
            f"{row.priceable_requests} ({row.price_pattern})" if row.price_pattern else "no price",
        )
    console.print(table)
    console.print(
        f"{reply.unpriced_requests} unpriced requests, {reply.priceable_requests} of them "
        "covered by a price now (`lodestar prices recost` prices them)"
        + (f"; {reply.more_rows} more rows (--limit)" if reply.more_rows else ""),
        highlight=False,
    )


def _unpriced_dict(reply: usage_pb2.ListUnpricedResponse) -> dict[str, object]:
    rows = []
    for row in reply.rows:
        t = row.tokens
        rows.append(
            {
                "model": row.model,
                "provider": row.provider,
                "day": row.day,
                "requests": row.requests,
                "input_tokens": t.input,
                "output_tokens": t.output,
                "cached_read_tokens": t.cached_read,
                "cache_write_tokens": t.cache_write,
                "reasoning_tokens": t.reasoning,
                "first_seen": row.first_seen.ToJsonString(),
                "last_seen": row.last_seen.ToJsonString(),
                "priceable_requests": row.priceable_requests,
                "price_pattern": row.price_pattern,
            }
        )
    return {
        "start": reply.start.ToJsonString(),
        "end": reply.end.ToJsonString(),
        "rows": rows,
        "unpriced_requests": reply.unpriced_requests,
        "priceable_requests": reply.priceable_requests,
        "more_rows": reply.more_rows,
    }


#: Recost fields, as the flags of ``prices recost``.
RECOST_FLAGS = {
    "window.range.start": "--since",
    "window.range.end": "--until",
    "window": "--since/--until",
    "model_pattern": "--model",
    "max_rows": "--batch",
}


@prices_app.command("recost")
@with_client(USAGE, flags=RECOST_FLAGS)
def recost(
    client: Client,
    since: Annotated[str, typer.Option(help="first UTC day of the rows, YYYY-MM-DD")],
    until: Annotated[
        str, typer.Option(help="last UTC day of the rows, YYYY-MM-DD (default: today)")
    ] = "",
    model: Annotated[
        str, typer.Option("--model", help="only models matching this pattern, e.g. 'gpt-5*'")
    ] = "",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report, change nothing")] = False,
    batch: Annotated[int, typer.Option(help="rows per call (one transaction each)")] = 10_000,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of text")] = False,
) -> None:
    """Price usage recorded without a price with the prices that now apply on its days (admin)."""
    from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc

    request = usage_pb2.RecostRequest(
        window=usage_pb2.Window(range=_day_range(since, until)),
        model_pattern=model,
        dry_run=dry_run,
        max_rows=batch,
    )

    async def send() -> list[usage_pb2.RecostResponse]:
        replies = []
        async with client.channel() as channel:
            stub = usage_pb2_grpc.UsageServiceStub(channel)
            while True:
                reply: usage_pb2.RecostResponse = await stub.Recost(request)
                replies.append(reply)
                if not reply.more:
                    return replies

    replies = client.run(send())
    rows = sum(r.rows_recosted for r in replies)
    added = sum(r.micros_added for r in replies)
    left = replies[-1].rows_still_unpriced
    if as_json:
        print(
            json.dumps(
                {
                    "dry_run": dry_run,
                    "rows_recosted": rows,
                    "micros_added": added,
                    "rows_still_unpriced": left,
                    "calls": len(replies),
                    "audit_entry_ids": [r.audit_entry_id for r in replies if r.audit_entry_id],
                }
            )
        )
        return
    verb = "would re-cost" if dry_run else "re-costed"
    console.print(
        f"{verb} {rows} requests: {dollars(added)} added; {left} still without a price",
        highlight=False,
    )


def _day_range(since: str, until: str) -> usage_pb2.TimeRange:
    """[since 00:00, until + 1 day 00:00) UTC as a TimeRange; a usage error names a bad flag."""
    from datetime import UTC, date, datetime, timedelta

    from lodestar.usage.v1 import usage_pb2

    days = []
    for text, flag in ((since, "--since"), (until, "--until")):
        try:
            days.append(date.fromisoformat(text) if text else datetime.now(UTC).date())
        except ValueError:
            raise typer.BadParameter(
                f"{text!r} is not a date YYYY-MM-DD", param_hint=flag
            ) from None
    first, last = days
    if last == date.max:
        raise typer.BadParameter(f"{last} is past the last day there is", param_hint="--until")
    rng = usage_pb2.TimeRange()
    rng.start.FromDatetime(datetime(first.year, first.month, first.day, tzinfo=UTC))
    end = datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1)
    rng.end.FromDatetime(end)
    return rng
