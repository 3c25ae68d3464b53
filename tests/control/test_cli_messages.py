"""What a CLI user reads, with a real `trellis run`: `trellis logs` of a path that is no
child says so (exit 1) while a silent child prints nothing (exit 0); `trellis restart
ROOT` points to `trellis stop`."""

from __future__ import annotations

from control.test_trees import Trees, trees  # noqa: F401  (the fixture)


def test_logs_of_no_child_and_of_a_silent_child_and_restart_root(
    trees: Trees,  # noqa: F811
) -> None:
    trees.run("msg")  # its child "os" sleeps without a word
    r = trees.cli("logs", "msg/nochild", "--tree", "msg")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no such child: 'msg/nochild'" in r.stderr
    assert r.stdout == ""
    r = trees.cli("logs", "msg/os", "--tree", "msg")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout == ""
    assert r.stderr == ""
    r = trees.cli("restart", "msg", "--tree", "msg")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "msg is the root" in r.stderr
    assert "`trellis stop`" in r.stderr
    assert "POST /v1/stop" in r.stderr
