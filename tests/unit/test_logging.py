"""Structured logging: JSON lines, trace ids, stdlib routing, redaction, idempotence."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest
from opentelemetry.sdk.trace import TracerProvider

from lodestar.common.logging import configure_logging, get_logger, redact_text


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    err = capsys.readouterr().err
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def only_line(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    out = lines(capsys)
    assert len(out) == 1, out
    return out[0]


def test_json_line_has_the_standard_keys(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("core")
    get_logger("lodestar.test").info("started", port=50051)
    line = only_line(capsys)
    assert line["event"] == "started"
    assert line["level"] == "info"
    assert line["service"] == "core"
    assert line["logger"] == "lodestar.test"
    assert line["port"] == 50051
    stamp = datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00"))
    assert stamp.utcoffset() is not None
    assert stamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert "trace_id" not in line


def test_trace_and_span_ids_of_the_active_span(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("core")
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        get_logger("t").info("inside")
        ctx = span.get_span_context()
    line = only_line(capsys)
    assert line["trace_id"] == f"{ctx.trace_id:032x}"
    assert line["span_id"] == f"{ctx.span_id:016x}"


def test_stdlib_logging_goes_through_the_same_formatter(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("usage")
    logging.getLogger("grpc._server").warning("peer %s failed with %s", "p1", "postgres://a:b@h/d")
    line = only_line(capsys)
    assert line["event"] == "peer p1 failed with postgres://a:***@h/d"
    assert line["logger"] == "grpc._server"
    assert line["level"] == "warning"
    assert line["service"] == "usage"


def test_level_filters_both_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("core", level="WARNING")
    get_logger("t").info("hidden")
    logging.getLogger("asyncpg").info("hidden too")
    get_logger("t").warning("shown")
    assert [line["event"] for line in lines(capsys)] == ["shown"]


@pytest.mark.parametrize(
    "key",
    [
        "token",
        "auth_token",
        "password",
        "client_secret",
        "Authorization",
        "api_key",
        "credentials",
        "dsn",
        "database_url",
    ],
)
def test_secret_named_keys_are_redacted(capsys: pytest.CaptureFixture[str], key: str) -> None:
    configure_logging("core")
    get_logger("t").info("event", **{key: "hunter2"})
    line = only_line(capsys)
    assert line[key] == "***"


def test_nested_values_urls_and_bearer_tokens_are_redacted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("core")
    get_logger("t").info(
        "calling postgresql://svc:pa55@db:5432/lodestar",
        headers={"authorization": "Bearer abc.def", "x-other": "ok"},
        note="sent Bearer eyJhbGciOi.payload.sig to core",
        peers=["https://u:p@host/x"],
        prompt_tokens=42,
    )
    line = only_line(capsys)
    assert line["event"] == "calling postgresql://svc:***@db:5432/lodestar"
    assert line["headers"] == {"authorization": "***", "x-other": "ok"}
    assert line["note"] == "sent Bearer *** to core"
    assert line["peers"] == ["https://u:***@host/x"]
    assert line["prompt_tokens"] == 42  # counts are not secrets
    assert "pa55" not in json.dumps(line)


def test_exception_traceback_is_rendered_and_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("core")
    try:
        raise RuntimeError("cannot reach postgresql://u:leaky@h/db")
    except RuntimeError:
        get_logger("t").exception("failed")
    line = only_line(capsys)
    assert "RuntimeError" in str(line["exception"])
    assert "leaky" not in str(line["exception"])


def test_configure_twice_logs_once(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("core")
    configure_logging("core")
    get_logger("t").info("once")
    logging.getLogger("x").error("also once")
    assert [line["event"] for line in lines(capsys)] == ["once", "also once"]


def test_console_format_is_not_json_but_still_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("core", fmt="console")
    get_logger("t").info("hello", password="hunter2")
    err = capsys.readouterr().err
    assert "hello" in err
    assert "hunter2" not in err
    assert "password=***" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[0])


def test_redact_text() -> None:
    assert redact_text("postgresql://user:pass@host/db") == "postgresql://user:***@host/db"
    assert redact_text("postgresql://user@host/db") == "postgresql://user@host/db"
    assert redact_text("Authorization: bearer xyz, next") == "Authorization: bearer ***, next"
    assert redact_text("host:50051") == "host:50051"
