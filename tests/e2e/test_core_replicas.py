"""Three core processes on one database: publishes on any replica reach subscribers on any
other, in order; a subscription is streamed by one replica at a time; a paused or killed
replica's subscription is taken over by a standby consumer, and nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from lodestar.common.auth import Role
from lodestar.common.cli import free_port
from lodestar.common.events import new_event
from lodestar.common.sdk import ReceivedEvent, Subscriber, connect
from lodestar.common.testing import (
    dev_credentials,
    kill9,
    service_env,
    start_process,
    wait_serving,
)
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc, registry_pb2, registry_pb2_grpc
from lodestar.events.v1 import event_pb2
from lodestar.usage.v1 import events_pb2 as usage

from .pooling import POOLED_SETTINGS, pooled_roles

pytestmark = pytest.mark.faults
CONSUMER = Path(__file__).with_name("standby_consumer.py")
TAKEOVER_SECONDS = 3.0
HEARTBEAT_SECONDS = 0.5


class Replicas:
    """Core processes sharing one database schema, each restartable, with consumer processes."""

    def __init__(self, root: Path, database_url: str, schema: str, **settings: object) -> None:
        self.root = root
        self.tokens = dev_credentials(root / "credentials.yaml")
        self.env = service_env(
            database_url,
            root / "credentials.yaml",
            schema=schema,
            shutdown_grace_seconds=1,
            bus__takeover_after_seconds=TAKEOVER_SECONDS,
            bus__replica_heartbeat_seconds=HEARTBEAT_SECONDS,
            **settings,
        )
        self.ports = [free_port() for _ in range(3)]
        self.cores: list[subprocess.Popen[bytes] | None] = [None, None, None]
        self.consumers: list[subprocess.Popen[bytes]] = []

    def target(self, replica: int) -> str:
        return f"127.0.0.1:{self.ports[replica]}"

    async def start(self, replica: int) -> None:
        log = self.root / f"core-{replica}.log"
        self.cores[replica] = start_process("lodestar_core", self.env, log, self.ports[replica])
        await wait_serving(self.target(replica), "readiness")

    def start_consumer(self, replica: int, subscription: str, out: Path) -> None:
        command = [sys.executable, str(CONSUMER), self.target(replica)]
        command += [self.tokens[Role.MODULE], subscription, str(out)]
        log = (self.root / "consumers.log").open("ab")
        self.consumers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))

    def signal(self, replica: int, sig: signal.Signals) -> None:
        process = self.cores[replica]
        assert process is not None
        process.send_signal(sig)

    def kill(self, replica: int) -> None:
        process = self.cores[replica]
        assert process is not None
        kill9(process)

    def close(self) -> None:
        for process in [*self.consumers, *self.cores]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
                kill9(process)


@pytest.fixture(params=["direct", "pgbouncer"])
async def replicas(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str, schema: str
) -> AsyncIterator[Replicas]:
    """Three core replicas on Postgres directly, or through a transaction-pooling PgBouncer."""
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "direct":
            cluster = Replicas(tmp_path, database_url, schema)
        else:
            service = f"core-{schema}"
            roles = pooled_roles(database_url, {service: schema})
            dsn = (await stack.enter_async_context(roles))[service]
            cluster = Replicas(tmp_path, dsn, schema, **POOLED_SETTINGS)
        stack.callback(cluster.close)
        await cluster.start(0)  # applies the migrations
        await asyncio.gather(cluster.start(1), cluster.start(2))
        yield cluster


def usage_events(count: int, tag: str) -> list[event_pb2.Event]:
    return [
        new_event(
            usage.RequestCompleted(model="m", provider="p", project=tag, task_id=f"{tag}-{i}"),
            source=f"test://{tag}",
        )
        for i in range(count)
    ]


async def publish(target: str, token: str, events: list[event_pb2.Event], batch: int = 50) -> None:
    async with connect(target, token) as channel:
        stub = bus_pb2_grpc.EventBusServiceStub(channel)
        for start in range(0, len(events), batch):
            await stub.Publish(bus_pb2.PublishRequest(events=events[start : start + batch]))


async def test_publishes_on_two_replicas_reach_a_subscriber_on_the_third_in_order(replicas):
    token = replicas.tokens[Role.PUBLISHER]
    first, second = usage_events(300, "first"), usage_events(300, "second")
    expected = {e.id for e in first + second}
    received: list[ReceivedEvent] = []
    done = asyncio.Event()

    async def handle(event: ReceivedEvent) -> None:
        received.append(event)
        if expected <= {r.event.id for r in received}:
            done.set()

    async with connect(replicas.target(2), replicas.tokens[Role.MODULE]) as channel:
        subscriber = Subscriber(channel, subscription="everything", handler=handle)
        running = asyncio.create_task(subscriber.run())
        await asyncio.gather(
            publish(replicas.target(0), token, first), publish(replicas.target(1), token, second)
        )
        await asyncio.wait_for(done.wait(), 30)
        subscriber.stop()
        await asyncio.wait_for(running, 10)
    sequences = [r.sequence for r in received]
    assert sequences == sorted(set(sequences))  # log order, no repeats
    for batch in (first, second):  # each publisher's events in the order it published them
        ids = [e.id for e in batch]
        assert [r.event.id for r in received if r.event.id in set(ids)] == ids


async def test_a_second_consumer_on_another_replica_is_refused_while_the_first_streams(
    replicas,
):
    async with (
        connect(replicas.target(0), replicas.tokens[Role.MODULE]) as first_channel,
        connect(replicas.target(1), replicas.tokens[Role.MODULE]) as second_channel,
    ):
        first = bus_pb2_grpc.EventBusServiceStub(first_channel).Subscribe()
        await first.write(bus_pb2.SubscribeRequest(open=bus_pb2.SubscribeOpen(subscription="solo")))
        assert (await first.read()).WhichOneof("message") == "opened"
        second = bus_pb2_grpc.EventBusServiceStub(second_channel).Subscribe()
        await second.write(
            bus_pb2.SubscribeRequest(open=bus_pb2.SubscribeOpen(subscription="solo"))
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await second.read()
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "connected on core replica" in (refused.value.details() or "")
        listed = await bus_pb2_grpc.EventBusServiceStub(second_channel).ListSubscriptions(
            bus_pb2.ListSubscriptionsRequest()
        )
        assert [s.connected for s in listed.subscriptions if s.name == "solo"] == [True]
        first.cancel()


def records(path: Path) -> list[tuple[float, int, str]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        stamp, seq, event_id = line.split()
        rows.append((float(stamp), int(seq), event_id))
    return rows


async def eventually(check, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_a_paused_then_a_killed_replica_hand_their_subscription_over(replicas, tmp_path):
    token = replicas.tokens[Role.PUBLISHER]
    active, standby = tmp_path / "active.txt", tmp_path / "standby.txt"
    replicas.start_consumer(0, "handover", active)
    await eventually(lambda: active.exists(), 15)  # created when the consumer starts
    await asyncio.sleep(1.0)  # the active consumer holds the subscription
    replicas.start_consumer(2, "handover", standby)  # stands by on another replica
    published = usage_events(600, "handover")
    await publish(replicas.target(1), token, published[:200])
    await eventually(lambda: len(records(active)) >= 200, 20)
    assert records(standby) == []  # one consumer at a time

    # pause the active consumer's replica: after the takeover time the standby streams; resumed,
    # the paused replica sends nothing more (it can no longer prove it is alive, and its
    # acks are fenced by the epoch)
    replicas.signal(0, signal.SIGSTOP)
    paused_at = time.time()
    await publish(replicas.target(1), token, published[200:400])
    await eventually(
        lambda: {r[2] for r in records(standby)} >= {e.id for e in published[200:400]}, 30
    )
    taken_over_at = records(standby)[0][0]
    assert taken_over_at >= paused_at + TAKEOVER_SECONDS - HEARTBEAT_SECONDS
    replicas.signal(0, signal.SIGCONT)
    await asyncio.sleep(2 * HEARTBEAT_SECONDS + 1)
    assert all(stamp < taken_over_at for stamp, _, _ in records(active)), "two replicas delivered"

    # kill -9 the replica streaming to the standby: the first consumer, whose replica is alive
    # again, takes the subscription back and the rest arrives
    replicas.kill(2)
    await publish(replicas.target(1), token, published[400:])
    everything = {e.id for e in published}
    await eventually(lambda: {r[2] for r in records(active) + records(standby)} >= everything, 40)

    merged = sorted(records(active) + records(standby))
    firsts: list[int] = []
    seen: set[int] = set()
    for _, seq, _ in merged:
        if seq not in seen:
            seen.add(seq)
            firsts.append(seq)
    assert firsts == sorted(firsts), "events were first delivered out of log order"


async def test_registry_changes_on_one_replica_reach_watchers_on_another(replicas):
    change = registry_pb2.ModuleChange
    async with (
        connect(replicas.target(0), replicas.tokens[Role.MODULE]) as module_channel,
        connect(replicas.target(1), replicas.tokens[Role.ADMIN]) as admin_channel,
        connect(replicas.target(2), replicas.tokens[Role.MODULE]) as watch_channel,
    ):
        watch = registry_pb2_grpc.RegistryServiceStub(watch_channel).WatchModules(
            registry_pb2.WatchModulesRequest()
        )
        registry = registry_pb2_grpc.RegistryServiceStub(module_channel)
        await registry.Register(
            registry_pb2.RegisterRequest(name="test-module", version="1", endpoint="127.0.0.1:1")
        )
        seen = await asyncio.wait_for(watch.read(), 10)
        while seen.change == change.MODULE_CHANGE_SNAPSHOT:
            seen = await asyncio.wait_for(watch.read(), 10)
        assert (seen.change, seen.module.name) == (change.MODULE_CHANGE_REGISTERED, "test-module")
        admin = registry_pb2_grpc.RegistryServiceStub(admin_channel)
        await admin.SetModuleEnabled(
            registry_pb2.SetModuleEnabledRequest(name="test-module", enabled=False)
        )
        seen = await asyncio.wait_for(watch.read(), 10)
        assert (seen.change, seen.module.enabled) == (change.MODULE_CHANGE_UPDATED, False)
        watch.cancel()
