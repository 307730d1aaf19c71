"""usage-tracker ledger: idempotent ingest, pricing, summaries, records, sessions."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import duration_pb2

from lodestar.common.auth import Role
from lodestar.common.events import new_event
from lodestar.common.sdk import PermanentFailure, ReceivedEvent, connect
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc
from lodestar.usage.v1 import events_pb2 as ev
from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug
from lodestar_usage.testing import start_tracker, tracker_settings

M = 1_000_000


@pytest.fixture
def tracker_schema(schema):
    return f"{schema}_usage"


@pytest.fixture
def make_settings(tmp_path, database_url, tracker_schema, core, tokens):
    def make(**overrides):
        return tracker_settings(
            database_url=database_url,
            schema=tracker_schema,
            core_target=core.target,
            token=tokens["usage-tracker"],
            credentials=tmp_path / "credentials.yaml",
            spool=tmp_path / "spool",
            **overrides,
        )

    return make


@pytest.fixture
async def tracker(make_settings):
    running = await start_tracker(make_settings())
    yield running
    await running.stop()


@pytest.fixture
async def admin(tracker, tokens):
    async with connect(tracker.target, tokens[Role.ADMIN]) as channel:
        yield channel


def completed(
    model="claude-sonnet-4",
    provider="anthropic",
    *,
    project="p1",
    session="s1",
    user="ann",
    tokens=None,
    cost=None,
    status=ev.REQUEST_STATUS_OK,
    seconds=1.0,
    reservation="",
):
    payload = ev.RequestCompleted(
        model=model,
        provider=provider,
        project=project,
        session_id=session,
        user=user,
        task_id="t",
        attempt=1,
        status=status,
        duration=duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9)),
        tokens=tokens or ev.TokenUsage(input=1000, output=100),
        reservation_id=reservation,
    )
    if cost is not None:
        payload.reported_cost.CopyFrom(ev.Money(currency="USD", micros=cost))
    return payload


async def publish(channel, payloads, when=None):
    events = [new_event(p, source="test://usage", time=when) for p in payloads]
    stub = bus_pb2_grpc.EventBusServiceStub(channel)
    for i in range(0, len(events), 1000):
        await stub.Publish(bus_pb2.PublishRequest(events=events[i : i + 1000]))
    return events


async def summary(channel, group_by=(), **kw):
    stub = ug.UsageServiceStub(channel)
    window = u.Window(rolling=u.RollingWindow(days=30))
    return await stub.Summary(u.SummaryRequest(window=window, group_by=list(group_by), **kw))


async def wait_requests(channel, n, timeout=20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        reply = await summary(channel)
        if reply.totals.requests >= n:
            return reply
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"only {reply.totals.requests} of {n} requests visible")
        await asyncio.sleep(0.05)


async def set_price(admin, pattern, valid_from, inp, out, **kw):
    await ug.UsageServiceStub(admin).SetPrice(
        u.SetPriceRequest(
            price=u.Price(
                model_pattern=pattern,
                valid_from=valid_from,
                input_micros_per_mtok=inp,
                output_micros_per_mtok=out,
                **kw,
            )
        )
    )


async def test_events_priced_and_summarised_by_model_and_day(tracker, admin, publisher_channel):
    await set_price(
        admin,
        "claude-sonnet-4*",
        "2020-01-01",
        3 * M,
        15 * M,
        cached_read_micros_per_mtok=300_000,
        reasoning_micros_per_mtok=20 * M,
    )
    await tracker.module.reload_prices()
    tokens = ev.TokenUsage(
        input=1_000_000, output=100_000, cached_read=2_000_000, cache_write=10_000, reasoning=50_000
    )
    await publish(
        publisher_channel,
        [
            completed(tokens=tokens),
            completed(model="gpt-4o", provider="openai", cost=1234),
            completed(model="mystery", provider="acme"),
            completed(status=ev.REQUEST_STATUS_ERROR, tokens=ev.TokenUsage()),
        ],
    )
    reply = await wait_requests(admin, 4)
    # 3.00 input + 1.50 output + 0.60 cached read + 0.03 cache write (input price) + 1.00 reasoning
    expected = 3 * M + 1_500_000 + 600_000 + 30_000 + 1 * M
    by_model = await summary(admin, ["model", "day"])
    costs = {r.group["model"]: r.totals.cost_micros for r in by_model.rows}
    assert costs == {"claude-sonnet-4": expected, "gpt-4o": 1234, "mystery": 0}
    assert reply.totals.errors == 1
    assert reply.totals.tokens.reasoning == 50_000
    assert {r.group["day"] for r in by_model.rows} == {datetime.now(UTC).date().isoformat()}


async def test_replaying_the_same_events_twice_gives_identical_totals(
    tracker, admin, publisher_channel, db
):
    events = await publish(
        publisher_channel, [completed(cost=i + 1, session=f"s{i % 3}") for i in range(300)]
    )
    first = await wait_requests(admin, 300)
    # Deliver everything again: a second subscription's worth of the same ids through the writer.
    from lodestar.common.events import unpack
    from lodestar.common.sdk.subscriber import ReceivedEvent

    await tracker.module.handle_batch(
        [ReceivedEvent(i, 2, e, unpack(e)) for i, e in enumerate(events)]
    )
    again = await summary(admin, ["session"])
    assert again.totals == first.totals
    assert first.totals.cost_micros == sum(range(1, 301))
    assert first.totals.requests == 300


async def test_effective_dated_price_change_applies_only_from_its_date(
    tracker, admin, publisher_channel
):
    await set_price(admin, "m-*", "2024-01-01", 1 * M, 1 * M)
    await set_price(admin, "m-*", "2024-06-01", 2 * M, 2 * M)
    await tracker.module.reload_prices()
    old = datetime(2024, 5, 31, 23, 0, tzinfo=UTC)
    new = datetime(2024, 6, 1, 1, 0, tzinfo=UTC)
    tk = ev.TokenUsage(input=1_000_000)
    await publish(publisher_channel, [completed(model="m-1", tokens=tk)], when=old)
    await publish(publisher_channel, [completed(model="m-1", tokens=tk)], when=new)
    stub = ug.UsageServiceStub(admin)
    window = u.Window(range=u.TimeRange())
    window.range.start.FromDatetime(datetime(2024, 5, 1, tzinfo=UTC))
    window.range.end.FromDatetime(datetime(2024, 7, 1, tzinfo=UTC))
    for _ in range(200):
        reply = await stub.Summary(u.SummaryRequest(window=window, group_by=["day"]))
        if reply.totals.requests == 2:
            break
        await asyncio.sleep(0.05)
    assert {r.group["day"]: r.totals.cost_micros for r in reply.rows} == {
        "2024-05-31": 1 * M,
        "2024-06-01": 2 * M,
    }


async def test_local_models_cost_compute_and_report_savings(
    make_settings, admin_channel, publisher_channel, tokens
):
    from lodestar_usage.settings import PricingSettings

    settings = make_settings(
        pricing=PricingSettings(
            local_compute_micros_per_second=1000, baseline_model="premium", baseline_provider="x"
        )
    )
    tracker = await start_tracker(settings)
    try:
        async with connect(tracker.target, tokens[Role.ADMIN]) as admin:
            await set_price(admin, "premium", "2020-01-01", 10 * M, 10 * M)
            await tracker.module.reload_prices()
            await publish(
                publisher_channel,
                [
                    completed(
                        model="llama3:8b",
                        provider="ollama",
                        seconds=2.5,
                        project="p",
                        session="a",
                        tokens=ev.TokenUsage(input=100_000, output=100_000),
                    ),
                ],
            )
            reply = await wait_requests(admin, 1)
            t = reply.totals
            assert (t.cost_micros, t.compute_cost_micros, t.shadow_cost_micros) == (
                2500,
                2500,
                2 * M,
            )
            assert t.savings_micros == 2 * M - 2500
            by_session = await summary(admin, ["project", "session"])
            assert by_session.rows[0].group == {"project": "p", "session": "a"}
            assert by_session.rows[0].totals.savings_micros == 2 * M - 2500
    finally:
        await tracker.stop()


async def test_records_export_and_sessions(tracker, admin, publisher_channel):
    base = datetime.now(UTC) - timedelta(minutes=10)
    payloads = [completed(model=m, session="sx", cost=10) for m in ("a", "a", "b", "a")]
    for i, p in enumerate(payloads):
        await publish(publisher_channel, [p], when=base + timedelta(seconds=i))
    await wait_requests(admin, 4)
    stub = ug.UsageServiceStub(admin)
    page = await stub.ListRecords(
        u.ListRecordsRequest(window=u.Window(rolling=u.RollingWindow(hours=1)), page_size=3)
    )
    assert len(page.records) == 3
    assert page.next_page_token
    rest = await stub.ListRecords(
        u.ListRecordsRequest(
            window=u.Window(rolling=u.RollingWindow(hours=1)),
            page_size=3,
            page_token=page.next_page_token,
        )
    )
    assert len(rest.records) == 1
    assert not rest.next_page_token
    chunks = [
        c.chunk
        async for c in stub.ExportRecords(
            u.ExportRecordsRequest(
                window=u.Window(rolling=u.RollingWindow(hours=1)), format=u.EXPORT_FORMAT_CSV
            )
        )
    ]
    lines = b"".join(chunks).decode().splitlines()
    assert lines[0].startswith("occurred_at,event_id")
    assert len(lines) == 5
    sessions = await stub.ListSessions(u.ListSessionsRequest(filters=u.Filters(sessions=["sx"])))
    s = sessions.sessions[0]
    assert (s.requests, s.model_switches, s.cost_micros, s.last_model) == (4, 2, 40, "a")
    assert s.duration.seconds == 3


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (u.SummaryRequest(group_by=["model", "colour"]), "group_by[1]"),
        (
            u.SummaryRequest(
                window=u.Window(
                    range=u.TimeRange(
                        start={"seconds": 1_750_000_100}, end={"seconds": 1_750_000_050}
                    )
                )
            ),
            "window.range.end",
        ),
        (
            u.SummaryRequest(
                window=u.Window(
                    calendar=u.CalendarWindow(unit=u.CALENDAR_UNIT_DAY, timezone="Mars/Base")
                )
            ),
            "window.calendar.timezone",
        ),
    ],
)
async def test_bad_summary_requests_name_the_field(admin, request_, field):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ug.UsageServiceStub(admin).Summary(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field)


async def test_malformed_price_pattern_is_refused_and_nothing_stored(admin):
    stub = ug.UsageServiceStub(admin)
    for pattern in ("claude[", "", "a b", "**"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await set_price(admin, pattern, "2024-01-01", 1, 1)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "price.model_pattern" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await set_price(admin, "ok", "2024-13-01", 1, 1)
    assert "price.valid_from" in info.value.details()
    assert list((await stub.ListPrices(u.ListPricesRequest())).prices) == []


async def test_negative_tokens_are_never_stored(tracker, admin, publisher_channel, db):
    bad = completed(tokens=ev.TokenUsage(input=-5))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await publish(publisher_channel, [bad, completed(cost=7)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, "core refuses it at the edge"
    assert "events[0].data.tokens.input" in (info.value.details() or "")

    # Defence in depth: should one reach the tracker (an event stored before the bounds), it is
    # refused for good, so core dead-letters it at once instead of retrying it.
    event = new_event(bad, source="test://usage")
    refused = await tracker.module.handle_batch([ReceivedEvent(7, 1, event, bad)])
    assert list(refused) == [7]
    assert isinstance(refused[7], PermanentFailure)

    await publish(publisher_channel, [completed(cost=7)])
    reply = await wait_requests(admin, 1)
    await asyncio.sleep(0.3)
    assert (await summary(admin)).totals.requests == 1
    assert reply.totals.tokens.input == 1000


async def test_reads_need_a_credential_and_price_changes_need_admin(tracker, tokens):
    async with connect(tracker.target, tokens[Role.MODULE]) as module:
        await ug.UsageServiceStub(module).Summary(u.SummaryRequest())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await set_price(module, "x", "2024-01-01", 1, 1)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with connect(tracker.target, tokens[Role.PUBLISHER]) as publisher:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ug.UsageServiceStub(publisher).Summary(u.SummaryRequest())
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
