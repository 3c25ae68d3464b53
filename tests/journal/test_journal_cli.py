"""``trellis journal verify|tail|export``: output, exit codes (0 ok, 1 broken, 2 bad
input), URL resolution (argument, --journal, $TRELLIS_JOURNAL, the state dir; plain
file paths and the documented sqlite:// forms), the journal read named on stderr, and
verify's anchor options."""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import trellis
from trellis.cli.journal import journal_group
from trellis.journal import Journal

ROOT = Path(__file__).resolve().parents[2]
KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def journal_url(tmp_path: Path) -> str:
    """A closed journal with 40 records: child-like events with exit reasons."""
    url = f"sqlite:///{tmp_path / 'j.db'}"
    with Journal(url, node="n1", key=KEY):
        for i in range(20):
            trellis.telemetry.emit("child.started", time=float(i), path="root/w", child_id="w")
            trellis.telemetry.emit(
                "child.exited", time=i + 0.5, path="root/w", reason=RuntimeError("boom")
            )
    return url


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(journal_group, list(args), env=env)


def test_verify_ok(journal_url: str) -> None:
    r = run("verify", journal_url, env={"TRELLIS_JOURNAL_KEY": ""})
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == "ok: 40 records, hash chain intact"
    assert "1 checkpoints up to seq 40: hashes match; HMAC not checked" in r.stdout
    r = run("verify", journal_url, env={"TRELLIS_JOURNAL_KEY": KEY})
    assert r.exit_code == 0
    assert "1 checkpoints up to seq 40: HMAC verified" in r.stdout
    r = run("verify", "--json", journal_url, env={"TRELLIS_JOURNAL_KEY": KEY})
    assert json.loads(r.stdout) == {
        "ok": True,
        "records": 40,
        "first_bad_seq": None,
        "problem": "",
        "checkpoints": 1,
        "signed": True,
        "last_checkpoint_seq": 40,
        "last_seq": 40,
        "anchor": journal_url[len("sqlite:///") :] + ".anchor",
        "anchor_seq": 40,
        "journal": journal_url,
    }


def test_verify_broken_exits_1_naming_the_seq(journal_url: str) -> None:
    path = journal_url.removeprefix("sqlite:///")
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DROP TRIGGER journal_no_update")
        conn.execute("UPDATE journal SET data = '{}' WHERE seq = 17")
    r = run("verify", journal_url, env={"TRELLIS_JOURNAL_KEY": ""})
    assert r.exit_code == 1
    assert r.stdout.splitlines() == [
        "BROKEN at seq 17: hash mismatch at seq 17 (record edited)",
        "16 records intact before it",
    ]


def test_bad_input_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    for cmd in ("verify", "tail", "export"):
        r = run(cmd, f"sqlite:///{missing}")
        assert r.exit_code == 2, (cmd, r.output)
        assert f"Error: no journal at sqlite:///{missing}" in r.stderr
        r = run(cmd, "mysql://h/db")
        assert r.exit_code == 2
        assert "Error: bad journal URL 'mysql://h/db': unknown scheme 'mysql'" in r.stderr
        r = run(cmd, env={"TRELLIS_JOURNAL": ""})
        assert r.exit_code == 2
        assert "Error: no journal URL: give URL" in r.stderr
    assert not missing.exists()
    r = run("verify", "sqlite:///a.db", "--journal", "sqlite:///b.db")
    assert r.exit_code == 2
    assert "two journal URLs" in r.stderr


def test_url_from_option_or_environment(journal_url: str) -> None:
    assert run("verify", "--journal", journal_url).exit_code == 0
    r = run("verify", env={"TRELLIS_JOURNAL": journal_url})
    assert r.exit_code == 0
    assert r.stdout.startswith("ok: 40 records")


def test_tail_prints_the_last_records(journal_url: str) -> None:
    r = run("tail", journal_url, "-n", "3")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].split()[0] == "38"
    assert "child.started" in lines[1]
    assert "root/w" in lines[1]
    assert 'reason="RuntimeError: boom"' in lines[2]
    assert "reason_class=crash" in lines[2]
    r = run("tail", journal_url, "--since", "39", "--json")
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["seq"] for x in recs] == [39, 40]
    assert recs[1]["data"]["reason_class"] == "crash"
    assert recs[1]["node"] == "n1"


