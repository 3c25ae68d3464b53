"""`trellis dashboard` chooses its tree like every other client command (`--tree NAME`,
exit 2 when several run and none is named, exit 3 when none listens, also on --url),
with real `trellis run` processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx

from control.test_trees import Trees, trees  # noqa: F401  (the fixture)


def test_dashboard_tree_option_and_exit_codes(trees: Trees) -> None:  # noqa: F811
    # nothing listening: exit 3, over the socket directory and over --url alike
    r = trees.cli("dashboard", "--no-open")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "no Trellis tree is running" in r.stderr
    r = trees.cli("dashboard", "--no-open", "--url", "http://127.0.0.1:1")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "no Trellis tree is listening on http://127.0.0.1:1" in r.stderr
    assert "http://127.0.0.1:1/" not in r.stdout

    trees.run("alpha")
    trees.run("beta")
    r = trees.cli("dashboard", "--no-open")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "choose one with --tree NAME" in r.stderr
    r = trees.cli("dashboard", "--no-open", "--tree", "gamma")
    assert r.returncode == 3, r.stdout + r.stderr

    proc = subprocess.Popen(
        [sys.executable, "-m", "trellis", "dashboard", "--no-open", "--json", "--tree", "beta"],
        env=trees.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else b""
        shown = json.loads(line)
        assert shown["socket"] == str(trees.dir / "beta.sock")
        url, _, token = shown["url"].partition("#token=")
        answer = httpx.get(url + "v1/tree", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200
        assert answer.json()["root"]["path"] == "beta"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
