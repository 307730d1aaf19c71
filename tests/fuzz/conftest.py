"""The fuzz suite's servers: every installed service, started once for the module."""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator

import pytest

from tests.fuzz.harness import Suite, server_errors_logged

#: Calls of every suite run in this session, by RPC and status code (for the summary).
CALLS: Counter[tuple[str, str]] = Counter()


@pytest.fixture(scope="module")
def suite(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    """Core and every other installed service, each in a schema of its own, serving."""
    running = Suite(database_url, tmp_path_factory.mktemp("fuzz"), f"fz_{uuid.uuid4().hex[:8]}")
    with server_errors_logged(running.errors):
        running.start()
        try:
            yield running
        finally:
            CALLS.update(running.calls)
            running.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many calls each RPC got and how they ended."""
    if not CALLS:
        return
    by_rpc: dict[str, dict[str, int]] = defaultdict(dict)
    for (rpc, code), count in sorted(CALLS.items()):
        by_rpc[rpc][code] = count
    terminalreporter.section(f"fuzz: {sum(CALLS.values())} calls")
    for rpc, codes in by_rpc.items():
        counts = ", ".join(f"{code} {n}" for code, n in sorted(codes.items(), key=lambda i: -i[1]))
        terminalreporter.write_line(f"{rpc}: {counts}")