def test_export_jsonl(journal_url: str, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    r = run("export", journal_url, "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "exported 40 records" in r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["seq"] for x in recs] == list(range(1, 41))
    assert set(recs[0]) == {
        "seq",
        "utc",
        "mono",
        "node",
        "path",
        "kind",
        "data",
        "prev_hash",
        "hash",
    }
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(recs))
    r = run("export", journal_url, "--format", "jsonl")
    assert [json.loads(line) for line in r.stdout.splitlines()] == recs
    r = run("export", journal_url, "--format", "csv")
    assert r.exit_code == 2


def test_tail_follow_prints_new_records_until_interrupted(tmp_path: Path) -> None:
    """`tail -f` in a real process: new records appear as they are committed; SIGINT
    ends it with exit 0."""
    url = f"sqlite:///{tmp_path / 'j.db'}"
    with Journal(url) as journal:
        trellis.telemetry.emit("first.event", time=0.0)
        journal.flush()
        code = "import sys; from trellis.cli.journal import journal_group; journal_group()"
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "tail", "-f", "--json", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            # as from a terminal, even when the suite runs in the background (a shell's
            # `&` ignores SIGINT for what it starts, and Python keeps that)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        lines: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        out = proc.stdout
        reader = threading.Thread(target=lambda: [lines.put(x) for x in out], daemon=True)
        reader.start()
        try:
            assert json.loads(lines.get(timeout=30))["kind"] == "first.event"
            trellis.telemetry.emit("second.event", time=1.0, n=2)
            journal.flush()
            rec = json.loads(lines.get(timeout=30))
            assert (rec["seq"], rec["kind"], rec["data"]) == (2, "second.event", {"n": 2})
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
            reader.join(timeout=30)
            out.close()
            assert proc.stderr is not None
            proc.stderr.close()


# ---------------------------------------------------------------------------
# Which journal: plain paths, URL forms, and saying which one was read
# ---------------------------------------------------------------------------


def test_a_plain_file_path_is_a_sqlite_journal(
    journal_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = journal_url[len("sqlite:///") :]
    r = run("verify", path)  # an absolute path
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("ok: 40 records")
    assert r.stderr.splitlines()[0] == (
        f"journal: sqlite:///{path} (file {path}), from the argument"
    )
    monkeypatch.chdir(tmp_path)
    for given in ("j.db", "./j.db"):  # relative: to the working directory
        r = run("tail", "-n", "1", given)
        assert r.exit_code == 0, r.output
        assert r.stderr.splitlines()[0] == (
            f"journal: sqlite:///{given} (file {path}), from the argument"
        )
    r = run("export", "--journal", "j.db", "-o", str(tmp_path / "out.jsonl"))
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines()[0].endswith(", from --journal")
    r = run("verify", env={"TRELLIS_JOURNAL": "j.db"})
    assert r.exit_code == 0
    assert r.stderr.splitlines()[0].endswith(", from $TRELLIS_JOURNAL")
    r = run("verify", "missing.db")
    assert r.exit_code == 2
    assert "Error: no journal at sqlite:///missing.db: 'missing.db' does not exist" in r.stderr


def test_sqlite_url_forms_as_documented(
    journal_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/api.md: sqlite:///rel.db is relative to the working directory,
    sqlite:////abs/path.db (four slashes) is absolute."""
    path = journal_url[len("sqlite:///") :]
    assert journal_url.startswith("sqlite:////")
    monkeypatch.chdir(tmp_path.parent)
    rel = f"{tmp_path.name}/j.db"
    r = run("verify", f"sqlite:///{rel}")
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines()[0] == (
        f"journal: sqlite:///{rel} (file {path}), from the argument"
    )
    r = run("verify", "sqlite://j.db")
    assert r.exit_code == 2
    assert "three slashes before a relative path" in r.stderr


def test_the_only_journal_in_the_state_dir_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with Journal(f"sqlite:///{state}/shop.journal.db"):
        trellis.telemetry.emit("work.item", time=0.0)
    monkeypatch.setenv("TRELLIS_STATE_DIR", str(state))
    r = run("tail", env={"TRELLIS_JOURNAL": ""})
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines()[0] == (
        f"journal: sqlite:///{state}/shop.journal.db (file {state}/shop.journal.db), "
        f"from the only journal in {state}"
    )


def test_verify_with_an_anchor(journal_url: str, tmp_path: Path) -> None:
    path = journal_url[len("sqlite:///") :]
    env = {"TRELLIS_JOURNAL_KEY": KEY}
    r = run("verify", path, env=env)
    assert r.exit_code == 0, r.output
    assert f"anchor {path}.anchor: the journal holds its checkpoint at seq 40" in r.stdout
    r = run("verify", path, "--no-anchor", env=env)
    assert r.exit_code == 0
    assert "anchor" not in r.stdout
    r = run("verify", path, "--anchor", str(tmp_path / "none.anchor"), env=env)
    assert r.exit_code == 2
    assert f"Error: anchor '{tmp_path / 'none.anchor'}' does not exist" in r.stderr
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER journal_no_delete")
    conn.execute("DROP TRIGGER journal_checkpoints_no_delete")
    conn.execute("DELETE FROM journal")
    conn.execute("DELETE FROM journal_checkpoints")
    conn.close()
    r = run("verify", path, "--anchor", f"{path}.anchor", env=env)
    assert r.exit_code == 1
    assert r.stdout.splitlines()[0] == (
        "BROKEN at seq 1: the journal ends at seq 0 but the anchor covers seq 40: "
        "truncated (every record deleted)"
    )
    r = run("verify", path, "--no-anchor", env=env)
    assert r.exit_code == 1
    assert "the journal is empty, but a key was given" in r.stdout
    r = run("verify", path, "--no-anchor", "--max-unsigned", "5", "--anchor", "x", env=env)
    assert r.exit_code == 2
