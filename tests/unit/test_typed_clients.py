"""The typed clients' declarations, options and error mapping, and mypy checking their callers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from lodestar.common import errors
from lodestar.common.errors import (
    CLIENT_ERRORS,
    ConfigurationError,
    InternalError,
    LodestarError,
    NetworkError,
    client_error_from,
)
from lodestar.common.sdk import clients
from lodestar.common.sdk.clients import ClientOptions, RetryPolicy, Unary
from lodestar.core.v1 import registry_pb2

REPO = Path(__file__).resolve().parents[2]
SERVICES = {
    clients.RegistryRpcs: (clients.RegistryClient, clients.AsyncRegistryClient),
    clients.EventBusRpcs: (clients.EventBusClient, clients.AsyncEventBusClient),
    clients.UsageRpcs: (clients.UsageClient, clients.AsyncUsageClient),
    clients.BudgetRpcs: (clients.BudgetClient, clients.AsyncBudgetClient),
    clients.AuditRpcs: (clients.AuditClient, clients.AsyncAuditClient),
}


@pytest.mark.parametrize("rpcs", SERVICES, ids=lambda c: c.__name__)
def test_every_rpc_of_the_service_is_declared(rpcs):
    declared = {v.name for v in vars(rpcs).values() if isinstance(v, clients._Rpc)}
    assert declared == set(rpcs.service.methods_by_name)
    for client in SERVICES[rpcs]:
        assert issubclass(client, rpcs)
    assert isinstance(clients.RegistryClient.list_modules, Unary)  # on the class: the declaration


def test_a_declaration_that_does_not_match_the_service_fails_at_import():
    with pytest.raises((TypeError, RuntimeError)) as caught:

        class Wrong(clients.RegistryRpcs):
            list_modules = Unary(registry_pb2.GetModuleRequest, registry_pb2.ListModulesResponse)

    assert "Wrong.list_modules" in str(caught.value) + str(caught.value.__cause__)
    with pytest.raises((TypeError, RuntimeError)):

        class Misspelt(clients.RegistryRpcs):
            list_module = Unary(registry_pb2.ListModulesRequest, registry_pb2.ListModulesResponse)


class FailedCall(grpc.RpcError):
    """A failed call as grpc raises it: code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, status=None) -> None:
        self._code, self._details = code, details
        self._trailers = (
            (("grpc-status-details-bin", status.SerializeToString()),) if status else ()
        )

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_every_status_code_has_its_error(code):
    error = client_error_from(FailedCall(code, "what happened"))
    assert isinstance(error, CLIENT_ERRORS[code])
    assert (error.code, error.message) == (code, "what happened")
    assert error.violations == ()
    assert error.retry_after is None
    assert error.reason is None


def test_codes_map_to_the_categories_servers_raise():
    assert CLIENT_ERRORS[grpc.StatusCode.UNAVAILABLE] is NetworkError
    assert issubclass(CLIENT_ERRORS[grpc.StatusCode.DEADLINE_EXCEEDED], NetworkError)
    assert issubclass(CLIENT_ERRORS[grpc.StatusCode.OUT_OF_RANGE], errors.InvalidArgumentError)
    for server_error in (
        errors.InvalidArgumentError,
        errors.NotFoundError,
        errors.AuthenticationError,
        errors.PermissionDeniedError,
        errors.ResourceExhaustedError,
        errors.UsageTrackerError,
    ):
        assert issubclass(server_error, CLIENT_ERRORS[server_error.code])


def test_the_rich_details_become_fields_and_round_trip():
    sent = errors.ModuleError("held", field="open.subscription", retry_after=1.5)
    sent.reason = "SUBSCRIPTION_HELD"
    status = errors.status_message(sent)
    info = error_details_pb2.ErrorInfo(reason="R", domain="lodestar", metadata={"k": "v"})
    packed = any_pb2.Any()
    packed.Pack(info)
    del status.details[-1]
    status.details.append(packed)
    call = FailedCall(grpc.StatusCode.FAILED_PRECONDITION, status.message, status)
    received = client_error_from(call)
    assert isinstance(received, errors.ModuleError)
    assert received.violations == (errors.FieldViolation("open.subscription", "held"),)
    assert received.retry_after == 1.5
    assert (received.reason, received.domain, dict(received.metadata)) == (
        "R",
        "lodestar",
        {"k": "v"},
    )
    assert received.__cause__ is call
    # raised again by a server, it sends what it received
    assert errors.status_message(received).details[0] == status.details[0]


def test_details_that_contradict_the_call_are_ignored():
    status = status_pb2.Status(code=5, message="other")  # NOT_FOUND, not INTERNAL
    delay = duration_pb2.Duration(seconds=3)
    retry = any_pb2.Any()
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status.details.append(retry)
    error = client_error_from(FailedCall(grpc.StatusCode.INTERNAL, "boom", status))
    assert isinstance(error, InternalError)
    assert error.retry_after is None


def test_options_refuse_what_cannot_work_and_hide_the_token(tmp_path):
    with pytest.raises(ConfigurationError) as caught:
        ClientOptions("h:1", client_cert=tmp_path / "c.pem")
    assert caught.value.field == "client_key"
    with pytest.raises(ConfigurationError):
        ClientOptions(" ")
    with pytest.raises(ConfigurationError):
        ClientOptions("h:1", timeout_seconds=0)
    with pytest.raises(ConfigurationError):
        RetryPolicy(attempts=0)
    with pytest.raises(ConfigurationError):
        RetryPolicy(initial_backoff_seconds=3, max_backoff_seconds=1)
    with pytest.raises(ConfigurationError):
        RetryPolicy(jitter_seconds=-1)
    assert "s3cret" not in repr(ClientOptions("h:1", token="s3cret"))
    assert ClientOptions("h:1", root_ca=tmp_path / "ca.pem").uses_tls
    assert not ClientOptions("h:1").uses_tls


