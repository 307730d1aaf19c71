"""A LiteLLM Router with Lodestar on its request path: budget admission first, usage after.

Run it against `make run` (it reads the endpoints and the publisher token that `lodestar up` keeps
in `.lodestar/`, or LODESTAR_CORE_ENDPOINT, LODESTAR_USAGE_ENDPOINT and LODESTAR_TOKEN):

    .venv/bin/python examples/litellm_router.py

The deployments answer with `mock_response`, so it runs without provider keys; delete that line
and set OPENAI_API_KEY / ANTHROPIC_API_KEY for real calls. It sends CALLS completions across
three projects, one of which has a budget too small for the smart model, and prints what was
served and what a budget refused before it was sent; `lodestar usage summary --by project`
shows what Lodestar counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import litellm
import yaml

from lodestar.common.sdk import Publisher, connect
from lodestar.usage.v1 import usage_pb2, usage_pb2_grpc
from lodestar_usage.client import BudgetGate, GatePolicy
from lodestar_usage.litellm_callback import BudgetExceededError, LodestarLogger

STATE_DIR = Path(os.environ.get("LODESTAR_STATE_DIR", ".lodestar"))
CALLS = int(os.environ.get("CALLS", "30"))
PROJECTS = ("web", "batch", "intern")
#: The intern project may spend a tenth of a cent a day: enough for a call to the fast model
#: (estimated at 0.024 cents: prompt + 400 tokens), too little for the smart model (0.2 cents).
INTERN_BUDGET_MICROS = 1_000

MODEL_LIST = [
    {
        "model_name": "fast",
        "litellm_params": {
            "model": "openai/gpt-4o-mini",
            "api_key": os.environ.get("OPENAI_API_KEY", "no-key-needed-with-mock_response"),
            "mock_response": "Paris is the capital of France.",
        },
    },
    {
        "model_name": "smart",
        "litellm_params": {
            "model": "anthropic/claude-haiku-4-5",
            "api_key": os.environ.get("ANTHROPIC_API_KEY", "no-key-needed-with-mock_response"),
            "mock_response": "The capital of France is Paris.",
        },
    },
]


def endpoint(service: str, variable: str, default: str) -> str:
    """A service's address: its variable, else what `lodestar up` wrote, else its default."""
    if address := os.environ.get(variable):
        return address
    endpoints = STATE_DIR / "endpoints.json"
    if endpoints.is_file():
        return str(json.loads(endpoints.read_text())[service]["grpc"])
    return default


def token(role: str) -> str:
    """LODESTAR_TOKEN, else the local development token of ``role`` that `lodestar up` made."""
    if from_env := os.environ.get("LODESTAR_TOKEN"):
        return from_env
    return str(yaml.safe_load((STATE_DIR / "tokens.yaml").read_text())[role])


async def ensure_intern_budget(admin_channel: Any) -> None:
    """A daily budget on the intern project (made once; an admin's job, done here for the demo)."""
    budgets = usage_pb2_grpc.BudgetServiceStub(admin_channel)
    listed = await budgets.ListBudgets(usage_pb2.ListBudgetsRequest())
    if any(status.budget.name == "intern-daily" for status in listed.budgets):
        return
    budget = usage_pb2.Budget(
        name="intern-daily",
        scope=usage_pb2.BUDGET_SCOPE_PROJECT,
        scope_value="intern",
        period=usage_pb2.BUDGET_PERIOD_DAILY,
        limit_micros=INTERN_BUDGET_MICROS,
    )
    await budgets.CreateBudget(usage_pb2.CreateBudgetRequest(budget=budget))


async def main() -> int:
    """Serve CALLS completions through the Router and report what happened to them."""
    core = endpoint("core", "LODESTAR_CORE_ENDPOINT", "127.0.0.1:50051")
    usage = endpoint("usage-tracker", "LODESTAR_USAGE_ENDPOINT", "127.0.0.1:50061")
    async with (
        connect(core, token("publisher")) as to_core,
        connect(usage, token("publisher")) as to_usage,
        connect(usage, os.environ.get("LODESTAR_ADMIN_TOKEN") or token("admin")) as as_admin,
        Publisher(
            to_core,
            source="litellm://example-router",
            spool_dir=STATE_DIR / "spool",
            linger_seconds=0.05,  # one Publish per 50 ms of calls: less of the gateway's CPU
        ) as pub,
    ):
        await ensure_intern_budget(as_admin)
        logger = LodestarLogger(pub, BudgetGate(to_usage, GatePolicy(fail_open=False)))
        litellm.callbacks = [logger]
        router = litellm.Router(model_list=MODEL_LIST, num_retries=0)
        served, refused = await serve(router)
        await logger.drain()
        await pub.flush()
    print(f"served {served} calls, {refused} refused by a budget")
    return 0


async def serve(router: litellm.Router) -> tuple[int, int]:
    """Send the calls; count the served and the refused."""
    served = refused = 0
    for i in range(CALLS):
        project = PROJECTS[i % len(PROJECTS)]
        try:
            await router.acompletion(
                model="fast" if i % 2 else "smart",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=400,
                metadata={"lodestar": {"project": project, "session_id": f"{project}-session"}},
            )
            served += 1
        except BudgetExceededError as refusal:
            refused += 1
            print(f"refused: {refusal}")
    return served, refused


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
