"""Logging for ``trellis run``: supervision events and child output as text or JSON lines."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from .._core._reasons import is_clean

__all__ = ["configure_logging", "log_event"]

_events_log = logging.getLogger("trellis.events")
_output_log = logging.getLogger("trellis.output")


_ERROR_EVENTS = frozenset(
    {"supervisor.gave_up", "child.start_failed", "process.unkillable", "telemetry.handler_failed"}
)
_WARNING_EVENTS = frozenset({"supervisor.auto_shutdown", "mailbox.overflow", "child.backoff"})


def log_event(event: dict[str, Any]) -> None:
    """A telemetry handler: each supervision event becomes one log record."""
    name = str(event.get("event"))
    if name == "process.output":
        logger, level = _output_log, logging.INFO
    elif name in _ERROR_EVENTS:
        logger, level = _events_log, logging.ERROR
    elif name in _WARNING_EVENTS:
        logger, level = _events_log, logging.WARNING
    elif name == "child.exited" and not is_clean(event.get("reason")):
        logger, level = _events_log, logging.ERROR
    else:
        logger, level = _events_log, logging.INFO
    if logger.isEnabledFor(level):
        fields = {k: v for k, v in event.items() if k not in ("event", "time")}
        logger.log(level, name, extra={"trellis": fields})


def _add_fields(_logger: Any, _method: str, event_dict: Any) -> Any:
    """Copy the event fields carried by a stdlib record into the structlog event dict."""
    record = event_dict.get("_record")
    fields = getattr(record, "trellis", None)
    if isinstance(fields, dict):
        for key, value in fields.items():
            event_dict.setdefault(key, value)
    return event_dict


class _DropDuplicates(logging.Filter):
    """Drops the core's plain-text reports that a telemetry event already logs."""

    _PREFIXES = ("child_terminated:", "reached_max_restart_intensity:")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self._PREFIXES))


def configure_logging(log_format: str = "text", level: str = "info") -> logging.Handler:
    """Send every log record (Trellis events, child output, other libraries) to stderr,
    as text or as one JSON object per line; returns the installed handler.

    Example::

        configure_logging("json", "info")
    """
    renderer: list[Any]
    if log_format == "json":
        renderer = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        renderer = [
            structlog.dev.ConsoleRenderer(
                colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
            )
        ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            _add_fields,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(_DropDuplicates())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return handler
