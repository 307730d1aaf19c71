"""Benchmarks of usage-tracker: real core and tracker processes on a real Postgres.

Sizes via environment: USAGE_BENCH_ROWS (ledger rows for the Summary benchmark, default 10M),
USAGE_BENCH_EVENTS (events for end-to-end ingest, default 100k). USAGE_BENCH_ONLY picks one part:
``ingest`` (ingest rate and freshness), ``admission`` (Reserve+Commit), ``rounds`` (the same on
an ``Admitter`` in this process, without gRPC; also part of ``admission``) or ``summary``.

Admission (issue #10): USAGE_BENCH_RATE (offered Reserve+Commit pairs/s, default 500) spread over
USAGE_BENCH_BUDGETS project budgets (default 100), open loop; USAGE_BENCH_CALLERS callers
(default 200) in a closed loop on one budget, first back to back, then each waiting
USAGE_BENCH_LLM_CALL_SECONDS (default 0.08) between Reserve and Commit as a gateway waits for
its LLM call; each for USAGE_BENCH_SECONDS (default 10); then
USAGE_BENCH_BURST (default 3,000) Reserves at once, counted by status. USAGE_BENCH_REPLICAS
(default 1) tracker processes serve admission on the one database, the load spread over them,
with the publisher's rate limit off (the scenarios measure admission, not that limit).
USAGE_BENCH_GATES (default ``single,coalesced``) picks how the gates call: every call its own RPC,
and/or every call a message on the gate's AdmitStream, concurrent calls sent together (ADR 0018).
The load generator runs on the same machine as the tracker, core and Postgres and competes with
them for CPU; the spread scenario runs once more from ``bench/node/admission_load.js`` (Node.js),
a generator that takes less of it, when Node.js and its packages (``make bench`` installs them)
are there, interleaved with the same load on ``bench.admission_floor`` (Python's gRPC and one
Postgres round trip per request, nothing else): the floor this machine puts under the tracker's
figures in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.compare import process_cpu_seconds
from bench.core_bench import READY_TIMEOUT_SECONDS, CoreUnderTest
from lodestar.common.auth import Role
from lodestar.common.cli import free_port, wait_until_serving
from lodestar.common.db import apply_migrations, create_pool
from lodestar.common.events import new_event
from lodestar.common.sdk import Publisher, connect
from lodestar.common.testing import postgres_server, start_process
from lodestar.core.v1 import bus_pb2, bus_pb2_grpc
from lodestar.usage.v1 import events_pb2 as ev
from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug
from lodestar_usage import budgets, reports
from lodestar_usage.admission import Admitter
from lodestar_usage.client import AdmissionUnavailableError, BudgetGate, GatePolicy
from lodestar_usage.ingest import ensure_partitions
from lodestar_usage.reservations import Admission, Finished
from lodestar_usage.service import MIGRATIONS

ROWS = int(os.environ.get("USAGE_BENCH_ROWS", "10000000"))
EVENTS = int(os.environ.get("USAGE_BENCH_EVENTS", "100000"))
ONLY = os.environ.get("USAGE_BENCH_ONLY", "")
GENERATE_TIMEOUT_SECONDS = 3600.0
ADMISSION_RATE = float(os.environ.get("USAGE_BENCH_RATE", "500"))
ADMISSION_BUDGETS = int(os.environ.get("USAGE_BENCH_BUDGETS", "100"))
ADMISSION_CALLERS = int(os.environ.get("USAGE_BENCH_CALLERS", "200"))
ADMISSION_SECONDS = float(os.environ.get("USAGE_BENCH_SECONDS", "10"))
BURST_CALLS = int(os.environ.get("USAGE_BENCH_BURST", "3000"))
#: Client channels the load generator spreads its calls over (as several gateway processes would).
ADMISSION_CHANNELS = 4
#: Tracker processes serving admission on one database (only the first one ingests).
ADMISSION_REPLICAS = int(os.environ.get("USAGE_BENCH_REPLICAS", "1"))
#: How the load generator's gates call admission: each call its own RPC, and coalesced.
#: Seconds of each in-process rounds scenario (USAGE_BENCH_ONLY=rounds), and its repeats per mode.
ROUNDS_SECONDS = float(os.environ.get("USAGE_BENCH_ROUNDS_SECONDS", "5"))
ROUNDS_REPEATS = 2
GATE_MODES = [
    (label, coalesce)
    for label, coalesce, name in (
        ("one RPC per call", False, "single"),
        ("BudgetGate on its AdmitStream", True, "coalesced"),
    )
    if name in os.environ.get("USAGE_BENCH_GATES", "single,coalesced").split(",")
]
#: The LLM call a gateway makes between Reserve and Commit in the third scenario: 200 callers
#: then offer 200 / (0.08 s + admission time) pairs a second, 2,000 if admission takes 20 ms.
LLM_CALL_SECONDS = float(os.environ.get("USAGE_BENCH_LLM_CALL_SECONDS", "0.08"))
#: A gateway's deadline for one admission call.
CALL_TIMEOUT = 5.0
#: The projects the spread scenario's budgets limit.
SPREAD_PROJECTS = [f"adm-{i}" for i in range(ADMISSION_BUDGETS)]
#: The Node.js load generator and the protos it loads.
NODE_GENERATOR = Path(__file__).parent / "node"
PROTOS = Path(__file__).parents[1] / "protos"
#: Times the Node.js spread scenario runs on the floor and on the tracker, interleaved.
FLOOR_REPEATS = 2


def _pct(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values``; nan when there are none."""
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def _scratch(admin_dsn: str) -> tuple[str, str]:
    name = f"lodestar_usage_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    base, _, query = admin_dsn.partition("?")
    return name, base.rpartition("/")[0] + f"/{name}" + (f"?{query}" if query else "")


