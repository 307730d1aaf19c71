"""lodestar up's supervisor: restart with doubling delays, give up on a service that keeps
failing (never on core), forget failures older than the window."""

from __future__ import annotations

import subprocess
from pathlib import Path

from lodestar.common.supervisor import RestartPolicy, Supervisor


class FakeProcess:
    """A process whose exit the test decides."""

    count = 0

    def __init__(self) -> None:
        FakeProcess.count += 1
        self.pid = 1000 + FakeProcess.count
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code


def supervisor(policy: RestartPolicy) -> tuple[Supervisor, list[str], list[tuple[str, str]]]:
    started: list[str] = []
    given_up: list[tuple[str, str]] = []

    def start(name: str) -> subprocess.Popen[bytes]:
        started.append(name)
        return FakeProcess()  # type: ignore[return-value]

    sup = Supervisor(
        policy,
        start,
        lambda name, reason: given_up.append((name, reason)),
        lambda _text: None,
        essential=frozenset({"core"}),
    )
    return sup, started, given_up


POLICY = RestartPolicy(
    first_delay_seconds=1, max_delay_seconds=4, max_failures=3, window_seconds=60
)


def exits(sup: Supervisor, name: str) -> None:
    sup.services[name].process.code = 1  # type: ignore[attr-defined]


def test_an_exited_service_is_restarted_after_a_doubling_delay_then_given_up_on():
    sup, started, given_up = supervisor(POLICY)
    sup.watch("learning", FakeProcess(), Path("learning.log"))  # type: ignore[arg-type]
    exits(sup, "learning")
    sup.tick(10.0)  # first failure: restart in 1 s
    sup.tick(10.99)
    assert started == []
    sup.tick(11.0)
    assert started == ["learning"]
    exits(sup, "learning")
    sup.tick(12.0)  # second failure: restart in 2 s
    sup.tick(13.99)
    assert started == ["learning"]
    sup.tick(14.0)
    assert started == ["learning", "learning"]
    exits(sup, "learning")
    sup.tick(15.0)  # third failure within the window: given up
    assert [name for name, _ in given_up] == ["learning"]
    assert "exited with 1 3 time(s) in 60 s" in given_up[0][1]
    sup.tick(100.0)
    assert started == ["learning", "learning"]  # stays stopped


def test_core_is_never_given_up_on_and_waits_at_most_the_longest_delay():
    sup, started, given_up = supervisor(POLICY)
    sup.watch("core", FakeProcess(), Path("core.log"))  # type: ignore[arg-type]
    now = 0.0
    for _ in range(6):
        sup.services["core"].process.code = 1  # type: ignore[attr-defined]
        sup.tick(now)
        restart_at = sup.services["core"].restart_at
        assert restart_at is not None
        assert restart_at - now <= POLICY.max_delay_seconds
        now = restart_at
        sup.tick(now)
    assert given_up == []
    assert len(started) == 6


def test_failures_older_than_the_window_are_forgotten():
    sup, _started, given_up = supervisor(POLICY)
    sup.watch("learning", FakeProcess(), Path("learning.log"))  # type: ignore[arg-type]
    now = 0.0
    for _ in range(5):  # one failure a minute and a half: never three within the window
        sup.services["learning"].process.code = 1  # type: ignore[attr-defined]
        sup.tick(now)
        now += 90
        sup.tick(now)
    assert given_up == []
