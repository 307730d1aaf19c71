"""Start-up time of the ``lodestar`` CLI, measured as fresh processes.

Four commands: ``lodestar --help`` (it lists every installed package's commands, so it imports
each package's ``cli`` module through the ``lodestar.cli`` entry points); ``lodestar budgets list
--help`` (one package's command group); ``lodestar tokens list`` on a local credentials file (a
command that reads a file and prints a table); ``lodestar modules`` against a port nothing listens
on (a gRPC command: its imports, a channel, an UNAVAILABLE answer). Issue #9's targets: ``--help``
≤ 0.3 s, a simple call ≤ 0.5 s (warm cache, median). Each runs BENCH_CLI_RUNS times
(default 10); the median and 90th percentile of the wall-clock time are printed, never asserted,
with the median CPU time (user + system) of the process, which other load on the machine
disturbs less. Twice: with a warm bytecode cache (what a user sees from the second run on) and
with none (the first run after an install, or a machine with PYTHONDONTWRITEBYTECODE set).

Run on its own with ``python -m bench.cli_bench``.
"""

from __future__ import annotations

import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

RUNS = int(os.environ.get("BENCH_CLI_RUNS", "10"))


def lodestar_command() -> list[str]:
    """The installed ``lodestar`` script beside this interpreter, else ``python -m``."""
    script = Path(sys.executable).parent / "lodestar"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "lodestar.common.cli"]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_sample_credentials(path: Path) -> None:
    """A credentials file with one principal per role, for ``lodestar tokens list``."""
    from lodestar.common.auth import Role, new_token, write_credentials

    write_credentials(path, {role.value: (role, new_token()) for role in Role})


def bytecode_env(pycache: Path, *, warm: bool) -> dict[str, str]:
    """The environment for the timed runs: a private bytecode cache, written to or not."""
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(pycache), COLUMNS="120")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if not warm:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def child_cpu_seconds() -> float:
    """User + system CPU seconds of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_runs(argv: list[str], env: dict[str, str], runs: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU seconds of ``runs`` fresh processes running ``argv`` (output dropped)."""
    wall, cpu = [], []
    for _ in range(runs):
        cpu_before, started = child_cpu_seconds(), time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall.append(time.perf_counter() - started)
        cpu.append(child_cpu_seconds() - cpu_before)
    return wall, cpu


def summary(wall: list[float], cpu: list[float]) -> str:
    """``median / p90`` wall-clock seconds and the median CPU seconds."""
    ordered = sorted(wall)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"{statistics.median(ordered):.3f} / {p90:.3f}   {statistics.median(cpu):.3f}"


def run_cli_benchmarks(emit: Callable[[str], None], runs: int = RUNS) -> None:
    """Time the four commands, warm cache then cold, and emit one line per measurement."""
    lodestar = lodestar_command()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        credentials = root / "credentials.yaml"
        write_sample_credentials(credentials)
        commands = {
            "lodestar --help": ["--help"],
            "lodestar budgets list --help (an entry point's group)": ["budgets", "list", "--help"],
            "lodestar tokens list (local file)": [
                "tokens",
                "list",
                "--credentials-file",
                str(credentials),
            ],
            "lodestar modules (nothing listening)": [
                "modules",
                "--target",
                f"127.0.0.1:{closed_port()}",
                "--token",
                "bench",
                "--state-dir",
                str(root),
            ],
        }
        emit(f"CLI start-up, {runs} fresh processes each: median / p90 wall (s), median CPU (s)")
        for warm in (True, False):
            env = bytecode_env(root / ("pyc-warm" if warm else "pyc-none"), warm=warm)
            cache = "warm bytecode cache" if warm else "no bytecode cache"
            for label, args in commands.items():
                argv = [*lodestar, *args]
                if warm:
                    time_runs(argv, env, 1)  # fills the cache
                emit(f"  {label + ', ' + cache:<70} {summary(*time_runs(argv, env, runs))}")


if __name__ == "__main__":
    run_cli_benchmarks(lambda text: print(text, flush=True))
