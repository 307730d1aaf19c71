"""What Lodestar adds to a LiteLLM call: the callback (publishing) and the budget hook (admission).

Real core and usage-tracker processes on a real Postgres; in this process, a LiteLLM ``Router``
whose deployment answers with ``mock_response`` after ``mock_delay`` (the LLM call), driven open
loop at LITELLM_BENCH_RATE calls/s (default 50) for LITELLM_BENCH_SECONDS (default 10) per round,
each call waiting LITELLM_BENCH_CALL_SECONDS (default 0.5) for its answer, so about rate x wait
calls are in flight at once, as in a gateway. LiteLLM itself spends about 9 ms of CPU per call
here, so one process serves about 100 calls/s at most; the default keeps it half busy. Six modes,
interleaved over LITELLM_BENCH_ROUNDS rounds so that each sees the same machine (default 4: each
mode's p99 is then of 2,000 calls; with 1,000, two runs' p99s of one mode differed by ~1.5 ms):

* ``off``: no callback at all;
* ``no-op callback``: a LiteLLM ``CustomLogger`` that does nothing, which makes LiteLLM build its
  logging payload and compute the call's cost (what any callback costs, Lodestar's or not);
* ``hook awaiting 1 ms``: a callback whose pre-call hook only awaits 1 ms, about a Reserve's
  p50 here: what any awaited hook adds to a call in LiteLLM's busy event loop (the floor under
  the admission mode's figures);
* ``publish``: ``LodestarLogger`` publishing a ``RequestCompleted`` per call (no gate);
* ``publish + admission``: the logger with a ``BudgetGate`` (Reserve before the call, Commit after);
* ``no-op callback again``: the no-op callback once more, so what it "adds" over the first is
  the run's own noise, the yardstick for the figures above.

Printed per mode: the call's latency beyond the LLM wait (p50 / p99), what Lodestar's modes add
to it over the no-op callback (p50 / p99), and for admission the time spent in the pre-call hook
itself (p50 / p99), the tracker's admission rounds by path, and the longest pause of this
process's garbage collector while the mode ran (a pause holds every call in flight). Before
them, the gateway's CPU per call for publishing and for the hook alone.
The load generator shares the machine's cores with LiteLLM, core, the tracker and Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network

import litellm
from litellm.integrations.custom_logger import CustomLogger

from bench.core_bench import CoreUnderTest
from bench.usage_bench import (
    TrackerUnderTest,
    _create_budgets,
    _drop,
    _pct,
    _scratch,
    rounds_text,
)
from lodestar.common.auth import Role
from lodestar.common.sdk import Publisher, connect
from lodestar.common.testing import postgres_server
from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug
from lodestar_usage.client import BudgetGate, GatePolicy
from lodestar_usage.litellm_callback import RESERVATION_KEY, LodestarLogger

RATE = float(os.environ.get("LITELLM_BENCH_RATE", "50"))
SECONDS = float(os.environ.get("LITELLM_BENCH_SECONDS", "10"))
CALL_SECONDS = float(os.environ.get("LITELLM_BENCH_CALL_SECONDS", "0.5"))
ROUNDS = int(os.environ.get("LITELLM_BENCH_ROUNDS", "4"))
COST_CALLS = int(os.environ.get("LITELLM_BENCH_COST_CALLS", "5000"))
#: How long the gateway's publisher gathers events into one Publish (LITELLM_BENCH_LINGER).
PUBLISH_LINGER = float(os.environ.get("LITELLM_BENCH_LINGER", "0.05"))
HOOK_RATE = float(os.environ.get("LITELLM_BENCH_HOOK_RATE", "500"))
PROJECTS = [f"gw-{i}" for i in range(20)]
#: How long the floor mode's pre-call hook waits: about a Reserve's p50 here.
FLOOR_HOOK_SECONDS = 0.001
FLOOR_MODE = f"hook awaiting {FLOOR_HOOK_SECONDS * 1000:g} ms"
NOOP_AGAIN = "no-op callback again"
ALL_MODES = ("off", "no-op callback", FLOOR_MODE, "publish", "publish + admission", NOOP_AGAIN)
#: LITELLM_BENCH_MODES: a comma-separated subset, e.g. "no-op callback,publish" (for profiling).
MODES = tuple(
    m
    for m in ALL_MODES
    if m in os.environ.get("LITELLM_BENCH_MODES", ",".join(ALL_MODES)).split(",")
)


@dataclass
class Timings:
    """Latencies of one mode, in milliseconds, over every round."""

    added_ms: list[float] = field(default_factory=list)
    hook_ms: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    failed: int = 0
    #: The tracker's admission rounds during this mode's runs, by path (known, stale, locked).
    rounds: Counter[str] = field(default_factory=Counter)
    #: How long each of this process's garbage collections took while the mode ran.
    gc_ms: list[float] = field(default_factory=list)

    def cpu_ms_per_call(self) -> float:
        """The gateway process's CPU time per call, in milliseconds."""
        return self.cpu_seconds * 1000 / max(1, len(self.added_ms) + self.failed)


