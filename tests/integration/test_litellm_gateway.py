"""LiteLLM on the request path, with the real ``litellm`` and ``mock_response`` (no network):
usage events for every call, budget admission before it, and totals exact to the micro-dollar."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import os
from collections.abc import AsyncIterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from lodestar.common.auth import Role
from lodestar.common.events import unpack
from lodestar.common.sdk import Publisher, connect
from lodestar.events.v1 import event_pb2
from lodestar.learning.v1 import events_pb2 as learning_events
from lodestar.usage.v1 import events_pb2 as usage_events
from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug
from lodestar_usage.client import BudgetGate, GatePolicy

from .test_usage_admission import project_budget
from .test_usage_ledger import summary, wait_requests

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network
litellm = importlib.import_module("litellm")
CustomLogger = importlib.import_module("litellm.integrations.custom_logger").CustomLogger
gateway = importlib.import_module("lodestar_usage.litellm_callback")

#: Three deployments of three providers, each answering with a canned text.
MODELS = {
    "fast": "openai/gpt-4o-mini",
    "smart": "anthropic/claude-3-5-haiku-20241022",
    "open": "mistral/mistral-small-latest",
}


class CostsLiteLLMReported(CustomLogger):  # type: ignore[misc]
    """What LiteLLM itself computed for each successful call, by project."""

    def __init__(self) -> None:
        super().__init__()
        self.micros: collections.Counter[str] = collections.Counter()

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):  # type: ignore[no-untyped-def]
        cost = kwargs["standard_logging_object"]["response_cost"]
        project = gateway.lodestar_fields(kwargs["litellm_params"]["metadata"]).get("project", "")
        self.micros[project] += int(
            (Decimal(repr(cost)) * 1_000_000).quantize(Decimal(1), rounding=ROUND_HALF_UP)
        )


def router() -> Any:
    answer = "Lodestar counts every token."
    return litellm.Router(
        model_list=[
            {
                "model_name": name,
                "litellm_params": {"model": m, "api_key": "k", "mock_response": answer},
            }
            for name, m in MODELS.items()
        ],
        num_retries=0,
    )


class SlowCommits(BudgetGate):
    """A gate whose Commits take a second, as under a loaded tracker."""

    async def commit(self, request: u.CommitRequest) -> bool:
        await asyncio.sleep(1.0)
        return await super().commit(request)


@contextlib.asynccontextmanager
async def logger_on(
    core: Any,
    tracker: Any,
    tokens: dict[Role | str, str],
    spool: Path,
    *,
    gate: bool,
    **options: Any,
) -> AsyncIterator[Any]:
    """A LodestarLogger publishing to ``core`` (and admitting through ``tracker``) as litellm's
    only callbacks, with a logger of LiteLLM's own costs."""
    async with (
        connect(core.target, tokens[Role.PUBLISHER]) as to_core,
        connect(tracker.target, tokens[Role.PUBLISHER]) as to_tracker,
        Publisher(to_core, source="litellm://gateway", spool_dir=spool) as publisher,
    ):
        gate_class = options.pop("gate_class", BudgetGate)
        budget_gate = gate_class(to_tracker, GatePolicy(timeout_seconds=10)) if gate else None
        logger = gateway.LodestarLogger(publisher, budget_gate, **options)
        reported = CostsLiteLLMReported()
        litellm.callbacks = [logger, reported]
        try:
            yield logger, reported
            await logger.drain()
            await publisher.flush()
        finally:
            litellm.callbacks = []
            for callback in (logger, reported):  # litellm keeps them in lists of its own too
                litellm.logging_callback_manager.remove_callback_from_all_lists(callback)


async def call(
    llm: Any,
    model: str,
    project: str,
    session: str,
    *,
    task: dict[str, str] | None = None,
    **kwargs: Any,
) -> Any:
    fields = {"project": project, "session_id": session, "user": "ann", **(task or {})}
    return await llm.acompletion(
        model=model,
        messages=[{"role": "user", "content": f"hello from {project}"}],
        metadata={"lodestar": fields},
        **kwargs,
    )


