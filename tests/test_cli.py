"""The ``trellis`` command: ``check`` and ``run`` with exit codes, signals and log formats."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from trellis.cli import cli, main

ROOT = Path(__file__).resolve().parents[1]
TREES = ROOT / "examples" / "trees"
SERVICES = str(TREES / "services.toml")
CRASHLOOP = str(TREES / "crashloop.toml")
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

BAD = textwrap.dedent(
    """\
    [supervisor]
    name = "bad"
    intensity = -1

    [[supervisor.children]]
    id = "web"
    command = ["no-such-binary-xyz"]
    restart = "always"
    """
)


def _bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    return path


def _bad_lines(path: Path) -> list[str]:
    return [
        f"{path}:3: supervisor.intensity: invalid intensity: -1 (must be an int >= 0)",
        f"{path}:7: supervisor.children[0].command: executable not found: 'no-such-binary-xyz' "
        "(not on PATH)",
        f"{path}:8: supervisor.children[0].restart: invalid restart: 'always' "
        "(expected one of permanent, transient, temporary)",
        f"{path}: 3 errors",
    ]


class Trellis:
    """``python -m trellis ARGS`` in a subprocess; threads collect its stdout/stderr lines."""

    def __init__(self, *args: str, cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trellis", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=cwd,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out, True)),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err, False)),
        ]
        for t in self._threads:
            t.start()

    def _read(self, stream: object, into: list[str], notify: bool) -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.append(line.rstrip("\n"))
            if notify:
                self._lines.put(line.rstrip("\n"))

    def wait_for(self, wanted: str, timeout: float = 30.0) -> None:
        """Block until stdout prints the line ``wanted`` (at most ``timeout`` seconds)."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"{wanted!r} never printed; stderr: {self.err}") from None
            if line == wanted:
                return

    def finish(self, sig: int | None = None, timeout: float = 30.0) -> int:
        """Send ``sig`` (if any), wait for the exit; returns the exit code."""
        if sig is not None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.proc.kill()
            for t in self._threads:
                t.join(timeout)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()
        return code


# ---------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------


def test_check_valid_file_prints_the_tree() -> None:
    """A valid file: exit 0, "ok" and the outline of the tree."""
    result = CliRunner().invoke(cli, ["check", SERVICES])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"{SERVICES}: ok",
        "shop: supervisor rest_for_one",
        "  db: server tree_parts:Part",
        "  cache: supervisor one_for_one",
        "    store: server tree_parts:Part",
        "    warmer: worker tree_parts:ticker",
        "  web: server tree_parts:Part",
    ]


def test_check_reports_every_error_with_its_line(tmp_path: Path) -> None:
    """An invalid file: exit 2 and every error as FILE:LINE: KEY: MESSAGE on stderr."""
    path = _bad_file(tmp_path)
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == _bad_lines(path)
    assert result.stdout == ""


def test_check_several_files_and_a_missing_one(tmp_path: Path) -> None:
    """Each file is checked; one bad or missing file makes the exit code 2."""
    missing = tmp_path / "missing.toml"
    result = CliRunner().invoke(cli, ["check", SERVICES, str(missing)])
    assert result.exit_code == 2
    assert f"{SERVICES}: ok" in result.stdout
    assert result.stderr.splitlines() == [
        f"{missing}: cannot read: No such file or directory",
        f"{missing}: 1 error",
    ]


def test_main_returns_exit_codes(tmp_path: Path) -> None:
    """main() returns the exit code: 0, 2 for a bad file, 2 for a usage error."""
    assert main(["check", SERVICES]) == 0
    assert main(["check", str(_bad_file(tmp_path))]) == 2
    assert main(["check"]) == 2
    assert main(["--version"]) == 0


def test_help_lists_the_commands() -> None:
    """demo, check and run are the commands."""
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("check", "demo", "run"):
        assert f"  {name} " in result.stdout