def test_errors_are_lodestar_errors():
    assert all(issubclass(cls, LodestarError) for cls in CLIENT_ERRORS.values())


MISUSE = """
from lodestar.common.sdk import AsyncBudgetClient, ClientOptions, RegistryClient
from lodestar.core.v1 import bus_pb2, registry_pb2
from lodestar.usage.v1 import usage_pb2


def blocking(client: RegistryClient) -> registry_pb2.ListModulesResponse:
    client.list_modules(bus_pb2.PublishRequest())
    for change in client.watch_modules():
        change.no_such_field
    return client.list_modules()


async def asyncio(client: AsyncBudgetClient) -> None:
    reply: usage_pb2.CommitResponse = await client.reserve(usage_pb2.ReserveRequest())
    client.reserve(usage_pb2.ReserveRequest(), timeout="1s")
"""


def test_mypy_strict_checks_the_callers_and_the_examples(tmp_path, monkeypatch):
    api = pytest.importorskip("mypy.api")
    monkeypatch.chdir(REPO)  # the configuration's mypy_path is relative
    misuse = tmp_path / "misuse.py"
    misuse.write_text(textwrap.dedent(MISUSE))
    config = ["--strict", "--config-file", str(REPO / "pyproject.toml")]
    out, _, status = api.run([*config, str(misuse)])
    found = sorted(int(line.split(":")[1]) for line in out.splitlines() if ": error:" in line)
    assert status == 1
    # the wrong request, the missing field, the wrong response, the un-awaited call and timeout
    assert found == [8, 10, 15, 16, 16], out
    examples = [str(REPO / "examples" / name) for name in ("python_client.py", "order_service.py")]
    out, _, status = api.run([*config, *examples])
    assert status == 0, out


TRACED = """
from concurrent import futures

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lodestar.common import telemetry
from lodestar.common.sdk import ClientOptions, RegistryClient
from lodestar.core.v1 import registry_pb2


class On:
    enabled = True


telemetry._active = On()  # as configure_telemetry leaves it, without an exporter
spans = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(spans))
trace.set_tracer_provider(provider)
seen = []


def list_modules(request, context):
    seen.append(dict(context.invocation_metadata()))
    return registry_pb2.ListModulesResponse()


handler = grpc.unary_unary_rpc_method_handler(
    list_modules,
    request_deserializer=registry_pb2.ListModulesRequest.FromString,
    response_serializer=registry_pb2.ListModulesResponse.SerializeToString,
)
server = grpc.server(futures.ThreadPoolExecutor(2))
registry = grpc.method_handlers_generic_handler(
    "lodestar.core.v1.RegistryService", {"ListModules": handler}
)
server.add_generic_rpc_handlers((registry,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
with RegistryClient(ClientOptions(f"127.0.0.1:{port}", token="tok")) as client:
    client.list_modules()
print(seen[0].get("authorization"), "traceparent" in seen[0])
print([span.name for span in spans.get_finished_spans()])
server.stop(None)
"""


def test_blocking_calls_carry_the_token_and_the_trace_when_telemetry_is_on():
    """In a process of its own: it sets OpenTelemetry's global tracer provider."""
    done = subprocess.run(
        [sys.executable, "-c", TRACED], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "Bearer tok True",  # the server saw the token and a traceparent
        "['/lodestar.core.v1.RegistryService/ListModules']",  # the client's span
    ]


@pytest.mark.parametrize("seconds", [0, -1, float("inf"), float("nan"), 1e10])
def test_deadlines_that_cannot_work_are_refused_by_name(seconds):
    with pytest.raises(ConfigurationError) as caught:
        ClientOptions("h:1", timeout_seconds=seconds)
    assert caught.value.field == "timeout_seconds"
    client = clients.RegistryClient(ClientOptions("127.0.0.1:9"))
    with client, pytest.raises(ConfigurationError) as caught:
        client.list_modules(timeout=seconds)
    assert caught.value.field == "timeout"


@pytest.mark.parametrize("token", ["abc\ndef", "tökén", "two words", ""])
def test_a_token_no_header_can_carry_is_refused_by_name(token):
    with pytest.raises(ConfigurationError) as caught:
        ClientOptions("h:1", token=token)
    assert caught.value.field == "token"


def test_a_closed_client_refuses_calls_instead_of_crashing():
    client = clients.UsageClient(ClientOptions("127.0.0.1:9"))
    client.close()
    with pytest.raises(clients.ClientClosedError, match="closed client"):
        client.list_unpriced()
    with pytest.raises(clients.ClientClosedError):
        list(client.export_records())


async def test_a_closed_async_client_refuses_calls():
    async with clients.AsyncUsageClient(ClientOptions("127.0.0.1:9")) as client:
        pass
    with pytest.raises(clients.ClientClosedError):
        await client.list_unpriced()


def test_a_request_of_another_rpc_is_refused_before_it_is_sent():
    from lodestar.usage.v1 import usage_pb2

    with (
        clients.UsageClient(ClientOptions("127.0.0.1:9")) as client,
        pytest.raises(TypeError, match="Recost takes a RecostRequest, not a ListUnpricedRequest"),
    ):
        client.recost(usage_pb2.ListUnpricedRequest())  # type: ignore[arg-type]
