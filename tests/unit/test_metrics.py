"""Prometheus endpoint and shared gRPC metric objects."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client import REGISTRY

from lodestar.common.errors import ConfigurationError
from lodestar.common.metrics import (
    GRPC_HANDLED,
    GRPC_HANDLING_SECONDS,
    GRPC_STARTED,
    start_metrics_server,
)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_disabled_returns_none() -> None:
    assert start_metrics_server("127.0.0.1", -1) is None


def test_free_port_is_served_and_returned() -> None:
    GRPC_HANDLED.labels("test.Metrics", "Scrape", "OK").inc()
    port = start_metrics_server("127.0.0.1", 0)
    assert port is not None
    assert port > 0
    body = scrape(port)
    assert (
        'lodestar_grpc_server_handled_total{grpc_code="OK",grpc_method="Scrape",'
        'grpc_service="test.Metrics"}' in body
    )


def test_port_in_use_is_a_configuration_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            start_metrics_server("127.0.0.1", port)


@pytest.mark.parametrize("port", [-2, 65536])
def test_invalid_port(port: int) -> None:
    with pytest.raises(ConfigurationError, match="is not a port") as info:
        start_metrics_server("127.0.0.1", port)
    assert info.value.field == "metrics_port"


def test_metric_names_and_labels() -> None:
    GRPC_STARTED.labels("test.Names", "M").inc()
    GRPC_HANDLING_SECONDS.labels("test.Names", "M").observe(0.02)
    labels = {"grpc_service": "test.Names", "grpc_method": "M"}
    assert REGISTRY.get_sample_value("lodestar_grpc_server_started_total", labels) == 1
    assert REGISTRY.get_sample_value("lodestar_grpc_server_handling_seconds_count", labels) == 1
    bucket = {**labels, "le": "0.025"}
    assert REGISTRY.get_sample_value("lodestar_grpc_server_handling_seconds_bucket", bucket) == 1
    assert GRPC_HANDLED._labelnames == ("grpc_service", "grpc_method", "grpc_code")
