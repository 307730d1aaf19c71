"""Structured logs for every service: JSON lines on stderr with trace ids; secrets redacted.

Both structlog loggers and the standard library's ``logging`` (grpc, asyncpg, ...) go through
the same processors and renderer.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from opentelemetry import trace
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "***"

_SECRET_KEY = re.compile(
    r"token|password|secret|authorization|api_key|credential|dsn|database_url", re.IGNORECASE
)
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)[^@\s]+@")
_BEARER = re.compile(r"(?P<head>\bbearer\s+)[^\s,;\"']+", re.IGNORECASE)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at the time of the call (test capture friendly)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        """Ignore: the stream is always the current ``sys.stderr``."""


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Route structlog and stdlib logging to stderr as JSON (or console) lines; idempotent."""
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared = _shared_processors(service, fmt)
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, _for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=False,
    )
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _renderer(fmt)],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structured logger named ``name`` (the caller's module when omitted)."""
    return structlog.stdlib.get_logger(name) if name else structlog.stdlib.get_logger()


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor: hide secret-named values, URL passwords and bearer tokens."""
    return {key: _redact_item(key, value) for key, value in event_dict.items()}


def redact_text(text: str) -> str:
    """``text`` with URL passwords and bearer tokens replaced by ``***``."""
    return _BEARER.sub(rf"\g<head>{REDACTED}", _URL_PASSWORD.sub(rf"\g<head>{REDACTED}@", text))


def _redact_item(key: str, value: Any) -> Any:
    if _SECRET_KEY.search(key) and not _is_plain_number(value):
        return REDACTED
    return _redact_value(value)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: _redact_item(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def _is_plain_number(value: Any) -> bool:
    """Counts such as ``prompt_tokens=12`` are not secrets; ``None`` hides nothing."""
    return value is None or isinstance(value, int | float)


def _add_trace_ids(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict


def _add_service(service: str) -> Processor:
    def add(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("service", service)
        return event_dict

    return add


def _shared_processors(service: str, fmt: str) -> list[Processor]:
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        _add_service(service),
        _add_trace_ids,
        structlog.processors.StackInfoRenderer(),
    ]
    if fmt != "console":
        processors.append(structlog.processors.format_exc_info)
    processors.append(redact)
    return processors


def _for_formatter(logger: WrappedLogger, method: str, event_dict: EventDict) -> Any:
    return structlog.stdlib.ProcessorFormatter.wrap_for_formatter(logger, method, event_dict)


def _renderer(fmt: str) -> Processor:
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.JSONRenderer(default=str)
