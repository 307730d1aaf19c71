"""Another service calling Lodestar: an order service that budgets, does its work, reports usage.

For each ``POST /orders`` (JSON ``{"project": "shop", "user": "ann", "items": ["tea", "cups"]}``):

1. it asks the usage-tracker to reserve the worst case against every budget that applies
   (``AsyncBudgetClient.reserve``); a budget that refuses answers the order with HTTP 429;
2. it does its work: here a pretend LLM call whose tokens grow with the number of items;
3. it commits what the work actually cost (``AsyncBudgetClient.commit``);
4. it publishes a ``RequestCompleted`` to core with the SDK's ``Publisher``, so that the ledger
   counts the usage (and settles the reservation: the event names it).

Run it against `make run` (examples/README.md) with the publisher token, then POST an order:

    LODESTAR_TOKEN=<publisher token> .venv/bin/python examples/order_service.py --port 8080
    curl -s -d '{"project": "shop", "items": ["tea"]}' http://127.0.0.1:8080/orders
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

from google.protobuf import duration_pb2

from lodestar.common.errors import InvalidArgumentError, LodestarError, NetworkError
from lodestar.common.sdk import AsyncBudgetClient, ClientOptions, Publisher
from lodestar.usage.v1 import events_pb2, usage_pb2

MODEL, PROVIDER = "pretend-llm", "example"
#: Micro-dollars per token: $3 per million input tokens, $15 per million output tokens.
INPUT_PRICE, OUTPUT_PRICE = 3, 15
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 503: "Busy"}


class OrderService:
    """Places orders: reserve, work, commit, publish."""

    def __init__(self, budgets: AsyncBudgetClient, publisher: Publisher) -> None:
        self.budgets = budgets
        self.publisher = publisher

    async def place(self, order: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """The HTTP status and JSON answer for one order."""
        project, user = str(order.get("project", "")), str(order.get("user", ""))
        items = [str(item) for item in order.get("items", [])]
        if not items:
            return 400, {"error": "items: at least one"}
        reserved = await self.budgets.reserve(
            usage_pb2.ReserveRequest(
                project=project,
                user=user,
                model=MODEL,
                estimated_cost_micros=2 * _cost(*_tokens(items)),  # the worst case
                estimated_tokens=2 * sum(_tokens(items)),
            )
        )
        if not reserved.granted:
            return 429, {"error": reserved.denial.reason, "budget": reserved.denial.budget_name}

        started = time.monotonic()
        input_tokens, output_tokens = await _pretend_llm_call(items)
        cost = _cost(input_tokens, output_tokens)

        await self.budgets.commit(
            usage_pb2.CommitRequest(
                reservation_id=reserved.reservation_id,
                actual_cost_micros=cost,
                actual_tokens=input_tokens + output_tokens,
            )
        )
        duration = duration_pb2.Duration()
        duration.FromMilliseconds(round((time.monotonic() - started) * 1000))
        receipt = await self.publisher.publish(
            events_pb2.RequestCompleted(
                model=MODEL,
                provider=PROVIDER,
                project=project,
                user=user,
                status=events_pb2.REQUEST_STATUS_OK,
                duration=duration,
                tokens=events_pb2.TokenUsage(input=input_tokens, output=output_tokens),
                reported_cost=events_pb2.Money(currency="USD", micros=cost),
                reservation_id=reserved.reservation_id,
            )
        )
        return 200, {"items": len(items), "cost_micros": cost, "event_id": receipt.event_id}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One HTTP/1.1 exchange: ``POST /orders`` with a JSON body, a JSON answer."""
        method, path, headers = await _read_head(reader)
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if (method, path) != ("POST", "/orders"):
            status, answer = 404, {"error": "POST /orders"}
        else:
            try:
                status, answer = await self.place(json.loads(body or b"{}"))
            except InvalidArgumentError as refused:  # the tracker names the field
                status, answer = 400, {"error": refused.message}
            except NetworkError as unreachable:  # retried already; Lodestar is down or slow
                status, answer = 503, {"error": unreachable.message}
        payload = json.dumps(answer).encode()
        writer.write(
            f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        writer.close()


async def _pretend_llm_call(items: list[str]) -> tuple[int, int]:
    """The service's own work; a real one would call a model here."""
    await asyncio.sleep(0.01)
    return _tokens(items)


def _tokens(items: list[str]) -> tuple[int, int]:
    return 50 * len(items), 20 * len(items)


def _cost(input_tokens: int, output_tokens: int) -> int:
    return input_tokens * INPUT_PRICE + output_tokens * OUTPUT_PRICE


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    method, path, _ = (await reader.readline()).decode().split(" ", 2)
    headers = {}
    while (line := (await reader.readline()).decode().strip()) != "":
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, path, headers


async def serve(args: argparse.Namespace) -> None:
    """Serve orders until interrupted; the publisher flushes what it holds on the way out."""
    core = ClientOptions(args.target, args.token)
    tracker = ClientOptions(args.usage_target, args.token, timeout_seconds=2)
    async with (
        AsyncBudgetClient(tracker) as budgets,
        core.async_channel() as channel,
        Publisher(channel, source="example://order-service") as publisher,
    ):
        service = OrderService(budgets, publisher)
        server = await asyncio.start_server(service.handle, "127.0.0.1", args.port)
        port = server.sockets[0].getsockname()[1]
        print(f"order service listening on http://127.0.0.1:{port}/orders", flush=True)
        async with server:
            await server.serve_forever()


def main() -> None:
    """Read the options, then serve."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="0: any free port")
    parser.add_argument("--target", default=env("LODESTAR_CORE_ENDPOINT", "127.0.0.1:50051"))
    parser.add_argument("--usage-target", default=env("LODESTAR_USAGE_ENDPOINT", "127.0.0.1:50061"))
    parser.add_argument("--token", default=env("LODESTAR_TOKEN"))
    try:
        asyncio.run(serve(parser.parse_args()))
    except KeyboardInterrupt:
        pass
    except LodestarError as error:
        raise SystemExit(f"order service: {error.code.name}: {error.message}") from error


if __name__ == "__main__":
    main()
