"""One trace spans publisher, core and subscriber processes (OTLP/gRPC receiver on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NamedTuple

import asyncpg
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from lodestar.common.auth import Role
from lodestar.common.cli import free_port
from lodestar.common.testing import dev_credentials, start_process, wait_serving

HERE = Path(__file__).parent
TRACKER = "lodestar-usage-tracker"
HANDLE = "lodestar.handle lodestar.usage.v1.RequestCompleted"


class ExportedSpan(NamedTuple):
    """One span as the receiver got it (ids in hex, the SQL text for database spans)."""

    trace_id: str
    span_id: str
    parent_id: str
    service: str
    name: str
    links: tuple[str, ...]
    statement: str


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects every exported span."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []

    async def Export(self, request, context):
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "?",
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: a.value.string_value for a in span.attributes}
                    self.spans.append(
                        ExportedSpan(
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            service,
                            span.name,
                            tuple(link.span_id.hex() for link in span.links),
                            attributes.get("db.statement") or attributes.get("db.query.text", ""),
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[tuple[Receiver, dict[str, str]]]:
    """A receiver in this event loop, and the OTEL_* variables that send spans to it."""
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    otlp_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield (
            receiver,
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_BSP_SCHEDULE_DELAY": "100",
            },
        )
    finally:
        await server.stop(None)


async def publish_traced(target: str, token: str, otel: Mapping[str, str]) -> str:
    """Publish one RequestCompleted inside a ``lodestar.publish`` span; returns its event id."""
    # asyncio subprocess: the receiver runs in this event loop and must keep answering
    publisher = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "traced_publisher.py"),
        target,
        token,
        env=os.environ | dict(otel),
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(publisher.communicate(), 60)
    assert publisher.returncode == 0
    event_id = stdout.decode().strip()
    assert len(event_id) == 36, event_id
    return event_id


async def test_one_trace_spans_publisher_core_and_subscriber(
    tmp_path: Path, database_url: str, schema: str
):
    tokens = dev_credentials(tmp_path / "credentials.yaml")
    port = free_port()
    consumer = None
    async with otlp_receiver() as (receiver, otel):
        core = start_process(
            "lodestar_core",
            otel
            | {
                "LODESTAR_DATABASE__URL": database_url,
                "LODESTAR_DATABASE__SCHEMA_NAME": schema,
                "LODESTAR_CREDENTIALS_FILE": str(tmp_path / "credentials.yaml"),
            },
            tmp_path / "core.log",
            port,
        )
        target = f"127.0.0.1:{port}"
        try:
            await wait_serving(target, "readiness")
            await publish_traced(target, tokens[Role.PUBLISHER], otel)
            out = tmp_path / "handled.txt"
            consumer = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "consumer.py"),
                    target,
                    tokens[Role.MODULE],
                    "traced",
                    str(out),
                ],
                env=os.environ | otel,
            )
            deadline = asyncio.get_running_loop().time() + 60
            while not (out.exists() and out.read_text().strip()):
                assert asyncio.get_running_loop().time() < deadline, "consumer never handled it"
                await asyncio.sleep(0.1)
            consumer.send_signal(signal.SIGINT)
            while consumer.poll() is None:
                await asyncio.sleep(0.1)
            by_trace: dict[str, set[tuple[str, str]]] = defaultdict(set)
            while asyncio.get_running_loop().time() < deadline:
                by_trace.clear()
                for span in receiver.spans:
                    by_trace[span.trace_id].add((span.service, span.name))
                if any(_complete(spans) for spans in by_trace.values()):
                    break
                await asyncio.sleep(0.2)
            complete = [spans for spans in by_trace.values() if _complete(spans)]
            interesting = {
                t: spans
                for t, spans in by_trace.items()
                if any(n.startswith(("lodestar", "/")) for _, n in spans)
            }
            assert complete, f"no trace covers all three processes: {interesting}"
        finally:
            for process in (consumer, core):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()


def _complete(spans: set[tuple[str, str]]) -> bool:
    services = {service for service, _ in spans}
    names = {name for _, name in spans}
    return (
        {"lodestar-test-publisher", "lodestar-core", "lodestar-test-consumer"} <= services
        and "lodestar.publish" in names
        and "lodestar.persist" in names
        and any(name.startswith("lodestar.handle") for name in names)
    )


async def test_one_trace_reaches_the_usage_trackers_sql(
    tmp_path: Path, database_url: str, schema: str
):
    """One published event: publisher → core → the real usage-tracker's handler → its ledger SQL.

    Core, the usage-tracker and the publisher run as processes and export to a receiver here.
    Every step is checked by parent span id (a parent chain, not just a shared trace id):
    core's ``lodestar.persist`` and ``lodestar.deliver`` and the tracker's handler span are
    children of the publisher's ``lodestar.publish`` span (the event carries its context); the
    ledger transaction's ``lodestar.ingest.write`` span is a child of the handler span (the only
    submission of its write, which also links to it); the asyncpg spans of that transaction,
    the ledger INSERT among them, are children of the write span. The ledger row is checked too.
    """
    tokens = dev_credentials(tmp_path / "credentials.yaml", ["usage-tracker"])
    common = {
        "LODESTAR_DATABASE__URL": database_url,
        "LODESTAR_CREDENTIALS_FILE": str(tmp_path / "credentials.yaml"),
        "LODESTAR_SPOOL_DIR": str(tmp_path / "spool"),
    }
    usage_schema = f"{schema}_usage"
    core_port, tracker_port = free_port(), free_port()
    core_target = f"127.0.0.1:{core_port}"
    processes: list[subprocess.Popen[bytes]] = []
    async with otlp_receiver() as (receiver, otel):
        try:
            processes.append(
                start_process(
                    "lodestar_core",
                    otel | common | {"LODESTAR_DATABASE__SCHEMA_NAME": schema},
                    tmp_path / "core.log",
                    core_port,
                )
            )
            await wait_serving(core_target, "readiness")
            tracker_env = {
                "LODESTAR_DATABASE__SCHEMA_NAME": usage_schema,
                "LODESTAR_CORE_ENDPOINT": core_target,
                "LODESTAR_TOKEN": tokens["usage-tracker"],
            }
            processes.append(
                start_process(
                    "lodestar_usage",
                    otel | common | tracker_env,
                    tmp_path / "tracker.log",
                    tracker_port,
                )
            )
            await wait_serving(f"127.0.0.1:{tracker_port}", "readiness")
            event_id = await publish_traced(core_target, tokens[Role.PUBLISHER], otel)
            await _wait_for_ledger_row(database_url, usage_schema, event_id)
            chain = await _wait_for_chain(receiver)
        finally:
            await _stop(processes)
    publish, handle, write, statements = chain
    assert publish.service == "lodestar-test-publisher"
    assert handle.service == TRACKER
    assert handle.parent_id == publish.span_id
    assert write.parent_id == handle.span_id
    assert write.links == (handle.span_id,)
    assert {s.service for s in statements} == {TRACKER}
    assert {s.parent_id for s in statements} == {write.span_id}
    assert any("INSERT INTO ledger" in s.statement for s in statements), statements
    core_spans = {
        s.name
        for s in receiver.spans
        if s.trace_id == publish.trace_id
        and s.parent_id == publish.span_id
        and s.service == "lodestar-core"
    }
    assert {"lodestar.persist", "lodestar.deliver"} <= core_spans


async def _stop(processes: list[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    """SIGTERM (a clean stop exports the last spans to the receiver, which this loop serves
    meanwhile), then SIGKILL whatever is still running after ``timeout``."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + timeout
    while any(p.poll() is None for p in processes):
        if asyncio.get_running_loop().time() > deadline:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            return
        await asyncio.sleep(0.05)


