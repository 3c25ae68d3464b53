"""What crosses the pipe between Trellis and an isolated server: length-prefixed frames
of msgpack (msgspec), or of pickle when the spec opts in.

A frame is ``[kind, ...]``. Tuples keep their type (msgpack has only arrays: a tuple
travels as an extension type), ``msgspec.Struct`` values travel tagged with their class
and come back as that class only if the receiving side registered it
(:func:`message_type`). Nothing else is reconstructed: no class is imported or
instantiated because a frame named it.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from collections.abc import Callable
from typing import Any, cast

import msgspec

from .._core._exceptions import TrellisError

__all__ = [
    "CALL",
    "CAST",
    "EXIT",
    "FAIL",
    "GO",
    "HELLO",
    "INFO",
    "READY",
    "REPLY",
    "REPLY_ERROR",
    "STOP",
    "TELEMETRY",
    "Codec",
    "FrameReader",
    "UnsupportedMessage",
    "message_type",
]

# parent -> child (GO: start the server, ``[GO, target, args, kwargs]``)
CALL, CAST, INFO, STOP, GO = 0, 1, 2, 3, 4
# child -> parent (HELLO: imports done, connected, waiting for GO)
REPLY, REPLY_ERROR, TELEMETRY, READY, FAIL, EXIT, HELLO = 10, 11, 12, 13, 14, 15, 16

HEADER = struct.Struct("!I")
MAX_FRAME = 256 * 1024 * 1024  # a larger length is a broken stream, not a message

_TUPLE = 1
_STRUCT = 2
_SCALARS = frozenset({str, int, float, bytes, bool, type(None)})
_types: dict[str, type[msgspec.Struct]] = {}


class UnsupportedMessage(TrellisError, TypeError):
    """A value that cannot cross to (or back from) an isolated server with its serializer.

    Raised at the caller of ``call``; the server is not touched."""


def message_type(cls: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """Register a ``msgspec.Struct`` class so values of it arrive as that class (use it as a
    class decorator in a module both sides import).

    Example::

        @trellis.message_type
        class Order(msgspec.Struct):
            symbol: str
            qty: int
    """
    if not (isinstance(cls, type) and issubclass(cls, msgspec.Struct)):
        raise TypeError(f"message_type takes a msgspec.Struct subclass, got {cls!r}")
    _types[_tag(cls)] = cls
    return cls


def _tag(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class Codec:
    """Encodes frames as msgpack (``"msgpack"``) or pickle (``"pickle"``: trusts the peer)."""

    __slots__ = ("_dec", "_enc", "decode", "encode", "name")

    def __init__(self, name: str = "msgpack") -> None:
        self.name = name
        if name == "pickle":
            self.encode: Callable[[Any], bytes] = _pickle_frame
            self.decode: Callable[[bytes], Any] = pickle.loads
            return
        if name != "msgpack":
            raise ValueError(f"serializer must be 'msgpack' or 'pickle', got {name!r}")
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(ext_hook=self._ext)
        enc = self._enc.encode
        pack = self._pack
        pack_header = HEADER.pack

        def encode(frame: Any) -> bytes:
            try:
                body = enc(pack(frame))
            except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as e:
                raise UnsupportedMessage(str(e)) from None
            return pack_header(len(body)) + body

        self.encode = encode
        self.decode = self._dec.decode

    def _pack(self, x: Any) -> Any:
        t = type(x)
        if t in _SCALARS:
            return x
        if t is list:
            return [self._pack(v) for v in x]
        if t is tuple:
            return msgspec.msgpack.Ext(_TUPLE, self._enc.encode([self._pack(v) for v in x]))
        if t is dict:
            return {self._pack(k): self._pack(v) for k, v in x.items()}
        if isinstance(x, msgspec.Struct):
            body = self._enc.encode(x)
            return msgspec.msgpack.Ext(_STRUCT, self._enc.encode([_tag(t), body]))
        if isinstance(x, set | frozenset):
            raise UnsupportedMessage(f"{t.__name__} values cannot be sent: use a list or tuple")
        return x  # msgspec knows datetimes, UUIDs, decimals, enums ...; else it raises

    def _ext(self, code: int, data: memoryview) -> Any:
        if code == _TUPLE:
            return tuple(self._dec.decode(data))
        if code == _STRUCT:
            tag, body = self._dec.decode(data)
            cls = _types.get(tag)
            if cls is None:
                raise UnsupportedMessage(
                    f"a {tag} value arrived but that type is not registered with "
                    "trellis.message_type on this side"
                )
            return msgspec.msgpack.decode(body, type=cls)
        raise UnsupportedMessage(f"unknown extension type {code}")


def cast_transport(transport: Any) -> asyncio.Transport:
    """The transport a protocol was given, typed as the stream transport it is (uvloop's
    transports implement the interface without subclassing ``asyncio.Transport``)."""
    return cast("asyncio.Transport", transport)


def _pickle_frame(frame: Any) -> bytes:
    try:
        body = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        raise UnsupportedMessage(f"cannot pickle: {e}") from None
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Splits a byte stream into frame bodies."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (size,) = HEADER.unpack_from(buf, pos)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes: the stream is broken")
            end = pos + 4 + size
            if end > n:
                break
            out.append(bytes(buf[pos + 4 : end]))
            pos = end
        if pos:
            del buf[:pos]
        return out
