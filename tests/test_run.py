"""trellis.run: a tree as a program (signals, exit codes), the demo, and the README example."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = textwrap.dedent(
    """
    import sys, trellis

    class Part(trellis.Server):
        trap_exits = True

        async def init(self, name, crash_at_start=False):
            self.name = name
            print("start", name, flush=True)
            if crash_at_start:
                trellis.cast(self.pid, "crash")

        async def handle_cast(self, msg):
            raise RuntimeError("crash " + self.name)

        async def terminate(self, reason):
            print("stop", self.name, reason, flush=True)

    mode = sys.argv[1]
    children = [Part.child_spec("a", id="a"), Part.child_spec("b", id="b"),
                Part.child_spec("c", id="c", crash_at_start=(mode == "giveup"))]
    sys.exit(trellis.run(lambda: trellis.Supervisor.start_link(children, intensity=2, period=5)))
    """
)


ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def _popen(tmp_path: Path, source: str, *args: str) -> subprocess.Popen[str]:
    """Run ``source`` as a script with the project importable, output piped."""
    script = tmp_path / "prog.py"
    script.write_text(source)
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the project's Python with ``args`` to completion (60 s at most)."""
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=60, check=False
    )


def _spawn(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    return _popen(tmp_path, PROGRAM, mode)


def _read_until(proc: subprocess.Popen[str], line: str) -> list[str]:
    seen = []
    assert proc.stdout is not None
    for got in proc.stdout:
        seen.append(got.strip())
        if got.strip() == line:
            return seen
    raise AssertionError(f"{line!r} never printed; got {seen}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_tree_in_reverse_order_with_exit_code_0(tmp_path: Path, sig: int) -> None:
    """SIGTERM/SIGINT: children stop in reverse start order (terminate runs, trapping), code 0."""
    proc = _spawn(tmp_path, "ok")
    try:
        assert _read_until(proc, "start c") == ["start a", "start b", "start c"]
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert out.split("\n")[:3] == ["stop c SHUTDOWN", "stop b SHUTDOWN", "stop a SHUTDOWN"], err
    assert proc.returncode == 0, err


def test_root_that_gives_up_exits_1(tmp_path: Path) -> None:
    """A root supervisor that reaches its restart intensity ends the program with code 1."""
    proc = _spawn(tmp_path, "giveup")
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert "reached_max_restart_intensity" in err
    # c crashed 3 times (intensity 2), then b and a were stopped in reverse order.
    assert out.count("start c") == 3
    assert out.strip().split("\n")[-2:] == ["stop b SHUTDOWN", "stop a SHUTDOWN"]


def test_demo_shows_crash_restart_and_escalation() -> None:
    """The bundled demo (the README's main job) runs, restarts and escalates, exit code 0."""
    done = _python("-m", "trellis", "demo")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "CRASH" in out
    assert "+ root/pipeline/sink: restarted" in out
    assert "gives up and escalates" in out
    assert "+ root/pipeline: restarted" in out
    assert out.rstrip().endswith("and an escalation to the root.")


def test_readme_example_runs() -> None:
    """The README's counter example runs as printed."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README has no python example"
    done = _python("-c", blocks[0])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["15", "crashed: boom", "10"]


BLOCKING = textwrap.dedent(
    """
    import sys, time, trellis

    async def blocker():
        print("ready", flush=True)
        time.sleep(float(sys.argv[1]))  # blocks the event loop on purpose

    async def stuck_on_stop():
        try:
            print("ready", flush=True)
            await trellis.sleep(3600)
        finally:
            time.sleep(3600)  # blocks the loop during shutdown: cannot be cancelled

    mode = sys.argv[2]
    fn = blocker if mode == "block" else stuck_on_stop
    root = trellis.worker("w", fn, restart="temporary")
    sys.exit(trellis.run(root, hard_exit_after=1.0, blocked_warning=0.3))
    """
)


def _spawn_blocking(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return _popen(tmp_path, BLOCKING, *args)


def test_blocked_event_loop_is_reported_with_its_stack(tmp_path: Path) -> None:
    """A task that blocks the loop is reported (with the blocking line) by the watchdog."""
    proc = _spawn_blocking(tmp_path, "1.5", "block")
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "event loop blocked for over 0.3s" in err
    assert "time.sleep(float(sys.argv[1]))" in err


def test_shutdown_blocked_forever_exits_instead_of_hanging(tmp_path: Path) -> None:
    """SIGTERM while a task blocks the loop in its cleanup: after hard_exit_after the
    process exits with code 1 and says why, instead of hanging."""
    proc = _spawn_blocking(tmp_path, "0", "stuck")
    try:
        assert _read_until(proc, "ready") == ["ready"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert "shutdown did not finish within 1.0s" in err
    assert "time.sleep(3600)" in err
