"""Another user cannot pass for a running tree, or stop one from starting without being
named: in a shared sticky directory (like /tmp, allowed for ``socket=``) a lock file or
socket planted by another uid is refused with a message naming it and its owner, never
taken for "tree ... is already running"; a squatted default socket directory is named.
Run as root, with uid 65534 (nobody) as the other user."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import trellis.control._errors
import trellis.control._paths
from trellis._operate import Operations, OperationsError, TreeLocked, lock_tree
from trellis.control import ControlServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as uid 65534")

NOBODY = 65534
ROOT = Path(__file__).resolve().parents[2]
# trellis.control._errors and ._paths are imported above, before any fork (lock_tree
# imports them lazily; a child with another uid may not be able to read them).


@pytest.fixture
def sticky() -> Iterator[Path]:
    """A world-writable sticky directory, like /tmp."""
    d = Path(tempfile.mkdtemp(prefix="tsq-", dir="/tmp"))
    os.chmod(d, 0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _as_nobody(action: str, path: Path) -> tuple[int, int]:
    """Fork a process running as uid 65534 that does ``action`` on ``path`` ("lock":
    create, write ``1 shop`` and flock it; "create": only create it; "socket": bind a
    Unix socket there), reports on a pipe and holds on until the returned write end is
    closed: ``(pid, fd to close)``."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(ready_r)
            os.close(hold_w)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            if action == "socket":
                s = socket.socket(socket.AF_UNIX)
                s.bind(str(path))
                s.listen(1)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                if action == "lock":
                    os.write(fd, b"1 shop\n")
                    fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(ready_w, b"ok")
            os.read(hold_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(hold_r)
    assert os.read(ready_r, 2) == b"ok"
    os.close(ready_r)
    return pid, hold_w


def _release(pid: int, hold: int) -> None:
    os.close(hold)
    os.waitpid(pid, 0)


def test_a_lock_file_flocked_by_another_uid_is_not_a_running_tree(sticky: Path) -> None:
    sock = sticky / "shop.sock"
    pid, hold = _as_nobody("lock", Path(f"{sock}.lock"))
    try:
        with pytest.raises(OperationsError) as info:
            lock_tree(Operations(name="shop", node="n", socket=str(sock)))
        assert not isinstance(info.value, TreeLocked)
        message = str(info.value)
        assert "already running" not in message
        assert f"{sock}.lock" in message
        assert f"owned by uid {NOBODY}" in message
        assert "remove it" in message
    finally:
        _release(pid, hold)


def test_trellis_run_says_whose_lock_file_it_is(sticky: Path) -> None:
    """End to end: exit 2 with the owner named, not "already running (pid 1)"."""
    sock = sticky / "shop.sock"
    tree = sticky / "t.toml"
    tree.write_text(
        '[supervisor]\nname = "shop"\n[journal]\nenabled = false\n'
        f'[control]\nsocket = "{sock}"\n'
        '[[supervisor.children]]\nid = "a"\ncommand = ["sleep", "30"]\n'
    )
    pid, hold = _as_nobody("lock", Path(f"{sock}.lock"))
    try:
        r = subprocess.run(
            [sys.executable, "-m", "trellis", "run", str(tree)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            timeout=60,
            check=False,
        )
    finally:
        _release(pid, hold)
    assert r.returncode == 2, r.stderr
    assert "already running" not in r.stderr
    assert f"{sock}.lock is owned by uid {NOBODY}" in r.stderr


def test_an_unlocked_lock_file_of_another_uid_is_refused_too(sticky: Path) -> None:
    """Its owner could lock it at any time: it is not used at all."""
    sock = sticky / "shop.sock"
    pid, hold = _as_nobody("create", Path(f"{sock}.lock"))
    _release(pid, hold)
    with pytest.raises(OperationsError, match=f"owned by uid {NOBODY}"):
        lock_tree(Operations(name="shop", node="n", socket=str(sock)))


def test_a_symlinked_lock_file_is_refused(sticky: Path) -> None:
    sock = sticky / "shop.sock"
    target = sticky / "elsewhere"
    target.write_text("")
    os.symlink(target, f"{sock}.lock")
    with pytest.raises(OperationsError, match="not a regular file"):
        lock_tree(Operations(name="shop", node="n", socket=str(sock)))


def test_our_own_lock_is_still_already_running(sticky: Path) -> None:
    sock = sticky / "shop.sock"
    ops = Operations(name="shop", node="n", socket=str(sock))
    held = lock_tree(ops)
    try:
        with pytest.raises(TreeLocked, match=rf"already running \(pid {os.getpid()}\)"):
            lock_tree(ops)
    finally:
        held.release()


async def test_a_socket_file_of_another_uid_is_refused(sticky: Path) -> None:
    sock = sticky / "shop.sock"
    pid, hold = _as_nobody("socket", sock)
    try:
        ctl = ControlServer(socket=sock)
        with pytest.raises(trellis.control._errors.ControlError) as info:
            await ctl.start()
        message = str(info.value)
        assert f"{sock} is owned by uid {NOBODY}" in message
        assert "already listening" not in message
    finally:
        _release(pid, hold)


def test_a_squatted_default_socket_directory_is_named() -> None:
    """uid 65534 made /tmp/trellis-<victim uid> first: the victim's `lock_tree` says
    which directory and whose (it said "cannot open the lock file ...: Permission
    denied")."""
    victim = 54321
    directory = Path(f"/tmp/trellis-{victim}")
    if directory.exists():
        pytest.skip(f"{directory} exists already")
    os.mkdir(directory, 0o700)
    os.chown(directory, NOBODY, NOBODY)
    out_r, out_w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(out_r)
                os.environ.pop("XDG_RUNTIME_DIR", None)
                os.environ.pop("TRELLIS_SOCKET", None)
                os.setgroups([])
                os.setgid(victim)
                os.setuid(victim)
                sock = trellis.control._paths.default_socket_path("victim")
                try:
                    lock_tree(Operations(name="victim", node="n", socket=str(sock)))
                    os.write(out_w, b"locked")
                except OperationsError as e:
                    os.write(out_w, str(e).encode())
            finally:
                os._exit(0)
        os.close(out_w)
        with os.fdopen(out_r, "rb") as f:
            message = f.read().decode()
        os.waitpid(pid, 0)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert str(directory) in message
    assert f"uid {NOBODY}" in message
    assert "remove it" in message
    assert "Permission denied" not in message