Chain = tuple[ExportedSpan, ExportedSpan, ExportedSpan, list[ExportedSpan]]


async def _wait_for_chain(receiver: Receiver, timeout: float = 30.0) -> Chain:
    """publish, handle, write and the write's SQL spans, once all of them have arrived."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        chain = _find_chain(receiver.spans)
        if chain is not None:
            return chain
        names = sorted({(s.service, s.name) for s in receiver.spans})
        assert asyncio.get_running_loop().time() < deadline, f"no complete chain in {names}"
        await asyncio.sleep(0.2)


def _find_chain(spans: list[ExportedSpan]) -> Chain | None:
    by_id = {s.span_id: s for s in spans}
    for write in (s for s in spans if s.name == "lodestar.ingest.write"):
        handle = by_id.get(write.parent_id)
        publish = by_id.get(handle.parent_id) if handle is not None else None
        statements = [s for s in spans if s.parent_id == write.span_id]
        if (
            handle is not None
            and handle.name == HANDLE
            and publish is not None
            and publish.name == "lodestar.publish"
            and any("INSERT INTO ledger" in s.statement for s in statements)
            and {write.trace_id, handle.trace_id, *(s.trace_id for s in statements)}
            == {publish.trace_id}
        ):
            return publish, handle, write, statements
    return None


async def _wait_for_ledger_row(dsn: str, schema: str, event_id: str) -> None:
    """Until the tracker has committed the event's ledger row."""
    deadline = asyncio.get_running_loop().time() + 60
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            found = await conn.fetchval(
                f"SELECT count(*) FROM {schema}.ledger WHERE event_id = $1::uuid",
                event_id,
            )
            if found == 1:
                return
            assert asyncio.get_running_loop().time() < deadline, "the tracker never wrote it"
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