async def _drop(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


async def bench_summary(dsn: str, out: Callable[[str], None]) -> None:
    """Summary over ROWS ledger rows (30 days, by model and day), answered from the rollups."""
    pool = await create_pool(dsn, "usage_summary_bench", max_size=4)
    try:
        async with pool.acquire() as conn:
            await apply_migrations(conn, "usage_summary_bench", MIGRATIONS)
        end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        start = end - timedelta(days=30)
        await ensure_partitions(pool, start, end)
        began = time.perf_counter()
        await pool.execute(
            "INSERT INTO ledger (occurred_at, event_id, model, provider, project, session_id, "
            "user_id, task_id, attempt, status, duration_ms, input_tokens, output_tokens, "
            "cached_read_tokens, cache_write_tokens, reasoning_tokens, cost_micros, cost_source, "
            "compute_cost_micros, shadow_cost_micros, savings_micros) "
            "SELECT $1::timestamptz + (i * $2::float8) * interval '1 second', gen_random_uuid(), "
            "'model-' || (i % 12), 'prov-' || (i % 4), 'proj-' || (i % 7), 's-' || (i % 5000), "
            "'u-' || (i % 40), '', 1, CASE WHEN i % 50 = 0 THEN 2 ELSE 1 END, 800, 1000, 200, "
            "0, 0, 0, 1500 + i % 100, 2, 0, 0, 0 FROM generate_series(0, $3 - 1) AS i",
            start,
            (30 * 86400) / ROWS,
            ROWS,
            timeout=GENERATE_TIMEOUT_SECONDS,
        )
        for table, unit in (("rollup_hourly", "hour"), ("rollup_daily", "day")):
            await pool.execute(
                f"INSERT INTO {table} SELECT date_trunc('{unit}', occurred_at), model, provider, "
                "project, user_id, count(*), count(*) FILTER (WHERE status = 2), "
                "sum(input_tokens), "
                "sum(output_tokens), sum(cached_read_tokens), sum(cache_write_tokens), "
                "sum(reasoning_tokens), sum(cost_micros), sum(compute_cost_micros), "
                "sum(shadow_cost_micros), sum(savings_micros), sum(duration_ms) FROM ledger "
                "GROUP BY 1, 2, 3, 4, 5",
                timeout=GENERATE_TIMEOUT_SECONDS,
            )
        for table, source, unit in (
            ("rollup_hourly_model", "rollup_hourly", "hour"),
            ("rollup_daily_model", "rollup_daily", "day"),
        ):
            await pool.execute(
                f"INSERT INTO {table} SELECT {unit}, model, provider, sum(requests), sum(errors), "
                "sum(input_tokens), sum(output_tokens), sum(cached_read_tokens), "
                "sum(cache_write_tokens), sum(reasoning_tokens), sum(cost_micros), "
                "sum(compute_cost_micros), sum(shadow_cost_micros), sum(savings_micros), "
                f"sum(duration_ms) FROM {source} GROUP BY 1, 2, 3",
                timeout=GENERATE_TIMEOUT_SECONDS,
            )
        await pool.execute("ANALYZE", timeout=GENERATE_TIMEOUT_SECONDS)
        out(
            f"  {'summary bench: ledger rows generated (N) / seconds':<58} "
            f"{ROWS:,} / {time.perf_counter() - began:.1f}"
        )
        latencies = []
        for _ in range(200):
            t0 = time.perf_counter()
            rows = await reports.summarize(pool, start, end, ["model", "day"], reports.Filters())
            latencies.append((time.perf_counter() - t0) * 1000)
        assert sum(r.sums["requests"] for r in rows) == ROWS
        out(
            f"  {'Summary 30 days by model,day over N rows: p50 / p99 (ms)':<58} "
            f"{statistics.median(latencies):.2f} / {_pct(latencies, 0.99):.2f}"
        )
    finally:
        await pool.close()


class TrackerUnderTest:
    """``python -m lodestar_usage serve`` subscribed to ``core``."""

    def __init__(self, dsn: str, workdir: Path, core: CoreUnderTest, name: str = "usage") -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.dsn, self.workdir = dsn, workdir
        self._env = {
            "LODESTAR_DATABASE__URL": dsn,
            "LODESTAR_CREDENTIALS_FILE": str(workdir / "credentials.yaml"),
            "LODESTAR_CORE_ENDPOINT": core.target,
            "LODESTAR_TOKEN": core.tokens["usage-tracker"],
            "LODESTAR_SPOOL_DIR": str(workdir / "spool"),
            "LODESTAR_LOG_LEVEL": "WARNING",
            # The admission scenarios measure admission, not the publisher's default limit
            # (10,000 calls/s), which one hot budget's 200 callers pass on a fast machine.
            "LODESTAR_RATE_LIMITS__ROLES__PUBLISHER": "null",
            "LODESTAR_METRICS_PORT": str(self.metrics_port),
        }
        self._log = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        """The address to dial: ``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start the tracker process; returns once it serves and has had time to subscribe."""
        self.process = start_process("lodestar_usage", self._env, self._log, self.port)
        if await wait_until_serving(self.port, self.process, READY_TIMEOUT_SECONDS):
            await asyncio.sleep(1.0)  # let it subscribe
            return
        raise RuntimeError("usage-tracker did not become ready")

    async def admission_rounds(self) -> Counter[str]:
        """Admission rounds the tracker ran so far, by path (known, stale, locked)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = await asyncio.to_thread(_fetch_text, url)
        rounds: Counter[str] = Counter()
        for family in text_string_to_metric_families(text):
            if family.name == "lodestar_usage_admission_rounds":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        rounds[sample.labels["path"]] += int(sample.value)
        return rounds

    def stop(self) -> None:
        """Terminate the tracker process, if started, and wait for it to exit."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)


def _fetch_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _event(project: str = "bench") -> ev.RequestCompleted:
    return ev.RequestCompleted(
        model="bench-model",
        provider="p",
        project=project,
        session_id="s",
        tokens=ev.TokenUsage(input=100, output=10),
        reported_cost=ev.Money(micros=7),
    )


async def _requests(stub: ug.UsageServiceStub, project: str | None = None) -> int:
    filters = u.Filters(projects=[project]) if project else u.Filters()
    reply = await stub.Summary(
        u.SummaryRequest(window=u.Window(rolling=u.RollingWindow(days=1)), filters=filters)
    )
    return int(reply.totals.requests)


async def bench_end_to_end(dsn: str, workdir: Path, out: Callable[[str], None]) -> None:
    """Ingest rate, freshness at 2,000 events/s, and Reserve + Commit latency."""
    async with CoreUnderTest(dsn, workdir) as core:
        tracker = TrackerUnderTest(dsn, workdir, core)
        await tracker.start()
        try:
            async with (
                connect(core.target, core.tokens[Role.PUBLISHER]) as pub,
                connect(tracker.target, core.tokens[Role.ADMIN]) as admin,
            ):
                bus = bus_pb2_grpc.EventBusServiceStub(pub)
                usage = ug.UsageServiceStub(admin)
                if ONLY == "admission":
                    await _admission(tracker, core, out)
                    return
                events = [new_event(_event(), source="bench://usage") for _ in range(EVENTS)]
                began = time.perf_counter()
                sem = asyncio.Semaphore(8)

                async def send(chunk: list[object]) -> None:
                    async with sem:
                        await bus.Publish(bus_pb2.PublishRequest(events=chunk))

                await asyncio.gather(*(send(events[i : i + 1000]) for i in range(0, EVENTS, 1000)))
                while await _requests(usage) < EVENTS:
                    await asyncio.sleep(0.05)
                rate = EVENTS / (time.perf_counter() - began)
                out(
                    f"  {'ingest publish→core→ledger, visible in Summary (events/s)':<58} "
                    f"{rate:,.0f}"
                )
                await _freshness(bus, usage, out)
                if ONLY != "ingest":
                    await _admission(tracker, core, out)
        finally:
            tracker.stop()


async def _freshness(
    bus: bus_pb2_grpc.EventBusServiceStub, usage: ug.UsageServiceStub, out: Callable[[str], None]
) -> None:
    stop = asyncio.Event()

    async def load() -> None:  # 2,000 events/s in batches of 20 every 10 ms
        while not stop.is_set():
            batch = [new_event(_event(), source="bench://load") for _ in range(20)]
            await bus.Publish(bus_pb2.PublishRequest(events=batch))
            await asyncio.sleep(0.01)

    loader = asyncio.create_task(load())
    latencies = []
    for i in range(40):
        project = f"probe-{i}"
        t0 = time.perf_counter()
        await bus.Publish(
            bus_pb2.PublishRequest(events=[new_event(_event(project), source="bench://probe")])
        )
        while await _requests(usage, project) < 1:
            await asyncio.sleep(0.002)
        latencies.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.05)
    stop.set()
    await loader
    out(
        f"  {'freshness at ~2,000 events/s: publish→visible p50 / p99 (ms)':<58} "
        f"{statistics.median(latencies):.1f} / {_pct(latencies, 0.99):.1f}"
    )


