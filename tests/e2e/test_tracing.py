"""One trace spans publisher, core and subscriber processes (OTLP/gRPC receiver on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from lodestar.common.auth import Role
from lodestar.common.cli import free_port
from lodestar.common.testing import dev_credentials
from tests.conftest import wait_serving
from tests.e2e.processes import start_service

HERE = Path(__file__).parent


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects exported spans as (trace id, service name, span name)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []

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
                    self.spans.append((span.trace_id.hex(), service, span.name))
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_one_trace_spans_publisher_core_and_subscriber(
    tmp_path: Path, database_url: str, schema: str
):
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    otlp_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tokens = dev_credentials(tmp_path / "credentials.yaml")
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    port = free_port()
    core = start_service(
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
    consumer = None
    try:
        await wait_serving(target, "readiness")
        env = os.environ | otel
        # asyncio subprocess: the receiver runs in this event loop and must keep answering
        publisher = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "traced_publisher.py"),
            target,
            tokens[Role.PUBLISHER],
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        stdout, _ = await asyncio.wait_for(publisher.communicate(), 60)
        assert publisher.returncode == 0
        assert stdout.strip()
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
            env=env,
        )
        deadline = asyncio.get_running_loop().time() + 60
        while not (out.exists() and out.read_text().strip()):
            assert asyncio.get_running_loop().time() < deadline, "consumer never handled the event"
            await asyncio.sleep(0.1)
        consumer.send_signal(signal.SIGINT)
        while consumer.poll() is None:
            await asyncio.sleep(0.1)
        by_trace: dict[str, set[tuple[str, str]]] = defaultdict(set)
        while asyncio.get_running_loop().time() < deadline:
            by_trace.clear()
            for trace_id, service, name in receiver.spans:
                by_trace[trace_id].add((service, name))
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
        await server.stop(None)


def _complete(spans: set[tuple[str, str]]) -> bool:
    services = {service for service, _ in spans}
    names = {name for _, name in spans}
    return (
        {"lodestar-test-publisher", "lodestar-core", "lodestar-test-consumer"} <= services
        and "lodestar.publish" in names
        and "lodestar.persist" in names
        and any(name.startswith("lodestar.handle") for name in names)
    )
