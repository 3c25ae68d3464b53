"""Where control sockets live, and whether a socket directory is safe to use.

Every tree run by ``trellis run`` listens on ``<socket_dir>/<name>.sock``; the directory
is ``$XDG_RUNTIME_DIR/trellis`` or ``/tmp/trellis-<uid>``. The second is guessable, so
another local user could create it first (and listen there, or point a symlink at a
directory of theirs): :func:`check_socket_dir` refuses a directory that is a symlink,
is not ours, or is open to others, and :func:`make_socket_dir` creates it with mode
0700 in one ``mkdir`` and then checks what it got.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from ._errors import ControlError

__all__ = [
    "MAX_SOCKET_PATH",
    "check_socket_dir",
    "default_socket_path",
    "make_socket_dir",
    "socket_dir",
    "tree_name",
    "tree_socket_path",
]

#: The longest Unix socket path Linux accepts (``sun_path`` is 108 bytes with the NUL).
MAX_SOCKET_PATH = 107


def socket_dir() -> Path:
    """The directory for control sockets: ``$XDG_RUNTIME_DIR/trellis`` when
    ``XDG_RUNTIME_DIR`` is set, else ``/tmp/trellis-<uid>``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "trellis"
    return Path(f"/tmp/trellis-{os.getuid()}")


def tree_name(name: str) -> str:
    """``name`` as a socket file stem: characters other than letters, digits, ``.``,
    ``_`` and ``-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def tree_socket_path(name: str) -> Path:
    """The socket of the tree named ``name`` in :func:`socket_dir` (``$TRELLIS_SOCKET``
    does not apply: a name chooses among the trees in the directory).

    Example::

        tree_socket_path("shop")  # /run/user/1000/trellis/shop.sock
    """
    return socket_dir() / f"{tree_name(name)}.sock"


def default_socket_path(name: str | None = None) -> Path:
    """The control socket path: ``$TRELLIS_SOCKET`` if set, else ``<socket_dir>/<name>.sock``
    (``control.sock`` without a name), where ``socket_dir`` is ``$XDG_RUNTIME_DIR/trellis``
    or ``/tmp/trellis-<uid>``.

    Example::

        default_socket_path()        # /run/user/1000/trellis/control.sock
        default_socket_path("shop")  # /run/user/1000/trellis/shop.sock
    """
    env = os.environ.get("TRELLIS_SOCKET")
    if env:
        return Path(env)
    return tree_socket_path(name) if name else socket_dir() / "control.sock"


def check_socket_dir(directory: Path, *, private: bool) -> None:
    """Raise :class:`ControlError` unless ``directory`` is safe for a control socket.

    ``private`` (the default socket directory, whose name anyone can guess): a real
    directory (not a symlink: checked with ``lstat``) owned by our uid with no access
    for group or others (0700).

    Otherwise (a directory the operator chose): a symlink is followed only if root or we
    own it; the directory must be owned by us or root and not writable by group or
    others, unless it has the sticky bit (like ``/tmp``: others cannot remove or rename
    our socket there).
    """
    me = os.getuid()
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        raise ControlError(f"socket: the directory {directory} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        if private:
            raise ControlError(
                f"socket: {directory} is a symbolic link; the socket directory must be a "
                "real directory of ours (someone may have planted it): remove it"
            )
        if st.st_uid not in (me, 0):
            raise ControlError(
                f"socket: {directory} is a symbolic link owned by uid {st.st_uid} (not uid "
                f"{me} or root): refusing to follow it"
            )
        st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"socket: {directory} is not a directory")
    mode = stat.S_IMODE(st.st_mode)
    if private:
        if st.st_uid != me or mode & 0o077:
            whose = (
                f"another user (uid {st.st_uid}) may have created it first: remove it (as "
                f"uid {st.st_uid} or root)"
                if st.st_uid != me
                else "fix its mode (chmod 0700) or remove it"
            )
            raise ControlError(
                f"socket: the socket directory {directory} must be owned by uid {me} with "
                f"mode 0700 (it is uid {st.st_uid}, mode {mode:04o}); {whose}, or choose "
                "another place for the socket (--socket, [control] socket or "
                "$XDG_RUNTIME_DIR)"
            )
        return
    if st.st_uid not in (me, 0):
        raise ControlError(
            f"socket: {directory} is owned by uid {st.st_uid}, not uid {me} or root: "
            "its owner could replace the socket; choose a directory of ours"
        )
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise ControlError(
            f"socket: {directory} is writable by others (mode {mode:04o}) without the "
            "sticky bit: anyone could replace the socket; use a directory with mode 0700"
        )


def make_socket_dir(directory: Path, *, private: bool) -> None:
    """Create ``directory`` (mode 0700) if missing, then :func:`check_socket_dir` it.

    The directory itself is made with one ``mkdir(0o700)``: either we create it, closed
    from the start, or it existed and is checked like any other. Missing parents (only
    for a directory the operator chose) are created with the default mode.
    """
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        if private:
            raise ControlError(
                f"socket: cannot create {directory}: its parent is missing"
            ) from None
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise ControlError(f"socket: cannot create {directory}: {e.strerror or e}") from e
    except OSError as e:
        raise ControlError(f"socket: cannot create {directory}: {e.strerror or e}") from e
    else:
        st = os.lstat(directory)
        # The umask may have taken owner bits away (never added any): make it 0700.
        mine = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
        if mine and stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(directory, 0o700)
    check_socket_dir(directory, private=private)