@dataclass
class Scenario:
    """What one admission scenario measured."""

    pairs: int = 0
    denied: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    reserve_ms: list[float] = field(default_factory=list)
    pair_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    #: The trackers' admission rounds during the scenario, by path, when they were asked.
    rounds: Counter[str] = field(default_factory=Counter)

    def failed(self, exc: grpc.aio.AioRpcError) -> None:
        """Count a call that ended in an error status."""
        name = exc.code().name
        self.errors[name] = self.errors.get(name, 0) + 1

    def summary(self) -> str:
        """Achieved rate, Reserve and pair latency, and errors by status."""
        rate = self.pairs / self.seconds if self.seconds else 0.0
        text = f"{rate:,.0f} pairs/s"
        if self.reserve_ms:
            text += (
                f"; Reserve p50 / p99 {statistics.median(self.reserve_ms):.1f} / "
                f"{_pct(self.reserve_ms, 0.99):.1f} ms"
            )
        if self.pair_ms:
            text += (
                f"; pair p50 / p99 {statistics.median(self.pair_ms):.1f} / "
                f"{_pct(self.pair_ms, 0.99):.1f} ms"
            )
        if self.lag_ms:
            text += f"; send lag p99 {_pct(self.lag_ms, 0.99):.1f} ms"
        if self.denied:
            text += f"; {self.denied} denied"
        if self.errors:
            text += "; errors " + ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items()))
        return text + rounds_text(self.rounds)


