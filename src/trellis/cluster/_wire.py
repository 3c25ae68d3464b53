"""What crosses between nodes: msgpack (msgspec) with registered ``msgspec.Struct`` types
(``trellis.message_type``), tuples kept as tuples. Nothing is ever unpickled: a payload
that is not valid msgpack, or names a type this node did not register, is refused."""

from __future__ import annotations

from typing import Any

from .._isolated._wire import Codec, UnsupportedMessage

__all__ = ["UnsupportedMessage", "decode", "encode"]

_codec: Codec | None = None


def _get() -> Codec:
    global _codec
    if _codec is None:
        _codec = Codec("msgpack")
    return _codec


def encode(value: Any) -> bytes:
    """msgpack bytes of ``value``; raises :class:`UnsupportedMessage` for what cannot cross."""
    return _get().encode(value)[4:]  # the codec frames for a pipe; NATS frames itself


def decode(data: bytes) -> Any:
    """The value in ``data``; raises :class:`UnsupportedMessage` (or ``msgspec``'s
    ``DecodeError``) for anything else."""
    return _get().decode(data)
