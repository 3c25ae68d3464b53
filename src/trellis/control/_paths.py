"""Where the control socket lives by default."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["default_socket_path", "socket_dir"]

#: The longest Unix socket path Linux accepts (``sun_path`` is 108 bytes with the NUL).
MAX_SOCKET_PATH = 107


def socket_dir() -> Path:
    """The directory for control sockets: ``$XDG_RUNTIME_DIR/trellis`` when
    ``XDG_RUNTIME_DIR`` is set, else ``/tmp/trellis-<uid>``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "trellis"
    return Path(f"/tmp/trellis-{os.getuid()}")


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
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name) if name else "control"
    return socket_dir() / f"{stem}.sock"
