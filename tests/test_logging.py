"""`trellis run`'s logs: sentences people can read, decoded wait statuses, the give-up
line, child output at its own level, JSON with `event` and `message`, each operator
action once, journal batches at debug."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trellis.cli._logging import decode_wait_status, output_level

CRASH = """
[supervisor]
name = "cr"
intensity = 2
period = 30.0

[[supervisor.children]]
id = "ok"
command = ["sleep", "60"]

[[supervisor.children]]
id = "bad"
command = ["sh", "-c", "echo 'ERROR: cannot bind port 80' >&2; echo 'plain' >&2; exit 3"]
"""


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="trg-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _run(d: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (d / "tree.toml").write_text(CRASH)
    return subprocess.run(
        [sys.executable, "-m", "trellis", "run", "tree.toml", "--no-control", *args],
        cwd=d,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_wait_statuses_and_declared_levels() -> None:
    assert decode_wait_status(768) == "exit 3"
    assert decode_wait_status(9) == "killed by SIGKILL"
    assert decode_wait_status(0) == "exit 0"
    assert output_level("ERROR: no", "stdout") == 40
    assert output_level("2024-01-01 12:00:00 [warn] slow", "stdout") == 30
    assert output_level('{"level": "error", "msg": "x"}', "stdout") == 40
    assert output_level("ts=1 level=warning msg=x", "stdout") == 30
    assert output_level("<3>broken", "stdout") == 40
    assert output_level("no errors found", "stderr") == 20  # not a level prefix
    assert output_level("information", "stdout") == 20


def test_warning_level_still_shows_why_a_child_crashed(short_tmp: Path) -> None:
    """--log-level warning: the child's declared ERROR line, its plain stderr (at
    --child-stderr-level warning), the decoded exits and a give-up line naming the
    child, the intensity and the last exits."""
    r = _run(short_tmp, "--no-journal", "--log-level", "warning", "--child-stderr-level", "warning")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert any("[error" in ln and "cr/bad stderr: ERROR: cannot bind port 80" in ln for ln in lines)
    assert any("[warning" in ln and "cr/bad stderr: plain" in ln for ln in lines)
    assert any("cr/bad exited: exit code 3; restarting" in ln for ln in lines)
    [gave_up] = [ln for ln in lines if "gave up" in ln]
    assert "supervisor cr gave up: more than 2 restarts in 30.0s" in gave_up
    assert "intensity 2" in gave_up
    assert "the last was of bad" in gave_up
    assert "last exits: bad: exit code 3" in gave_up
    assert "status=768" not in r.stderr


def test_json_has_event_and_message_and_batches_at_debug(short_tmp: Path) -> None:
    db = short_tmp / "j.db"
    r = _run(short_tmp, "--journal", f"sqlite:///{db}", "--log-format", "json")
    assert r.returncode == 1, r.stderr
    records = [json.loads(ln) for ln in r.stderr.splitlines()]
    exited = [x for x in records if x["event"] == "process.exited" and x["child_id"] == "bad"]
    assert exited
    assert exited[0]["status"] == 768  # the raw field is kept for machines
    assert exited[0]["message"].endswith("exited: exit 3")
    assert all("message" in x for x in records)
    assert not [x for x in records if x["event"] == "journal.batch"]  # debug only
    r = _run(
        short_tmp, "--journal", f"sqlite:///{db}", "--log-format", "json", "--log-level", "debug"
    )
    records = [json.loads(ln) for ln in r.stderr.splitlines()]
    batches = [x for x in records if x["event"] == "journal.batch"]
    assert batches
    assert batches[0]["level"] == "debug"
    assert batches[0]["message"].startswith("journal: wrote ")


def test_operator_action_is_logged_once_as_text(short_tmp: Path) -> None:
    (short_tmp / "tree.toml").write_text(CRASH.replace("exit 3", "sleep 60"))
    sock = short_tmp / "c.sock"
    cmd = [sys.executable, "-m", "trellis", "run", "tree.toml", "--no-journal"]
    with open(short_tmp / "err.log", "w") as err:
        proc = subprocess.Popen([*cmd, "--socket", str(sock)], cwd=short_tmp, stderr=err)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "trellis",
                "restart",
                "cr/ok",
                "--socket",
                str(sock),
                "--reason",
                "testing",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    finally:
        proc.terminate()
        proc.wait(30)
    text = (short_tmp / "err.log").read_text()
    actions = [ln for ln in text.splitlines() if "restart cr/ok" in ln]
    assert len(actions) == 1, text
    assert "via unix:" in actions[0]
    assert ": ok (reason: testing)" in actions[0]


def test_signal_action_log_line_and_bad_signal_exit_2(short_tmp: Path) -> None:
    """The log line of a signal action names the signal and the operator's reason (not
    a Python dict); an unknown signal is a usage error (exit 2)."""
    (short_tmp / "tree.toml").write_text(CRASH.replace("exit 3", "sleep 60"))
    sock = short_tmp / "c.sock"
    cmd = [sys.executable, "-m", "trellis", "run", "tree.toml", "--no-journal"]

    def trellis(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "trellis", *args, "--socket", str(sock)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    with open(short_tmp / "err.log", "w") as err:
        proc = subprocess.Popen([*cmd, "--socket", str(sock)], cwd=short_tmp, stderr=err)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        done = trellis("signal", "cr/ok", "HUP", "--reason", "rotate logs")
        assert done.returncode == 0, done.stderr
        bad = trellis("signal", "cr/ok", "BOGUS")
        assert bad.returncode == 2, bad.stderr
        assert "not a signal name or number: 'BOGUS'" in bad.stderr
    finally:
        proc.terminate()
        proc.wait(30)
    text = (short_tmp / "err.log").read_text()
    [action] = [ln for ln in text.splitlines() if "signal cr/ok: ok" in ln]
    assert "(signal SIGHUP; reason: rotate logs)" in action, action
    assert "{" not in action


def test_json_lines_of_plain_log_records_have_a_short_event_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A record that is no telemetry event (here the control API's refusal warning)
    gets ``event: "log"``, its sentence in ``message`` and its logger in ``logger``."""
    import logging

    from trellis.cli._logging import configure_logging, log_event

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("json", "info")
        logging.getLogger("trellis.control").warning(
            "control API: refused %s %s from %s (%s): %s", "GET", "/v1/tree", "tcp", 401, "no"
        )
        log_event({"event": "child.started", "time": 1.0, "supervisor": "s", "child_id": "c"})
        logging.getLogger("trellis.server").error("crash_report: Db %r exited", "<Pid 3>")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    plain, event, report = (json.loads(ln) for ln in capsys.readouterr().err.splitlines())
    assert report["event"] == "crash_report"  # a core report names its kind first
    assert report["message"] == "crash_report: Db '<Pid 3>' exited"
    assert plain["event"] == "log"
    assert plain["logger"] == "trellis.control"
    assert plain["message"] == "control API: refused GET /v1/tree from tcp (401): no"
    assert plain["level"] == "warning"
    assert event["event"] == "child.started"
    assert event["message"] == "s/c started"


