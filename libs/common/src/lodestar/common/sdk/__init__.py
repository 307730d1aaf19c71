"""Typed async client SDK: connect to core, publish events, consume subscriptions."""

from lodestar.common.sdk.channel import connect
from lodestar.common.sdk.publisher import Publisher, PublishReceipt
from lodestar.common.sdk.registration import ModuleAgent
from lodestar.common.sdk.subscriber import PermanentFailure, ReceivedEvent, Subscriber

__all__ = [
    "ModuleAgent",
    "PermanentFailure",
    "PublishReceipt",
    "Publisher",
    "ReceivedEvent",
    "Subscriber",
    "connect",
]