def rounds_text(rounds: Counter[str]) -> str:
    """``"; rounds known 9, stale 1"`` (admission rounds by path), or "" when none were counted."""
    if not rounds:
        return ""
    return "; rounds " + ", ".join(f"{path} {n}" for path, n in sorted(rounds.items()))


def _bench_budget(project: str) -> u.Budget:
    """A monthly budget of ``project`` too large to refuse anything."""
    return u.Budget(
        name=f"bench-{project}",
        scope=u.BUDGET_SCOPE_PROJECT,
        scope_value=project,
        period=u.BUDGET_PERIOD_MONTHLY,
        limit_micros=10**15,
    )


async def _create_budgets(gate: ug.BudgetServiceStub, projects: list[str]) -> None:
    for project in projects:
        await gate.CreateBudget(u.CreateBudgetRequest(budget=_bench_budget(project)))


class Gate(Protocol):
    """What the scenarios call: a ``BudgetGate``, or an ``Admitter`` without gRPC."""

    async def reserve(self, request: u.ReserveRequest) -> Any:
        """The answer to a Reserve (``granted``, ``reservation_id``)."""

    async def commit(self, request: u.CommitRequest) -> Any:
        """The answer to a Commit (true when answered)."""


class InProcessGate:
    """Reserve and Commit straight on an ``Admitter`` in this process, as the API calls it."""

    def __init__(self, admitter: Admitter) -> None:
        self._admitter = admitter

    async def reserve(self, request: u.ReserveRequest) -> Admission:
        """Decide ``request`` in a round."""
        return await self._admitter.reserve(request, timedelta(seconds=60), "bench", None)

    async def commit(self, request: u.CommitRequest) -> Finished:
        """Commit the reservation ``request`` names at its actual cost."""
        key = uuid.UUID(request.reservation_id)
        return await self._admitter.finish(
            key, "bench", None, commit=True, micros=request.actual_cost_micros
        )


