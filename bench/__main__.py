"""``make bench``: every benchmark, each printing figures to compare within one run.

CLI start-up, durable publish, delivery, unary latency, NATS JetStream, usage-tracker (ingest,
Summary, admission) and what Lodestar adds to a LiteLLM call.

Absolute figures vary between runs and machines; compare the ratios printed in one run.
Sizes can be changed with BENCH_EVENTS (default 200000), BENCH_RATE (default 500 req/s) and
BENCH_CLI_RUNS (default 10 processes per CLI command).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

from bench.cli_bench import run_cli_benchmarks
from bench.core_bench import (
    CoreUnderTest,
    bench_delivery,
    bench_stream_publish,
    bench_unary_latency,
    sample_events,
)
from bench.litellm_bench import run_litellm_benchmarks
from bench.nats_bench import bench_jetstream, jetstream_available
from bench.replica_bench import run_replica_benchmarks
from bench.usage_bench import run_usage_benchmarks
from lodestar.common.testing import postgres_server, scratch_database

EVENTS = int(os.environ.get("BENCH_EVENTS", "200000"))
RATE = int(os.environ.get("BENCH_RATE", "500"))


def line(label: str, value: str) -> None:
    """Print one result row."""
    print(f"  {label:<58} {value}", flush=True)


async def main(dsn: str, workdir: Path) -> None:
    """Run the core benchmarks (and the JetStream comparison when NATS answers), printing rows."""
    print(
        f"Lodestar benchmarks — {EVENTS} events, {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}"
    )
    async with CoreUnderTest(dsn, workdir) as core:
        events = sample_events(EVENTS)
        publish_rate = await bench_stream_publish(core, events)
        line("durable publish, PublishStream, batches of 500 (events/s)", f"{publish_rate:,.0f}")
        delivery_rate = await bench_delivery(core, len(events))
        line(
            "delivery to one subscriber, SDK runtime with acks (events/s)", f"{delivery_rate:,.0f}"
        )
        p50, p99, achieved = await bench_unary_latency(core, RATE, seconds=5)
        line(
            f"unary Publish of 1 event at {RATE}/s: p50 / p99 (ms)",
            f"{p50:.2f} / {p99:.2f}  ({achieved:,.0f} req/s achieved)",
        )
    if not await jetstream_available():
        line("NATS JetStream", "not answering on 127.0.0.1:4222; comparison skipped")
        return
    js_publish, js_consume = await bench_jetstream(len(events))
    line("NATS JetStream acked async publish, file storage (msgs/s)", f"{js_publish:,.0f}")
    line("NATS JetStream pull consume with an ack per message (msgs/s)", f"{js_consume:,.0f}")
    line("ratio: Lodestar durable publish / JetStream publish", f"{publish_rate / js_publish:.2f}x")
    line("ratio: Lodestar delivery / JetStream consume", f"{delivery_rate / js_consume:.2f}x")


def run() -> None:
    """Entry point: a scratch database on the test Postgres (or an embedded one)."""
    run_cli_benchmarks(lambda text: print(text, flush=True))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with postgres_server(workdir) as admin_dsn:
            with scratch_database(admin_dsn) as dsn:
                asyncio.run(main(dsn, workdir))
            run_replica_benchmarks(admin_dsn, workdir, EVENTS // 2, line)
    asyncio.run(run_usage_benchmarks(print))
    asyncio.run(run_litellm_benchmarks(lambda text: print(text, flush=True)))


if __name__ == "__main__":
    run()
