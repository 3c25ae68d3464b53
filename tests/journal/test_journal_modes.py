"""File modes: the journal's database, WAL, SHM and anchor files are 0600, the state
directory 0700 (created so, an open one of ours tightened, someone else's refused)."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import trellis
from trellis._operate import OperationsError, operations
from trellis.journal import Journal

KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_database_wal_shm_and_anchor_are_0600(tmp_path: Path, umask022: None) -> None:
    if True:
        path = tmp_path / "j.db"
        with Journal(f"sqlite:///{path}", key=KEY) as journal:
            trellis.telemetry.emit("work.item", time=0.0)
            journal.flush()
            modes = {
                p.name: stat.S_IMODE(p.stat().st_mode)
                for p in tmp_path.iterdir()
                if p.name.startswith("j.db")
            }
        anchor = stat.S_IMODE((tmp_path / "j.db.anchor").stat().st_mode)
    assert {"j.db", "j.db-wal", "j.db-shm"} <= set(modes)
    assert set(modes.values()) == {0o600}, modes
    assert anchor == 0o600


def test_an_existing_database_readable_by_others_is_made_0600(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "j.db"
    with Journal(f"sqlite:///{path}"):
        pass
    os.chmod(path, 0o644)
    with Journal(f"sqlite:///{path}"):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"{path} was readable by others; its mode is now 0600" in caplog.text


def test_the_state_directory_is_created_0700(
    tmp_path: Path, umask022: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state" / "trellis"
    monkeypatch.setenv("TRELLIS_STATE_DIR", str(state))
    ops = operations("shop", {})
    assert ops.journal_url == f"sqlite:///{state}/shop.journal.db"
    assert mode(state) == 0o700


def test_an_open_state_directory_of_ours_is_made_0700(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    monkeypatch.setenv("TRELLIS_STATE_DIR", str(state))
    with caplog.at_level(logging.WARNING, "trellis.journal"):
        operations("shop", {})
    assert mode(state) == 0o700
    assert f"journal: {state} was open to others (mode 0755); its mode is now 0700" in caplog.text


def test_a_symlinked_or_foreign_state_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    state = tmp_path / "state"
    state.symlink_to(elsewhere)
    monkeypatch.setenv("TRELLIS_STATE_DIR", str(state))
    with pytest.raises(OperationsError, match=f"journal: {state} is not a directory"):
        operations("shop", {})
    if os.getuid() != 0:
        return  # chown needs root: the ownership case runs where the tests run as root
    state.unlink()
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    with pytest.raises(
        OperationsError,
        match=f"journal: {state} must be owned by uid 0 with mode 0700 "
        r"\(it is uid 65534, mode 0700\); fix or remove it",
    ):
        operations("shop", {})


def test_a_directory_the_user_named_is_created_0700_and_otherwise_left_alone(
    tmp_path: Path, umask022: None
) -> None:
    made = tmp_path / "made"
    operations("shop", {}, journal=f"sqlite:///{made}/j.db")
    assert mode(made) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    operations("shop", {}, journal=f"sqlite:///{shared}/j.db")
    assert mode(shared) == 0o755  # the user's choice; the journal's files are 0600


def test_the_tree_file_names_the_anchor(tmp_path: Path) -> None:
    """``[journal] anchor``: a path relative to the tree file, or false for none."""
    from trellis.config import ConfigError, load

    tree = tmp_path / "tree.toml"
    body = '[supervisor]\nname = "t"\n[journal]\nkey_env = "K"\nanchor = "audit/t.anchor"\n'
    tree.write_text(body)
    ops = operations("t", load(tree).settings, environ={"K": KEY})
    assert ops.journal_options["anchor"] == str(tmp_path / "audit" / "t.anchor")
    journal = Journal(ops.journal_url or "", **ops.journal_options)
    assert journal.anchor_path == str(tmp_path / "audit" / "t.anchor")
    tree.write_text(body.replace('"audit/t.anchor"', "false"))
    ops = operations("t", load(tree).settings, environ={"K": KEY})
    assert Journal(ops.journal_url or "", **ops.journal_options).anchor_path is None
    tree.write_text(body.replace('"audit/t.anchor"', "3"))
    with pytest.raises(ConfigError, match="anchor is a file path or true/false, got 3"):
        load(tree)


def test_the_tree_file_names_an_anchor_command(tmp_path: Path) -> None:
    from trellis.config import ConfigError, load

    tree = tmp_path / "tree.toml"
    body = '[supervisor]\nname = "t"\n[journal]\nanchor_command = ["logger", "-t", "a"]\n'
    tree.write_text(body)
    ops = operations("t", load(tree).settings, environ={})
    assert Journal(ops.journal_url or "", **ops.journal_options).anchor_command == [
        "logger",
        "-t",
        "a",
    ]
    tree.write_text(body.replace('["logger", "-t", "a"]', "[]"))
    with pytest.raises(ConfigError, match="anchor_command"):
        load(tree)
    with pytest.raises(ValueError, match="anchor_command: 'logger' is not a list"):
        Journal("sqlite:///x.db", anchor_command="logger")
