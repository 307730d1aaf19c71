"""Prometheus metrics: the HTTP endpoint and the metric objects every gRPC server shares.

Label values must come from a bounded set (service and method names, status codes), never from
ids, so that the number of time series stays fixed.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

from lodestar.common.errors import ConfigurationError

METRICS_DISABLED = -1

GRPC_STARTED = Counter(
    "lodestar_grpc_server_started_total",
    "gRPC calls started on the server.",
    ["grpc_service", "grpc_method"],
)
GRPC_HANDLED = Counter(
    "lodestar_grpc_server_handled_total",
    "gRPC calls finished on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_HANDLING_SECONDS = Histogram(
    "lodestar_grpc_server_handling_seconds",
    "Time from the start of a gRPC call on the server to its end.",
    ["grpc_service", "grpc_method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


def start_metrics_server(host: str, port: int) -> int | None:
    """Serve the default registry on ``host:port``; return the bound port (None if disabled).

    ``port`` -1 disables the endpoint and 0 picks a free port.
    """
    if port == METRICS_DISABLED:
        return None
    if not 0 <= port <= 65535:
        raise ConfigurationError(
            f"{port} is not a port; use 0..65535, or -1 to disable metrics", field="metrics_port"
        )
    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); "
            "choose a free port, 0 for any free port, or -1 to disable metrics",
            field="metrics_port",
        ) from exc
    return int(server.server_port)
