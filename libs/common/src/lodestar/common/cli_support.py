"""What the ``lodestar`` commands that call a service share."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import typer
from rich.console import Console


def run_rpc(coroutine: Coroutine[Any, Any, Any], console: Console) -> Any:
    """Run ``coroutine``; a gRPC error becomes one red line and exit status 1, Ctrl-C status 130."""
    import asyncio

    import grpc

    try:
        return asyncio.run(coroutine)
    except grpc.aio.AioRpcError as exc:
        console.print(f"[red]{exc.code().name}: {exc.details()}[/red]")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
