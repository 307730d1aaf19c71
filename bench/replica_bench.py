"""Durable publish and delivery with one and with three core replicas on one database.

Publishers are spread over the replicas (one PublishStream each); one subscriber reads every
event through the last replica, so with three replicas most of what it delivers was stored by
the others (ADR 0012: heads followed across replicas).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.core_bench import READY_TIMEOUT_SECONDS, delivery_rate, publish_rate, sample_events
from lodestar.common.auth import Role
from lodestar.common.cli import free_port, wait_until_serving
from lodestar.common.testing import dev_credentials, scratch_database, service_env, start_process

REPLICA_COUNTS = (1, 3)


async def measure(dsn: str, workdir: Path, replicas: int, events: int) -> tuple[float, float]:
    """Events per second published (all replicas together) and delivered to one subscriber."""
    tokens = dev_credentials(workdir / "credentials.yaml")
    env = service_env(dsn, workdir / "credentials.yaml", log_level="WARNING")
    ports = [free_port() for _ in range(replicas)]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for index, port in enumerate(ports):  # one by one: the first applies the migrations
            log = workdir / f"core-{replicas}-{index}.log"
            processes.append(start_process("lodestar_core", env, log, port))
            if not await wait_until_serving(port, processes[-1], READY_TIMEOUT_SECONDS):
                raise RuntimeError(f"core replica {index} did not start; see {log}")
        targets = [f"127.0.0.1:{port}" for port in ports]
        batch = sample_events(events)
        slices = [batch[i::replicas] for i in range(replicas)]
        started = time.perf_counter()
        await asyncio.gather(
            *(
                publish_rate(t, tokens[Role.PUBLISHER], s)
                for t, s in zip(targets, slices, strict=True)
            )
        )
        published = events / (time.perf_counter() - started)
        delivered = await delivery_rate(targets[-1], tokens[Role.MODULE], events, "bench-replicas")
        return published, delivered
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def run_replica_benchmarks(
    admin_dsn: str, workdir: Path, events: int, line: Callable[[str, str], None]
) -> None:
    """One and three replicas, each on a fresh database, printed side by side."""
    results = {}
    for replicas in REPLICA_COUNTS:
        with scratch_database(admin_dsn) as dsn:
            results[replicas] = asyncio.run(measure(dsn, workdir, replicas, events))
        published, delivered = results[replicas]
        line(
            f"{replicas} core replica(s): publish spread over them / delivery (events/s)",
            f"{published:,.0f} / {delivered:,.0f}",
        )
    (one_publish, one_delivery), (three_publish, three_delivery) = results.values()
    line(
        "ratio: three replicas / one (publish, delivery)",
        f"{three_publish / one_publish:.2f}x, {three_delivery / one_delivery:.2f}x",
    )
