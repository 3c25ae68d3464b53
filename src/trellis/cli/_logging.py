"""Logging for ``trellis run``: supervision events and child output as text or JSON lines.

Each telemetry event becomes one record whose message is a sentence (``shop/db
exited: exit code 3; restarting``); JSON lines carry the event's name in ``event``,
that sentence in ``message`` and every field of the event. Wait statuses are decoded
(``exit 3``, ``killed by SIGKILL``). Child output is logged at the level a line
declares (``ERROR ...``, ``level=warning``, ``{"level": "error"}``), else at info for
stdout and at the ``--child-stderr-level`` for stderr.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from collections import deque
from typing import Any

from .._core._reasons import is_clean

__all__ = ["configure_logging", "decode_wait_status", "describe", "log_event"]

_events_log = logging.getLogger("trellis.events")
_output_log = logging.getLogger("trellis.output")

_ERROR_EVENTS = frozenset(
    {
        "supervisor.gave_up",
        "child.start_failed",
        "process.unkillable",
        "telemetry.handler_failed",
        "guardian.down",
        "journal.error",
    }
)
_WARNING_EVENTS = frozenset(
    {
        "supervisor.auto_shutdown",
        "mailbox.overflow",
        "child.backoff",
        "journal.dropped",
        "journal.foreign_head",
        "guardian.restarted",
    }
)
# process.usage: one per OS child every 10 s (the metrics' USE sample), too many for info
_DEBUG_EVENTS = frozenset({"journal.batch", "supervisor.reordered", "process.usage"})

# the last exits per supervisor, for the give-up line (bounded)
_last_exits: dict[str, deque[tuple[str, str]]] = {}
_stderr_level = logging.INFO


def decode_wait_status(status: object) -> str:
    """``exit 3``, ``killed by SIGKILL`` (``(core dumped)``) from a raw wait status.

    Example::

        assert decode_wait_status(768) == "exit 3"
    """
    if not isinstance(status, int) or isinstance(status, bool):
        return str(status)
    if os.WIFEXITED(status):
        return f"exit {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        core = " (core dumped)" if os.WCOREDUMP(status) else ""
        return f"killed by {name}{core}"
    return f"wait status {status}"


def _detail(detail: Any) -> str:
    """An operator action's ``detail`` as ``" (signal SIGHUP; reason: rotate)"``: the
    operator's reason text, and what a signal action sent."""
    if not detail:
        return ""
    if not isinstance(detail, dict):
        return f" (reason: {_safe(str(detail))})"
    parts = []
    if detail.get("signal") is not None:
        group = " to the process group" if detail.get("group") else ""
        parts.append(f"signal {_safe(str(detail['signal']))}{group}")
    if detail.get("reason"):
        parts.append(f"reason: {_safe(str(detail['reason']))}")
    rest = {k: v for k, v in detail.items() if k not in ("signal", "group", "reason")}
    parts += [f"{k}: {_safe(str(v))}" for k, v in rest.items()]
    return f" ({'; '.join(parts)})" if parts else ""


