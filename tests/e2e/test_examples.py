"""Every example in examples/ runs as a user runs it, against a `lodestar up` suite of processes.

Each test checks what the example printed and what it left behind in the services.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from lodestar.common.sdk import BudgetClient, ClientOptions, UsageClient
from lodestar.usage.v1 import usage_pb2
from tests.e2e.test_suite_up import lodestar, lodestar_up, wait_for_line, wait_registered

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@dataclass(frozen=True)
class Suite:
    state: Path
    core: str
    tracker: str
    tokens: dict[str, str]

    def env(self, token: str) -> dict[str, str]:
        """The environment the examples read: targets and a token."""
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("LODESTAR_")},
            "LODESTAR_CORE_ENDPOINT": self.core,
            "LODESTAR_USAGE_ENDPOINT": self.tracker,
            "LODESTAR_TOKEN": self.tokens[token],
        }

    def admin(self, target: str) -> ClientOptions:
        return ClientOptions(target, self.tokens["admin"])


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    folder = tmp_path_factory.mktemp("examples")
    with lodestar_up(folder):
        state = folder / "state"
        wait_registered(state, {"usage-tracker"})
        endpoints = json.loads((state / "endpoints.json").read_text())
        yield Suite(
            state,
            endpoints["core"]["grpc"],
            endpoints["usage-tracker"]["grpc"],
            yaml.safe_load((state / "tokens.yaml").read_text()),
        )


def run(*command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_python_client(suite: Suite):
    first = run(sys.executable, str(EXAMPLES / "python_client.py"), env=suite.env("admin"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "module usage-tracker: enabled=True" in first.stdout
    assert "created budget" in first.stdout
    assert "usage this month:" in first.stdout
    assert "refused as expected: budget.name: required, 1-200 characters" in first.stdout

    listed = json.loads(lodestar(suite.state, "budgets", "list", "--json").stdout)
    created = [b for b in listed if b["name"] == "example-monthly"]
    assert len(created) == 1
    assert created[0]["limit_micros"] == 5_000_000

    again = run(sys.executable, str(EXAMPLES / "python_client.py"), env=suite.env("admin"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "created budget" not in again.stdout  # the budget is found, not made twice
    assert f"budget example-monthly: id={created[0]['id']}" in again.stdout

    refused = run(
        sys.executable,
        str(EXAMPLES / "python_client.py"),
        "--token",
        "wrong",
        env=suite.env("admin"),
    )
    assert refused.returncode == 1
    assert refused.stdout.startswith("failed: UNAUTHENTICATED: invalid credential")


def test_grpcurl_script(suite: Suite):
    done = run("bash", str(EXAMPLES / "grpcurl.sh"), env=suite.env("admin"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lodestar.core.v1.RegistryService" in done.stdout  # reflection
    assert '"name": "usage-tracker"' in done.stdout  # ListModules
    assert '"start":' in done.stdout  # Summary's resolved window
    assert "google.rpc.BadRequest" in done.stderr  # the refusal, with its details
    assert '"field":"budget.name"' in done.stderr

    no_token = {k: v for k, v in suite.env("admin").items() if k != "LODESTAR_TOKEN"}
    missing = run("bash", str(EXAMPLES / "grpcurl.sh"), env=no_token)
    assert missing.returncode != 0
    assert "set LODESTAR_TOKEN" in missing.stderr


@pytest.fixture
def order_service(suite: Suite) -> Iterator[str]:
    """examples/order_service.py on a free port with the publisher token; its orders URL."""
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "order_service.py"), "--port", "0"],
        env=suite.env("publisher"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = wait_for_line(process, "listening on", timeout=30)[-1]
        yield line.split("listening on ", 1)[1].strip()
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def post(url: str, order: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=json.dumps(order).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def test_order_service(suite: Suite, order_service: str):
    with BudgetClient(suite.admin(suite.tracker)) as budgets:
        tiny = usage_pb2.Budget(
            name="tiny-orders",
            scope=usage_pb2.BUDGET_SCOPE_PROJECT,
            scope_value="tiny",
            period=usage_pb2.BUDGET_PERIOD_MONTHLY,
            limit_micros=100,
        )
        budgets.create_budget(usage_pb2.CreateBudgetRequest(budget=tiny))

    status, placed = post(
        order_service, {"project": "shop", "user": "ann", "items": ["tea", "cups"]}
    )
    assert (status, placed["cost_micros"]) == (200, 900), placed
    status, refused = post(order_service, {"project": "tiny", "items": ["tea"]})
    assert (status, refused["budget"]) == (429, "tiny-orders"), refused
    assert post(order_service, {"project": "shop", "items": []})[0] == 400

    # The published RequestCompleted reached the ledger: usage by project shows the one order.
    summary = usage_pb2.SummaryRequest(group_by=["project"])
    deadline = time.monotonic() + 30
    with UsageClient(suite.admin(suite.tracker)) as usage:
        while True:
            rows = {r.group["project"]: r.totals for r in usage.summary(summary).rows}
            if "shop" in rows or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert (rows["shop"].requests, rows["shop"].cost_micros) == (1, 900)
    assert (rows["shop"].tokens.input, rows["shop"].tokens.output) == (100, 40)
    assert "tiny" not in rows  # refused before any work