async def _pair(
    gate: Gate,
    project: str,
    result: Scenario,
    call_seconds: float = 0.0,
    publisher: Publisher | None = None,
) -> None:
    """One Reserve, then its Commit; latency and outcome recorded in ``result``.

    ``call_seconds`` is the LLM call between them, left out of the pair's latency. With
    ``publisher``, the call's RequestCompleted naming the reservation is published after the
    Commit, as a gateway's LiteLLM callback does (not timed).
    """
    t0 = time.perf_counter()
    try:
        reply = await gate.reserve(u.ReserveRequest(project=project, estimated_cost_micros=100))
        t1 = time.perf_counter()
        if not reply.granted:
            result.denied += 1
            return
        if call_seconds:
            await asyncio.sleep(call_seconds)
        t_call = time.perf_counter() - t1
        if not await gate.commit(
            u.CommitRequest(reservation_id=reply.reservation_id, actual_cost_micros=50)
        ):
            result.errors["Commit unanswered"] = result.errors.get("Commit unanswered", 0) + 1
            return
    except AdmissionUnavailableError as exc:
        result.errors[exc.code.name] = result.errors.get(exc.code.name, 0) + 1
        return
    except grpc.aio.AioRpcError as exc:
        result.failed(exc)
        return
    t2 = time.perf_counter()
    result.reserve_ms.append((t1 - t0) * 1000)
    result.pair_ms.append((t2 - t0 - t_call) * 1000)
    result.pairs += 1
    if publisher is not None:
        event = _event(project)
        event.ClearField("session_id")  # a gateway's calls are not all of one session
        event.reservation_id = reply.reservation_id
        await publisher.publish(event)


async def open_loop(
    gates: Sequence[Gate],
    projects: list[str],
    rate: float,
    seconds: float,
    publisher: Publisher | None = None,
) -> Scenario:
    """Reserve+Commit pairs started at ``rate`` per second whatever the answers (open loop).

    The pairs are spread round-robin over ``projects``; the achieved rate counts completed pairs.
    With ``publisher``, each pair's usage event is published too (``_pair``).
    """
    result = Scenario()
    tasks: list[asyncio.Task[None]] = []
    total = int(rate * seconds)
    began = time.perf_counter()
    for i in range(total):
        due = began + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        result.lag_ms.append(max(0.0, time.perf_counter() - due) * 1000)
        gate = gates[i % len(gates)]
        project = projects[i % len(projects)]
        tasks.append(asyncio.create_task(_pair(gate, project, result, publisher=publisher)))
    await asyncio.gather(*tasks)
    result.seconds = time.perf_counter() - began
    return result


