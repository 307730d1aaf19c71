"""Starting Lodestar services as real processes for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lodestar.common.cli import free_port


@contextmanager
def service_process(
    package: str, env: dict[str, str], log: Path, port: int | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``python -m <package> serve`` on a free port; SIGKILLed afterwards if still running."""
    port = port or free_port()
    process = start_service(package, env, log, port)
    try:
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def start_service(
    package: str, env: dict[str, str], log: Path, port: int
) -> subprocess.Popen[bytes]:
    """Start a service process writing its log to ``log``."""
    full_env = os.environ | env | {"LODESTAR_PORT": str(port), "LODESTAR_METRICS_PORT": "-1"}
    return subprocess.Popen(
        [sys.executable, "-m", package, "serve"],
        env=full_env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def kill9(process: subprocess.Popen[bytes]) -> None:
    """Kill without any chance to clean up."""
    process.send_signal(signal.SIGKILL)
    process.wait()
