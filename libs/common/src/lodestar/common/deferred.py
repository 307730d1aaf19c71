"""Servicers whose implementation arrives after the server is built."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

from lodestar.common.errors import StorageError


class DeferredServicer:
    """A servicer that forwards each call to ``target`` once it is set.

    Handlers are bound when the server is built, before the database is reachable; until then
    every call fails with UNAVAILABLE (a StorageError) so that clients retry.
    """

    def __init__(self, service: ServiceDescriptor, owner: str) -> None:
        self.target: object | None = None
        self._service = service
        self._owner = owner

    def _require(self) -> Any:
        if self.target is None:
            raise StorageError(
                f"{self._owner} is starting and its database is not ready yet; retry"
            )
        return self.target

    def __getattr__(self, method: str) -> Callable[..., object]:
        if self._service.methods_by_name[method].server_streaming:

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                async for response in getattr(self._require(), method)(request, context):
                    yield response

            return stream

        async def unary(request: Any, context: Any) -> Any:
            return await getattr(self._require(), method)(request, context)

        return unary