def test_check_in_a_subprocess(tmp_path: Path) -> None:
    """`python -m trellis check`: 0 for the examples, 2 with the errors for a bad file."""
    examples = [str(p) for p in sorted(TREES.glob("*.toml"))]
    done = subprocess.run(
        [sys.executable, "-m", "trellis", "check", *examples],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(": ok\n") == len(examples) >= 3
    path = _bad_file(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "trellis", "check", str(path)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == _bad_lines(path)


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_stops_in_reverse_order_on_a_signal(sig: int) -> None:
    """SIGTERM/SIGINT: every child stops in reverse start order (nested too), exit code 0."""
    run = Trellis("run", SERVICES)
    run.wait_for("start web")
    code = run.finish(sig)
    assert code == 0, run.err
    assert run.out == [
        "start db",
        "start store",
        "start warmer",
        "start web",
        "stop web",
        "stop warmer",
        "stop store",
        "stop db",
    ]
    # text logs: "shop/web stopped (shutdown) [child.terminated]"
    terminated = [
        line.split("] ", 1)[1].split(" stopped")[0]
        for line in run.err
        if "child.terminated" in line
    ]
    assert terminated == [
        "shop/web",
        "shop/cache/warmer",
        "shop/cache/store",
        "shop/cache",
        "shop/db",
    ]
    assert "tree stopped: exit code 0" in run.err[-1]


def test_run_exits_1_when_the_root_gives_up() -> None:
    """A child that keeps crashing exhausts the root's intensity: exit code 1, logs at warning+."""
    run = Trellis("run", CRASHLOOP, "--log-level", "warning")
    code = run.finish()
    assert code == 1, run.err
    assert run.out.count("start flaky") == 3
    assert run.out[-1] == "stop steady"
    text = "\n".join(run.err)
    assert "supervisor.gave_up" in text
    assert "child.started" not in text  # info is below --log-level warning


def test_run_json_logs_are_one_object_per_line() -> None:
    """--log-format json: every stderr line is a JSON object with the event's fields."""
    run = Trellis("run", CRASHLOOP, "--log-format", "json")
    assert run.finish() == 1
    records = [json.loads(line) for line in run.err]
    assert all({"event", "level", "logger", "timestamp"} <= r.keys() for r in records)
    exits = [r for r in records if r["event"] == "child.exited"]
    assert len(exits) == 3
    assert exits[0]["child_id"] == "flaky"
    assert exits[0]["supervisor"] == "crashloop"
    assert exits[0]["reason"] == "RuntimeError('flaky crashed')"
    assert exits[0]["level"] == "error"
    [gave_up] = [r for r in records if r["event"] == "supervisor.gave_up"]
    assert (gave_up["intensity"], gave_up["period"]) == (2, 5.0)
    crash = next(r for r in records if r["event"] == "crash_report")
    assert "RuntimeError: flaky crashed" in crash["exception"]
    assert records[-1]["event"] == "tree.stopped"
    assert records[-1]["exit_code"] == 1


def test_run_bad_file_exits_2_without_starting(tmp_path: Path) -> None:
    """An invalid tree file is reported like `check` does, and nothing runs."""
    path = _bad_file(tmp_path)
    run = Trellis("run", str(path))
    assert run.finish() == 2
    assert run.err == _bad_lines(path)
    assert run.out == []


def test_run_start_failure_names_the_child(tmp_path: Path) -> None:
    """A child whose init fails: exit code 1, the failed child and the reason are logged."""
    (tmp_path / "broken_parts.py").write_text(
        textwrap.dedent(
            """\
            import trellis

            class Db(trellis.Server):
                async def init(self):
                    raise RuntimeError("no database")
            """
        )
    )
    tree = tmp_path / "tree.toml"
    tree.write_text(
        textwrap.dedent(
            """\
            [supervisor]
            [[supervisor.children]]
            id = "sub"
            [[supervisor.children.children]]
            id = "db"
            server = "broken_parts:Db"
            """
        )
    )
    run = Trellis("run", str(tree), "--log-format", "json")
    assert run.finish() == 1
    records = [json.loads(line) for line in run.err]
    [failed] = [r for r in records if r["event"] == "tree.start_failed"]
    assert failed["child"] == "sub"
    assert failed["reason"] == "RuntimeError: no database"
    # the core's own report names the innermost child
    # the core's plain report: its kind in event, its sentence in message
    reports = [r["message"] for r in records if r["event"] == "start_error"]
    assert any("supervisor=root/sub child='db'" in m for m in reports)


def test_run_os_process_child(tmp_path: Path) -> None:
    """A command child: its output is logged, it stops on SIGTERM, and its process is gone."""
    script = tmp_path / "service.py"
    script.write_text("import time\nprint('serving', flush=True)\ntime.sleep(60)\n")
    tree = tmp_path / "tree.toml"
    tree.write_text(
        textwrap.dedent(
            f"""\
            [supervisor]
            name = "os"
            [[supervisor.children]]
            id = "service"
            command = ["{sys.executable}", "-u", "service.py"]
            cwd = "."
            ready = {{ log = "^serving$", timeout = 20 }}
            [[supervisor.children]]
            id = "after"
            server = "tree_parts:Part"
            args = ["after"]
            """
        )
    )
    run = Trellis("run", str(tree), "--log-format", "json", cwd=TREES)
    run.wait_for("start after")
    assert run.finish(signal.SIGTERM) == 0, run.err
    records = [json.loads(line) for line in run.err]
    [output] = [r for r in records if r["event"] == "process.output"]
    assert (output["child_id"], output["line"], output["stream"]) == (
        "service",
        "serving",
        "stdout",
    )
    [spawned] = [r for r in records if r["event"] == "process.spawned"]
    with pytest.raises(ProcessLookupError):
        os.kill(spawned["os_pid"], 0)
    assert run.out == ["start after", "stop after"]
