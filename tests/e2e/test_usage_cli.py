"""`lodestar usage …`, `budgets …` and `prices …` against `lodestar up`: real processes, Postgres.

Also what a user meets around them: the state dir from LODESTAR_STATE_DIR instead of a repeated
--state-dir, and a second `lodestar up` on a state dir in use refused in one line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.test_suite_up import LODESTAR, lodestar, wait_for_line

pytestmark = pytest.mark.e2e

EVENTS = [
    # model, project, input, output, reported cost in micro-dollars
    ("claude-sonnet-4", "alpha", 1200, 300, 12_345),
    ("claude-sonnet-4", "beta", 800, 100, 7_001),
    ("gpt-4o", "alpha", 500, 50, 3_333),
]


@pytest.fixture
def suite(tmp_path: Path):
    state = tmp_path / "state"
    process = subprocess.Popen(
        [*LODESTAR, "up", "--port-base", "0", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        wait_for_line(process, "Ctrl-C stops everything", timeout=120)
        yield state
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_usage_summary_export_top_and_budgets(suite: Path):
    state = suite
    assert "usage-tracker" in json.loads((state / "endpoints.json").read_text())
    for model, project, inp, out, cost in EVENTS:
        data = {
            "model": model,
            "provider": "anthropic" if model.startswith("claude") else "openai",
            "project": project,
            "tokens": {"input": inp, "output": out},
            "reportedCost": {"currency": "USD", "micros": cost},
        }
        ok(lodestar(state, "publish", "lodestar.usage.v1.RequestCompleted", json.dumps(data)))

    deadline = time.monotonic() + 30
    while True:
        summary = json.loads(
            ok(
                lodestar(
                    state, "usage", "summary", "--by", "model,day", "--window", "month", "--json"
                )
            )
        )
        if summary["totals"]["requests"] >= len(EVENTS) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert summary["totals"]["requests"] == len(EVENTS)
    assert summary["totals"]["cost_micros"] == sum(e[4] for e in EVENTS)
    by_model = {r["group"]["model"]: r["cost_micros"] for r in summary["rows"]}
    assert by_model == {"claude-sonnet-4": 12_345 + 7_001, "gpt-4o": 3_333}
    assert all(r["group"]["day"] for r in summary["rows"])

    # The human view: a table and the chart of daily cost per model.
    shown = ok(lodestar(state, "usage", "summary", "--by", "model,day", "--window", "month"))
    assert "claude-sonnet-4" in shown
    assert "$0.022679" in shown  # the exact total, 22,679 micro-dollars
    assert "daily cost per model" in shown
    assert "█" in shown

    exported = ok(lodestar(state, "usage", "export", "--format", "csv", "--window", "month"))
    rows = list(csv.DictReader(io.StringIO(exported)))
    assert len(rows) == len(EVENTS)
    assert sum(int(r["cost_micros"]) for r in rows) == sum(e[4] for e in EVENTS)
    assert sum(int(r["input_tokens"]) for r in rows) == sum(e[2] for e in EVENTS)
    assert {r["project"] for r in rows} == {"alpha", "beta"}
    # Enums by name, not number: every event reported its cost.
    assert {r["cost_source"] for r in rows} == {"reported"}
    assert {r["status"] for r in rows} <= {"unspecified", "ok", "error"}

    top = ok(lodestar(state, "usage", "top", "--by", "project", "--window", "24h"))
    assert top.index("alpha") < top.index("beta")  # alpha spent more

    budget_id = ok(
        lodestar(
            state,
            "budgets",
            "create",
            "--name",
            "alpha-monthly",
            "--scope",
            "project",
            "--value",
            "alpha",
            "--limit-usd",
            "0.1",
        )
    ).strip()
    listed = json.loads(ok(lodestar(state, "budgets", "list", "--json")))
    assert [(b["id"], b["limit_micros"], b["spent_micros"]) for b in listed] == [
        (budget_id, 100_000, 12_345 + 3_333)
    ]
    assert "alpha-monthly" in ok(lodestar(state, "budgets", "list"))
    ok(lodestar(state, "budgets", "delete", budget_id))
    assert json.loads(ok(lodestar(state, "budgets", "list", "--json"))) == []

    bad = lodestar(state, "usage", "summary", "--by", "colour")
    assert bad.returncode != 0
    assert "colour" in bad.stdout + bad.stderr


def test_state_dir_from_the_environment(suite: Path, tmp_path: Path):
    """No --state-dir: LODESTAR_STATE_DIR names `lodestar up`'s folder, from any working dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LODESTAR_")}
    result = subprocess.run(
        [*LODESTAR, "budgets", "list", "--json"],
        env={**env, "LODESTAR_STATE_DIR": str(suite)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_a_second_up_on_the_same_state_dir_is_one_line(suite: Path, tmp_path: Path):
    result = subprocess.run(
        [*LODESTAR, "up", "--port-base", "0", "--state-dir", str(suite)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "another `lodestar up`" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    # The running suite is untouched.
    assert json.loads(ok(lodestar(suite, "budgets", "list", "--json"))) == []


def test_prices_through_the_cli(suite: Path):
    ok(
        lodestar(
            suite, "prices", "set", "e2e-model", "--input", "2", "--output", "8",
            "--valid-from", "2026-01-01",
        )
    )  # fmt: skip
    listed = json.loads(ok(lodestar(suite, "prices", "list", "--model", "e2e-model", "--json")))
    [mine] = [p for p in listed if p["model_pattern"] == "e2e-model"]
    assert (mine["valid_from"], mine["input_micros_per_mtok"]) == ("2026-01-01", 2_000_000)
    assert "e2e-model" in ok(lodestar(suite, "prices", "list"))
    ok(lodestar(suite, "prices", "delete", "e2e-model", "--valid-from", "2026-01-01"))
