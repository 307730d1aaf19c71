"""Fixtures for the chart tests (helpers in helm_chart.py).

Run: .venv/bin/pytest deploy/helm/tests
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helm_chart import SCENARIOS, render


@pytest.fixture(params=SCENARIOS, ids=lambda p: p.name.removesuffix("-values.yaml"))
def scenario(request: pytest.FixtureRequest) -> Path:
    return request.param


@pytest.fixture
def rendered(scenario: Path) -> list[dict[str, Any]]:
    return render(files=(scenario,))
