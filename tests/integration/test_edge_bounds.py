"""Issue 8, sections 2 and 4, against a real core: bounds at the edge and the SDK's quarantine.

Every attack event is refused with INVALID_ARGUMENT and a field violation naming it, and nothing
of its batch is stored. A spooled batch with one event core refuses for good no longer blocks the
good events beside and behind it: the bad one is quarantined on disk, visible in a metric and in
``lodestar spool list``, and ``lodestar spool replay --quarantined`` sends it after a fix.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_status import rpc_status
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from lodestar.common.auth import Role
from lodestar.common.cli import app, free_port
from lodestar.common.errors import bad_request_violations
from lodestar.common.events import new_event
from lodestar.common.sdk import Publisher, connect
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc
from lodestar.events.v1 import event_pb2
from lodestar.usage.v1 import events_pb2 as usage
from lodestar_core.settings import CoreSettings
from tests.conftest import RunningCore

INT64_MAX = 2**63 - 1
SMALL_EVENT_BYTES = 1024


def good(model: str = "m") -> event_pb2.Event:
    payload = usage.RequestCompleted(model=model, provider="p", tokens=usage.TokenUsage(input=1))
    return new_event(payload, source="test://edge")


def int64_max_cost(e: event_pb2.Event) -> None:
    payload = usage.RequestCompleted(model="m", reported_cost=usage.Money(micros=INT64_MAX))
    e.data.Pack(payload)


def year_1(e: event_pb2.Event) -> None:
    e.time.seconds = -62_135_596_800


def beyond_year_9999(e: event_pb2.Event) -> None:
    e.time.seconds = 253_402_300_800


def negative_nanos(e: event_pb2.Event) -> None:
    e.time.nanos = -1


def id_dated_1970(e: event_pb2.Event) -> None:
    e.id = str(uuid.UUID(int=(0x7 << 76) | (0xABC << 64) | (0b10 << 62) | 12345))


def id_dated_10889(e: event_pb2.Event) -> None:
    e.id = "ffffffff-ffff-7fff-bfff-ffffffffffff"


def nul_in_source(e: event_pb2.Event) -> None:
    e.source = "test://edge\x00"


ATTACKS: dict[str, tuple[Callable[[event_pb2.Event], None], str, str]] = {
    "int64-max cost": (int64_max_cost, "data.reported_cost.micros", "10000000000"),
    "year 1": (year_1, "time", "bus.max_event_age_days"),
    "year 9999 beyond range": (beyond_year_9999, "time", "Timestamp range"),
    "negative nanos": (negative_nanos, "time", "nanos -1"),
    "id dated 1970": (id_dated_1970, "id", "1970-01-01"),
    "id dated 10889": (id_dated_10889, "id", "bus.retention_days"),
    "NUL in source": (nul_in_source, "source", "NUL"),
}


async def stored(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM events"))


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_attack_event_among_six_good_ones_is_refused_and_nothing_is_stored(
    attack: str, publisher_channel: grpc.aio.Channel, db: asyncpg.Connection
):
    spoil, field, bound = ATTACKS[attack]
    batch = [good() for _ in range(7)]
    spoil(batch[4])
    stub = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Publish(bus_pb2.PublishRequest(events=batch))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1 of 7 events rejected, nothing was stored" in (caught.value.details() or "")
    status = rpc_status.from_call(caught.value)
    assert status is not None
    violations = bad_request_violations(status)
    assert [v.field for v in violations] == [f"events[4].{field}"]
    assert bound in violations[0].description
    assert await stored(db) == 0

    del batch[4]
    reply = await stub.Publish(bus_pb2.PublishRequest(events=batch))
    assert reply.accepted == 6
    assert await stored(db) == 6


async def test_publish_stream_refuses_the_bad_batch_alone(
    publisher_channel: grpc.aio.Channel, db: asyncpg.Connection
):
    bad = good()
    nul_in_source(bad)
    requests = [
        bus_pb2.PublishStreamRequest(batch_id=1, events=[good(), bad]),
        bus_pb2.PublishStreamRequest(batch_id=2, events=[good(), good()]),
    ]
    stub = bus_pb2_grpc.EventBusServiceStub(publisher_channel)
    replies = [reply async for reply in stub.PublishStream(iter(requests))]
    assert [r.rejections[0].reason.split(":")[0] for r in replies[:1]] == ["events[1].source"]
    assert replies[1].accepted == 2
    assert await stored(db) == 2


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def run_cli(*args: str) -> tuple[int, str]:
    """Run ``lodestar …`` in a thread (its commands run an event loop of their own)."""
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args))
    return result.exit_code, result.output


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


async def test_spooled_bad_event_is_quarantined_and_never_blocks_the_rest(
    core_settings: CoreSettings,
    core_starter: Callable[[CoreSettings], Awaitable[RunningCore]],
    tokens: dict[Role, str],
    database_url: str,
    schema: str,
    tmp_path: Path,
):
    port = free_port()
    target = f"127.0.0.1:{port}"
    spool_dir = tmp_path / "spool"
    quarantined_before = metric("lodestar_sdk_quarantined_events_total")
    bad = good()
    nul_in_source(bad)
    batch = [good(f"early-{i}") for i in range(3)] + [bad] + [good(f"late-{i}") for i in range(3)]
    async with (
        connect(target, tokens[Role.PUBLISHER]) as channel,
        Publisher(channel, source="test://edge", spool_dir=spool_dir, attempts=1) as publisher,
    ):
        # Core is away: the batch with its bad event is spooled.
        receipts = await publisher.publish_events(batch)
        assert all(r.spooled for r in receipts)
        code, output = await run_cli("spool", "list", "--spool-dir", str(spool_dir))
        assert code == 0, output
        assert "pending" in output
        assert "7 events pending, 0 quarantined" in output

        core = await core_starter(core_settings.model_copy(update={"port": port}))
        conn = await asyncpg.connect(
            database_url, server_settings={"search_path": f"{schema},public"}
        )
        try:
            await publisher.flush(timeout=60)
            later = await publisher.publish(usage.RequestCompleted(model="after", provider="p"))
            assert not later.spooled
            ids = {r["id"] for r in await conn.fetch("SELECT id::text FROM events")}
        finally:
            await conn.close()

    assert ids == {e.id for e in batch if e is not bad} | {later.event_id}
    quarantined = sorted((spool_dir / "rejected").glob("*.batch"))
    assert len(quarantined) == 1
    kept = bus_pb2.PublishRequest.FromString(quarantined[0].read_bytes())
    assert [e.id for e in kept.events] == [bad.id]
    reason = json.loads(quarantined[0].with_name(quarantined[0].stem + ".reason.json").read_text())
    assert reason["code"] == "INVALID_ARGUMENT"
    assert reason["event_ids"] == [bad.id]
    assert [v["field"] for v in reason["violations"]] == ["events[0].source"]
    assert metric("lodestar_sdk_quarantined_events_total") == quarantined_before + 1
    assert metric("lodestar_sdk_quarantined_batches") >= 1
    assert not list(spool_dir.glob("*.batch")), "nothing stays pending"

    code, output = await run_cli("spool", "list", "--spool-dir", str(spool_dir))
    assert code == 0, output
    for expected in ("quarantined", bad.id, "INVALID_ARGUMENT", "events[0].source"):
        assert expected in output

    # Still refused: it stays quarantined, with the reason of this refusal.
    code, output = await run_cli(
        "spool", "replay", "--quarantined", "--spool-dir", str(spool_dir),
        "--target", core.target, "--token", tokens[Role.PUBLISHER],
    )  # fmt: skip
    assert code == 1, output
    assert "1 still refused (kept quarantined)" in output
    assert len(list((spool_dir / "rejected").glob("*.batch"))) == 1


async def test_replay_quarantined_sends_events_once_the_cause_is_fixed(
    core_settings: CoreSettings,
    core_starter: Callable[[CoreSettings], Awaitable[RunningCore]],
    tokens: dict[Role, str],
    database_url: str,
    schema: str,
    tmp_path: Path,
):
    port = free_port()
    spool_dir = tmp_path / "spool"
    strict = core_settings.model_copy(
        update={
            "port": port,
            "bus": core_settings.bus.model_copy(update={"max_event_bytes": SMALL_EVENT_BYTES}),
        }
    )
    large = new_event(
        usage.RequestCompleted(model="m", error_message="x" * 2000), source="test://edge"
    )
    small = good()
    async with (
        connect(f"127.0.0.1:{port}", tokens[Role.PUBLISHER]) as channel,
        Publisher(channel, source="test://edge", spool_dir=spool_dir, attempts=1) as publisher,
    ):
        assert all(r.spooled for r in await publisher.publish_events([large, small]))
        core = await core_starter(strict)
        await publisher.flush(timeout=60)
    assert len(list((spool_dir / "rejected").glob("*.batch"))) == 1

    # The fix: core allows larger events. Replaying publishes the quarantined event.
    await core.stop()
    relaxed = strict.model_copy(
        update={"bus": strict.bus.model_copy(update={"max_event_bytes": 256 * 1024})}
    )
    core = await core_starter(relaxed)
    code, output = await run_cli(
        "spool", "replay", "--quarantined", "--spool-dir", str(spool_dir),
        "--target", core.target, "--token", tokens[Role.PUBLISHER],
    )  # fmt: skip
    assert code == 0, output
    assert "1 events published" in output
    assert not list((spool_dir / "rejected").glob("*"))
    conn = await asyncpg.connect(database_url, server_settings={"search_path": f"{schema},public"})
    try:
        ids = {r["id"] for r in await conn.fetch("SELECT id::text FROM events")}
    finally:
        await conn.close()
    assert ids == {large.id, small.id}


async def test_replay_of_pending_batches_from_the_cli(
    core: RunningCore, tokens: dict[Role, str], db: asyncpg.Connection, tmp_path: Path
):
    from lodestar.common.sdk.spool import Spool

    root = tmp_path / "spool"
    spool = Spool(root / "usage-tracker")
    spool.append(bus_pb2.PublishRequest(events=[good(), good()]))
    spool.append(bus_pb2.PublishRequest(events=[good()]))
    code, output = await run_cli("spool", "list", "--spool-dir", str(root))
    assert code == 0, output
    assert "usage-tracker" in output
    assert "3 events pending" in output
    code, output = await run_cli(
        "spool", "replay", "--spool-dir", str(root), "--target", core.target,
        "--token", tokens[Role.PUBLISHER],
    )  # fmt: skip
    assert code == 0, output
    assert "usage-tracker: 3 events published" in output
    assert await stored(db) == 3
    assert len(spool) == 0


async def test_a_live_publish_fails_only_the_refused_event(
    publisher_channel: grpc.aio.Channel, db: asyncpg.Connection
):
    from lodestar.common.errors import InvalidArgumentError

    bad = good()
    nul_in_source(bad)
    async with Publisher(publisher_channel, source="test://edge") as publisher:
        results = await asyncio.gather(
            publisher.publish_events([good(), bad, good()]), return_exceptions=True
        )
        # publish_events gathers its events: the refusal surfaces for the whole call …
        assert isinstance(results[0], InvalidArgumentError)
        assert results[0].violations[0].field == "events[0].source"
    # … but the two good events were delivered.
    assert await stored(db) == 2
