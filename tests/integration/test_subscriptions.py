"""Durable subscriptions against a real core: resume, filters, retries, dead letters, isolation."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

import grpc
import pytest

from lodestar.common.auth import Role
from lodestar.common.events import new_event
from lodestar.common.sdk import ReceivedEvent, Subscriber
from lodestar.common.sdk.channel import token_interceptors
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc, registry_pb2, registry_pb2_grpc
from lodestar.events.v1 import event_pb2
from lodestar.learning.v1 import events_pb2 as learning
from lodestar.usage.v1 import events_pb2 as usage
from lodestar_core import bus

MAX_ATTEMPTS = 3
OUTCOME = "lodestar.learning.v1.OutcomeRecorded"


@pytest.fixture
def core_settings(core_settings):  # type: ignore[no-untyped-def]
    bus = core_settings.bus.model_copy(update={"max_delivery_attempts": MAX_ATTEMPTS})
    return core_settings.model_copy(update={"bus": bus})


def usage_event(n: int) -> event_pb2.Event:
    payload = usage.RequestCompleted(model="m", provider="t", tokens=usage.TokenUsage(input=n))
    return new_event(payload, source="test://subs")


def outcome_event(n: int) -> event_pb2.Event:
    return new_event(learning.OutcomeRecorded(), source="test://subs", subject=f"o{n}")


async def publish(channel, events: list[event_pb2.Event]) -> list[event_pb2.Event]:  # type: ignore[no-untyped-def]
    reply = await bus_pb2_grpc.EventBusServiceStub(channel).Publish(
        bus_pb2.PublishRequest(events=events)
    )
    assert reply.accepted == len(events)
    return events


async def subscriptions(channel) -> dict[str, bus_pb2.Subscription]:  # type: ignore[no-untyped-def]
    reply = await bus_pb2_grpc.EventBusServiceStub(channel).ListSubscriptions(
        bus_pb2.ListSubscriptionsRequest()
    )
    return {s.name: s for s in reply.subscriptions}


async def eventually(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``check`` (an async predicate) until it is true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


class RawSubscription:
    """A Subscribe stream driven by hand: read deliveries, ack and nack explicitly."""

    def __init__(self, channel: grpc.aio.Channel, open_: bus_pb2.SubscribeOpen) -> None:
        self._outbox: asyncio.Queue[bus_pb2.SubscribeRequest | None] = asyncio.Queue()
        self._outbox.put_nowait(bus_pb2.SubscribeRequest(open=open_))
        self.call = bus_pb2_grpc.EventBusServiceStub(channel).Subscribe(self._requests())
        self._inbox: asyncio.Queue[
            bus_pb2.SubscribeResponse | bus_pb2.Delivery | BaseException | None
        ] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[bus_pb2.SubscribeRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        try:
            async for response in self.call:
                if response.WhichOneof("message") == "batch":
                    for delivery in response.batch.deliveries:
                        self._inbox.put_nowait(delivery)
                else:
                    self._inbox.put_nowait(response)
        except grpc.aio.AioRpcError as exc:
            self._inbox.put_nowait(exc)
        except asyncio.CancelledError:
            self._inbox.put_nowait(None)
            raise
        self._inbox.put_nowait(None)

    async def _get(self, timeout: float) -> bus_pb2.SubscribeResponse | bus_pb2.Delivery:
        item = await asyncio.wait_for(self._inbox.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        assert item is not None, "the stream ended"
        return item

    async def opened(self) -> bus_pb2.SubscribeOpened:
        response = await self._get(5)
        assert isinstance(response, bus_pb2.SubscribeResponse)
        assert response.WhichOneof("message") == "opened"
        return response.opened

    async def next(self, timeout: float = 5.0) -> bus_pb2.Delivery:
        delivery = await self._get(timeout)
        assert isinstance(delivery, bus_pb2.Delivery)
        return delivery

    async def take(self, n: int) -> list[bus_pb2.Delivery]:
        return [await self.next() for _ in range(n)]

    async def nothing_within(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        assert self._inbox.empty(), f"unexpected message {self._inbox.get_nowait()}"

    def ack(self, *sequences: int) -> None:
        self._outbox.put_nowait(
            bus_pb2.SubscribeRequest(ack=bus_pb2.SubscribeAck(sequences=list(sequences)))
        )

    def nack(self, sequence: int, error: str) -> None:
        self._outbox.put_nowait(
            bus_pb2.SubscribeRequest(nack=bus_pb2.SubscribeNack(sequence=sequence, error=error))
        )

    def permanent_nack(self, sequence: int, error: str) -> None:
        nack = bus_pb2.SubscribeNack(sequence=sequence, error=error, permanent=True)
        self._outbox.put_nowait(bus_pb2.SubscribeRequest(nack=nack))

    async def close(self) -> None:
        self.call.cancel()
        self._outbox.put_nowait(None)
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


@contextlib.asynccontextmanager
async def dropped_generators_stay_open() -> AsyncIterator[None]:
    """Async generators dropped unfinished are not closed, as when a reference cycle holds them."""
    hooks = sys.get_asyncgen_hooks()
    sys.set_asyncgen_hooks(firstiter=hooks.firstiter, finalizer=lambda _: None)
    try:
        yield
    finally:
        sys.set_asyncgen_hooks(*hooks)


def raw(channel, name: str, **kwargs) -> RawSubscription:  # type: ignore[no-untyped-def]
    return RawSubscription(channel, bus_pb2.SubscribeOpen(subscription=name, **kwargs))


async def wait_disconnected(channel, name: str) -> None:  # type: ignore[no-untyped-def]
    async def gone() -> bool:
        return not (await subscriptions(channel))[name].connected

    await eventually(gone)


async def test_resume_after_ack_gets_only_unacked_in_order(publisher_channel, module_channel):
    first = await publish(publisher_channel, [usage_event(i) for i in range(10)])
    sub = raw(module_channel, "resume")
    assert (await sub.opened()).acked_sequence == 0
    deliveries = await sub.take(10)
    assert [d.event.id for d in deliveries] == [e.id for e in first]
    assert all(d.attempt == 1 for d in deliveries)
    sub.ack(*(d.sequence for d in deliveries[:4]))

    async def acked() -> bool:
        return (await subscriptions(module_channel))["resume"].acked_sequence == deliveries[
            3
        ].sequence

    await eventually(acked)
    await sub.close()
    await wait_disconnected(module_channel, "resume")

    more = await publish(publisher_channel, [usage_event(i) for i in range(10, 15)])
    again = raw(module_channel, "resume")
    assert (await again.opened()).acked_sequence == deliveries[3].sequence
    redelivered = await again.take(11)
    assert [d.event.id for d in redelivered] == [e.id for e in first[4:] + more]
    seqs = [d.sequence for d in redelivered]
    assert seqs == sorted(seqs)
    assert seqs[0] > deliveries[3].sequence
    await again.nothing_within(0.2)
    again.ack(*seqs)

    async def caught_up() -> bool:
        return (await subscriptions(module_channel))["resume"].lag == 0

    await eventually(caught_up)
    await again.close()


async def test_acks_out_of_order_keep_the_cursor_below_the_gap(publisher_channel, module_channel):
    await publish(publisher_channel, [usage_event(i) for i in range(5)])
    sub = raw(module_channel, "gaps")
    await sub.opened()
    d = await sub.take(5)
    sub.ack(d[0].sequence, d[2].sequence, d[3].sequence, d[4].sequence)

    async def first_acked() -> bool:
        return (await subscriptions(module_channel))["gaps"].acked_sequence == d[0].sequence

    await eventually(first_acked)
    await sub.nothing_within(0.1)
    await sub.close()
    await wait_disconnected(module_channel, "gaps")
    assert (await subscriptions(module_channel))["gaps"].acked_sequence == d[0].sequence
    again = raw(module_channel, "gaps")
    await again.opened()
    assert [x.sequence for x in await again.take(4)] == [x.sequence for x in d[1:]]
    await again.close()


async def test_latest_skips_old_events(publisher_channel, module_channel):
    await publish(publisher_channel, [usage_event(i) for i in range(3)])
    sub = raw(module_channel, "late", start=bus_pb2.START_POSITION_LATEST)
    opened = await sub.opened()
    assert opened.acked_sequence >= 3
    assert (await subscriptions(module_channel))["late"].lag == 0
    new = await publish(publisher_channel, [usage_event(i) for i in range(3, 5)])
    assert [d.event.id for d in await sub.take(2)] == [e.id for e in new]
    await sub.nothing_within(0.1)
    await sub.close()


async def test_event_types_filter(publisher_channel, module_channel):
    mixed = [usage_event(0), outcome_event(0), usage_event(1), outcome_event(1), usage_event(2)]
    await publish(publisher_channel, mixed)
    sub = raw(module_channel, "outcomes", event_types=[OUTCOME])
    await sub.opened()
    got = await sub.take(2)
    assert [d.event.id for d in got] == [mixed[1].id, mixed[3].id]
    assert (await subscriptions(module_channel))["outcomes"].lag == 2
    await sub.nothing_within(0.1)
    sub.ack(*(d.sequence for d in got))

    async def no_lag() -> bool:
        return (await subscriptions(module_channel))["outcomes"].lag == 0

    await eventually(no_lag)
    later = await publish(publisher_channel, [usage_event(3), outcome_event(2)])
    assert (await sub.next()).event.id == later[1].id
    await sub.close()


async def test_lag_counts_unacked_matching_events(publisher_channel, module_channel):
    sub = raw(module_channel, "lagging", max_in_flight=2)
    await sub.opened()
    await publish(publisher_channel, [usage_event(i) for i in range(7)])
    assert (await subscriptions(module_channel))["lagging"].lag == 7
    listed = (await subscriptions(module_channel))["lagging"]
    assert listed.connected
    assert listed.head_sequence >= 7
    for _ in range(7):
        delivery = await sub.next()
        sub.ack(delivery.sequence)

    async def drained() -> bool:
        return (await subscriptions(module_channel))["lagging"].lag == 0

    await eventually(drained)
    await sub.close()


async def test_poison_event_is_dead_lettered_then_replayed(
    publisher_channel, module_channel, admin_channel, db
):
    events = await publish(publisher_channel, [usage_event(i) for i in range(5)])
    poison = events[2].id
    attempts: dict[str, list[int]] = {}
    healed = asyncio.Event()
    done = asyncio.Event()

    async def handle(event: ReceivedEvent) -> None:
        attempts.setdefault(event.event.id, []).append(event.attempt)
        if event.event.id == poison and not healed.is_set():
            raise RuntimeError("cannot digest this one")
        if healed.is_set() and event.event.id == poison:
            done.set()

    subscriber = Subscriber(module_channel, subscription="poisoned", handler=handle)
    task = asyncio.create_task(subscriber.run())

    async def dead_lettered() -> bool:
        return (await subscriptions(module_channel)).get(
            "poisoned", bus_pb2.Subscription()
        ).dead_letters == 1

    await eventually(dead_lettered)
    assert attempts[poison] == list(range(1, MAX_ATTEMPTS + 1))
    assert all(attempts[e.id] == [1] for e in events if e.id != poison)

    async def caught_up() -> bool:
        return (await subscriptions(module_channel))["poisoned"].lag == 0

    await eventually(caught_up)
    bus = bus_pb2_grpc.EventBusServiceStub(module_channel)
    (letter,) = (
        await bus.ListDeadLetters(bus_pb2.ListDeadLettersRequest(subscription="poisoned"))
    ).dead_letters
    assert letter.event.id == poison
    assert letter.attempts == MAX_ATTEMPTS
    assert "cannot digest this one" in letter.last_error
    assert await db.fetchval("SELECT count(*) FROM delivery_failures") == 0

    healed.set()
    admin = bus_pb2_grpc.EventBusServiceStub(admin_channel)
    replayed = await admin.ReplayDeadLetters(
        bus_pb2.ReplayDeadLettersRequest(subscription="poisoned")
    )
    assert replayed.replayed == 1
    await asyncio.wait_for(done.wait(), 5)

    async def replay_finished() -> bool:
        return await db.fetchval("SELECT count(*) FROM redeliveries") == 0

    await eventually(replay_finished)
    assert (await subscriptions(module_channel))["poisoned"].dead_letters == 0
    subscriber.stop()
    await task
    assert len(attempts[poison]) == MAX_ATTEMPTS + 1


async def test_replayed_dead_letter_survives_reconnect(
    publisher_channel, module_channel, admin_channel, db
):
    (event,) = await publish(publisher_channel, [usage_event(0)])
    sub = raw(module_channel, "replay-later")
    await sub.opened()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        delivery = await sub.next()
        assert (delivery.event.id, delivery.attempt) == (event.id, attempt)
        sub.nack(delivery.sequence, f"boom {attempt}")

    async def dead() -> bool:
        return await db.fetchval("SELECT count(*) FROM dead_letters") == 1

    await eventually(dead)
    assert await db.fetchval("SELECT last_error FROM dead_letters") == f"boom {MAX_ATTEMPTS}"
    await sub.close()
    await wait_disconnected(module_channel, "replay-later")
    admin = bus_pb2_grpc.EventBusServiceStub(admin_channel)
    reply = await admin.ReplayDeadLetters(
        bus_pb2.ReplayDeadLettersRequest(subscription="replay-later")
    )
    assert reply.replayed == 1
    again = raw(module_channel, "replay-later")
    await again.opened()
    delivery = await again.next()
    assert delivery.event.id == event.id
    again.ack(delivery.sequence)
    await eventually(lambda: _no_redeliveries(db))
    await again.nothing_within(0.2)
    await again.close()


async def _no_redeliveries(db) -> bool:  # type: ignore[no-untyped-def]
    return await db.fetchval("SELECT count(*) FROM redeliveries") == 0


async def test_attempt_numbers_survive_reconnect(publisher_channel, module_channel):
    await publish(publisher_channel, [usage_event(0)])
    sub = raw(module_channel, "flaky")
    await sub.opened()
    first = await sub.next()
    assert first.attempt == 1
    sub.nack(first.sequence, "transient")
    second = await sub.next()
    assert second.attempt == 2
    await sub.close()
    await wait_disconnected(module_channel, "flaky")
    again = raw(module_channel, "flaky")
    await again.opened()
    third = await again.next()
    assert (third.sequence, third.attempt) == (first.sequence, 2)
    await again.close()


async def test_second_connection_is_refused_until_first_leaves(module_channel):
    first = raw(module_channel, "exclusive")
    await first.opened()
    second = raw(module_channel, "exclusive")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await second.opened()
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already connected" in (caught.value.details() or "")
    await second.close()
    assert (await subscriptions(module_channel))["exclusive"].connected
    await first.close()
    await wait_disconnected(module_channel, "exclusive")
    third = raw(module_channel, "exclusive")
    assert (await third.opened()).subscription == "exclusive"
    await third.close()


async def test_stream_cancelled_while_the_server_writes_is_released(
    core, tokens, publisher_channel, module_channel
):
    """A client that stops reading, then cancels, leaves the server blocked in a write."""
    for start in range(0, 2000, 500):
        await publish(publisher_channel, [usage_event(n) for n in range(start, start + 500)])

    async def requests() -> AsyncIterator[bus_pb2.SubscribeRequest]:
        open_ = bus_pb2.SubscribeOpen(subscription="unread", max_in_flight=2000)
        yield bus_pb2.SubscribeRequest(open=open_)
        await asyncio.Event().wait()

    small_window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    interceptors = token_interceptors(tokens[Role.MODULE])
    async with (
        grpc.aio.insecure_channel(
            core.target, options=small_window, interceptors=interceptors
        ) as channel,
        dropped_generators_stay_open(),
    ):
        call = bus_pb2_grpc.EventBusServiceStub(channel).Subscribe(requests())
        await call.read()  # `opened`; the deliveries behind it fill the flow-control window

        async def connected() -> bool:
            return (await subscriptions(module_channel))["unread"].connected

        await eventually(connected)
        await asyncio.sleep(0.5)
        call.cancel()
        await wait_disconnected(module_channel, "unread")
    again = raw(module_channel, "unread")
    assert (await again.opened()).subscription == "unread"
    await again.close()


async def test_a_stream_cancelled_while_its_claim_commits_gives_the_hold_back(
    module_channel, monkeypatch
):
    loading = asyncio.Event()
    load_failures = bus._Session.load_failures

    async def slowly(self: bus._Session) -> None:
        loading.set()
        await asyncio.sleep(0.5)
        await load_failures(self)

    monkeypatch.setattr(bus._Session, "load_failures", slowly)
    sub = raw(module_channel, "half-open")
    await asyncio.wait_for(loading.wait(), 5)  # the hold is committed; the session not yet open
    await sub.close()
    await wait_disconnected(module_channel, "half-open")
    monkeypatch.undo()
    again = raw(module_channel, "half-open")
    assert (await again.opened()).subscription == "half-open"
    await again.close()


async def test_concurrent_opens_of_one_name_admit_one(module_channel):
    subs = [raw(module_channel, "race") for _ in range(5)]
    results = await asyncio.gather(*(s.opened() for s in subs), return_exceptions=True)
    opened = [r for r in results if isinstance(r, bus_pb2.SubscribeOpened)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(opened) == 1
    assert len(refused) == 4
    assert all(r.code() == grpc.StatusCode.FAILED_PRECONDITION for r in refused)
    for s in subs:
        await s.close()


async def test_disabled_module_pauses_and_resumes_without_loss(
    publisher_channel, module_channel, module_as, admin_channel
):
    pausable = await module_as("pausable")
    registry = registry_pb2_grpc.RegistryServiceStub(pausable)
    await registry.Register(
        registry_pb2.RegisterRequest(name="pausable", version="1", endpoint="127.0.0.1:1")
    )
    sub = raw(pausable, "pausable-sub", module="pausable")
    await sub.opened()
    before = await publish(publisher_channel, [usage_event(i) for i in range(3)])
    got = await sub.take(3)
    assert [d.event.id for d in got] == [e.id for e in before]
    sub.ack(*(d.sequence for d in got))

    admin = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    reply = await admin.SetModuleEnabled(
        registry_pb2.SetModuleEnabledRequest(name="pausable", enabled=False)
    )
    assert reply.module.enabled is False
    during = await publish(publisher_channel, [usage_event(i) for i in range(3, 6)])
    await sub.nothing_within(0.3)
    # the server (and its event loop) is still responsive while the module is paused
    listed = (await subscriptions(module_channel))["pausable-sub"]
    assert listed.lag == 3
    assert listed.connected

    await admin.SetModuleEnabled(
        registry_pb2.SetModuleEnabledRequest(name="pausable", enabled=True)
    )
    resumed = await sub.take(3)
    assert [d.event.id for d in resumed] == [e.id for e in during]
    sub.ack(*(d.sequence for d in resumed))

    async def drained() -> bool:
        return (await subscriptions(module_channel))["pausable-sub"].lag == 0

    await eventually(drained)
    await sub.close()


async def test_deregistered_module_pauses_without_hanging(
    publisher_channel, module_channel, module_as, admin_channel
):
    gone = await module_as("gone")
    registry = registry_pb2_grpc.RegistryServiceStub(gone)
    await registry.Register(registry_pb2.RegisterRequest(name="gone", version="1", endpoint="h:1"))
    sub = raw(gone, "gone-sub", module="gone")
    await sub.opened()
    admin = registry_pb2_grpc.RegistryServiceStub(admin_channel)
    await admin.Deregister(registry_pb2.DeregisterRequest(name="gone"))
    await publish(publisher_channel, [usage_event(0)])
    await sub.nothing_within(0.3)
    assert (await subscriptions(module_channel))["gone-sub"].lag == 1
    await sub.close()


async def test_slow_subscriber_blocks_neither_others_nor_publishers(
    publisher_channel, module_channel
):
    total = 40
    release = asyncio.Event()
    slow_seen: list[str] = []
    fast_seen: list[str] = []
    fast_done = asyncio.Event()

    async def slow(event: ReceivedEvent) -> None:
        slow_seen.append(event.event.id)
        await release.wait()

    async def fast(event: ReceivedEvent) -> None:
        fast_seen.append(event.event.id)
        if len(fast_seen) == total:
            fast_done.set()

    slow_sub = Subscriber(module_channel, subscription="slow", handler=slow, max_in_flight=2)
    fast_sub = Subscriber(module_channel, subscription="fast", handler=fast, max_in_flight=4)
    tasks = [asyncio.create_task(slow_sub.run()), asyncio.create_task(fast_sub.run())]
    await asyncio.wait_for(slow_sub.connected.wait(), 5)
    await asyncio.wait_for(fast_sub.connected.wait(), 5)
    published: list[event_pb2.Event] = []
    for i in range(0, total, 5):
        published += await publish(publisher_channel, [usage_event(n) for n in range(i, i + 5)])
    await asyncio.wait_for(fast_done.wait(), 10)
    assert fast_seen == [e.id for e in published]
    listed = await subscriptions(module_channel)
    assert listed["slow"].lag == total

    async def fast_caught_up() -> bool:  # its acks go out every few milliseconds
        return (await subscriptions(module_channel))["fast"].lag == 0

    await eventually(fast_caught_up)
    assert slow_seen == [published[0].id]

    release.set()

    async def slow_caught_up() -> bool:
        return (await subscriptions(module_channel))["slow"].lag == 0

    await eventually(slow_caught_up, 10)
    assert slow_seen == [e.id for e in published]
    for sub in (slow_sub, fast_sub):
        sub.stop()
    await asyncio.gather(*tasks)