def test_process_usage_is_logged_at_debug(capsys: pytest.CaptureFixture[str]) -> None:
    """process.usage (one per OS child every 10 s) stays out of the info logs; at
    debug it is a sentence, not raw key=value pairs."""
    import logging

    from trellis.cli._logging import configure_logging, log_event

    usage = {
        "event": "process.usage",
        "time": 1.0,
        "path": "shop/web",
        "supervisor": "shop",
        "child_id": "web",
        "os_pid": 42,
        "cpu_seconds": 1.234,
        "rss_bytes": 10 * 1048576,
        "open_fds": 7,
        "threads": 3,
    }
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("text", "info")
        log_event(usage)
        assert capsys.readouterr().err == ""
        configure_logging("json", "debug")
        log_event(usage)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    [line] = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert record["level"] == "debug"
    assert record["event"] == "process.usage"
    assert record["message"] == (
        "shop/web (os pid 42) usage: cpu 1.23s, rss 10.0 MiB, 7 fds, 3 threads"
    )


_LAZY = """
import logging, sys
from trellis.cli._logging import configure_logging
configure_logging(sys.argv[1], "warning")
logging.getLogger("trellis.x").info("not shown")
print("structlog before a record:", "structlog" in sys.modules, flush=True)
logging.getLogger("trellis.x").warning("disk nearly full")
print("structlog after a record:", "structlog" in sys.modules, flush=True)
"""


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_structlog_is_imported_at_the_first_record_shown(fmt: str) -> None:
    """`trellis run` does not pay structlog's import (and rich's) before its root starts
    unless a record is logged; the first one is formatted as always."""
    out = subprocess.run(
        [sys.executable, "-c", _LAZY, fmt], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "structlog before a record: False",
        "structlog after a record: True",
    ]
    (line,) = out.stderr.splitlines()
    if fmt == "json":
        rec = json.loads(line)
        assert rec["message"] == "disk nearly full"
        assert rec["level"] == "warning"
        assert rec["logger"] == "trellis.x"
        assert rec["event"] == "log"
    else:
        assert "disk nearly full" in line
        assert "warning" in line
        assert "not shown" not in out.stderr