class GcPauses:
    """Times this process's garbage collections (a ``gc.callbacks`` entry) into ``pauses``."""

    def __init__(self, pauses: list[float]) -> None:
        self.pauses = pauses
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        """Note a collection's start, or its duration at its stop."""
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((time.perf_counter() - self._started) * 1000)


class TimedLogger(LodestarLogger):
    """The logger, timing its pre-call hook (the part a caller waits for)."""

    hook_ms: list[float]

    async def async_pre_call_deployment_hook(
        self, kwargs: dict[str, Any], call_type: object
    ) -> dict[str, Any]:
        """Reserve, timed."""
        began = time.perf_counter()
        try:
            return await super().async_pre_call_deployment_hook(kwargs, call_type)
        finally:
            self.hook_ms.append((time.perf_counter() - began) * 1000)


class AwaitingHook(CustomLogger):  # type: ignore[misc]
    """A pre-call hook that only awaits FLOOR_HOOK_SECONDS, timed: what any awaited hook adds."""

    def __init__(self, hook_ms: list[float]) -> None:
        super().__init__()
        self.hook_ms = hook_ms

    async def async_pre_call_deployment_hook(
        self, kwargs: dict[str, Any], call_type: object
    ) -> dict[str, Any]:
        """Wait, timed."""
        began = time.perf_counter()
        await asyncio.sleep(FLOOR_HOOK_SECONDS)
        self.hook_ms.append((time.perf_counter() - began) * 1000)
        return kwargs


def _router() -> litellm.Router:
    return litellm.Router(
        model_list=[
            {
                "model_name": "fast",
                "litellm_params": {
                    "model": "openai/gpt-4o-mini",
                    "api_key": "no-key-needed-with-mock_response",
                    "mock_response": "Paris is the capital of France.",
                    "mock_delay": CALL_SECONDS,
                },
            }
        ],
        num_retries=0,
    )


async def _drive(router: litellm.Router, timings: Timings) -> None:
    """Calls started at RATE per second for SECONDS, whatever the answers (open loop)."""

    async def one(i: int) -> None:
        began = time.perf_counter()
        try:
            await router.acompletion(
                model="fast",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=100,
                metadata={"lodestar": {"project": PROJECTS[i % len(PROJECTS)]}},
            )
        except Exception:
            timings.failed += 1
            return
        timings.added_ms.append((time.perf_counter() - began - CALL_SECONDS) * 1000)

    await _open_loop(one, RATE, int(RATE * SECONDS))


async def _open_loop(start: Callable[[int], Awaitable[None]], rate: float, count: int) -> None:
    """``start(0)`` … ``start(count - 1)`` begun ``rate`` per second whatever the answers."""
    tasks = []
    began = time.perf_counter()
    for i in range(count):
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(start(i)))
    await asyncio.gather(*tasks)


