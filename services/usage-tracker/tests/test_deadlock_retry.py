"""One retry rule for deadlocks: the attempt is decided again, at most DEADLOCK_ATTEMPTS times."""

from __future__ import annotations

import pytest
from asyncpg.exceptions import DeadlockDetectedError

from lodestar_usage.counters import DEADLOCK_ATTEMPTS, again_after_deadlock


async def test_a_deadlocked_attempt_is_made_again() -> None:
    attempts = []

    @again_after_deadlock
    async def clashes_twice() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise DeadlockDetectedError("deadlock detected")
        return "decided"

    assert await clashes_twice() == "decided"
    assert len(attempts) == 3


async def test_the_last_deadlock_and_any_other_error_reach_the_caller() -> None:
    attempts = []

    @again_after_deadlock
    async def always(error: Exception) -> None:
        attempts.append(1)
        raise error

    with pytest.raises(DeadlockDetectedError):
        await always(DeadlockDetectedError("deadlock detected"))
    assert len(attempts) == DEADLOCK_ATTEMPTS
    with pytest.raises(ValueError, match="not a deadlock"):
        await always(ValueError("not a deadlock"))
    assert len(attempts) == DEADLOCK_ATTEMPTS + 1