def _reason(reason: Any) -> str:
    from .._tree import reason_text

    return reason_text(reason, 300)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _safe(text: str) -> str:
    """Control characters (terminal escapes) shown as ``\\x1b``, never sent raw."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _child(fields: dict[str, Any]) -> str:
    path = fields.get("path")
    if isinstance(path, str):
        return path
    sup, cid = fields.get("supervisor"), fields.get("child_id")
    return f"{sup}/{cid}" if sup is not None and cid is not None else str(cid or sup or "?")


def describe(name: str, fields: dict[str, Any]) -> str:
    """One sentence for a telemetry event (a generic ``name key=value`` if unknown).

    Example::

        describe("process.exited", {"path": "shop/db", "os_pid": 7, "status": 768})
        # 'shop/db (os pid 7) exited: exit 3'
    """
    f = fields
    who = _child(f)
    sup = f.get("supervisor")
    if name == "child.started":
        return f"{who} started"
    if name == "child.restarted":
        return f"{who} restarted"
    if name == "child.exited":
        tail = "; restarting" if f.get("restart") else ""
        return f"{who} exited: {_reason(f.get('reason'))}{tail}"
    if name == "child.terminated":
        return f"{who} stopped ({_reason(f.get('reason'))})"
    if name == "child.start_failed":
        return f"{who} failed to start: {_reason(f.get('reason'))}"
    if name == "child.backoff":
        return f"{who} restarts in {f.get('delay', 0):.2f}s (attempt {f.get('attempt')})"
    if name == "child.deleted":
        return f"{who} removed"
    if name == "supervisor.started":
        return f"supervisor {sup} started ({f.get('strategy')})"
    if name == "supervisor.stopped":
        return f"supervisor {sup} stopped ({_reason(f.get('reason'))})"
    if name == "supervisor.gave_up":
        exits = list(_last_exits.get(str(sup), ()))
        last = "; ".join(f"{c}: {r}" for c, r in exits[-3:]) or "none seen"
        return (
            f"supervisor {sup} gave up: more than {f.get('intensity')} restarts in "
            f"{f.get('period')}s (intensity {f.get('intensity')}, period {f.get('period')}s); "
            f"the last was of {f.get('child_id')}; last exits: {last}"
        )
    if name == "supervisor.auto_shutdown":
        return f"supervisor {sup} shuts down: significant child {f.get('child_id')} ended"
    if name == "supervisor.reordered":
        return f"supervisor {sup} start order: {', '.join(map(str, f.get('children') or []))}"
    if name == "process.spawned":
        argv = f.get("argv")
        shown = " ".join(map(str, argv)) if isinstance(argv, list | tuple) else str(argv)
        return f"{who} spawned os pid {f.get('os_pid')}: {_safe(shown)}"
    if name == "process.exited":
        return f"{who} (os pid {f.get('os_pid')}) exited: {decode_wait_status(f.get('status'))}"
    if name == "process.output":
        return f"{who} {f.get('stream')}: {_safe(str(f.get('line', '')))}"
    if name == "operator.action":
        target = f" {f['target']}" if f.get("target") else ""
        why = _detail(f.get("detail"))
        return (
            f"operator {f.get('who')} via {f.get('source')}: {f.get('action')}{target}: "
            f"{_safe(str(f.get('result')))}{why}"
        )
    if name == "tree.reloading":
        return f"reloading {f.get('file')}"
    if name == "tree.reloaded":
        notes = "".join(f"; note: {n}" for n in f.get("notes") or ())
        return f"reload {f.get('result')}: {f.get('summary')}{notes}"
    if name == "tree.starting":
        return f"starting tree {f.get('root')} from {f.get('file')}"
    if name == "tree.stopped":
        return f"tree stopped: exit code {f.get('exit_code')}"
    if name == "tree.start_failed":
        return f"the tree could not start: {f.get('child')} failed: {f.get('reason')}"
    if name == "process.usage":
        rss = f.get("rss_bytes")
        cpu = f.get("cpu_seconds")
        mib = f"{rss / 1048576:.1f} MiB" if isinstance(rss, int | float) else "?"
        cpu_s = f"{cpu:.2f}s" if isinstance(cpu, int | float) else "?"
        return (
            f"{who} (os pid {f.get('os_pid')}) usage: cpu {cpu_s}, rss {mib}, "
            f"{f.get('open_fds')} fds, {f.get('threads')} threads"
        )
    if name == "journal.batch":
        return f"journal: wrote {f.get('events')} record(s) in {f.get('seconds', 0):.3f}s"
    rest = " ".join(f"{k}={v!r}" for k, v in f.items())
    return f"{name} {rest}".rstrip()


_LEVEL_WORDS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "notice": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "err": logging.ERROR,
    "crit": logging.CRITICAL,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
    "alert": logging.CRITICAL,
    "emerg": logging.CRITICAL,
    "panic": logging.CRITICAL,
}
_LEVEL_PREFIX = re.compile(
    r"^\s*(?:[\d\[]\S*\s+){0,2}[\[<(]?(debug|info|notice|warn|warning|error|err|crit|critical|fatal)"
    r"[\]>):]?(?=[\s:\]>)]|$)",
    re.IGNORECASE,
)
_LEVEL_KV = re.compile(r"\blevel=\"?(\w+)", re.IGNORECASE)
_SYSLOG = re.compile(r"^<([0-7])>")
_SYSLOG_LEVELS = (50, 50, 50, 40, 30, 20, 20, 10)


def output_level(line: str, stream: object) -> int:
    """The level a child's output line declares (``<3>``, ``ERROR:``, ``[warn]``,
    ``level=error``, a JSON ``level``/``severity``), else info for stdout and the
    configured level for stderr."""
    m = _SYSLOG.match(line)
    if m:
        return _SYSLOG_LEVELS[int(m.group(1))]
    stripped = line.lstrip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except ValueError:
            data = None
        if isinstance(data, dict):
            word = data.get("level") or data.get("severity") or data.get("levelname")
            if isinstance(word, str) and word.lower() in _LEVEL_WORDS:
                return _LEVEL_WORDS[word.lower()]
    m = _LEVEL_KV.search(line)
    if m and m.group(1).lower() in _LEVEL_WORDS:
        return _LEVEL_WORDS[m.group(1).lower()]
    m = _LEVEL_PREFIX.match(line)
    if m:
        return _LEVEL_WORDS[m.group(1).lower()]
    return _stderr_level if stream == "stderr" else logging.INFO


def log_event(event: dict[str, Any]) -> None:
    """A telemetry handler: each supervision event becomes one log record."""
    name = str(event.get("event"))
    logger = _events_log
    if name == "process.output":
        logger = _output_log
        level = output_level(str(event.get("line", "")), event.get("stream"))
    elif name in _ERROR_EVENTS:
        level = logging.ERROR
    elif name in _WARNING_EVENTS:
        level = logging.WARNING
    elif name in _DEBUG_EVENTS:
        level = logging.DEBUG
    elif name in ("process.spawned", "process.exited") and "~standby/" in str(event.get("path")):
        # an isolated child's standby interpreter, started and killed with each (re)start
        # and stop; one that dies unused is reported by a warning of its own
        level = logging.DEBUG
    elif name == "child.exited" and not is_clean(event.get("reason")):
        level = logging.ERROR
        sup = str(event.get("supervisor"))
        exits = _last_exits.get(sup)
        if exits is None:
            if len(_last_exits) > 1000:
                _last_exits.clear()
            exits = _last_exits[sup] = deque(maxlen=5)
        exits.append((str(event.get("child_id")), _reason(event.get("reason"))))
    elif name == "tree.reloaded" and event.get("result") != "ok":
        level = logging.ERROR if event.get("result") == "failed" else logging.WARNING
    else:
        level = logging.INFO
    if logger.isEnabledFor(level):
        fields = {k: v for k, v in event.items() if k not in ("event", "time")}
        text = describe(name, fields)
        logger.log(level, text, extra={"trellis": fields, "trellis_event": name})


def _add_fields(_logger: Any, _method: str, event_dict: Any) -> Any:
    """Copy the event fields carried by a stdlib record into the structlog event dict:
    ``event`` is the event's name, ``message`` its sentence."""
    record = event_dict.get("_record")
    fields = getattr(record, "trellis", None)
    name = getattr(record, "trellis_event", None)
    text = str(event_dict.get("event"))
    if isinstance(fields, dict):
        for key, value in fields.items():
            event_dict.setdefault(key, value)
        if name is None and " " not in text:  # the CLI's own events (tree.starting, ...)
            name, text = text, describe(text, fields)
    event_dict["message"] = text
    if name is None:
        # a record that is no telemetry event: the core's reports name their kind
        # first (``crash_report: ...``); anything else (a library's or Trellis's own
        # warning, the loop-blocked stack, "control API: refused ...") is ``log``. The
        # sentence is in ``message``, who wrote it in ``logger``
        kind = _REPORT_KIND.match(text)
        name = kind.group(1) if kind else "log"
    event_dict["event"] = name
    return event_dict


