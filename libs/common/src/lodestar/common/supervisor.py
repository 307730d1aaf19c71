"""What ``lodestar up`` does when a service exits: restart it with backoff, or give up on it.

A service that exits is started again after a delay that doubles with each failure in a row
(``RestartPolicy``). One that fails ``max_failures`` times within ``window_seconds`` is given up
on: it stays stopped and is disabled in core's registry with the reason, while core and the
other services go on. Core itself is never given up on (nothing works without it): it is
restarted for as long as ``lodestar up`` runs, at the longest delay.
"""

from __future__ import annotations

import subprocess
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RestartPolicy:
    """How eagerly a service that exited is started again."""

    first_delay_seconds: float = 1.0
    max_delay_seconds: float = 30.0
    max_failures: int = 5
    window_seconds: float = 300.0


@dataclass
class Supervised:
    """A service process under supervision and its recent failures."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    failures: deque[float] = field(default_factory=deque)
    restart_at: float | None = None
    given_up: bool = False


class Supervisor:
    """Restarts exited services with backoff; gives up on one that keeps failing."""

    def __init__(
        self,
        policy: RestartPolicy,
        start: Callable[[str], subprocess.Popen[bytes]],
        give_up: Callable[[str, str], None],
        say: Callable[[str], None],
        *,
        essential: frozenset[str] = frozenset(),
    ) -> None:
        self.policy = policy
        self._start = start
        self._give_up = give_up
        self._say = say
        self._essential = essential
        self.services: dict[str, Supervised] = {}

    def watch(self, name: str, process: subprocess.Popen[bytes], log: Path) -> None:
        """Supervise ``process``, the running service ``name``."""
        self.services[name] = Supervised(name, process, log)

    def tick(self, now: float) -> None:
        """Notice exits, start what is due; call it every fraction of a second."""
        for service in self.services.values():
            if service.given_up:
                continue
            if service.restart_at is None:
                code = service.process.poll()
                if code is not None:
                    self._exited(service, code, now)
            elif now >= service.restart_at:
                service.restart_at = None
                service.process = self._start(service.name)
                self._say(f"[yellow]{service.name} restarted (pid {service.process.pid})[/yellow]")

    def _exited(self, service: Supervised, code: int, now: float) -> None:
        policy = self.policy
        failures = service.failures
        failures.append(now)
        while failures and failures[0] < now - policy.window_seconds:
            failures.popleft()
        reason = (
            f"exited with {code} {len(failures)} time(s) in {policy.window_seconds:g} s; "
            f"see {service.log}"
        )
        if len(failures) >= policy.max_failures and service.name not in self._essential:
            service.given_up = True
            self._give_up(service.name, f"lodestar up gave up: it {reason}")
            self._say(f"[red]{service.name} {reason}: given up on, disabled in core[/red]")
            return
        delay = min(policy.first_delay_seconds * 2 ** (len(failures) - 1), policy.max_delay_seconds)
        service.restart_at = now + delay
        self._say(f"[red]{service.name} {reason}; restarting in {delay:g} s[/red]")
