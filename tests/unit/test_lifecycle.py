"""The shared service lifecycle: background tasks that survive failures and stop cleanly, and the
one declaration of a module's name, version and migrations."""

from __future__ import annotations

import asyncio
from importlib.metadata import entry_points, version
from pathlib import Path

import asyncpg
import pytest
from structlog.testing import capture_logs

from lodestar.common.errors import ConfigurationError
from lodestar.common.lifecycle import BackgroundTasks
from lodestar.common.module import ModuleInfo
from lodestar_core.service import MIGRATIONS as CORE_MIGRATIONS
from lodestar_core.service import SPEC as CORE_SPEC
from lodestar_core.service import CoreModule
from lodestar_usage.service import SPEC as USAGE_SPEC
from lodestar_usage.service import UsageModule

WAIT = 10.0  # a deadline for something that happens at once, not a speed requirement


class Flaky:
    """A job that raises on every call but the ones listed, and counts its calls."""

    def __init__(self, error: Exception, succeed_on: frozenset[int] = frozenset()) -> None:
        self.calls = 0
        self.error = error
        self.succeed_on = succeed_on
        self.reached: dict[int, asyncio.Event] = {}

    def when(self, calls: int) -> asyncio.Event:
        return self.reached.setdefault(calls, asyncio.Event())

    async def __call__(self) -> None:
        self.calls += 1
        if self.calls in self.reached:
            self.reached[self.calls].set()
        if self.calls not in self.succeed_on:
            raise self.error


@pytest.mark.parametrize(
    ("error", "level", "message"),
    [
        (asyncpg.PostgresConnectionError("db went away"), "warning", "background job failed"),
        (KeyError("a bug"), "error", "background job crashed"),
    ],
)
async def test_a_job_that_raises_is_logged_by_name_and_called_again(
    error: Exception, level: str, message: str
) -> None:
    tasks = BackgroundTasks()
    job = Flaky(error)
    with capture_logs() as logs:
        tasks.every(0.001, job, name="expire_leases")
        await asyncio.wait_for(job.when(3).wait(), WAIT)
        await tasks.stop()
    failures = [entry for entry in logs if entry["event"] == message]
    assert len(failures) >= 2
    assert {entry["job"] for entry in failures} == {"expire_leases"}
    assert {entry["log_level"] for entry in failures} == {level}
    assert tasks.last_error.startswith("expire_leases: ")
    assert str(error) in tasks.last_error


async def test_a_job_recovers_after_failures() -> None:
    tasks = BackgroundTasks()
    job = Flaky(OSError("refused"), succeed_on=frozenset({3, 4}))
    tasks.every(0.001, job)
    await asyncio.wait_for(job.when(5).wait(), WAIT)
    await tasks.stop()
    assert job.calls >= 5
    assert tasks.last_error == "job: refused"


async def test_the_job_name_defaults_to_the_function_name() -> None:
    tasks = BackgroundTasks()
    called = asyncio.Event()

    async def maintain_partitions() -> None:
        called.set()
        raise RuntimeError("no space")

    tasks.every(60.0, maintain_partitions)
    await asyncio.wait_for(called.wait(), WAIT)
    await asyncio.sleep(0)  # let the loop record the failure
    await tasks.stop()
    assert tasks.last_error == "maintain_partitions: no space"


async def test_stop_cancels_periodic_jobs_and_ends_long_running_tasks() -> None:
    tasks = BackgroundTasks()
    polite_stop = asyncio.Event()
    polite_ended, stubborn_cancelled = asyncio.Event(), asyncio.Event()
    slow = asyncio.Event()

    async def polite() -> None:
        await polite_stop.wait()
        polite_ended.set()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()  # never asked to stop, never ends by itself
        except asyncio.CancelledError:
            stubborn_cancelled.set()
            raise

    async def periodic() -> None:
        slow.set()
        await asyncio.Event().wait()

    tasks.every(1.0, periodic, name="periodic")
    tasks.keep_running("polite", polite(), polite_stop.set)
    tasks.keep_running("stubborn", stubborn(), lambda: None)
    await asyncio.wait_for(slow.wait(), WAIT)
    await tasks.stop(wait_seconds=0.05)
    assert polite_ended.is_set(), "asked to stop, it ended by itself"
    assert stubborn_cancelled.is_set(), "still running after the wait, it was cancelled"
    remaining = [t for t in asyncio.all_tasks() if t.get_name() in {"periodic", "polite"}]
    assert remaining == []
    await tasks.stop()  # a second stop has nothing left to do


async def test_a_long_running_task_that_crashes_is_kept_as_last_error() -> None:
    tasks = BackgroundTasks()

    async def subscriber() -> None:
        raise ValueError("refused by core")

    with capture_logs() as logs:
        tasks.keep_running("subscriber", subscriber())
        async with asyncio.timeout(WAIT):
            while not tasks.last_error:
                await asyncio.sleep(0)
        await tasks.stop()
    assert tasks.last_error == "subscriber: refused by core"
    assert [e["job"] for e in logs if e["event"] == "background job crashed"] == ["subscriber"]


def test_name_version_and_migrations_come_from_the_one_declaration() -> None:
    assert CoreModule.info == ModuleInfo(name="core", migrations=CORE_MIGRATIONS)
    assert (CoreModule.name, CoreModule.migrations) == ("core", CORE_MIGRATIONS)
    assert CORE_SPEC.name == "core"
    assert CORE_SPEC.migrations == CORE_MIGRATIONS
    assert CORE_SPEC.info.version == version("lodestar-core")
    assert USAGE_SPEC.name == UsageModule.name == "usage-tracker"
    assert USAGE_SPEC.info.version == version("lodestar-usage-tracker")
    assert USAGE_SPEC.migrations is not None
    assert (USAGE_SPEC.migrations / "0001_init.sql").is_file()


def test_a_version_of_a_distribution_not_installed_names_it() -> None:
    info = ModuleInfo(name="nowhere", migrations=Path("missing"))
    with pytest.raises(ConfigurationError, match="'lodestar-nowhere' is not installed"):
        _ = info.version
    assert ModuleInfo(name="x", distribution="lodestar-core").version == version("lodestar-core")


def test_every_entry_point_is_named_after_its_module() -> None:
    """`lodestar up` keys tokens, logs and ports by the entry point's name: it must be the
    module's declared name, or the module would register under a name it has no token for."""
    found = {ep.name: ep.load() for ep in entry_points(group="lodestar.services")}
    assert {"core", "usage-tracker", "learning", "health-monitor"} <= set(found)
    assert {name: spec.name for name, spec in found.items()} == {name: name for name in found}
