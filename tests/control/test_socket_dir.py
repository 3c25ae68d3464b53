"""The socket directory cannot be squatted: the server refuses a directory that is a
symlink, is not ours, or is open to others (checked with lstat), creates it 0700 in one
mkdir, and the client never sends its bearer token over a Unix socket."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from control._ctlenv import TOKEN
from trellis.cli.control import status
from trellis.control import ControlClient, ControlError, ControlServer

NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to chown to nobody")


@pytest.fixture
def xdg(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$XDG_RUNTIME_DIR is ``short_dir``: the default socket directory is
    ``short_dir/trellis``."""
    monkeypatch.delenv("TRELLIS_SOCKET", raising=False)
    monkeypatch.delenv("TRELLIS_TREE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_dir))
    return short_dir / "trellis"


async def _refused(match: str, **kwargs: object) -> None:
    ctl = ControlServer(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ControlError, match=match):
        await ctl.start()
    await ctl.stop()


# ---------------------------------------------------------------------------
# The default directory (/tmp/trellis-<uid> or $XDG_RUNTIME_DIR/trellis)
# ---------------------------------------------------------------------------


@needs_root
async def test_default_directory_owned_by_another_user_is_refused(xdg: Path) -> None:
    os.mkdir(xdg, 0o700)
    os.chown(xdg, NOBODY, NOBODY)
    await _refused(rf"{xdg} must be owned by uid 0 with mode 0700 \(it is uid {NOBODY}")
    assert os.listdir(xdg) == [], "nothing was created in someone else's directory"


async def test_default_directory_that_is_a_symlink_is_refused(xdg: Path, short_dir: Path) -> None:
    """A planted symlink to a directory of ours is refused too: lstat, not stat."""
    target = short_dir / "elsewhere"
    os.mkdir(target, 0o700)
    os.symlink(target, xdg)
    await _refused(f"{xdg} is a symbolic link")
    assert os.listdir(target) == []


async def test_default_directory_open_to_others_is_refused(xdg: Path) -> None:
    os.mkdir(xdg)
    os.chmod(xdg, 0o777)
    await _refused(r"must be owned by uid \d+ with mode 0700 \(it is uid \d+, mode 0777\)")


async def test_default_directory_is_created_0700_whatever_the_umask(xdg: Path) -> None:
    """One mkdir(0o700), checked after: 0700 with umask 0 (never wider), 0700 with a
    umask that takes owner bits away; the socket is 0600."""
    for mask in (0o000, 0o277):
        old = os.umask(mask)
        try:
            ctl = ControlServer(socket=True)
            await ctl.start()
        finally:
            os.umask(old)
        try:
            st = os.lstat(xdg)
            assert stat.S_ISDIR(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o700
            assert st.st_uid == os.getuid()
            sock = os.lstat(xdg / "control.sock")
            assert stat.S_ISSOCK(sock.st_mode)
            assert stat.S_IMODE(sock.st_mode) == 0o600
        finally:
            await ctl.stop()
        os.rmdir(xdg)


# ---------------------------------------------------------------------------
# A directory the operator chose
# ---------------------------------------------------------------------------


@needs_root
async def test_chosen_directory_owned_by_another_user_is_refused(short_dir: Path) -> None:
    d = short_dir / "theirs"
    os.mkdir(d, 0o755)
    os.chown(d, NOBODY, NOBODY)
    await _refused(f"{d} is owned by uid {NOBODY}, not uid 0 or root", socket=d / "c.sock")


async def test_chosen_directory_writable_by_others_is_refused(short_dir: Path) -> None:
    d = short_dir / "open"
    os.mkdir(d)
    os.chmod(d, 0o777)
    await _refused(r"writable by others \(mode 0777\) without the sticky bit", socket=d / "c.sock")
    os.chmod(d, 0o1777)  # like /tmp: others cannot remove or rename our socket
    ctl = ControlServer(socket=d / "c.sock")
    await ctl.start()
    await ctl.stop()


@needs_root
async def test_chosen_directory_behind_a_symlink_of_another_user_is_refused(
    short_dir: Path,
) -> None:
    target = short_dir / "target"
    os.mkdir(target, 0o700)
    link = short_dir / "link"
    os.symlink(target, link)
    os.lchown(link, NOBODY, NOBODY)
    await _refused(f"{link} is a symbolic link owned by uid {NOBODY}", socket=link / "c.sock")
    os.lchown(link, 0, 0)  # one of ours (like /var/run -> /run): followed
    ctl = ControlServer(socket=link / "c.sock")
    await ctl.start()
    try:
        assert stat.S_ISSOCK(os.lstat(target / "c.sock").st_mode)
    finally:
        await ctl.stop()


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------


class Recorder:
    """A Unix socket server that records each request and answers ``{}``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    continue
                if data:
                    self.requests.append(data)
                    body = b'{"root": {"path": "x", "id": "x", "state": "running"}}'
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: " + str(len(body)).encode() + b"\r\n"
                        b"connection: close\r\n\r\n" + body
                    )

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def recorder(short_dir: Path) -> Iterator[Recorder]:
    r = Recorder(short_dir / "rec.sock")
    try:
        yield r
    finally:
        r.close()


def test_the_client_never_sends_its_token_over_a_unix_socket(recorder: Recorder) -> None:
    """Whatever listens on the socket (a squatter, say) never sees the token: not from
    the library with token=, not from the CLI with --token or $TRELLIS_TOKEN."""
    with ControlClient(socket=recorder.path, token=TOKEN) as c:
        c.get("/v1/tree")
    runner = CliRunner()
    r = runner.invoke(status, ["--socket", str(recorder.path), "--token", TOKEN, "--json"], env={})
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        status, ["--socket", str(recorder.path), "--json"], env={"TRELLIS_TOKEN": TOKEN}
    )
    assert r.exit_code == 0, r.output
    assert len(recorder.requests) == 3
    for request in recorder.requests:
        assert b"authorization" not in request.lower(), request
        assert TOKEN.encode() not in request


@needs_root
async def test_the_client_refuses_a_default_directory_of_another_user(
    xdg: Path, short_dir: Path
) -> None:
    """`trellis status` does not talk to a socket in a default directory someone else
    made (nor follow a symlink there): exit 1, naming the directory."""
    os.mkdir(xdg, 0o700)
    squatter = Recorder(xdg / "shop.sock")
    try:
        os.chown(xdg, NOBODY, NOBODY)
        env = {"XDG_RUNTIME_DIR": str(short_dir)}
        for args in ([], ["--tree", "shop"]):
            r = await asyncio.to_thread(CliRunner().invoke, status, args, env=env)
            assert r.exit_code == 1, r.output
            assert f"{xdg} is owned by uid {NOBODY}, not by you" in r.output
        os.chown(xdg, 0, 0)
        real = short_dir / "real"
        os.rename(xdg, real)
        os.symlink(real, xdg)
        r = await asyncio.to_thread(CliRunner().invoke, status, [], env=env)
        assert r.exit_code == 1, r.output
        assert "is not a directory (a symlink?)" in r.output
    finally:
        squatter.close()
    assert squatter.requests == []