async def closed_loop(
    gates: Sequence[Gate], project: str, callers: int, seconds: float, call_seconds: float = 0.0
) -> Scenario:
    """``callers`` callers, each doing Reserve+Commit on one budget in a loop for ``seconds``.

    With ``call_seconds``, each caller waits that long between its Reserve and its Commit, as a
    gateway waits for the LLM call; the pair's latency leaves the wait out.
    """
    result = Scenario()
    stop_at = time.perf_counter() + seconds

    async def caller(gate: Gate) -> None:
        while time.perf_counter() < stop_at:
            await _pair(gate, project, result, call_seconds)

    began = time.perf_counter()
    await asyncio.gather(*(caller(gates[i % len(gates)]) for i in range(callers)))
    result.seconds = time.perf_counter() - began
    return result


async def burst(gates: list[BudgetGate], project: str, calls: int) -> dict[str, int]:
    """``calls`` Reserves at once: how many came back with each status (and a retry delay)."""
    outcomes: dict[str, int] = {}

    async def one(gate: BudgetGate) -> None:
        try:
            await gate.reserve(u.ReserveRequest(project=project, estimated_cost_micros=1))
            name = "OK"
        except AdmissionUnavailableError as exc:
            name = exc.code.name
            if name not in outcomes and os.environ.get("USAGE_BENCH_VERBOSE"):
                print(f"    first {name}: {exc}")
            if exc.retry_after is not None:
                name += " (with RetryInfo)"
        except grpc.aio.AioRpcError as exc:
            name = exc.code().name
        outcomes[name] = outcomes.get(name, 0) + 1

    await asyncio.gather(*(one(gates[i % len(gates)]) for i in range(calls)))
    return outcomes


async def _admission(
    tracker: TrackerUnderTest, core: CoreUnderTest, out: Callable[[str], None]
) -> None:
    """Admission scenarios against ``tracker`` and USAGE_BENCH_REPLICAS - 1 more replicas.

    The replicas share one database and are called as gateways (publishers) would, their
    channels spread over them.
    """
    replicas = [tracker]
    async with contextlib.AsyncExitStack() as stack:
        for i in range(1, ADMISSION_REPLICAS):
            replica = TrackerUnderTest(tracker.dsn, tracker.workdir, core, f"usage-{i}")
            stack.callback(replica.stop)
            await replica.start()
            replicas.append(replica)
        if ADMISSION_REPLICAS > 1:
            out(f"  ({ADMISSION_REPLICAS} tracker replicas on one database)")
        channels = [
            await stack.enter_async_context(
                connect(replicas[i % len(replicas)].target, core.tokens[Role.PUBLISHER])
            )
            for i in range(max(ADMISSION_CHANNELS, len(replicas)))
        ]
        admin = await stack.enter_async_context(connect(tracker.target, core.tokens[Role.ADMIN]))
        budget_admin = ug.BudgetServiceStub(admin)
        await _create_budgets(budget_admin, [*SPREAD_PROJECTS, "hot", "burst"])
        await spread_from_node(tracker, core.tokens[Role.PUBLISHER], out)
        to_core = await stack.enter_async_context(connect(core.target, core.tokens[Role.PUBLISHER]))
        publisher = await stack.enter_async_context(
            Publisher(to_core, source="litellm://bench", spool_dir=None, linger_seconds=0.05)
        )
        await bench_admission(channels, out, publisher, _rounds_of(replicas))


RoundCount = Callable[[], Awaitable[Counter[str]]]


def _rounds_of(replicas: Sequence[TrackerUnderTest]) -> RoundCount:
    """What counts the admission rounds of all ``replicas`` together."""

    async def count() -> Counter[str]:
        total: Counter[str] = Counter()
        for replica in replicas:
            total += await replica.admission_rounds()
        return total

    return count


async def _node_spread(target: str, token: str, server_pid: int) -> dict[str, Any] | str:
    """The Node.js generator's spread scenario against ``target``: its figures, or its error.

    Adds ``server_cores``, the CPU the process ``server_pid`` used meanwhile.
    """
    arguments = [ADMISSION_RATE, ADMISSION_SECONDS, ADMISSION_BUDGETS, ADMISSION_CHANNELS]
    cpu_before, began = process_cpu_seconds(server_pid), time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        "node",
        str(NODE_GENERATOR / "admission_load.js"),
        target,
        token,
        str(PROTOS),
        *(f"{a:g}" for a in arguments),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    if process.returncode:
        return stderr.decode().strip()
    figures: dict[str, Any] = json.loads(stdout)
    used = process_cpu_seconds(server_pid) - cpu_before
    figures["server_cores"] = round(used / (time.perf_counter() - began), 2)
    return figures


