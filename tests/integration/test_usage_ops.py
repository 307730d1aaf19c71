"""usage-tracker operations: retention archive → drop → import-archive, burn-rate alerts, and
admission while the database is unreachable (fail open / fail closed)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from lodestar.common.auth import Role
from lodestar.common.sdk import ReceivedEvent, Subscriber, connect
from lodestar.usage.v1 import events_pb2 as ev
from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug
from lodestar_usage import retention
from lodestar_usage.ingest import ensure_partitions
from lodestar_usage.settings import AdmissionSettings, AlertSettings
from lodestar_usage.testing import start_tracker

from .test_usage_ledger import completed, make_settings, publish, tracker_schema  # noqa: F401

LEDGER_ROWS = (
    "SELECT occurred_at, event_id, model, project, input_tokens, output_tokens, cost_micros, "
    "cost_source, savings_micros FROM ledger ORDER BY occurred_at, event_id"
)


@pytest.fixture
async def tracker(make_settings):  # noqa: F811
    running = await start_tracker(make_settings())
    yield running
    await running.stop()


async def _summary(channel, start, end):
    window = u.Window(range=u.TimeRange())
    window.range.start.FromDatetime(start)
    window.range.end.FromDatetime(end)
    return await ug.UsageServiceStub(channel).Summary(
        u.SummaryRequest(window=window, group_by=["model", "day"])
    )


async def test_archive_drop_and_reimport_gives_identical_totals(
    tracker,
    tokens,
    publisher_channel,
    database_url,
    tracker_schema,  # noqa: F811
    tmp_path,
):
    pool = tracker.module.pool
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    old_day = today - timedelta(days=120)  # gets a daily partition
    older_day = today - timedelta(days=150)  # no partition: lands in the default one
    await ensure_partitions(pool, old_day, old_day)
    # A window that starts mid-hour, so that its first partial hour is read from the ledger.
    start, end = old_day.replace(hour=11, minute=30), today - timedelta(days=100)
    sent = [
        (old_day.replace(hour=11, minute=45), completed("claude-sonnet-4", cost=1_111)),
        (old_day.replace(hour=11, minute=50), completed("gpt-4o", cost=2_222)),
        (old_day.replace(hour=13), completed("gpt-4o", cost=3_333)),
        (older_day.replace(hour=9), completed("claude-sonnet-4", cost=4_444)),
    ]
    for when, payload in sent:
        await publish(publisher_channel, [payload], when=when)
    deadline = asyncio.get_running_loop().time() + 20
    while await pool.fetchval("SELECT count(*) FROM ledger") < len(sent):
        assert asyncio.get_running_loop().time() < deadline, "events not ingested"
        await asyncio.sleep(0.05)

    async with connect(tracker.target, tokens[Role.MODULE]) as channel:
        before = await _summary(channel, start, end)
        assert before.totals.cost_micros == 1_111 + 2_222 + 3_333
        rows_before = [tuple(r) for r in await pool.fetch(LEDGER_ROWS)]

        archive = tmp_path / "archive"
        dropped = await retention.expire(pool, 90, archive)
        assert f"ledger_p{old_day:%Y%m%d}" in dropped
        assert await pool.fetchval("SELECT count(*) FROM ledger") == 0
        assert await pool.fetchval("SELECT to_regclass($1)", f"ledger_p{old_day:%Y%m%d}") is None
        manifests = sorted(archive.glob("*.manifest.json"))
        assert len(manifests) == 2
        assert sum(json.loads(m.read_text())["rows"] for m in manifests) == len(sent)
        # The partial hour came from the ledger rows that are gone now.
        missing = await _summary(channel, start, end)
        assert missing.totals.cost_micros == 3_333

        # Re-import with the real command, as an operator would.
        env = os.environ | {
            "LODESTAR_DATABASE__URL": database_url,
            "LODESTAR_DATABASE__SCHEMA_NAME": tracker_schema,
        }
        for manifest in manifests:
            done = subprocess.run(
                [sys.executable, "-m", "lodestar_usage", "import-archive", str(manifest)],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert "imported" in done.stdout
        after = await _summary(channel, start, end)
        assert after.totals == before.totals
        assert list(after.rows) == list(before.rows)
        assert [tuple(r) for r in await pool.fetch(LEDGER_ROWS)] == rows_before
        # Importing again adds nothing: rows are keyed by (time, event id).
        assert await retention.import_archive(pool, manifests[0]) == 0
        assert [tuple(r) for r in await pool.fetch(LEDGER_ROWS)] == rows_before

    # A tampered archive is refused and nothing is stored.
    archive_file = archive / json.loads(manifests[0].read_text())["file"]
    archive_file.write_bytes(archive_file.read_bytes()[:-4] + b"oops")
    with pytest.raises(Exception, match="checksum"):
        await retention.import_archive(pool, manifests[0])


async def test_burn_rate_alert_fires_once_for_the_budget_on_pace_to_overspend(
    make_settings,  # noqa: F811
    tokens,
    publisher_channel,
    module_channel,
):
    tracker = await start_tracker(
        make_settings(alerts=AlertSettings(check_interval_seconds=0.2, burn_rate_min_elapsed=0.0))
    )
    try:
        async with connect(tracker.target, tokens[Role.ADMIN]) as admin:
            stub = ug.BudgetServiceStub(admin)
            for project, limit in (("hot", 10**9), ("cold", 10**12)):
                await stub.CreateBudget(
                    u.CreateBudgetRequest(
                        budget=u.Budget(
                            name=project,
                            scope=u.BUDGET_SCOPE_PROJECT,
                            scope_value=project,
                            period=u.BUDGET_PERIOD_DAILY,
                            limit_micros=limit,
                            thresholds_pct=[100],
                        )
                    )
                )
            # "hot" spent all but one micro-dollar of its day: at any time of day its pace
            # projects past the limit. "cold" spent one micro-dollar of a million dollars.
            await publish(
                publisher_channel,
                [completed(project="hot", cost=10**9 - 1), completed(project="cold", cost=1)],
            )
            seen: list[ev.BudgetThresholdCrossed] = []

            async def handle(received: ReceivedEvent) -> None:
                seen.append(received.payload)

            sub = Subscriber(
                module_channel,
                subscription="burn-test",
                event_types=["lodestar.usage.v1.BudgetThresholdCrossed"],
                handler=handle,
            )
            task = asyncio.create_task(sub.run())
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.1)
            for _ in range(3):
                await tracker.module.check_alerts()
            await asyncio.sleep(0.6)
            sub.stop()
            await task
        assert len(seen) == 1, seen
        alert = seen[0]
        assert alert.kind == ev.ALERT_KIND_BURN_RATE
        assert alert.budget_name == "hot"
        assert alert.spent_micros == 10**9 - 1
        assert alert.projected_micros > alert.limit_micros == 10**9
        crossings = await tracker.module.pool.fetch("SELECT kind, published FROM budget_crossings")
        assert [(c["kind"], c["published"]) for c in crossings] == [(ev.ALERT_KIND_BURN_RATE, True)]
    finally:
        await tracker.stop()


@pytest.mark.parametrize("fail_open", [True, False])
async def test_admission_while_the_database_is_unreachable(
    make_settings,  # noqa: F811
    tokens,
    fail_open,
):
    tracker = await start_tracker(make_settings(admission=AdmissionSettings(fail_open=fail_open)))
    try:
        async with connect(tracker.target, tokens[Role.PUBLISHER]) as channel:
            gate = ug.BudgetServiceStub(channel)
            healthy = await gate.Reserve(u.ReserveRequest(project="p", estimated_cost_micros=5))
            assert healthy.granted
            assert not healthy.fail_open
            assert healthy.reservation_id
            await tracker.module.pool.close()  # the database is gone for this process
            request = u.ReserveRequest(project="p", estimated_cost_micros=5)
            if fail_open:
                reply = await gate.Reserve(request)
                assert reply.granted
                assert reply.fail_open
                assert reply.reservation_id == ""
            else:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await gate.Reserve(request)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "fails closed" in info.value.details()
            # Bad input is still refused, whatever the database does.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await gate.Reserve(u.ReserveRequest(estimated_cost_micros=-1))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await tracker.stop()
