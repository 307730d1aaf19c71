"""The LiteLLM proxy's Lodestar callback, named in config.yaml as ``lodestar_callbacks.lodestar``.

Configured from the environment:

* ``LODESTAR_CORE_ENDPOINT``, ``LODESTAR_USAGE_ENDPOINT``: core and the usage-tracker (host:port);
* ``LODESTAR_TOKEN``: a publisher token (publishes usage, asks for budget admission);
* ``LODESTAR_SPOOL_DIR``: where usage events wait while core is unreachable (``lodestar-spool``);
* ``LODESTAR_FAIL_OPEN``: ``1`` lets calls through unbudgeted when admission cannot answer; by
  default such calls are refused;
* ``LODESTAR_COLLECT_PROJECTS``: comma-separated projects whose prompts and answers are published
  for the learning service (``*``: all; none by default).

Clients name their project, user and session in the request body:
``"metadata": {"lodestar": {"project": "web", "session_id": "s-1"}}``.
"""

from __future__ import annotations

import os
from pathlib import Path

from lodestar.common.sdk import Publisher, connect
from lodestar_usage.client import BudgetGate, GatePolicy
from lodestar_usage.litellm_callback import LodestarLogger


def from_environment() -> LodestarLogger:
    """A LodestarLogger publishing to core and admitting through the usage-tracker."""
    token = os.environ["LODESTAR_TOKEN"]
    publisher = Publisher(
        connect(os.environ["LODESTAR_CORE_ENDPOINT"], token),
        source="litellm://proxy",
        spool_dir=Path(os.environ.get("LODESTAR_SPOOL_DIR", "lodestar-spool")),
        linger_seconds=0.05,  # one Publish per 50 ms of calls: less of the proxy's CPU
    )
    gate = BudgetGate(
        connect(os.environ["LODESTAR_USAGE_ENDPOINT"], token),
        GatePolicy(fail_open=os.environ.get("LODESTAR_FAIL_OPEN") == "1"),
    )
    projects = os.environ.get("LODESTAR_COLLECT_PROJECTS", "")
    return LodestarLogger(
        publisher, gate, collect_projects=[p.strip() for p in projects.split(",") if p.strip()]
    )


lodestar = from_environment()