@contextlib.asynccontextmanager
async def _callbacks(
    mode: str, core: CoreUnderTest, tracker: TrackerUnderTest, spool: Path, timings: Timings
) -> AsyncIterator[None]:
    """LiteLLM's callbacks for ``mode``, removed again afterwards."""
    if mode == "off":
        yield
        return
    if mode in ("no-op callback", NOOP_AGAIN, FLOOR_MODE):
        noop = AwaitingHook(timings.hook_ms) if mode == FLOOR_MODE else CustomLogger()
        litellm.callbacks = [noop]
        try:
            yield
        finally:
            litellm.callbacks = []
            litellm.logging_callback_manager.remove_callback_from_all_lists(noop)
        return
    token = core.tokens[Role.PUBLISHER]
    async with (
        connect(core.target, token) as to_core,
        connect(tracker.target, token) as to_tracker,
        Publisher(
            to_core, source="litellm://bench", spool_dir=spool, linger_seconds=PUBLISH_LINGER
        ) as publisher,
    ):
        gate = BudgetGate(to_tracker, GatePolicy()) if "admission" in mode else None
        if gate is not None:
            await _first_reserve_ms(gate)  # a gateway's gate is open before its traffic
        logger = TimedLogger(publisher, gate)
        logger.hook_ms = timings.hook_ms
        litellm.callbacks = [logger]
        try:
            yield
            await logger.drain()
            await publisher.flush()
        finally:
            if gate is not None:
                await gate.aclose()
            litellm.callbacks = []
            litellm.logging_callback_manager.remove_callback_from_all_lists(logger)


async def bench_litellm(dsn: str, workdir: Path, out: Callable[[str], None]) -> None:
    """The gateway's CPU per call, then the modes interleaved over ROUNDS rounds."""
    async with CoreUnderTest(dsn, workdir) as core:
        tracker = TrackerUnderTest(dsn, workdir, core)
        await tracker.start()
        try:
            async with connect(tracker.target, core.tokens[Role.ADMIN]) as admin:
                await _create_budgets(ug.BudgetServiceStub(admin), PROJECTS)
            router = _router()
            await _cost_per_call(core, tracker, router, out)
            results = {mode: Timings() for mode in MODES}
            await _drive(router, Timings())  # warm-up
            # A full collection walks LiteLLM's ~400,000 objects (~210 ms here) and lands in
            # whichever mode runs then: frozen, as a gateway would after start-up (ADR 0014).
            gc.collect()
            gc.freeze()
            for _ in range(ROUNDS):
                for mode in MODES:
                    rounds, cpu = await tracker.admission_rounds(), time.process_time()
                    async with _callbacks(mode, core, tracker, workdir / "spool", results[mode]):
                        gc.callbacks.append(pauses := GcPauses(results[mode].gc_ms))
                        try:
                            await _drive(router, results[mode])
                        finally:
                            gc.callbacks.remove(pauses)
                    results[mode].cpu_seconds += time.process_time() - cpu
                    results[mode].rounds += await tracker.admission_rounds() - rounds
            _report(results, out)
        finally:
            tracker.stop()


class _Capture(CustomLogger):
    """Keeps the kwargs and response LiteLLM hands its success callbacks."""

    kwargs: dict[str, Any]
    response: Any

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """Keep them."""
        self.kwargs, self.response = kwargs, response_obj


async def _logged_call(router: litellm.Router) -> tuple[dict[str, Any], Any]:
    """What one real call hands a success callback."""
    capture = _Capture()
    litellm.callbacks = [capture]
    try:
        await router.acompletion(
            model="fast",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            metadata={"lodestar": {"project": PROJECTS[0]}},
            mock_delay=0,
        )
        await asyncio.sleep(0.5)  # success callbacks run after the call returns
    finally:
        litellm.callbacks = []
        litellm.logging_callback_manager.remove_callback_from_all_lists(capture)
    return capture.kwargs, capture.response