async def test_a_router_serving_1000_completions_is_counted_exactly(
    core, tracker, tokens, admin, tmp_path
):
    """Every call is in the ledger; its totals equal what LiteLLM reported, to the micro-dollar."""
    async with logger_on(core, tracker, tokens, tmp_path / "spool", gate=False) as (_, reported):
        limit = asyncio.Semaphore(50)
        llm = router()  # per test: a router keeps clients of the event loop it first ran in

        async def one(i: int) -> None:
            async with limit:
                await call(llm, list(MODELS)[i % 3], f"p{i % 5}", f"s{i % 20}")

        await asyncio.gather(*(one(i) for i in range(1000)))
        await asyncio.sleep(0.5)  # litellm runs its success callbacks after the call returns
    totals = (await wait_requests(admin, 1000, timeout=60)).totals
    assert totals.requests == 1000
    assert totals.errors == 0
    assert totals.cost_micros == sum(reported.micros.values()) > 0
    by_project = await summary(admin, group_by=["project"])
    assert {r.group["project"]: r.totals.cost_micros for r in by_project.rows} == dict(
        reported.micros
    )
    by_model = await summary(admin, group_by=["model", "provider"])
    assert {(r.group["model"], r.group["provider"]) for r in by_model.rows} == {
        tuple(reversed(m.split("/", 1))) for m in MODELS.values()
    }
    by_session = await summary(admin, group_by=["session"])
    assert len(by_session.rows) == 20


async def test_an_over_budget_call_is_refused_before_it_is_sent(
    core, tracker, tokens, admin, tmp_path
):
    """Concurrent calls never overspend; a refusal names the budget; failures release holds."""
    await ug.BudgetServiceStub(admin).CreateBudget(
        u.CreateBudgetRequest(budget=project_budget(2_000, project="capped"))
    )
    with capture_logs() as logged:
        async with logger_on(core, tracker, tokens, tmp_path / "spool", gate=True) as (_, reported):
            llm = router()
            results = await asyncio.gather(
                *(call(llm, "fast", "capped", f"s{i}", max_tokens=100) for i in range(60)),
                return_exceptions=True,
            )
            refused = [r for r in results if isinstance(r, gateway.BudgetExceededError)]
            served = [r for r in results if not isinstance(r, BaseException)]
            assert refused
            assert served
            assert len(refused) + len(served) == 60
            assert "budget 'budget-capped'" in str(refused[0])
            with pytest.raises(Exception, match="provider down"):
                await call(
                    llm, "fast", "capped", "s-failed", max_tokens=1,
                    mock_response=Exception("provider down"), num_retries=0,
                )  # fmt: skip
            await asyncio.sleep(0.5)
    totals = (await wait_requests(admin, len(served) + 1, timeout=60)).totals
    assert totals.requests == len(served) + 1  # a refused call publishes nothing
    capped = (await summary(admin, filters=u.Filters(projects=["capped"]))).totals
    assert capped.errors == 1
    assert capped.cost_micros == reported.micros["capped"] <= 2_000
    pool = tracker.module.pool
    states = collections.Counter(
        r["state"] for r in await pool.fetch("SELECT state FROM reservations")
    )
    assert states["active"] == 0, states  # every hold committed, settled or released
    assert states["released"] == 1
    assert states["settled"] == len(served)
    assert [e for e in logged if e["log_level"] == "error"] == []  # no Commit refused


async def published(db: Any) -> list[Any]:
    """The payloads stored in core, in order."""
    rows = await db.fetch("SELECT envelope FROM events ORDER BY seq")
    return [unpack(event_pb2.Event.FromString(r["envelope"])) for r in rows]


