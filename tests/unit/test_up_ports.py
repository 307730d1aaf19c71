"""`lodestar up` port choice: a port in TIME_WAIT is free, a listened-on port is replaced."""

from __future__ import annotations

import socket

import pytest

from lodestar.common.cli import _assign_ports, port_free


def _close_from_server_side(listener: socket.socket) -> None:
    """Leave a connection of ``listener``'s port in TIME_WAIT, as a stopped server does."""
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    accepted.close()  # the side that closes first keeps the TIME_WAIT
    client.close()


def test_a_port_whose_server_just_stopped_is_free():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    _close_from_server_side(listener)
    listener.close()
    plain = socket.socket()
    with pytest.raises(OSError, match="in use"):  # the old check bound like this: refused
        plain.bind(("127.0.0.1", port))
    plain.close()
    assert port_free(port)


def test_a_taken_default_port_is_replaced_and_said(capsys: pytest.CaptureFixture[str]):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        base = taken.getsockname()[1]
        assert not port_free(base)
        ports = _assign_ports(["core"], base)
    grpc_port, _metrics = ports["core"]
    assert grpc_port != base
    assert f"port {base} (core gRPC) is taken; using {grpc_port}" in capsys.readouterr().out
