"""Client SDK: channels, typed clients of every service, publishing and consuming events."""

from lodestar.common.sdk.channel import connect, connect_sync
from lodestar.common.sdk.clients import (
    AsyncAuditClient,
    AsyncBudgetClient,
    AsyncEventBusClient,
    AsyncRegistryClient,
    AsyncUsageClient,
    AuditClient,
    BudgetClient,
    ClientClosedError,
    ClientOptions,
    EventBusClient,
    RegistryClient,
    RetryPolicy,
    UsageClient,
)
from lodestar.common.sdk.publisher import Publisher, PublishReceipt
from lodestar.common.sdk.registration import ModuleAgent
from lodestar.common.sdk.subscriber import PermanentFailure, ReceivedEvent, Subscriber

__all__ = [
    "AsyncAuditClient",
    "AsyncBudgetClient",
    "AsyncEventBusClient",
    "AsyncRegistryClient",
    "AsyncUsageClient",
    "AuditClient",
    "BudgetClient",
    "ClientClosedError",
    "ClientOptions",
    "EventBusClient",
    "ModuleAgent",
    "PermanentFailure",
    "PublishReceipt",
    "Publisher",
    "ReceivedEvent",
    "RegistryClient",
    "RetryPolicy",
    "Subscriber",
    "UsageClient",
    "connect",
    "connect_sync",
]