@contextlib.asynccontextmanager
async def _admission_floor(dsn: str) -> AsyncIterator[tuple[str, int]]:
    """``bench.admission_floor`` serving on a free port: its target and process id."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.admission_floor",
        str(port),
        dsn,
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parents[1],
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), READY_TIMEOUT_SECONDS)
        if line.strip() != b"ready":
            raise RuntimeError("bench.admission_floor did not start")
        yield f"127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        await process.wait()


async def spread_from_node(
    tracker: TrackerUnderTest, token: str, out: Callable[[str], None]
) -> None:
    """The spread scenario offered by the Node.js generator, which leaves the tracker more CPU.

    Interleaved with the same load on ``bench.admission_floor`` (Python's gRPC and one Postgres
    round trip per request, nothing else), so the tracker's figures read as ratios to the floor.
    """
    if shutil.which("node") is None or not (NODE_GENERATOR / "node_modules").is_dir():
        out("  (Node.js generator skipped: no node, or `npm ci --prefix bench/node` not run)")
        return
    assert tracker.process is not None
    what = f"Reserve+Commit offered {ADMISSION_RATE:g}/s over {ADMISSION_BUDGETS} budgets"
    out(f"  Node.js generator on AdmitStream, one call per message; {what}:")
    async with _admission_floor(tracker.dsn) as (floor, floor_pid):
        for _ in range(FLOOR_REPEATS):
            for label, target, pid in (
                ("floor (bare grpc.aio + 1 Postgres round trip)", floor, floor_pid),
                ("usage-tracker", tracker.target, tracker.process.pid),
            ):
                figures = await _node_spread(target, token, pid)
                out(f"    {label:<52} {_node_summary(figures)}")


def _node_summary(figures: dict[str, Any] | str) -> str:
    if isinstance(figures, str):
        return f"generator failed: {figures}"
    errors = "".join(f"; {kind} {n}" for kind, n in sorted(figures["errors"].items()))
    return (
        f"{figures['pairs_per_second']:,} pairs/s; Reserve p50 / p99 "
        f"{figures['reserve_p50_ms']} / {figures['reserve_p99_ms']} ms; pair p50 / p99 "
        f"{figures['pair_p50_ms']} / {figures['pair_p99_ms']} ms; denied {figures['denied']}"
        f"{errors}; server CPU {figures['server_cores']} cores, generator "
        f"{figures['cores']} cores"
    )


async def bench_admission(
    channels: list[grpc.aio.Channel],
    out: Callable[[str], None],
    publisher: Publisher,
    rounds: RoundCount | None = None,
) -> None:
    """The two admission scenarios of issue #10 and a burst beyond capacity.

    Each runs twice: with every call its own RPC, and through gates that send their callers'
    calls on a stream, together while they queue (``BudgetGate``'s default), one gate per
    channel. On the budgets of ``SPREAD_PROJECTS``, "hot" and "burst". The spread scenario runs
    once more with each pair's usage event published through ``publisher`` as a gateway's
    callback publishes it: the tracker then ingests it and settles the reservation, changing
    the counters its next Reserve on that budget is decided on.
    """
    projects = SPREAD_PROJECTS
    for label, coalesce in GATE_MODES:
        policy = GatePolicy(timeout_seconds=CALL_TIMEOUT, max_wait_seconds=0, coalesce=coalesce)
        gates = [BudgetGate(channel, policy) for channel in channels]
        out(f"  {label}:")
        await open_loop(gates, projects, min(ADMISSION_RATE, 100), 1.0)  # warm-up
        spread = await counting(
            rounds, open_loop(gates, projects, ADMISSION_RATE, ADMISSION_SECONDS)
        )
        what = f"Reserve+Commit offered {ADMISSION_RATE:g}/s over {ADMISSION_BUDGETS} budgets"
        out(f"    {what:<56} {spread.summary()}")
        spread = await counting(
            rounds, open_loop(gates, projects, ADMISSION_RATE, ADMISSION_SECONDS, publisher)
        )
        await publisher.flush()
        what = "… each pair's RequestCompleted published to core too"
        out(f"    {what:<56} {spread.summary()}")
        hot = await closed_loop(gates, "hot", ADMISSION_CALLERS, ADMISSION_SECONDS)
        out(f"    {f'{ADMISSION_CALLERS} callers in a loop on one budget':<56} {hot.summary()}")
        gateway = await closed_loop(
            gates, "hot", ADMISSION_CALLERS, ADMISSION_SECONDS, LLM_CALL_SECONDS
        )
        what = f"… each with a {LLM_CALL_SECONDS * 1000:g} ms LLM call between Reserve and Commit"
        out(f"    {what:<56} {gateway.summary()}")
        shed = await burst(gates, "burst", BURST_CALLS)
        out(
            f"    {f'{BURST_CALLS} concurrent Reserves at once: outcomes':<56} "
            + ", ".join(f"{k} {v}" for k, v in sorted(shed.items()))
        )
        for gate in gates:
            await gate.aclose()


async def counting(rounds: RoundCount | None, scenario: Awaitable[Scenario]) -> Scenario:
    """``scenario``'s result, with the admission rounds it took when ``rounds`` counts them."""
    if rounds is None:
        return await scenario
    before = await rounds()
    result = await scenario
    result.rounds = await rounds() - before
    return result


async def bench_rounds(dsn: str, out: Callable[[str], None]) -> None:
    """The admission scenarios on ``Admitter`` in this process, without gRPC (ADR 0017).

    Rounds decided on what the process knows, and locked rounds, interleaved in one run, each on
    fresh tables: what a round costs apart from the transport and the tracker's other work.
    """
    out("  admission rounds in one process, no gRPC (Admitter straight on Postgres):")
    for attempt in range(ROUNDS_REPEATS):
        for label, known in (("decided on what it knows", True), ("locked", False)):
            schema = f"bench_rounds_{attempt}_{int(known)}"
            pool = await create_pool(dsn, schema, max_size=4)
            try:
                projects = await _fresh_admission_tables(pool, schema)
                gates = [InProcessGate(Admitter(pool, rounds_in_flight=1, decide_on_known=known))]
                await open_loop(gates, projects, min(ADMISSION_RATE, 100), 1.0)  # warm-up
                spread = await open_loop(gates, projects, ADMISSION_RATE, ROUNDS_SECONDS)
                hot = await closed_loop(gates, "hot", ADMISSION_CALLERS, ROUNDS_SECONDS)
            finally:
                await pool.close()
            what = f"{label} ({attempt + 1}):"
            spread_what = f"{ADMISSION_RATE:g}/s over {ADMISSION_BUDGETS} budgets:"
            out(f"    {what:<30} {spread_what} {spread.summary()}")
            out(f"    {'':<30} {ADMISSION_CALLERS} callers on one budget: {hot.summary()}")


async def _fresh_admission_tables(pool: asyncpg.Pool, schema: str) -> list[str]:
    """The tracker's tables in ``schema`` with the spread budgets and "hot"; the spread ones."""
    async with pool.acquire() as conn:
        await apply_migrations(conn, schema, MIGRATIONS)
    projects = [f"adm-{i}" for i in range(ADMISSION_BUDGETS)]
    for project in [*projects, "hot"]:
        budget = budgets.budget_from_proto(_bench_budget(project), require_id=False)
        await budgets.create_budget(pool, budget)
    return projects


async def run_usage_benchmarks(print_fn: Callable[[str], None]) -> None:
    """Every usage-tracker benchmark, printed through ``print_fn``."""
    print_fn(
        f"usage-tracker benchmarks — N={ROWS:,} ledger rows, {EVENTS:,} ingest events, "
        f"{os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory() as tmp, postgres_server(Path(tmp)) as admin_dsn:
        name, dsn = await _scratch(admin_dsn)
        try:
            if ONLY in ("", "admission", "rounds"):
                await bench_rounds(dsn, print_fn)
            if ONLY not in ("summary", "rounds"):
                await bench_end_to_end(dsn, Path(tmp), print_fn)
            if ONLY in ("", "summary"):
                await bench_summary(dsn, print_fn)
        finally:
            await _drop(admin_dsn, name)


if __name__ == "__main__":
    asyncio.run(run_usage_benchmarks(print))
