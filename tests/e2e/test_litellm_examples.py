"""The LiteLLM examples, run as a user would against `lodestar up`.

The Router script, and the real LiteLLM proxy server on examples/litellm-proxy/config.yaml, from a
venv of its own (`make litellm-proxy`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.test_suite_up import lodestar
from tests.e2e.test_usage_cli import ok, suite  # noqa: F401 — the fixture, `lodestar up`

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PROXY_PYTHON = ROOT / ".tools" / "litellm-proxy" / "bin" / "python"
MASTER_KEY = "sk-lodestar-example-master-key-0123456789"


def suite_env(state: Path) -> dict[str, str]:
    """What a shell next to `make run` would have, plus LiteLLM's offline cost map."""
    endpoints = json.loads((state / "endpoints.json").read_text())
    tokens = yaml.safe_load((state / "tokens.yaml").read_text())
    return {
        **os.environ,
        "LODESTAR_STATE_DIR": str(state),
        "LODESTAR_CORE_ENDPOINT": endpoints["core"]["grpc"],
        "LODESTAR_USAGE_ENDPOINT": endpoints["usage-tracker"]["grpc"],
        "LODESTAR_TOKEN": tokens["publisher"],
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }


def usage_by_project(state: Path, requests: int) -> dict[str, dict[str, Any]]:
    """`lodestar usage summary --by project --json` once it counts ``requests`` requests."""
    deadline = time.monotonic() + 60
    while True:
        rows = json.loads(ok(lodestar(state, "usage", "summary", "--by", "project", "--json")))
        by_project = {r["group"]["project"]: r for r in rows["rows"]}
        counted = sum(t["requests"] for t in by_project.values())
        if counted >= requests or time.monotonic() > deadline:
            return by_project
        time.sleep(0.5)


def test_the_router_example_is_admitted_and_counted(suite: Path) -> None:  # noqa: F811
    env = {**suite_env(suite), "CALLS": "30"}
    env.pop("LODESTAR_TOKEN")  # the example finds the local tokens in the state dir by itself
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "litellm_router.py")],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # Intern's calls to the smart model (5 of 10) cost more than its whole budget.
    assert "served 25 calls, 5 refused by a budget" in result.stdout
    assert "budget 'intern-daily'" in result.stdout
    assert "reservation not finished" not in result.stdout + result.stderr
    by_project = usage_by_project(suite, 25)
    assert {p: t["requests"] for p, t in by_project.items()} == {
        "web": 10,
        "batch": 10,
        "intern": 5,
    }
    assert all(t["cost_micros"] > 0 for t in by_project.values())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def litellm_proxy(suite: Path, tmp_path: Path) -> Iterator[str]:  # noqa: F811
    """The LiteLLM proxy server on examples/litellm-proxy/config.yaml; its base URL."""
    built = subprocess.run(
        ["make", "-s", "litellm-proxy"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, built.stdout + built.stderr
    port = free_port()
    env = {
        **suite_env(suite),
        "LITELLM_MASTER_KEY": MASTER_KEY,
        "LODESTAR_SPOOL_DIR": str(tmp_path / "spool"),
        "LODESTAR_COLLECT_PROJECTS": "web",
    }
    log = (tmp_path / "proxy.log").open("w")
    proxy = subprocess.Popen(
        [str(PROXY_PYTHON), "-m", "litellm.proxy.proxy_cli",
         "--config", str(EXAMPLES / "litellm-proxy" / "config.yaml"),
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proxy.poll() is None:
            try:
                if httpx.get(f"{url}/health/liveliness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert proxy.poll() is None, (tmp_path / "proxy.log").read_text()[-3000:]
        yield url
    finally:
        os.killpg(proxy.pid, signal.SIGTERM)
        try:
            proxy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proxy.pid, signal.SIGKILL)
        log.close()


def chat(url: str, model: str, project: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {MASTER_KEY}"},
        json={
            "model": model,
            "max_tokens": 400,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "metadata": {"lodestar": {"project": project, "session_id": f"{project}-1"}},
        },
        timeout=30,
    )


def test_the_proxy_config_admits_refuses_and_counts(suite: Path, litellm_proxy: str) -> None:  # noqa: F811
    ok(lodestar(suite, "budgets", "create", "--name", "tiny", "--scope", "project",
                "--value", "tiny", "--period", "daily", "--limit-usd", "0.001"))  # fmt: skip
    costs: dict[str, int] = {}
    for i in range(12):
        project = ("web", "batch", "tiny")[i % 3]
        model = "fast" if project != "tiny" or i % 2 else "smart"
        answer = chat(litellm_proxy, model, project)
        if project == "tiny" and model == "smart":
            assert answer.status_code == 429, answer.text
            assert "budget 'tiny'" in answer.json()["error"]["message"]
            continue
        assert answer.status_code == 200, answer.text
        cost = float(answer.headers["x-litellm-response-cost"])
        costs[project] = costs.get(project, 0) + round(cost * 1_000_000)
    by_project = usage_by_project(suite, 10)
    assert {p: t["requests"] for p, t in by_project.items()} == {
        "web": 4,
        "batch": 4,
        "tiny": 2,
    }
    assert {p: t["cost_micros"] for p, t in by_project.items()} == costs
