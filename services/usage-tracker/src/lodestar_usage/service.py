"""usage-tracker as a module of the shared runtime: wiring, background upkeep and health."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import asyncpg
import grpc

from lodestar.common import audit
from lodestar.common.auth import Role
from lodestar.common.db import analyze_if_stale
from lodestar.common.deferred import DeferredServicer
from lodestar.common.errors import InvalidArgumentError
from lodestar.common.events import event_type, new_event, uuid7_millis
from lodestar.common.lifecycle import ServiceModule
from lodestar.common.logging import get_logger
from lodestar.common.module import ModuleInfo
from lodestar.common.sdk import PermanentFailure, Publisher, ReceivedEvent, Subscriber
from lodestar.common.service_cli import ServiceSpec
from lodestar.usage.v1 import events_pb2, usage_pb2, usage_pb2_grpc
from lodestar_usage import alerts, budgets, counters, metrics, recost, reservations, retention
from lodestar_usage.api import BudgetApi, UsageApi
from lodestar_usage.ingest import LedgerWriter, ensure_partitions, row_from_event
from lodestar_usage.pricing import PriceTable
from lodestar_usage.settings import UsageSettings

MIGRATIONS = Path(__file__).parent / "migrations"
INFO = ModuleInfo(name="usage-tracker", migrations=MIGRATIONS)
NAME = INFO.name
SOURCE = f"lodestar://{NAME}"
USAGE = "/lodestar.usage.v1.UsageService/"
BUDGET = "/lodestar.usage.v1.BudgetService/"
MODULE = frozenset({Role.MODULE})
ADMISSION = frozenset({Role.PUBLISHER, Role.MODULE})

METHOD_ROLES: Mapping[str, frozenset[Role]] = {
    USAGE + "Summary": MODULE,
    USAGE + "ListRecords": MODULE,
    USAGE + "ExportRecords": MODULE,
    USAGE + "ListSessions": MODULE,
    USAGE + "ListPrices": MODULE,
    USAGE + "ListUnpriced": MODULE,
    BUDGET + "ListBudgets": MODULE,
    BUDGET + "Reserve": ADMISSION,
    BUDGET + "Commit": ADMISSION,
    BUDGET + "Release": ADMISSION,
    BUDGET + "Admit": ADMISSION,
    BUDGET + "AdmitStream": ADMISSION,
    # SetPrice, DeletePrice, ImportPrices, Recost, CreateBudget, UpdateBudget and DeleteBudget
    # are admin only.
    **audit.METHOD_ROLES,  # reading the audit log: admin only
}

log = get_logger(__name__)
#: Tables that grow with every admission call.
ADMISSION_TABLES = ("reservations", "reservation_budgets", "budget_counters")


class UsageModule(ServiceModule[UsageSettings]):
    """The ledger, budgets, admission, alerts and reports."""

    info = INFO

    def __init__(self, settings: UsageSettings) -> None:
        super().__init__(settings)
        self.prices = PriceTable()
        self.writer: LedgerWriter | None = None
        self.subscriber: Subscriber | None = None
        self.publisher: Publisher | None = None
        self._usage = DeferredServicer(usage_pb2.DESCRIPTOR.services_by_name["UsageService"], NAME)
        self._budgets = DeferredServicer(
            usage_pb2.DESCRIPTOR.services_by_name["BudgetService"], NAME
        )
        self._audit = audit.deferred_servicer(NAME)

    def add_to_server(self, server: grpc.aio.Server) -> list[str]:
        """Register the services (they answer UNAVAILABLE until started)."""
        usage_pb2_grpc.add_UsageServiceServicer_to_server(self._usage, server)  # type: ignore[arg-type]
        usage_pb2_grpc.add_BudgetServiceServicer_to_server(self._budgets, server)  # type: ignore[arg-type]
        return [
            "lodestar.usage.v1.UsageService",
            "lodestar.usage.v1.BudgetService",
            audit.add_to_server(self._audit, server),
        ]

    def method_roles(self) -> Mapping[str, frozenset[Role]]:
        """Who may call what."""
        return METHOD_ROLES

    async def wire(self, pool: asyncpg.Pool) -> None:
        """Prepare the ledger, then start ingest, registration and upkeep."""
        now = datetime.now(UTC)
        await ensure_partitions(
            pool,
            now - timedelta(days=1),
            now + timedelta(days=self.settings.retention.partitions_ahead_days),
        )
        self.prices = await PriceTable.load(pool)
        self.pool = pool
        self._usage.target = UsageApi(pool, self.reload_prices, self.settings.limits)
        budget_api = BudgetApi(pool, self.settings)
        self._budgets.target = budget_api
        self._audit.target = audit.AuditService(pool)
        ingest = self.settings.ingest
        self.writer = LedgerWriter(
            pool,
            max_batch=ingest.batch_max_events,
            linger_seconds=ingest.batch_linger_seconds,
            on_counters=budget_api.counters_changed,
        )
        self.writer.start()
        self._start_core_clients()
        tasks = self.tasks
        tasks.every(1.0, self._reservation_upkeep)
        tasks.every(10.0, self._refresh_statistics)
        tasks.every(self.settings.alerts.check_interval_seconds, self.check_alerts)
        tasks.every(5.0, self.reload_prices)
        tasks.every(60.0, self._close_idle_sessions)
        tasks.every(60.0, self._refresh_unpriced_gauges)
        tasks.every(self.settings.retention.check_interval_seconds, self.maintain_partitions)

    def _start_core_clients(self) -> None:
        channel = self.link_to_core([event_type(events_pb2.RequestCompleted())]).channel
        ingest = self.settings.ingest
        self.subscriber = Subscriber(
            channel,
            subscription=NAME,
            module=NAME,
            batch_handler=self.handle_batch,
            event_types=[event_type(events_pb2.RequestCompleted())],
            concurrency=ingest.concurrency,
            max_in_flight=ingest.max_in_flight,
        )
        self.publisher = Publisher(channel, source=SOURCE, spool_dir=self.settings.spool_dir / NAME)
        self.publisher.start()
        self.tasks.keep_running("subscriber", self._run_subscriber(), self.subscriber.stop)

    async def _run_subscriber(self) -> None:
        assert self.subscriber is not None
        assert self.core is not None
        try:
            # core accepts a module's subscription once it knows it
            await self.core.agent.registered.wait()
            await self.subscriber.run()
        except grpc.aio.AioRpcError as exc:
            self.tasks.last_error = f"subscription refused: {exc.code().name}: {exc.details()}"
            log.error("subscription refused", code=exc.code().name, details=exc.details())

    async def handle_batch(
        self, batch: Sequence[ReceivedEvent]
    ) -> dict[int, str | PermanentFailure]:
        """Write delivered RequestCompleted events; returns after their rows are committed.

        Invalid events are refused for good (core dead-letters them at once); the rest are written.
        """
        assert self.writer is not None
        rows = []
        refused: dict[int, str | PermanentFailure] = {}
        prices, pricing = self.prices, self.settings.pricing
        for received in batch:
            payload = cast(events_pb2.RequestCompleted, received.payload)
            try:
                rows.append(row_from_event(received.event, payload, prices, pricing))
            except InvalidArgumentError as exc:
                metrics.REJECTED.inc()
                log.warning(
                    "invalid RequestCompleted refused",
                    event_id=received.event.id,
                    error=exc.details(),
                )
                refused[received.sequence] = PermanentFailure(
                    f"invalid RequestCompleted: {exc.details()}"
                )
        await self.writer.submit(rows)
        return refused

    async def reload_prices(self) -> None:
        """Refresh the in-memory price table."""
        if self.pool is not None:
            self.prices = await PriceTable.load(self.pool)

    async def _reservation_upkeep(self) -> None:
        """Mark holds whose lease ran out as expired; delete reservations past their keep time."""
        assert self.pool is not None
        await reservations.expire_reservations(self.pool)
        keep = timedelta(seconds=self.settings.admission.keep_finished_seconds)
        await reservations.prune_finished(self.pool, keep)

    async def _refresh_statistics(self) -> None:
        """Keep the planner's statistics of the fast-growing admission tables current."""
        assert self.pool is not None
        analyzed = await analyze_if_stale(self.pool, ADMISSION_TABLES)
        if analyzed:
            log.info("statistics refreshed", tables=analyzed)

    async def check_alerts(self) -> int:
        """Record new threshold crossings and publish the unpublished ones; returns new ones."""
        assert self.pool is not None
        now = datetime.now(UTC)
        new = 0
        alert_settings = self.settings.alerts
        readings = []
        async with self.pool.acquire() as conn:
            every = await budgets.all_budgets(conn)
            own = [budget for budget in every if not budget.per_session]
            read = await counters.usages_of(conn, [(b, b.scope_value) for b in own], now)
            usages = {b.id: usage for b, usage in zip(own, read, strict=True)}
            for budget in every:
                usage = usages.get(budget.id)
                if usage is not None:
                    readings.append(budget_reading(budget, usage))
                crossings = await alerts.detect_crossings(
                    conn,
                    budget,
                    now,
                    burn_rate=alert_settings.burn_rate,
                    min_elapsed=alert_settings.burn_rate_min_elapsed,
                    usage=usage,
                )
                new += await alerts.record_crossings(conn, crossings)
        metrics.export_budgets(readings)
        await self.publish_crossings()
        return new

    async def publish_crossings(self) -> None:
        """Publish recorded crossings with their deterministic ids (core drops repeats)."""
        assert self.pool is not None
        if self.publisher is None:
            return
        for rec in await self.pool.fetch(
            "SELECT budget_id, scope_value, window_start, kind, threshold_pct, event_id, payload "
            "FROM budget_crossings WHERE NOT published ORDER BY created_at LIMIT 500"
        ):
            payload = events_pb2.BudgetThresholdCrossed.FromString(rec["payload"])
            event_id: uuid.UUID = rec["event_id"]
            event = new_event(
                payload,
                source=SOURCE,
                subject=payload.budget_id,
                event_id=str(event_id),
                time=datetime.fromtimestamp(uuid7_millis(event_id) / 1000, UTC),  # detected at
            )
            await self.publisher.publish_events([event])
            kind = "burn_rate" if rec["kind"] == events_pb2.ALERT_KIND_BURN_RATE else "threshold"
            metrics.ALERTS.labels(kind).inc()
            await self.pool.execute(
                "UPDATE budget_crossings SET published = true "
                "WHERE budget_id = $1 AND scope_value = $2 "
                "AND window_start = $3 AND kind = $4 AND threshold_pct = $5",
                rec["budget_id"],
                rec["scope_value"],
                rec["window_start"],
                rec["kind"],
                rec["threshold_pct"],
            )

    async def _refresh_unpriced_gauges(self) -> None:
        """Count the ledger's recent unpriced rows and models in their gauges."""
        assert self.pool is not None
        await recost.refresh_gauges(self.pool, datetime.now(UTC))

    async def _close_idle_sessions(self) -> None:
        assert self.pool is not None
        for rec in await self.pool.fetch(
            "UPDATE sessions SET closed = true "
            "WHERE NOT closed AND last_activity_at < now() - $1::interval "
            "RETURNING extract(epoch FROM last_activity_at - started_at)::float8 AS seconds",
            timedelta(seconds=self.settings.session_idle_seconds),
        ):
            metrics.SESSION_DURATION.observe(rec["seconds"])

    async def maintain_partitions(self) -> None:
        """Create the coming days' partitions; archive and drop the expired ones."""
        assert self.pool is not None
        now = datetime.now(UTC)
        ret = self.settings.retention
        await ensure_partitions(self.pool, now, now + timedelta(days=ret.partitions_ahead_days))
        await retention.expire(self.pool, ret.raw_days, ret.archive_dir, now.date())

    async def release(self) -> None:
        """Stop the writer (committing what it holds) and the publisher."""
        if self.writer is not None:
            await self.writer.stop()
        if self.publisher is not None:
            await self.publisher.close()

    def core_problem(self) -> str | None:
        """Why the tracker does not receive events: not subscribed to core (yet)."""
        if self.subscriber is None or not self.subscriber.connected.is_set():
            return self.tasks.last_error or "not connected to core"
        return None


def budget_reading(budget: budgets.BudgetDef, usage: budgets.Usage) -> metrics.BudgetReading:
    """The gauges' view of ``budget`` given its ``usage`` in the current window."""
    money, tokens = budget.limit_micros, budget.limit_tokens
    ratios = [
        usage.used(kind) / limit if limit else 0.0
        for limit, kind in ((money, "micros"), (tokens, "tokens"))
        if limit is not None
    ]
    return metrics.BudgetReading(
        budget_id=str(budget.id),
        name=budget.name,
        remaining_usd=None if money is None else usage.remaining(money, "micros") / 1e6,
        remaining_tokens=None if tokens is None else usage.remaining(tokens, "tokens"),
        used_ratio=max(ratios, default=0.0),
    )


SPEC = ServiceSpec(UsageModule, UsageSettings)

__all__ = ["SPEC", "UsageModule"]
