"""Lodestar from Python with the blocking typed clients: modules, a budget, this month's usage.

Run it against `make run` (examples/README.md):

    LODESTAR_TOKEN=<admin token> .venv/bin/python examples/python_client.py

Options (or environment): --target (LODESTAR_CORE_ENDPOINT, core, default 127.0.0.1:50051),
--usage-target (LODESTAR_USAGE_ENDPOINT, the usage-tracker, default 127.0.0.1:50061),
--token (LODESTAR_TOKEN; creating a budget needs the admin token).
"""

from __future__ import annotations

import argparse
import os

from lodestar.common.errors import InvalidArgumentError, LodestarError
from lodestar.common.sdk import BudgetClient, ClientOptions, RegistryClient, UsageClient
from lodestar.core.v1 import registry_pb2
from lodestar.usage.v1 import usage_pb2

BUDGET_NAME = "example-monthly"


def main() -> int:
    """List the modules, make sure the example budget exists, print this month's usage."""
    args = _arguments()
    core = ClientOptions(args.target, args.token, timeout_seconds=5)
    tracker = ClientOptions(args.usage_target, args.token, timeout_seconds=5)
    try:
        with (
            RegistryClient(core) as registry,
            BudgetClient(tracker) as budgets,
            UsageClient(tracker) as usage,
        ):
            for module in registry.list_modules().modules:
                health = registry_pb2.HealthStatus.Name(module.health.status)
                print(f"module {module.name}: enabled={module.enabled} health={health}")

            budget = _example_budget(budgets)
            print(f"budget {budget.budget.name}: id={budget.budget.id} {_dollars(budget)}")

            summary = usage.summary(usage_pb2.SummaryRequest(group_by=["model"]))
            totals = summary.totals
            print(f"usage this month: {totals.requests} requests, {totals.cost_micros} micro-USD")
            for row in summary.rows:
                print(f"  {row.group['model']}: {row.totals.cost_micros} micro-USD")

            # A refusal is an exception with the server's details as fields.
            try:
                budgets.create_budget(usage_pb2.CreateBudgetRequest(budget=usage_pb2.Budget()))
            except InvalidArgumentError as refused:
                for violation in refused.violations:
                    print(f"refused as expected: {violation.field}: {violation.description}")
    except LodestarError as error:
        print(f"failed: {error.code.name}: {error.message}")
        return 1
    return 0


def _example_budget(budgets: BudgetClient) -> usage_pb2.BudgetStatus:
    """The example budget with its spend, created the first time ($5 a month for "example")."""
    for status in budgets.list_budgets().budgets:
        if status.budget.name == BUDGET_NAME:
            return status
    budget = usage_pb2.Budget(
        name=BUDGET_NAME,
        scope=usage_pb2.BUDGET_SCOPE_PROJECT,
        scope_value="example",
        period=usage_pb2.BUDGET_PERIOD_MONTHLY,
        limit_micros=5_000_000,
    )
    created = budgets.create_budget(usage_pb2.CreateBudgetRequest(budget=budget)).budget
    print(f"created budget {created.id}")
    return usage_pb2.BudgetStatus(budget=created)


def _dollars(status: usage_pb2.BudgetStatus) -> str:
    limit = status.budget.limit_micros / 1e6
    return f"limit=${limit:.2f} spent=${status.spent_micros / 1e6:.6f}"


def _arguments() -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=env("LODESTAR_CORE_ENDPOINT", "127.0.0.1:50051"))
    parser.add_argument("--usage-target", default=env("LODESTAR_USAGE_ENDPOINT", "127.0.0.1:50061"))
    parser.add_argument("--token", default=env("LODESTAR_TOKEN"))
    return parser.parse_args()


if __name__ == "__main__":
    raise SystemExit(main())