_REPORT_KIND = re.compile(r"^([a-z][a-z0-9_]*): ")


def _text_line(_logger: Any, _method: str, event_dict: Any) -> Any:
    """For text: the sentence first, then the event name; the fields are in the sentence."""
    record = event_dict.get("_record")
    fields = getattr(record, "trellis", None)
    name = event_dict.get("event")
    text = event_dict.pop("message", name)
    if isinstance(fields, dict):
        for key in fields:
            event_dict.pop(key, None)
        event_dict["logger"] = name
    event_dict["event"] = text
    return event_dict


class _Formatter(logging.Formatter):
    """structlog's formatter, built for the first record that is logged: importing
    structlog (and rich, which it imports) takes tens of milliseconds that ``trellis
    run`` would otherwise spend before its root starts. Records are formatted under
    the handler's lock, so it is built once."""

    def __init__(self, log_format: str, colors: bool) -> None:
        super().__init__()
        self.log_format = log_format
        self.colors = colors
        self.inner: logging.Formatter | None = None

    def format(self, record: logging.LogRecord) -> str:
        inner = self.inner
        if inner is None:
            inner = self.inner = _structlog_formatter(self.log_format, self.colors)
        return inner.format(record)


def _structlog_formatter(log_format: str, colors: bool) -> logging.Formatter:
    import structlog

    renderer: list[Any]
    if log_format == "json":
        renderer = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        renderer = [
            _text_line,
            structlog.dev.ConsoleRenderer(
                colors=colors, exception_formatter=structlog.dev.plain_traceback
            ),
        ]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            _add_fields,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            *renderer[:-1],
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *renderer[-1:],
        ],
    )


class _DropDuplicates(logging.Filter):
    """Drops the core's plain-text reports that a telemetry event already logs."""

    _PREFIXES = ("child_terminated:", "reached_max_restart_intensity:", "operator action:")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self._PREFIXES))


def configure_logging(
    log_format: str = "text", level: str = "info", child_stderr_level: str = "info"
) -> logging.Handler:
    """Send every log record (Trellis events, child output, other libraries) to stderr,
    as text or as one JSON object per line; returns the installed handler.
    ``child_stderr_level`` is the level of a child's stderr lines that declare none.

    Example::

        configure_logging("json", "info", child_stderr_level="warning")
    """
    global _stderr_level
    _stderr_level = logging.getLevelName(child_stderr_level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(log_format, colors=sys.stderr.isatty()))
    handler.addFilter(_DropDuplicates())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return handler