async def _cost_per_call(
    core: CoreUnderTest,
    tracker: TrackerUnderTest,
    router: litellm.Router,
    out: Callable[[str], None],
) -> None:
    """The gateway's CPU per call for publishing and for the hook, without LiteLLM's own work.

    Publishing: COST_CALLS success callbacks with a real call's kwargs, then everything drained
    and flushed into core. Hook: COST_CALLS pre-call hooks (estimate + Reserve) started at
    HOOK_RATE per second (open loop), with their latency.
    """
    kwargs, response = await _logged_call(router)
    token = core.tokens[Role.PUBLISHER]
    async with (
        connect(core.target, token) as to_core,
        connect(tracker.target, token) as to_tracker,
        Publisher(to_core, source="litellm://bench", spool_dir=None) as publisher,
    ):
        logger = LodestarLogger(publisher)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(COST_CALLS):
            await logger.async_log_success_event(dict(kwargs), response, None, None)
        callback_ms = (time.perf_counter() - wall) * 1000 / COST_CALLS
        await logger.drain()
        await publisher.flush()
        cpu_ms = (time.process_time() - cpu) * 1000 / COST_CALLS
        out(
            f"  {'publishing, per call (gateway CPU)':<40} {cpu_ms:.3f} ms CPU in all; "
            f"{callback_ms:.3f} ms in the callback itself, the rest in the background"
        )
        gate = BudgetGate(to_tracker, GatePolicy())
        first_ms = await _first_reserve_ms(gate)
        hooked = LodestarLogger(publisher, gate)
        latencies: list[float] = []

        async def hook(i: int) -> None:
            call = {
                "model": "openai/gpt-4o-mini",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 100,
                "metadata": {"lodestar": {"project": PROJECTS[i % len(PROJECTS)]}},
            }
            began = time.perf_counter()
            await hooked.async_pre_call_deployment_hook(call, "acompletion")
            latencies.append((time.perf_counter() - began) * 1000)
            held.append(call["metadata"][RESERVATION_KEY])

        held: list[str] = []
        cpu = time.process_time()
        await _open_loop(hook, HOOK_RATE, COST_CALLS)
        cpu_ms = (time.process_time() - cpu) * 1000 / COST_CALLS
        # Released, not left to lapse while the modes run: each lapse changes a counter the
        # tracker remembers and costs the next Reserve on it a stale round.
        for i in range(0, len(held), 500):
            releases = [u.ReleaseRequest(reservation_id=r) for r in held[i : i + 500]]
            await asyncio.gather(*map(gate.release, releases))
        await gate.aclose()
        out(
            f"  {'budget hook, per call (gateway CPU)':<40} {cpu_ms:.3f} ms CPU (estimate + "
            f"Reserve); latency p50 / p99 {_pct(latencies, 0.5):.2f} / {_pct(latencies, 0.99):.2f}"
            f" ms at {HOOK_RATE:g} calls/s; a new gate's first Reserve {first_ms:.1f} ms"
        )


async def _first_reserve_ms(gate: BudgetGate) -> float:
    """A Reserve and its Release through a new ``gate``; the Reserve's latency in milliseconds.

    The first call opens the gate's admission stream, which a gateway does once at start-up.
    """
    began = time.perf_counter()
    reply = await gate.reserve(u.ReserveRequest(project=PROJECTS[0], estimated_tokens=1))
    first_ms = (time.perf_counter() - began) * 1000
    await gate.release(u.ReleaseRequest(reservation_id=reply.reservation_id))
    return first_ms


def _report(results: dict[str, Timings], out: Callable[[str], None]) -> None:
    base = results["no-op callback"].added_ms if "no-op callback" in results else []
    for mode, timings in results.items():
        p50, p99 = _pct(timings.added_ms, 0.5), _pct(timings.added_ms, 0.99)
        line = f"{p50:.2f} / {p99:.2f} ms over the LLM wait, CPU {timings.cpu_ms_per_call():.2f} ms"
        if mode not in ("off", "no-op callback"):
            line += f"; adds {p50 - _pct(base, 0.5):+.2f} / {p99 - _pct(base, 0.99):+.2f} ms"
        if timings.hook_ms:
            line += (
                f"; hook {_pct(timings.hook_ms, 0.5):.2f} / {_pct(timings.hook_ms, 0.99):.2f} ms"
            )
        if timings.failed:
            line += f"; {timings.failed} failed"
        if timings.gc_ms:
            line += f"; longest GC pause {max(timings.gc_ms):.1f} ms"
        line += rounds_text(timings.rounds)
        out(f"  {mode + ' (p50 / p99)':<30} {line}  [{len(timings.added_ms):,} calls]")


async def run_litellm_benchmarks(out: Callable[[str], None]) -> None:
    """The LiteLLM overhead benchmark on a scratch database."""
    out(
        f"LiteLLM + Lodestar — {RATE:g} calls/s open loop, {CALL_SECONDS * 1000:g} ms LLM wait "
        f"(~{RATE * CALL_SECONDS:.0f} in flight), {SECONDS:g} s x {ROUNDS} rounds per mode, "
        f"{os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory() as tmp, postgres_server(Path(tmp)) as admin_dsn:
        name, dsn = await _scratch(admin_dsn)
        try:
            await bench_litellm(dsn, Path(tmp), out)
        finally:
            await _drop(admin_dsn, name)


if __name__ == "__main__":
    asyncio.run(run_litellm_benchmarks(lambda text: print(text, flush=True)))
