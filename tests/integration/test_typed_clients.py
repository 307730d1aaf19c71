"""The typed clients against real servers: core and usage-tracker in process, and a tiny servicer.

Errors are the real ones the servers send (field violations, RetryInfo, ErrorInfo). Retries are
counted on the server side. Blocking clients run in a thread, so that the servers in this test's
event loop keep serving.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from lodestar.common.auth import Role
from lodestar.common.cli import free_port
from lodestar.common.errors import (
    AbortedError,
    AuthenticationError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    ModuleError,
    NetworkError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    rich_status,
)
from lodestar.common.events import new_event
from lodestar.common.ratelimit import RateLimitSettings, TokenBucketLimit
from lodestar.common.sdk import (
    AsyncAuditClient,
    AsyncBudgetClient,
    AsyncEventBusClient,
    AsyncRegistryClient,
    AsyncUsageClient,
    AuditClient,
    BudgetClient,
    ClientClosedError,
    ClientOptions,
    EventBusClient,
    RegistryClient,
    RetryPolicy,
    UsageClient,
)
from lodestar.core.v1 import bus_pb2, registry_pb2
from lodestar.usage.v1 import events_pb2, usage_pb2
from tests.integration.test_tls import SERVER_NAME, pki  # noqa: F401 (the fixture)

#: Fast retries for tests: 0.05 s, 0.1 s, 0.2 s … without jitter, so the waits can be measured.
FAST = RetryPolicy(
    attempts=5, initial_backoff_seconds=0.05, max_backoff_seconds=1.0, jitter_seconds=0
)


def a_budget(name: str = "typed-clients", project: str = "alpha") -> usage_pb2.Budget:
    return usage_pb2.Budget(
        name=name,
        scope=usage_pb2.BUDGET_SCOPE_PROJECT,
        scope_value=project,
        period=usage_pb2.BUDGET_PERIOD_MONTHLY,
        limit_micros=5_000_000,
    )


# --- calls that succeed ------------------------------------------------------------------------


async def test_async_clients_call_every_service(core, tracker, tokens):
    admin = tokens[Role.ADMIN]
    async with (
        AsyncRegistryClient(ClientOptions(core.target, admin)) as registry,
        AsyncBudgetClient(ClientOptions(tracker.target, admin)) as budgets,
        AsyncUsageClient(ClientOptions(tracker.target, admin)) as usage,
        AsyncAuditClient(ClientOptions(tracker.target, admin)) as audit,
        AsyncEventBusClient(ClientOptions(core.target, tokens[Role.PUBLISHER])) as bus,
    ):
        modules = await registry.list_modules()
        assert "usage-tracker" in {m.name for m in modules.modules}
        got = await registry.get_module(registry_pb2.GetModuleRequest(name="usage-tracker"))
        assert got.module.name == "usage-tracker"

        created = (
            await budgets.create_budget(usage_pb2.CreateBudgetRequest(budget=a_budget()))
        ).budget
        listed = await budgets.list_budgets()
        assert [b.budget.id for b in listed.budgets] == [created.id]
        entries = (await audit.list_audit_entries()).entries
        assert entries[0].target == f"budget/{created.id}"

        event = _event()
        published = await bus.publish(bus_pb2.PublishRequest(events=[event]))
        assert published.accepted == 1
        summary = await _eventually(
            lambda: usage.summary(usage_pb2.SummaryRequest(group_by=["project"])),
            lambda s: s.totals.requests == 1,
        )
        assert dict(summary.rows[0].group) == {"project": "alpha"}
        assert summary.totals.tokens.input == 7

        exported = b"".join([chunk.chunk async for chunk in usage.export_records()])
        assert event.id.encode() in exported

        deleted = await budgets.delete_budget(usage_pb2.DeleteBudgetRequest(id=created.id))
        assert deleted.deleted


async def test_blocking_clients_call_every_service(core, tracker, tokens):
    admin = tokens[Role.ADMIN]

    def use_blocking_clients() -> tuple[set[str], str, str, str]:
        with (
            RegistryClient(ClientOptions(core.target, admin)) as registry,
            BudgetClient(ClientOptions(tracker.target, admin)) as budgets,
            UsageClient(ClientOptions(tracker.target, admin)) as usage,
            AuditClient(ClientOptions(core.target, admin)) as core_audit,
            EventBusClient(ClientOptions(core.target, tokens[Role.PUBLISHER])) as bus,
        ):
            batch = bus_pb2.PublishStreamRequest(batch_id=7, events=[_event()])
            (acked,) = list(bus.publish_stream([batch]))
            assert (acked.batch_id, acked.accepted) == (7, 1)
            names = {m.name for m in registry.list_modules().modules}
            watched = next(registry.watch_modules())  # the current modules, then every change
            budget = budgets.create_budget(usage_pb2.CreateBudgetRequest(budget=a_budget())).budget
            window = usage.summary(usage_pb2.SummaryRequest()).start.ToJsonString()
            core_audit.list_audit_entries()
            return names, watched.module.name, budget.id, window

    names, first_watched, budget_id, window_start = await asyncio.to_thread(use_blocking_clients)
    assert "usage-tracker" in names
    assert first_watched
    uuid.UUID(budget_id)
    assert window_start.endswith("Z")


async def test_a_channel_is_closed_by_its_client_only(core, tokens):
    options = ClientOptions(core.target, tokens[Role.ADMIN])

    def blocking() -> None:
        with RegistryClient(options) as client:
            client.list_modules()
        with pytest.raises(ClientClosedError):
            client.list_modules()
        shared = options.sync_channel()
        with RegistryClient(options, channel=shared):
            pass
        assert RegistryClient(options, channel=shared).list_modules() is not None  # still open
        shared.close()

    await asyncio.to_thread(blocking)
    async with AsyncRegistryClient(options) as client:
        await client.list_modules()
    assert client.channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN


# --- errors from real servers, with their details ----------------------------------------------


async def test_bad_field_is_invalid_argument_naming_the_field(tracker, tokens):
    nameless = a_budget(name="")
    async with AsyncBudgetClient(ClientOptions(tracker.target, tokens[Role.ADMIN])) as budgets:
        with pytest.raises(InvalidArgumentError) as caught:
            await budgets.create_budget(usage_pb2.CreateBudgetRequest(budget=nameless))
    error = caught.value
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.field_violations()] == ["budget.name"]
    assert error.violations[0].description == "required, 1-200 characters"
    assert "budget.name" in error.message
    assert isinstance(error.__cause__, grpc.aio.AioRpcError)

    def blocking() -> InvalidArgumentError:
        with (
            BudgetClient(ClientOptions(tracker.target, tokens[Role.ADMIN])) as client,
            pytest.raises(InvalidArgumentError) as caught,
        ):
            client.create_budget(usage_pb2.CreateBudgetRequest(budget=nameless))
        return caught.value

    blocking_error = await asyncio.to_thread(blocking)
    assert blocking_error.violations == error.violations
    assert isinstance(blocking_error.__cause__, grpc.RpcError)


async def test_unknown_budget_is_not_found(tracker, tokens):
    async with AsyncBudgetClient(ClientOptions(tracker.target, tokens[Role.ADMIN])) as budgets:
        with pytest.raises(NotFoundError) as caught:
            await budgets.delete_budget(usage_pb2.DeleteBudgetRequest(id=str(uuid.uuid4())))
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert [v.field for v in caught.value.violations] == ["id"]


async def test_wrong_token_and_wrong_role(core, tracker, tokens):
    async with AsyncBudgetClient(ClientOptions(tracker.target, "not-a-token")) as stranger:
        with pytest.raises(AuthenticationError) as caught:
            await stranger.list_budgets()
    assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert "invalid credential" in caught.value.message
    async with AsyncBudgetClient(ClientOptions(tracker.target, tokens[Role.PUBLISHER])) as gateway:
        with pytest.raises(PermissionDeniedError):
            await gateway.create_budget(usage_pb2.CreateBudgetRequest(budget=a_budget()))

    def watch_as_a_stranger() -> None:
        with RegistryClient(ClientOptions(core.target, "not-a-token")) as registry:
            next(registry.watch_modules())

    with pytest.raises(AuthenticationError):  # a stream's failure is mapped too
        await asyncio.to_thread(watch_as_a_stranger)


async def test_rate_limit_is_resource_exhausted_with_retry_after(
    core_starter, core_settings, tokens
):
    limits = RateLimitSettings(
        principals={"test-admin": TokenBucketLimit(rate_per_second=0.2, burst=1)}
    )
    core = await core_starter(core_settings.model_copy(update={"rate_limits": limits}))
    async with AsyncRegistryClient(ClientOptions(core.target, tokens[Role.ADMIN])) as registry:
        await registry.list_modules()
        started = time.monotonic()
        with pytest.raises(ResourceExhaustedError) as caught:
            await registry.list_modules()
    assert time.monotonic() - started < 1.0, "a refusal is not retried"
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.retry_after is not None
    assert 3.0 < caught.value.retry_after <= 5.0  # one call per 5 s


async def test_error_info_of_a_held_subscription(core, tokens):
    """A second consumer of one subscription: FAILED_PRECONDITION with reason SUBSCRIPTION_HELD."""
    release = asyncio.Event()

    async def open_then_wait() -> AsyncIterator[bus_pb2.SubscribeRequest]:
        yield bus_pb2.SubscribeRequest(open=bus_pb2.SubscribeOpen(subscription="typed-held"))
        await release.wait()

    async with AsyncEventBusClient(ClientOptions(core.target, tokens[Role.ADMIN])) as bus:
        first = bus.subscribe(open_then_wait())
        opened = await anext(first)
        assert opened.opened.subscription == "typed-held"
        with pytest.raises(ModuleError) as caught:
            async for _ in bus.subscribe(open_then_wait()):
                pass
        release.set()
        await first.aclose()
    error = caught.value
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert (error.reason, error.domain) == ("SUBSCRIPTION_HELD", "lodestar")
    assert [v.field for v in error.violations] == ["open.subscription"]


# --- retries, backoff and deadlines, counted on the server ------------------------------------


class Registry:
    """A RegistryService whose ListModules fails ``failures`` times with ``code``, then answers."""

    def __init__(self, failures: int = 0, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self.failures = failures
        self.code = code
        self.delay = 0.0
        self.retry_after: float | None = None  # a RetryInfo delay sent with each refusal
        self.calls: list[float] = []

    async def list_modules(self, request, context):
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            refusal = NetworkError(f"refusal {len(self.calls)}", retry_after=self.retry_after)
            refusal.code = self.code
            status = rich_status(refusal)
            await context.abort(status.code, status.details, status.trailing_metadata)
        await asyncio.sleep(self.delay)
        return registry_pb2.ListModulesResponse(modules=[registry_pb2.Module(name="tiny")])

    def gaps(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.calls, self.calls[1:], strict=False)]


@pytest.fixture
async def tiny() -> AsyncIterator[Callable[..., Awaitable[tuple[Registry, str]]]]:
    """Starts tiny RegistryService servers in this event loop; stops them afterwards."""
    servers: list[grpc.aio.Server] = []

    async def start(failures: int = 0, code=grpc.StatusCode.UNAVAILABLE) -> tuple[Registry, str]:
        registry = Registry(failures, code)
        handler = grpc.method_handlers_generic_handler(
            "lodestar.core.v1.RegistryService",
            {
                "ListModules": grpc.unary_unary_rpc_method_handler(
                    registry.list_modules,
                    request_deserializer=registry_pb2.ListModulesRequest.FromString,
                    response_serializer=registry_pb2.ListModulesResponse.SerializeToString,
                )
            },
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return registry, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(None)


async def test_unavailable_is_retried_with_backoff(tiny):
    registry, target = await tiny(failures=3)
    async with AsyncRegistryClient(ClientOptions(target, retry=FAST)) as client:
        reply = await client.list_modules()
    assert [m.name for m in reply.modules] == ["tiny"]
    assert len(registry.calls) == 4
    for gap, backoff in zip(registry.gaps(), (0.05, 0.1, 0.2), strict=True):
        assert gap >= backoff * 0.9, registry.gaps()


async def test_a_retry_waits_at_least_the_delay_the_server_asks_for(tiny):
    registry, target = await tiny(failures=1)
    registry.retry_after = 0.4
    async with AsyncRegistryClient(ClientOptions(target, retry=FAST)) as client:
        await client.list_modules()
    assert len(registry.calls) == 2
    assert registry.gaps()[0] >= 0.4


async def test_blocking_client_retries_too(tiny):
    registry, target = await tiny(failures=2)

    def call() -> registry_pb2.ListModulesResponse:
        with RegistryClient(ClientOptions(target, retry=FAST)) as client:
            return client.list_modules()

    assert (await asyncio.to_thread(call)).modules[0].name == "tiny"
    assert len(registry.calls) == 3


async def test_retries_end_after_the_attempts(tiny):
    registry, target = await tiny(failures=100)
    policy = RetryPolicy(attempts=3, initial_backoff_seconds=0.01, jitter_seconds=0)
    async with AsyncRegistryClient(ClientOptions(target, retry=policy)) as client:
        with pytest.raises(NetworkError) as caught:
            await client.list_modules()
    assert len(registry.calls) == 3
    assert caught.value.message == "refusal 3"


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (grpc.StatusCode.INTERNAL, InternalError),
        (grpc.StatusCode.ABORTED, AbortedError),
        (grpc.StatusCode.UNKNOWN, InternalError),
    ],
)
async def test_other_codes_are_not_retried(tiny, code, error):
    registry, target = await tiny(failures=1, code=code)
    async with AsyncRegistryClient(ClientOptions(target, retry=FAST)) as client:
        with pytest.raises(error) as caught:
            await client.list_modules()
    assert len(registry.calls) == 1
    assert caught.value.code is code


async def test_deadline_exceeded_is_raised_in_time_and_not_retried(tiny):
    registry, target = await tiny()
    registry.delay = 5.0
    async with AsyncRegistryClient(
        ClientOptions(target, timeout_seconds=0.3, retry=FAST)
    ) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError) as caught:
            await client.list_modules()
        assert time.monotonic() - started < 1.5
        assert isinstance(caught.value, NetworkError)
        assert len(registry.calls) == 1

        registry.delay = 0.5
        reply = await client.list_modules(timeout=5.0)  # a per-call deadline wins
    assert reply.modules[0].name == "tiny"


async def test_the_deadline_bounds_the_retries(tiny):
    registry, target = await tiny(failures=1000)
    patient = RetryPolicy(attempts=1000, initial_backoff_seconds=0.2, max_backoff_seconds=0.2)
    async with AsyncRegistryClient(
        ClientOptions(target, timeout_seconds=1.0, retry=patient)
    ) as client:
        started = time.monotonic()
        with pytest.raises(NetworkError):
            await client.list_modules()
    assert time.monotonic() - started < 1.5
    assert 2 <= len(registry.calls) <= 6


async def test_a_server_that_comes_up_late_is_waited_for(core_starter, core_settings, tokens):
    port = free_port()
    patient = RetryPolicy(attempts=100, initial_backoff_seconds=0.05, max_backoff_seconds=0.3)
    options = ClientOptions(
        f"127.0.0.1:{port}", tokens[Role.ADMIN], timeout_seconds=60, retry=patient
    )
    async with AsyncRegistryClient(options) as client:
        call = asyncio.create_task(client.list_modules())
        await asyncio.sleep(1.0)
        assert not call.done(), "nothing listens yet: the call is still being retried"
        await core_starter(core_settings.model_copy(update={"port": port}))
        reply = await asyncio.wait_for(call, 30)
    assert isinstance(reply, registry_pb2.ListModulesResponse)


# --- TLS ---------------------------------------------------------------------------------------


async def test_tls_and_mutual_tls(core_starter, core_settings, pki, tokens):  # noqa: F811
    tls = core_settings.tls.model_copy(
        update={
            "enabled": True,
            "cert_file": pki["server_cert"],
            "key_file": pki["server_key"],
            "client_ca_file": pki["ca"],
        }
    )
    core = await core_starter(core_settings.model_copy(update={"tls": tls, "health_port": 0}))
    mutual = ClientOptions(
        core.target,
        tokens[Role.ADMIN],
        root_ca=pki["ca"],  # implies TLS
        client_cert=pki["client_cert"],
        client_key=pki["client_key"],
        server_name=SERVER_NAME,
    )
    async with AsyncRegistryClient(mutual) as client:
        assert isinstance(await client.list_modules(), registry_pb2.ListModulesResponse)

    def blocking(options: ClientOptions) -> registry_pb2.ListModulesResponse:
        with RegistryClient(options) as client:
            return client.list_modules()

    assert isinstance(await asyncio.to_thread(blocking, mutual), registry_pb2.ListModulesResponse)

    once = RetryPolicy(attempts=1)
    no_certificate = ClientOptions(
        core.target, tokens[Role.ADMIN], root_ca=pki["ca"], server_name=SERVER_NAME, retry=once
    )
    with pytest.raises(NetworkError):
        await asyncio.to_thread(blocking, no_certificate)
    plaintext = ClientOptions(core.target, tokens[Role.ADMIN], retry=once)
    async with AsyncRegistryClient(plaintext) as client:
        with pytest.raises(NetworkError):
            await client.list_modules()
    stranger = ClientOptions(**{**mutual.__dict__, "token": "not-a-token"})
    with pytest.raises(AuthenticationError):
        await asyncio.to_thread(blocking, stranger)


def _event():
    return new_event(
        events_pb2.RequestCompleted(
            model="m", provider="p", project="alpha", tokens=events_pb2.TokenUsage(input=7)
        ),
        source="test://typed-clients",
    )


async def _eventually(call, done, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        reply = await call()
        if done(reply) or time.monotonic() > deadline:
            return reply
        await asyncio.sleep(0.1)
