"""The floor under admission's latency: a bare ``AdmitStream`` with one Postgres round trip each.

Run as ``python -m bench.admission_floor PORT DSN``: a grpc.aio server of ``BudgetService``
whose ``AdmitStream`` answers every request after one query on one asyncpg connection, one query
at a time (as the tracker runs its rounds), granting every Reserve. No interceptors, credentials,
validation, ledger or admission rule: what Python's gRPC and asyncpg cost on this machine, so the
benchmark can give the tracker's figures as a ratio to it, measured in the same run.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc

from lodestar.usage.v1 import usage_pb2 as u
from lodestar.usage.v1 import usage_pb2_grpc as ug

#: The query each request waits for: one round trip, next to no work in Postgres.
ROUND_TRIP = "SELECT $1::bigint"


class FloorBudgetService(ug.BudgetServiceServicer):
    """``AdmitStream`` answered after one database round trip per request; every Reserve granted."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._one_at_a_time = asyncio.Lock()

    async def AdmitStream(
        self,
        request_iterator: AsyncIterator[u.AdmitStreamRequest],
        context: grpc.aio.ServicerContext[u.AdmitStreamRequest, u.AdmitStreamResponse],
    ) -> None:
        """Answer each request, in the order its round trip completes, on one writer task."""
        answers: asyncio.Queue[u.AdmitStreamResponse | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def answer(request: u.AdmitStreamRequest) -> None:
            async with self._one_at_a_time:
                await self._conn.fetchval(ROUND_TRIP, request.request_id)
            answers.put_nowait(
                u.AdmitStreamResponse(
                    request_id=request.request_id,
                    results=[_granted(call) for call in request.calls],
                )
            )

        async def write() -> None:
            while (response := await answers.get()) is not None:
                await context.write(response)

        writer = asyncio.create_task(write())
        async for request in request_iterator:
            task = asyncio.create_task(answer(request))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        answers.put_nowait(None)
        await writer


def _granted(call: u.AdmissionCall) -> u.AdmissionResult:
    if call.HasField("reserve"):
        return u.AdmissionResult(
            reserve=u.ReserveResponse(granted=True, reservation_id=str(uuid.uuid4()))
        )
    return u.AdmissionResult(commit=u.CommitResponse())


async def serve(port: int, dsn: str) -> None:
    """Serve the floor on 127.0.0.1:``port`` until terminated; prints ``ready`` once serving."""
    conn = await asyncpg.connect(dsn)
    server = grpc.aio.server()
    ug.add_BudgetServiceServicer_to_server(FloorBudgetService(conn), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2]))
