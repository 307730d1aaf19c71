"""Core's ``lodestar`` commands.

``modules``, ``subscriptions``, ``dead-letters``, ``events`` and ``publish``.

Registered under the ``lodestar.cli`` entry-point group in this package's pyproject.toml, so they
come and go with lodestar-core. Importing this module loads only typer, rich and the CLI plumbing
of ``lodestar.common.cli_support``; the stubs and gRPC load when a command runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from lodestar.common.cli_support import (
    CORE,
    Client,
    fail,
    print_line,
    stdout_console,
    with_client,
)

if TYPE_CHECKING:
    import grpc

    from lodestar.core.v1 import bus_pb2, registry_pb2

console = stdout_console()
events_app = typer.Typer(help="Look at and publish events.", no_args_is_help=True)
dead_letters_app = typer.Typer(
    help="Events a subscription gave up on: list, replay.", no_args_is_help=True
)

#: Consecutive failed attempts to open the tail's stream before it gives up.
TAIL_ATTEMPTS = 5
FIRST_BACKOFF_SECONDS = 0.2
#: Status codes a tail retries (the server went away or restarted); others end it at once.
RETRIED = frozenset({"UNAVAILABLE"})
DEFAULT_TAIL_SUBSCRIPTION = "cli-tail"
#: How long a finished tail waits for core to end the stream after its last acks.
CLOSE_GRACE_SECONDS = 5.0


@with_client(CORE)
def modules(client: Client) -> None:
    """List registered modules and their health."""
    from lodestar.core.v1 import registry_pb2, registry_pb2_grpc

    async def fetch() -> list[registry_pb2.Module]:
        async with client.channel() as channel:
            reply = await registry_pb2_grpc.RegistryServiceStub(channel).ListModules(
                registry_pb2.ListModulesRequest()
            )
            return list(reply.modules)

    table = Table(title="modules")
    for column in ("name", "version", "endpoint", "enabled", "alive", "status", "latency ms"):
        table.add_column(column)
    table.add_column("last error")
    for module in client.run(fetch()):
        table.add_row(
            module.name,
            module.version,
            module.endpoint,
            str(module.enabled),
            str(module.alive),
            enum_name(registry_pb2.HealthStatus.Name(module.health.status), "HEALTH_STATUS_"),
            f"{module.health.latency_ms:.1f}",
            module.health.last_error,
        )
    console.print(table)


@with_client(CORE, flags={"subscription": "--delete"})
def subscriptions(
    client: Client,
    delete: Annotated[
        str | None,
        typer.Option(
            help="forget this subscription (no stream may have it open): its position, "
            "failures and dead letters; the events stay in the log",
            show_default=False,
        ),
    ] = None,
) -> None:
    """List subscriptions with their position, lag and dead letters, or delete one."""
    if delete is not None:
        dead_letters = client.run(delete_subscription(client, delete))
        console.print(f"deleted subscription {delete} and its {dead_letters} dead letters")
        return
    table = Table(title="subscriptions")
    for column in ("name", "module", "acked", "head", "lag", "connected", "dead letters"):
        table.add_column(column)
    for sub in client.run(list_subscriptions(client)):
        table.add_row(
            sub.name,
            sub.module,
            str(sub.acked_sequence),
            str(sub.head_sequence),
            str(sub.lag),
            str(sub.connected),
            str(sub.dead_letters),
        )
    console.print(table)


async def delete_subscription(client: Client, name: str) -> int:
    """Delete the subscription ``name``; how many dead letters went with it."""
    from lodestar.core.v1 import bus_pb2, bus_pb2_grpc

    async with client.channel() as channel:
        reply = await bus_pb2_grpc.EventBusServiceStub(channel).DeleteSubscription(
            bus_pb2.DeleteSubscriptionRequest(subscription=name)
        )
        return int(reply.dead_letters)


async def list_subscriptions(client: Client) -> list[bus_pb2.Subscription]:
    """Every subscription core knows."""
    from lodestar.core.v1 import bus_pb2, bus_pb2_grpc

    async with client.channel() as channel:
        reply = await bus_pb2_grpc.EventBusServiceStub(channel).ListSubscriptions(
            bus_pb2.ListSubscriptionsRequest()
        )
        return list(reply.subscriptions)


def enum_name(name: str, prefix: str) -> str:
    """``HEALTH_STATUS_SERVING`` → ``serving``."""
    return name.removeprefix(prefix).lower()


# --- events --------------------------------------------------------------------------------------


@events_app.command("tail")
@with_client(CORE, flags={"open.subscription": "--subscription", "open.event_types": "--type"})
def tail(
    client: Client,
    event_type: Annotated[
        list[str] | None, typer.Option("--type", help="only these event types")
    ] = None,
    subscription: Annotated[
        str, typer.Option(help="durable subscription name")
    ] = DEFAULT_TAIL_SUBSCRIPTION,
    from_start: Annotated[
        bool,
        typer.Option(
            help="first print the stored events (from the oldest, for a new subscription; else "
            "from its last position); with --limit, stop when they are all shown"
        ),
    ] = False,
    limit: Annotated[
        int, typer.Option(min=0, help="stop after N events (0: run until Ctrl-C)")
    ] = 0,
) -> None:
    """Print events as JSON lines (snake_case field names) as they arrive.

    Without --from-start only events published after the tail started are printed.
    """
    plan = TailPlan(limit=limit, from_start=from_start)
    client.run(follow(client, subscription, event_type or [], plan))


@dataclass
class TailPlan:
    """What one ``events tail`` prints and when it stops."""

    limit: int
    from_start: bool
    #: Events up to this sequence were stored before the tail started (known once opened).
    head: int | None = None
    #: How many stored events the subscription had to deliver when the tail started.
    backlog: int = 0
    printed: int = 0
    acked: list[int] = field(default_factory=list)
    #: Whether the current stream was opened (a failure after that starts the retry count anew).
    opened: bool = False

    def wants(self, sequence: int) -> bool:
        """Whether the delivery at ``sequence`` is printed (else it is only acknowledged)."""
        return self.from_start or self.head is None or sequence > self.head

    def done(self) -> bool:
        """Whether the tail has printed all it was asked to."""
        if self.limit and self.printed >= self.limit:
            return True
        return bool(self.limit and self.from_start and self.printed >= self.backlog)


async def follow(client: Client, subscription: str, event_types: list[str], plan: TailPlan) -> None:
    """Consume ``subscription`` until the plan is done.

    A lost stream is retried a bounded number of times (each successful open starts the count
    again).
    """
    import asyncio

    import grpc

    failures = 0
    while True:
        plan.opened = False
        try:
            async with client.channel() as channel:
                if await _tail_once(channel, subscription, event_types, plan):
                    return
            failures = 0
        except grpc.aio.AioRpcError as exc:
            failures = 1 if plan.opened else failures + 1
            if exc.code().name not in RETRIED or failures >= TAIL_ATTEMPTS:
                raise
        await asyncio.sleep(FIRST_BACKOFF_SECONDS * 2 ** max(failures - 1, 0))


async def _tail_once(
    channel: grpc.aio.Channel, subscription: str, event_types: list[str], plan: TailPlan
) -> bool:
    """One Subscribe stream: True when the plan is done, False when the server ended it."""
    import asyncio
    import contextlib

    from lodestar.core.v1 import bus_pb2, bus_pb2_grpc

    stub = bus_pb2_grpc.EventBusServiceStub(channel)
    outbox: asyncio.Queue[bus_pb2.SubscribeRequest | None] = asyncio.Queue()
    start = bus_pb2.START_POSITION_EARLIEST if plan.from_start else bus_pb2.START_POSITION_LATEST
    outbox.put_nowait(
        bus_pb2.SubscribeRequest(
            open=bus_pb2.SubscribeOpen(
                subscription=subscription, event_types=event_types, start=start
            )
        )
    )
    call = stub.Subscribe(_requests(outbox))
    async for response in call:
        if response.WhichOneof("message") == "opened":
            plan.opened = True
            if plan.head is None:
                await _note_start(stub, subscription, plan)
            if plan.done():
                break
            continue
        for delivery in response.batch.deliveries:
            if plan.wants(delivery.sequence):
                print_event(delivery)
                plan.printed += 1
            plan.acked.append(delivery.sequence)
            if plan.done():
                break
        _send_acks(outbox, plan)
        if plan.done():
            break
    else:
        return False
    # Done: the last acks go out, then the stream is closed from this side and core ends it
    # once it has applied them (or, should it not, the call is cancelled after a grace).
    _send_acks(outbox, plan)
    outbox.put_nowait(None)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_drain(call), CLOSE_GRACE_SECONDS)
    call.cancel()
    return True


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


async def _note_start(stub: Any, subscription: str, plan: TailPlan) -> None:
    """Record the log's head and the subscription's backlog at the moment the tail started."""
    from lodestar.core.v1 import bus_pb2

    reply = await stub.ListSubscriptions(bus_pb2.ListSubscriptionsRequest())
    for sub in reply.subscriptions:
        if sub.name == subscription:
            plan.head, plan.backlog = sub.head_sequence, sub.lag
            return
    plan.head = max((sub.head_sequence for sub in reply.subscriptions), default=0)


def _send_acks(outbox: Any, plan: TailPlan) -> None:
    from lodestar.core.v1 import bus_pb2

    if plan.acked:
        outbox.put_nowait(bus_pb2.SubscribeRequest(ack=bus_pb2.SubscribeAck(sequences=plan.acked)))
        plan.acked = []


async def _requests(outbox: Any) -> Any:
    while (request := await outbox.get()) is not None:
        yield request


def print_event(delivery: bus_pb2.Delivery) -> None:
    """One delivery as a JSON line: envelope fields and the payload, with snake_case names."""
    from google.protobuf import json_format

    from lodestar.common.events import unpack

    event = delivery.event
    line = {
        "sequence": delivery.sequence,
        "id": event.id,
        "type": event.type,
        "source": event.source,
        "time": event.time.ToJsonString() if event.HasField("time") else None,
        "data": json_format.MessageToDict(unpack(event), preserving_proto_field_name=True),
    }
    print_line(json.dumps(line))


@with_client(CORE)
def publish(
    client: Client,
    event_type: Annotated[str, typer.Argument(help="e.g. lodestar.usage.v1.RequestCompleted")],
    data: Annotated[str, typer.Argument(help="the payload as JSON")],
    source: Annotated[str, typer.Option(help="CloudEvents source")] = "lodestar://cli",
) -> None:
    """Publish one event and print its id once core has committed it."""
    from google.protobuf import json_format

    from lodestar.common.events import EVENT_TYPES, new_event

    payload_cls = EVENT_TYPES.get(event_type)
    if payload_cls is None:
        raise typer.BadParameter(
            f"unknown type; known: {', '.join(sorted(EVENT_TYPES))}", param_hint="EVENT_TYPE"
        )
    try:
        payload = json_format.Parse(data, payload_cls())
    except json_format.ParseError as exc:
        raise typer.BadParameter(str(exc), param_hint="DATA") from None
    check_bounds(payload)
    event = new_event(payload, source=source)

    async def send() -> str:
        from lodestar.core.v1 import bus_pb2, bus_pb2_grpc

        async with client.channel() as channel:
            await bus_pb2_grpc.EventBusServiceStub(channel).Publish(
                bus_pb2.PublishRequest(events=[event])
            )
        return event.id

    console.print(client.run(send()), highlight=False)


def check_bounds(payload: Any) -> None:
    """Refuse, naming the field, a payload core would refuse (negative tokens, a huge cost …)."""
    from lodestar.common.bounds import BoundViolation, check_payload

    try:
        check_payload(payload)
    except BoundViolation as exc:
        raise typer.BadParameter(str(exc), param_hint="DATA") from None


# --- dead letters --------------------------------------------------------------------------------


@dead_letters_app.command("list")
@with_client(CORE, flags={"subscription": "--subscription", "limit": "--limit"})
def list_dead_letters(
    client: Client,
    subscription: Annotated[
        str | None, typer.Option(help="only this subscription's (default: all you may see)")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="at most this many")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """Events subscriptions gave up on, with their attempts and last error."""
    from google.protobuf import json_format

    from lodestar.core.v1 import bus_pb2, bus_pb2_grpc

    async def fetch() -> list[bus_pb2.DeadLetter]:
        async with client.channel() as channel:
            reply = await bus_pb2_grpc.EventBusServiceStub(channel).ListDeadLetters(
                bus_pb2.ListDeadLettersRequest(subscription=subscription or "", limit=limit)
            )
            return list(reply.dead_letters)

    letters = client.run(fetch())
    if as_json:
        for letter in letters:
            print(
                json.dumps(
                    json_format.MessageToDict(letter, preserving_proto_field_name=True),
                    sort_keys=True,
                )
            )
        return
    table = Table(title="dead letters")
    for column in ("subscription", "sequence", "attempts", "event id", "type", "last error"):
        table.add_column(column, overflow="fold")
    for letter in letters:
        table.add_row(
            letter.subscription,
            str(letter.sequence),
            str(letter.attempts),
            letter.event.id,
            letter.event.type,
            letter.last_error,
        )
    console.print(table)


@dead_letters_app.command("replay")
@with_client(CORE, flags={"subscription": "SUBSCRIPTION", "sequences": "--sequence"})
def replay_dead_letters(
    client: Client,
    subscription: Annotated[str, typer.Argument(help="the subscription whose dead letters")],
    sequence: Annotated[
        list[int] | None, typer.Option(help="only these sequences (default: all of them)")
    ] = None,
) -> None:
    """Queue dead letters for redelivery to their subscription (admin)."""
    from lodestar.core.v1 import bus_pb2, bus_pb2_grpc

    async def send() -> int:
        async with client.channel() as channel:
            reply = await bus_pb2_grpc.EventBusServiceStub(channel).ReplayDeadLetters(
                bus_pb2.ReplayDeadLettersRequest(
                    subscription=subscription, sequences=sequence or []
                )
            )
            return reply.replayed

    replayed = client.run(send())
    if replayed == 0 and sequence:
        fail(f"none of those sequences is a dead letter of {subscription}")
    console.print(f"{replayed} dead letters queued for redelivery to {subscription}")
