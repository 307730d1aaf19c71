"""usage-tracker's Prometheus metrics. Labels are bounded: models (capped), kinds, budgets."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

MAX_MODEL_LABELS = 200
OTHER = "other"

TOKENS = Counter("lodestar_usage_tokens_total", "Tokens recorded in the ledger.", ["model", "kind"])
COST = Counter(
    "lodestar_usage_cost_usd_total", "Cost recorded in the ledger, in US dollars.", ["model"]
)
REQUESTS = Counter("lodestar_usage_requests_total", "Requests recorded.", ["model"])
ERRORS = Counter("lodestar_usage_errors_total", "Failed requests recorded.", ["model"])
UNPRICED = Counter(
    "lodestar_usage_unpriced_requests_total",
    "Requests recorded without a price (no price matched the model on their day; cost 0), by "
    "this process.",
    ["model"],
)
UNPRICED_RECENT = Gauge(
    "lodestar_usage_ledger_unpriced_requests",
    "Ledger rows of the last 30 days still without a price (refreshed every minute).",
)
UNPRICED_MODELS = Gauge(
    "lodestar_usage_ledger_unpriced_models",
    "Models (model and provider) with ledger rows of the last 30 days still without a price "
    "(refreshed every minute).",
)
MODEL_SWITCHES = Counter(
    "lodestar_usage_model_switches_total", "Consecutive requests of a session on another model."
)
SESSION_DURATION = Histogram(
    "lodestar_usage_session_duration_seconds",
    "Duration of sessions that went idle.",
    buckets=(10, 30, 60, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400),
)
#: A budget's id (unique) and its name (for people; not unique).
BUDGET_LABELS = ["budget_id", "budget"]
BUDGET_REMAINING = Gauge(
    "lodestar_usage_budget_remaining_usd",
    "Remaining money of a budget's current window (spend and holds deducted).",
    BUDGET_LABELS,
)
BUDGET_REMAINING_TOKENS = Gauge(
    "lodestar_usage_budget_remaining_tokens",
    "Remaining tokens of a budget's current window (spend and holds deducted).",
    BUDGET_LABELS,
)
BUDGET_USED_RATIO = Gauge(
    "lodestar_usage_budget_used_ratio",
    "Share of a budget's limit spent or held in its current window, the larger of money and "
    "tokens: 1 means used up.",
    BUDGET_LABELS,
)
INGESTED = Counter("lodestar_usage_ingested_events_total", "Events written to the ledger.")
DUPLICATES = Counter(
    "lodestar_usage_duplicate_events_total", "Redelivered events the ledger already had."
)
REJECTED = Counter(
    "lodestar_usage_rejected_events_total", "Events refused as invalid (left to dead-letter)."
)
BATCH_SECONDS = Histogram(
    "lodestar_usage_ingest_batch_seconds",
    "Time to write one ledger batch.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)
ALERTS = Counter("lodestar_usage_alerts_total", "Budget alerts raised.", ["kind"])
RESERVATIONS = Counter("lodestar_usage_reservations_total", "Reserve outcomes.", ["outcome"])
COMMITS = Counter(
    "lodestar_usage_commits_total",
    "Commits answered: committed, repeated (a retry, nothing changed) or after_lease_expiry.",
    ["outcome"],
)
OVER_ESTIMATE = Counter(
    "lodestar_usage_commits_over_estimate_total",
    "Commits whose actual cost or tokens went beyond what was reserved.",
)
ADMISSION_SHED = Counter(
    "lodestar_usage_admission_shed_total",
    "Admission calls (Reserve, Commit, Release) refused with RESOURCE_EXHAUSTED because the "
    "tracker was overloaded: queue_full, deadline (shorter than the expected wait), "
    "expired_in_queue.",
    ["reason"],
)
ADMISSION_ROUNDS = Counter(
    "lodestar_usage_admission_rounds_total",
    "Admission rounds by how they were decided: known (on the rows the process last knew, "
    "written in one call), stale (such a try found the rows changed and wrote nothing), locked "
    "(the rows locked and read first).",
    ["path"],
)
ADMISSION_QUEUED = Gauge(
    "lodestar_usage_admission_queued", "Admission calls waiting for a round in this process."
)
ADMISSION_ROUND_SIZE = Histogram(
    "lodestar_usage_admission_round_calls",
    "Admission calls decided in one round (one transaction).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
ADMISSION_ROUND_SECONDS = Histogram(
    "lodestar_usage_admission_round_seconds",
    "Time of one admission round, from taking the calls to answering them.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)

_models: set[str] = set()
_budget_series: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class BudgetReading:
    """Where one budget (not per session) stands in its current window."""

    budget_id: str
    name: str
    remaining_usd: float | None
    remaining_tokens: int | None
    used_ratio: float


def export_budgets(readings: Iterable[BudgetReading]) -> None:
    """Set the budget gauges to ``readings``; the series of budgets not among them are removed."""
    current = set()
    for reading in readings:
        labels = (reading.budget_id, reading.name)
        current.add(labels)
        _set_or_remove(BUDGET_REMAINING, labels, reading.remaining_usd)
        _set_or_remove(BUDGET_REMAINING_TOKENS, labels, reading.remaining_tokens)
        BUDGET_USED_RATIO.labels(*labels).set(reading.used_ratio)
    for labels in _budget_series - current:
        for gauge in (BUDGET_REMAINING, BUDGET_REMAINING_TOKENS, BUDGET_USED_RATIO):
            _set_or_remove(gauge, labels, None)
    _budget_series.clear()
    _budget_series.update(current)


def _set_or_remove(gauge: Gauge, labels: tuple[str, str], value: float | None) -> None:
    if value is not None:
        gauge.labels(*labels).set(value)
        return
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)


def model_label(model: str) -> str:
    """``model`` while fewer than MAX_MODEL_LABELS are known, then ``other`` for new ones."""
    if model in _models:
        return model
    if len(_models) >= MAX_MODEL_LABELS:
        return OTHER
    _models.add(model)
    return model
