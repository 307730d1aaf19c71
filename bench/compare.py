"""``make bench-compare REF=<commit>``: durable publish of this checkout against another commit.

Builds the other commit in a git worktree with its own virtualenv, then publishes the same
events to each core in turn (fresh database each round, rounds interleaved so both see the same
machine) and prints the median throughput, core CPU and Postgres CPU (of core's connections, when
the server runs on this machine) per 100,000 events of each, and their ratios. The client is this
checkout's, so only core differs.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench.core_bench import publish_rate, sample_events
from lodestar.common.auth import Role
from lodestar.common.cli import free_port, wait_until_serving
from lodestar.common.testing import dev_credentials, postgres_server, scratch_database
from lodestar.events.v1 import event_pb2

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
EVENTS = int(os.environ.get("BENCH_EVENTS", "100000"))
WARM_UP_EVENTS = 2000
READY_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Round:
    """One publish run against one checkout's core."""

    events_per_second: float
    core_cpu_per_100k: float
    postgres_cpu_per_100k: float | None


def build_checkout(ref: str, workdir: Path) -> Path:
    """A worktree of ``ref`` with its own virtualenv; returns its folder."""
    tree = workdir / "other"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True
    )
    uv = ROOT / ".tools" / "uv" / "bin" / "uv"
    env = os.environ | {"UV_PROJECT_ENVIRONMENT": str(tree / ".venv")}
    subprocess.run(
        [str(uv), "sync", "--frozen", "--all-packages", "--quiet", "--python", sys.executable],
        cwd=tree,
        env=env,
        check=True,
    )
    return tree


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def backend_pids(dsn: str) -> set[int]:
    """The Postgres server processes serving the other connections to ``dsn``'s database."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return {row["pid"] for row in rows}


def backends_cpu_seconds(pids: set[int]) -> float | None:
    """CPU time of ``pids`` so far; None when they are not processes of this machine."""
    try:
        return sum(map(process_cpu_seconds, pids))
    except (FileNotFoundError, PermissionError):
        return None


async def measure(tree: Path, dsn: str, workdir: Path, events: list[event_pb2.Event]) -> Round:
    """Start ``tree``'s core on ``dsn``, warm it up, then publish ``events`` and time it."""
    tokens = dev_credentials(workdir / "credentials.yaml")
    port = free_port()
    env = os.environ | {
        "LODESTAR_DATABASE__URL": dsn,
        "LODESTAR_CREDENTIALS_FILE": str(workdir / "credentials.yaml"),
        "LODESTAR_LOG_LEVEL": "WARNING",
        "LODESTAR_PORT": str(port),
        "LODESTAR_METRICS_PORT": "-1",
    }
    env.pop("VIRTUAL_ENV", None)
    with (workdir / "core.log").open("ab") as log:
        core = subprocess.Popen(
            [str(tree / ".venv" / "bin" / "python"), "-m", "lodestar_core", "serve"],
            env=env,
            cwd=tree,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        if not await wait_until_serving(port, core, READY_TIMEOUT_SECONDS):
            raise RuntimeError(f"core of {tree} did not start; see {workdir / 'core.log'}")
        target, token = f"127.0.0.1:{port}", tokens[Role.PUBLISHER]
        await publish_rate(target, token, sample_events(WARM_UP_EVENTS))
        pids = await backend_pids(dsn)
        before, postgres_before = process_cpu_seconds(core.pid), backends_cpu_seconds(pids)
        rate = await publish_rate(target, token, events)
        cpu = (process_cpu_seconds(core.pid) - before) / len(events) * 100_000
        postgres_after = backends_cpu_seconds(pids | await backend_pids(dsn))
        postgres = None
        if postgres_before is not None and postgres_after is not None:
            postgres = (postgres_after - postgres_before) / len(events) * 100_000
        return Round(rate, cpu, postgres)
    finally:
        core.terminate()
        core.wait(timeout=30)


def compare(ref: str) -> None:
    """Interleaved rounds against this checkout and ``ref``; prints medians and ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        other = build_checkout(ref, workdir)
        trees = {f"{ref} (before)": other, "this checkout": ROOT}
        rounds: dict[str, list[Round]] = {name: [] for name in trees}
        try:
            with postgres_server(workdir) as admin_dsn:
                for number in range(ROUNDS):
                    events = sample_events(EVENTS)  # minted now, inside the id window
                    for name, tree in trees.items():
                        with scratch_database(admin_dsn) as dsn:
                            result = asyncio.run(measure(tree, dsn, workdir, events))
                        rounds[name].append(result)
                        print(
                            f"  round {number + 1} {name:<24} {result.events_per_second:>9,.0f} "
                            f"events/s, core CPU {result.core_cpu_per_100k:.2f} s per 100k, "
                            f"Postgres {_seconds(result.postgres_cpu_per_100k)}",
                            flush=True,
                        )
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False
            )
        report(rounds)


def report(rounds: dict[str, list[Round]]) -> None:
    """Median of each side and the ratio this checkout / the other."""
    (before_name, before), (after_name, after) = rounds.items()
    rate_before = statistics.median(r.events_per_second for r in before)
    rate_after = statistics.median(r.events_per_second for r in after)
    cpu_before = statistics.median(r.core_cpu_per_100k for r in before)
    cpu_after = statistics.median(r.core_cpu_per_100k for r in after)
    pg_before, pg_after = _median_postgres(before), _median_postgres(after)
    for name, rate, cpu, pg in (
        (before_name, rate_before, cpu_before, pg_before),
        (after_name, rate_after, cpu_after, pg_after),
    ):
        print(
            f"  median {name:<24} {rate:>9,.0f} events/s, CPU {cpu:.2f} s/100k, "
            f"Postgres {_seconds(pg)}"
        )
    postgres = f"{pg_after / pg_before - 1:+.1%}" if pg_before and pg_after is not None else "n/a"
    print(
        f"  throughput {rate_after / rate_before - 1:+.1%}, "
        f"core CPU per event {cpu_after / cpu_before - 1:+.1%}, Postgres CPU per event {postgres}"
    )


def _median_postgres(rounds: list[Round]) -> float | None:
    measured = [r.postgres_cpu_per_100k for r in rounds if r.postgres_cpu_per_100k is not None]
    return statistics.median(measured) if len(measured) == len(rounds) else None


def _seconds(per_100k: float | None) -> str:
    return "n/a" if per_100k is None else f"{per_100k:.2f} s/100k"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.compare <git ref to compare against>")
    compare(sys.argv[1])