async def test_a_streamed_call_has_its_first_token_timed_and_its_answer_collected(
    core, tracker, tokens, db, tmp_path
):
    """Time to first token is measured; only projects whose content is collected send answers."""
    task = {"task_id": "t-1", "task_kind": "code-review"}
    async with logger_on(
        core, tracker, tokens, tmp_path / "spool", gate=False, collect_projects={"research"}
    ):
        llm = router()
        stream = await call(llm, "smart", "research", "s1", task=task, stream=True)
        chunks = [chunk async for chunk in stream]
        await call(llm, "fast", "private", "s2", task={"task_id": "t-2"})
        await asyncio.sleep(0.5)
    assert len(chunks) > 1
    payloads = await published(db)
    completed = [p for p in payloads if isinstance(p, usage_events.RequestCompleted)]
    collected = [p for p in payloads if isinstance(p, learning_events.ResponseCollected)]
    assert sorted(p.project for p in completed) == ["private", "research"]
    for event in completed:
        first_token = event.time_to_first_token.ToTimedelta()
        assert event.HasField("time_to_first_token")
        assert first_token <= event.duration.ToTimedelta()
    assert collected == [
        learning_events.ResponseCollected(
            task_id="t-1",
            model="claude-3-5-haiku-20241022",
            provider="anthropic",
            task_kind="code-review",
            prompt='[{"role": "user", "content": "hello from research"}]',
            response="Lodestar counts every token.",
            project="research",
        )
    ]


async def test_an_answer_too_large_to_collect_is_left_out_but_counted(
    core, tracker, tokens, db, tmp_path
):
    """A collected answer over the size limit is not published; its usage event still is."""
    async with logger_on(
        core, tracker, tokens, tmp_path / "spool", gate=False,
        collect_projects={gateway.ALL_PROJECTS}, max_collected_bytes=100,
    ):  # fmt: skip
        await call(router(), "fast", "any", "s1")
        await asyncio.sleep(0.5)
    payloads = await published(db)
    assert [type(p).__name__ for p in payloads] == ["RequestCompleted"]


async def test_calls_go_on_while_core_is_down_and_the_totals_are_exact_after(
    core, core_settings, core_starter, tracker, tokens, admin, tmp_path
):
    """Core stops mid-run: every call still succeeds, its event is spooled and lands once after."""
    port = int(core.target.rsplit(":", 1)[1])
    async with logger_on(core, tracker, tokens, tmp_path / "spool", gate=False) as (
        logger,
        reported,
    ):
        llm = router()

        async def calls(phase: str) -> None:
            await asyncio.gather(
                *(
                    call(llm, list(MODELS)[i % 3], f"p{i % 4}", f"{phase}-{i % 5}")
                    for i in range(100)
                )
            )
            await asyncio.sleep(0.5)  # litellm runs its success callbacks after the call returns
            await logger.drain()

        await calls("before")
        await core.stop()
        await calls("during")  # every call returns while nothing listens on core's port
        spooled = logger.publisher.spooled_batches
        await core_starter(core_settings.model_copy(update={"port": port}))
        await calls("after")
    assert spooled > 0
    totals = (await wait_requests(admin, 300, timeout=60)).totals
    assert totals.requests == 300
    assert totals.cost_micros == sum(reported.micros.values()) > 0
    by_session = await summary(admin, group_by=["session"])
    assert sorted(r.group["session"] for r in by_session.rows) == sorted(
        f"{phase}-{i}" for phase in ("before", "during", "after") for i in range(5)
    )


async def test_a_slow_commit_still_lands_before_the_event_settles_its_reservation(
    core, tracker, tokens, admin, tmp_path
):
    """Each hold ends committed with the actual cost, then settled; no Commit is refused."""
    with capture_logs() as logged:
        async with logger_on(
            core, tracker, tokens, tmp_path / "spool", gate=True, gate_class=SlowCommits
        ) as (_, reported):
            llm = router()
            await asyncio.gather(*(call(llm, "fast", "slow", f"s{i}") for i in range(5)))
            await asyncio.sleep(0.5)
    totals = (await wait_requests(admin, 5, timeout=60)).totals
    assert totals.cost_micros == reported.micros["slow"] > 0
    rows = await tracker.module.pool.fetch("SELECT state, amount_micros FROM reservations")
    assert [r["state"] for r in rows] == ["settled"] * 5
    assert sum(r["amount_micros"] for r in rows) == totals.cost_micros  # actual, not the estimate
    assert [e for e in logged if e["log_level"] == "error"] == []
