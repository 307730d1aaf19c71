"""Who may act as whom: principals bound to module names, event types bound to their owners.

A module principal registers, heartbeats and subscribes only under its own name; an admin may act
for anyone. A module's own event types (``EVENT_OWNERS``) may be published only by that module's
principal, producer events only by publishers, and a ``lodestar://<module>`` source only by that
module. Every stored event carries the principal that published it (``authid``/``authtype``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from operator import itemgetter

from lodestar.common.auth import Principal, Role
from lodestar.common.errors import PermissionDeniedError
from lodestar.common.events import EVENT_OWNERS, MODULE_SOURCE_PREFIX
from lodestar.core.v1 import bus_pb2
from lodestar.events.v1 import event_pb2
from lodestar_core.validation import ValidEvent

#: The URI scheme of Lodestar's own sources.
RESERVED_SCHEME = "lodestar:"
#: CloudEvents authcontext ``authtype`` of each role.
AUTHTYPE = {Role.ADMIN: "user", Role.MODULE: "service_account", Role.PUBLISHER: "api_key"}


def require_module_identity(principal: Principal, module: str, field: str) -> None:
    """Refuse a module principal acting under another module's name."""
    if principal.role is Role.ADMIN or principal.name == module:
        return
    raise PermissionDeniedError(
        f"{principal.name} ({principal.role.value}) may act only as module "
        f"{principal.name!r}, not {module[:64]!r}; use that module's credential or an admin one",
        field=field,
    )


def publish_refusals(principal: Principal, events: Sequence[ValidEvent]) -> list[bus_pb2.Rejection]:
    """The events of a batch that ``principal`` may not publish, each with the reason."""
    if principal.role is Role.ADMIN:
        return []
    denied_types = {t for t in set(map(itemgetter(1), events)) if _type_refusal(principal, t)}
    denied_sources = {s for s in set(map(itemgetter(2), events)) if _source_refusal(principal, s)}
    if not denied_types and not denied_sources:
        return []  # the usual batch, settled by its distinct types and sources
    suspects = [
        index
        for index, event in enumerate(events)
        if event.type in denied_types or event.source in denied_sources
    ]
    refusals = []
    for index in suspects:
        event = events[index]
        reason = _type_refusal(principal, event.type) or _source_refusal(principal, event.source)
        if reason:
            refusals.append(
                bus_pb2.Rejection(
                    index=index, event_id=event.id, reason=f"events[{index}].{reason}"
                )
            )
    return refusals


def _type_refusal(principal: Principal, event_type: str) -> str | None:
    owner = EVENT_OWNERS.get(event_type)
    if owner is not None and not (principal.role is Role.MODULE and principal.name == owner):
        return (
            f"type: {event_type} is emitted by module {owner!r} only; "
            f"{principal.name} ({principal.role.value}) may not publish it"
        )
    if owner is None and principal.role is not Role.PUBLISHER:
        return (
            f"type: {event_type} is a producer event, published with a publisher credential; "
            f"{principal.name} has role {principal.role.value}"
        )
    return None


def _source_refusal(principal: Principal, source: str) -> str | None:
    """Why ``principal`` may not use ``source``, or None when it may.

    The ``lodestar:`` scheme (in any case, as URI schemes are case-insensitive) is reserved,
    ``lodestar://<module>`` for that module alone.
    """
    if source[: len(RESERVED_SCHEME)].lower() != RESERVED_SCHEME:
        return None
    module = source[len(MODULE_SOURCE_PREFIX) :].partition("/")[0]
    if source[: len(MODULE_SOURCE_PREFIX)].lower() == MODULE_SOURCE_PREFIX and (
        module == principal.name
    ):
        return None
    return (
        f"source: the {RESERVED_SCHEME} scheme names Lodestar's modules; {principal.name} may "
        f"only use {MODULE_SOURCE_PREFIX}{principal.name} or a source of its own scheme"
    )


@functools.lru_cache(maxsize=1024)
def stamp(principal: Principal) -> bytes:
    """The serialized attributes that record ``principal`` on an event it published.

    Appended to an event's serialized envelope they replace whatever the publisher put there.
    """
    return event_pb2.Event(
        authid=principal.name, authtype=AUTHTYPE[principal.role]
    ).SerializeToString()
